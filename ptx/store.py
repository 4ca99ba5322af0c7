"""The tracker seam's plain half, free of MLflow: the records queries answer with, where the store is (URI,
reachability), the stage skeleton written once over any tracker, the tracker that stores nothing, and the names and
paths runs are logged under. `ptx.track` (the only MLflow user) builds on it and re-exports what its callers use.
"""

import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ptx.errors import PtxError

DEFAULT_EXPERIMENT = "ptx"


@dataclass(frozen=True)
class RunRecord:
    """One run as ptx reads it: what the store holds, as plain values (no MLflow object escapes ptx.track)."""

    run_id: str
    name: str
    experiment_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    start_time: int  # ms since the epoch
    end_time: int | None = None
    artifact_uri: str = ""
    tags: dict = field(default_factory=dict, compare=False)
    params: dict = field(default_factory=dict, compare=False)
    metrics: dict = field(default_factory=dict, compare=False)  # the latest value of each metric
    datasets: tuple = field(default=(), compare=False)  # DatasetRecord per logged input

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset input of a run (see `Tracker.log_datasets`)."""

    name: str
    digest: str
    source_type: str
    source: str  # JSON: {"uri": ...}
    profile: str  # JSON: rows, task, split
    context: str | None  # train, dev...


@dataclass(frozen=True)
class MetricPoint:
    step: int
    value: float
    timestamp: int = 0


def outage_wait_tries() -> int:
    """How many /health probes a (re)starting trial and the finalising driver make while the server is down
    (pauses of 2, 4, 6 ... s: 8 tries wait about 56 s); PTX_MLFLOW_WAIT_TRIES changes it (tests shorten it)."""
    raw = os.environ.get("PTX_MLFLOW_WAIT_TRIES", "8")
    if not raw.isdigit() or int(raw) < 1:
        raise PtxError(f"PTX_MLFLOW_WAIT_TRIES: expected a whole number >= 1, found {raw!r}")
    return int(raw)


def resolve_tracking_uri(uri: str | None, workdir: str | Path) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("file:") or (("://" not in uri) and not uri.startswith("databricks")):
            raise PtxError(f"tracking URI '{uri}': the file store is not supported by MLflow 3; use "
                           "sqlite:///ABS/PATH/mlflow.db or http://HOST:PORT")
        return uri
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


def wait_reachable(uri: str, tries: int = 3, delay: float = 1.0, timeout: float = 3.0) -> None:
    """For an http(s) URI, check the server answers /health (bounded retries); raise naming the URI."""
    if not uri.startswith(("http://", "https://")):
        return
    last = None
    for attempt in range(tries):  # worst case tries * timeout + delay * tries * (tries - 1) / 2 seconds (12 s)
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:  # URLError and socket timeouts are OSErrors
            last = exc
        if attempt + 1 < tries:
            time.sleep(delay * (attempt + 1))
    raise PtxError(f"MLflow tracking server {uri} is unreachable after {tries} tries ({last})")


@dataclass(frozen=True)
class StageRun:
    """The run a `Tracker.run` block writes to, or the finished run it reuses (`reused`: nothing to compute)."""

    run_id: str | None
    reused: RunRecord | None = None


@contextmanager
def run_block(store, name: str, tags: dict, parent_run_id: str | None, reuse: bool):
    """The stage skeleton, one implementation for every tracker (see `ptx.track.MlflowTracker.run`)."""
    digest = tags.get("ptx.config_hash")
    done = store.finished_run(tags["ptx.kind"], digest) if reuse and digest else None
    if done is not None:
        yield StageRun(done.run_id, done)
        return
    run_id = store.start_run(name, tags, parent_run_id)
    try:
        yield StageRun(run_id)
    except BaseException:
        store.finish(run_id, "FAILED")
        raise
    store.finish(run_id)


@dataclass
class NullTracker:
    """A tracker that stores nothing (`ptx train --no-track`): runs have no id, logging is a no-op, queries find
    nothing, and asking for a stored run or artifact is a PtxError."""

    experiment: str = DEFAULT_EXPERIMENT
    workdir: Path | None = None
    uri = ""
    experiment_id = None
    enabled = False
    skip_points: set = field(default_factory=set)

    def _none(self, what: str):
        raise PtxError(f"{what}: no MLflow store is configured (tracking is off)")

    def for_experiment(self, name: str, workdir=None) -> "NullTracker":
        return NullTracker(name, workdir if workdir is not None else self.workdir)

    def run(self, name, tags, parent_run_id=None, reuse=True):
        return run_block(self, name, tags, parent_run_id, reuse)

    def start_run(self, name, tags, parent_run_id=None) -> None:
        return None

    def log(self, run_id, metrics=None, step=0, params=None, tags=None) -> None:
        pass

    def set_tags(self, run_id, tags) -> None:
        pass

    def log_curve(self, run_id, curve) -> None:
        pass

    def metric_history(self, run_id, key) -> list[MetricPoint]:
        return []

    def stored_points(self, run_id, keys) -> set:
        return set()

    def log_datasets(self, run_id, splits) -> None:
        pass

    def copy_datasets(self, run_ids, to_run_id) -> None:
        pass

    def runs_on_dataset(self, name, digest=None, context=None, experiment_ids=None) -> list[RunRecord]:
        return []

    def link_runs(self, run_id, links) -> None:
        pass

    def system_metrics(self, run_id, enabled, interval=10.0):
        return nullcontext()

    def log_artifacts(self, run_id, local_dir, artifact_path=None) -> None:
        pass

    def log_table(self, run_id, table, artifact_path, file) -> None:
        pass

    def read_table(self, run_id, artifact_path, file):
        self._none(f"run '{run_id}'")

    def finish(self, run_id, status="FINISHED") -> None:
        pass

    def reopen(self, run_id) -> None:
        pass

    def get_run(self, run_id) -> RunRecord:
        self._none(f"run '{run_id}'")

    def find_runs(self, tags=None, status="FINISHED", order_by=None, max_results=5000,
                  experiment_ids=None) -> list[RunRecord]:
        return []

    def all_experiment_ids(self) -> list[str]:
        return []

    def experiment_id_of(self, name) -> None:
        return None

    def all_experiment_names(self) -> list[str]:
        return []

    def finished_run(self, kind, config_hash) -> None:
        return None

    def download(self, run_id, artifact_path, out_dir) -> Path:
        self._none(f"run '{run_id}'")


def run_name(*parts) -> str:
    """A run name readable at a glance: the parts that say what it is, joined by a middle dot."""
    return " · ".join(str(p) for p in parts if p not in (None, ""))


def artifact_target(out: Path, root: str, path: str, run_id: str = "?") -> Path:
    """Where artifact `path` (under `root`) lands inside `out`; PtxError if it would land outside `out`."""
    out = Path(out).resolve()
    pure, base = PurePosixPath(path), PurePosixPath(root)
    # MLflow refuses '..' when logging, but a store or server we do not control may still list one
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or not pure.is_relative_to(base):
        raise PtxError(f"run '{run_id}': artifact path '{path}' would escape {out}; refusing to download")
    target = (out / pure.relative_to(base)).resolve()
    if not target.is_relative_to(out):  # e.g. a symlink inside `out`
        raise PtxError(f"run '{run_id}': artifact path '{path}' would escape {out}; refusing to download")
    return target


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
