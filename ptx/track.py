"""Everything MLflow: the store every later stage reads from (runs, lineage tags, artifacts, queries).

The only module that imports mlflow. `open(uri, experiment, workdir)` is the one way to a tracker, `TrackerRef` the
picklable form Ray workers and job dicts carry. Callers code against the `Tracker` protocol below (what the stages
use); `MlflowTracker` implements it, plus MLflow-only extras, and `NullTracker` (ptx.store) tracks nothing. The
bank is free functions over the protocol (ptx.bank); the plain half of the seam (records, URIs, the run skeleton)
is ptx.store. Every query answers with ptx records (`RunRecord`, `MetricPoint`), never MLflow objects.

Only the client API is used, with explicit run ids, so this works whether or not an MLflow run is active in
the process (inside a Ray trial, a notebook, a script that already called mlflow.start_run).
"""

import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

# re-exported: callers reach the seam's plain parts (ptx.store, ptx.bank) through this module as before
from ptx.bank import KIND_PROMPT as KIND_PROMPT
from ptx.bank import PROMPT_ARTIFACT as PROMPT_ARTIFACT
from ptx.bank import is_vanilla as is_vanilla
from ptx.bank import prompt_dir as prompt_dir
from ptx.errors import PtxError
from ptx.store import DEFAULT_EXPERIMENT as DEFAULT_EXPERIMENT
from ptx.store import DatasetRecord, MetricPoint, RunRecord, artifact_target, flatten, run_block
from ptx.store import NullTracker as NullTracker
from ptx.store import StageRun as StageRun
from ptx.store import outage_wait_tries as outage_wait_tries
from ptx.store import resolve_tracking_uri as resolve_tracking_uri
from ptx.store import run_name as run_name
from ptx.store import wait_reachable as wait_reachable

log = logging.getLogger(__name__)

# the run kinds that readers below the stage layer (ptx.report) look for; each stage module declares its own KIND
KIND_TRANSFER, KIND_INDICATORS, KIND_PROJECTOR = "transfer", "indicators", "projector"
# MLflow 3's UI opens an experiment by its kind: model training goes to the runs table (not the GenAI overview)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's own HTTP retries back off for minutes; keep a dead server's cost bounded (seconds), then fail clearly
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # prompts are small; bars garble CLI errors


# MLflow's usage telemetry, off unless the environment says otherwise: on import its client stores a session id in
# os.environ and a background thread removes it again when the telemetry endpoint cannot be reached (any offline
# node). That removal races with `requests` iterating os.environ for proxy settings in the same process: at 500
# trials (benchmarks/bench_scale.py) two trials' first log-batch failed with KeyError('_MLFLOW_TELEMETRY_SESSION_ID').
# It has to be in the environment before mlflow is imported: the CLI sets it first thing, `sweep.connect` passes it
# to every Ray worker.
TELEMETRY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def disable_telemetry() -> dict:
    """Turn MLflow's telemetry off for this process (and the subprocesses it starts) unless the environment set it;
    returns the variables as set, for a Ray runtime_env."""
    for key, value in TELEMETRY_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in TELEMETRY_ENV}


def configure_client() -> None:
    """Set ptx's MLflow client defaults (bounded HTTP retries, no progress bars) unless the environment sets them.

    Called where a tracker is created, not at import: importing ptx changes nothing in the process."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def _record(run) -> RunRecord:
    info, data = run.info, run.data
    inputs = getattr(run, "inputs", None)
    datasets = tuple(DatasetRecord(d.dataset.name, d.dataset.digest, d.dataset.source_type, d.dataset.source,
                                   d.dataset.profile,
                                   next((t.value for t in d.tags if t.key == "mlflow.data.context"), None))
                     for d in (inputs.dataset_inputs if inputs is not None else ()))
    return RunRecord(info.run_id, info.run_name or "", info.experiment_id, info.status, info.start_time or 0,
                     info.end_time, info.artifact_uri or "", dict(data.tags), dict(data.params), dict(data.metrics),
                     datasets)


# Every request to a basic-auth server is checked with a deliberately slow password hash (~0.5-2 s of CPU);
# dozens of trials logging would queue on it, so a verified login is cached this long per server worker (a
# password change then takes up to this long to reach every worker).
AUTH_CACHE_TTL_S = 300


def prepare_basic_auth(workdir: str | Path, auth_db_uri: str, admin_username: str,
                       writer: tuple[str, str] | None) -> Path:
    """Write the settings of MLflow's basic-auth app (accounts in `auth_db_uri`) to WORKDIR/basic_auth.ini and
    create or update the non-admin writer account (name, password) that trials log in with. The admin account
    is bootstrapped by the server itself from MLFLOW_AUTH_ADMIN_PASSWORD. Returns the settings file."""
    if writer and writer[0] == admin_username:
        raise PtxError(f"--writer-user {writer[0]!r} is the admin account: trials must log in as a non-admin one")
    text = (f"[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {auth_db_uri.replace('%', '%%')}\n"  # configparser interpolates %
            f"admin_username = {admin_username}\n"
            f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"grant_default_workspace_access = false\nauth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
    path = Path(workdir) / "basic_auth.ini"
    tmp = path.with_name(path.name + ".tmp")
    # 0600: the database URI may carry a password
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    if writer:
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore()
        store.init_db(auth_db_uri)  # creates or migrates the account tables (their own alembic version table)
        if store.has_user(writer[0]):
            store.update_user(writer[0], password=writer[1], is_admin=False)
        else:
            store.create_user(writer[0], writer[1], is_admin=False)
    return path


@runtime_checkable
class Tracker(Protocol):
    """What the stages need of a store: runs with lineage tags, metrics, artifacts and queries.

    `MlflowTracker` is the real one; `NullTracker` tracks nothing. Queries return `RunRecord`s. The bank is free
    functions over these members (ptx.bank); MLflow-only extras (datasets, system metrics, run links, the UI's
    address) are plain `MlflowTracker` methods, not part of the seam."""

    uri: str
    experiment: str
    experiment_id: str | None
    enabled: bool  # False for the NullTracker: nothing is stored, queries find nothing

    def for_experiment(self, name: str, workdir=None) -> "Tracker": ...
    def run(self, name: str, tags: dict, parent_run_id: str | None = None, reuse: bool = True): ...
    def start_run(self, name: str, tags: dict, parent_run_id: str | None = None) -> str | None: ...
    def log(self, run_id, metrics: dict | None = None, step: int = 0, params: dict | None = None,
            tags: dict | None = None) -> None: ...
    def finish(self, run_id, status: str = "FINISHED") -> None: ...
    def get_run(self, run_id: str) -> RunRecord: ...
    def find_runs(self, tags: dict | None = None, status: str | None = "FINISHED", order_by: list | None = None,
                  max_results: int = 5000, experiment_ids: list | None = None) -> list[RunRecord]: ...
    def finished_run(self, kind: str, config_hash: str) -> RunRecord | None: ...
    def all_experiment_ids(self) -> list[str]: ...
    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]: ...
    def log_artifacts(self, run_id, local_dir, artifact_path: str | None = None) -> None: ...
    def download(self, run_id: str, artifact_path: str, out_dir) -> Path: ...
    def log_table(self, run_id, table, artifact_path: str, file: str) -> None: ...
    def read_table(self, run_id: str, artifact_path: str, file: str): ...


@dataclass(frozen=True)
class TrackerRef:
    """A store and experiment as plain values (picklable): what Ray workers and job dicts carry; `.open()` there."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    workdir: str | None = None

    def open(self) -> "MlflowTracker":
        return open(self.uri, self.experiment, self.workdir)


def open(uri: str | None, experiment: str = DEFAULT_EXPERIMENT, workdir: str | Path | None = None) -> "MlflowTracker":
    """The one way to a tracker on a store: `uri` (else $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db:
    `resolve_tracking_uri`), on experiment `experiment` (made when missing; a sqlite store keeps its artifacts
    under `<workdir>/artifacts`). A drop-in for `MlflowTracker(uri, experiment, workdir=workdir)`."""
    if workdir is None and not (uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise PtxError("tracker: no tracking URI, no $MLFLOW_TRACKING_URI and no workdir for a sqlite store")
    uri = resolve_tracking_uri(uri, workdir if workdir is not None else ".")  # "." is never used: a URI is known
    return MlflowTracker(uri, experiment, workdir=Path(workdir) if workdir is not None else None)


@dataclass
class MlflowTracker:
    """A handle on one MLflow store and experiment."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    workdir: Path | None = None
    # (run id, metric key, step) points already in the store that `log` must not send again: a retried trial
    # re-runs steps an earlier attempt may have logged (see ptx.sweep.prompt_trainable)
    skip_points: set = field(default_factory=set)
    enabled = True

    def __post_init__(self):
        configure_client()
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables": noise
        wait_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)  # for this module (and tests that read the store)
        self.experiment_id = self._experiment_id(self.experiment)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before ptx tagged its experiments
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") and self.workdir is not None:
            location = (Path(self.workdir).resolve() / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another process created it a moment ago
            return self.client.get_experiment_by_name(name).experiment_id

    def ref(self) -> TrackerRef:
        """This store and experiment as a picklable `TrackerRef` (for Ray workers and job dicts)."""
        return TrackerRef(self.uri, self.experiment, str(self.workdir) if self.workdir is not None else None)

    def for_experiment(self, name: str, workdir: str | Path | None = None) -> "MlflowTracker":
        """This tracker when it is on experiment `name`, else one on the same store that is."""
        if name == self.experiment:
            return self
        return open(self.uri, name, workdir if workdir is not None else self.workdir)

    # ---- runs ---------------------------------------------------------------------------------------
    def run(self, name: str, tags: dict, parent_run_id: str | None = None, reuse: bool = True):
        """The stage skeleton, a context manager: the FINISHED run of `tags`' ptx.kind and ptx.config_hash when
        there is one (and `reuse`), yielded as `StageRun(run_id, reused=record)` with nothing else done; else a new
        run (`StageRun(run_id)`), finished when the block ends and marked FAILED when it raises."""
        return run_block(self, name, tags, parent_run_id, reuse)

    def start_run(self, name: str, tags: dict, parent_run_id: str | None = None) -> str:
        """Create a run (RUNNING) with lineage tags; returns its id."""
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, metrics: dict | None = None, step: int = 0, params: dict | None = None,
            tags: dict | None = None) -> None:
        """Log metrics at `step`, params and tags in one batched request."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, v in (metrics or {}).items()
              if v is not None and (run_id, k, int(step)) not in self.skip_points]
        ps = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items() if v is not None]
        n = max(-(-len(ms) // 1000), -(-len(ps) // 100), -(-len(ts) // 100))  # MLflow's per-request caps
        for b in range(n):
            self.client.log_batch(run_id, metrics=ms[b * 1000:(b + 1) * 1000], params=ps[b * 100:(b + 1) * 100],
                                  tags=ts[b * 100:(b + 1) * 100])

    def set_tags(self, run_id: str, tags: dict) -> None:
        """Set (or overwrite) tags of a run."""
        self.log(run_id, tags=tags)

    def log_curve(self, run_id: str, curve: list[dict]) -> None:
        """Log a whole learning curve ([{step, key: value}]) in batched requests; points the store already has
        (same key and step) are skipped, so a curve can be resent after an outage without duplicates."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        stored = self.stored_points(run_id, {k for p in curve for k in p if k != "step"})
        ms = [Metric(k, float(v), now, int(p["step"])) for p in curve for k, v in p.items()
              if k != "step" and v is not None and (run_id, k, int(p["step"])) not in stored]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i:i + 1000])

    def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every logged point of one metric of a run, in the store's order."""
        return [MetricPoint(int(m.step), float(m.value), int(m.timestamp or 0))
                for m in self.client.get_metric_history(run_id, key)]

    def stored_points(self, run_id: str, keys) -> set:
        """The (run id, key, step) points of these metric keys that the store holds for a run."""
        return {(run_id, k, p.step) for k in keys for p in self.metric_history(run_id, k)}

    def log_datasets(self, run_id: str, splits: list[dict]) -> None:
        """Record the data a run used (`ptx.data.describe_split` records, plus a `context` such as train or dev) as
        MLflow dataset inputs: the UI's Dataset column, and `runs_on_dataset` finds them later."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], json.dumps({"uri": d["source"]}),
                                       profile=json.dumps({"num_rows": d["rows"], "task": d["task"],
                                                           "split": d["split"]})),
                               [InputTag("mlflow.data.context", d.get("context", d["split"]))]) for d in splits]
        self._log_inputs(run_id, inputs)

    def _log_inputs(self, run_id: str, inputs: list) -> None:
        """log_inputs, once more when it lost the dataset-key race: MLflow looks a dataset up by (experiment, name,
        digest) and inserts it when missing, so two trials logging the same split at once into a fresh store both
        insert and the slower one fails on the key. The store rolls the failed call back whole; its retry finds the
        winner's row."""
        for attempt in range(DATASET_RACE_TRIES):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except Exception as exc:
                if attempt + 1 == DATASET_RACE_TRIES or not _duplicate_key(exc):
                    raise
                log.info("dataset inputs of run %s raced another writer; retrying", run_id)
                time.sleep(0.2 * (attempt + 1))

    def copy_datasets(self, run_ids, to_run_id: str) -> None:
        """Log on `to_run_id` (e.g. a sweep's parent run) every dataset input the runs `run_ids` logged, once."""
        from mlflow.entities import DatasetInput

        seen = {}
        for rid in run_ids:
            for d in self.client.get_run(rid).inputs.dataset_inputs:
                key = (d.dataset.name, d.dataset.digest, tuple((t.key, t.value) for t in d.tags))
                seen.setdefault(key, DatasetInput(d.dataset, d.tags))
        if seen:
            self._log_inputs(to_run_id, list(seen.values()))

    def experiment_url(self, base: str) -> str:
        """The experiment's runs table in the MLflow UI at `base` (model-training view, not the GenAI overview)."""
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

    def runs_on_dataset(self, name: str, digest: str | None = None, context: str | None = None,
                        experiment_ids: list | None = None) -> list[RunRecord]:
        """Every run (any status) that logged dataset `name` (e.g. "sst2/train"), optionally of one digest/context."""
        for v in (name, digest, context):
            if v is not None and ("'" in v or "\\" in v):
                raise PtxError(f"dataset filter {v!r}: quotes and backslashes are not allowed in a search value")
        clauses = [f"dataset.name = '{name}'"] + ([f"dataset.digest = '{digest}'"] if digest else [])
        runs = [_record(r) for r in self.client.search_runs(experiment_ids or self.all_experiment_ids(),
                                                            " and ".join(clauses), max_results=5000)]

        def used(run: RunRecord) -> bool:  # MLflow matches each clause against any of a run's inputs: check one input
            return any(d.name == name and digest in (None, d.digest) and context in (None, d.context)
                       for d in run.datasets)

        return [r for r in runs if used(r)]

    def link_runs(self, run_id: str, links: dict) -> None:
        """Link a run to others ({label: run id}): a `ptx.link.LABEL` tag each, and a description in the UI whose
        entries open the linked runs."""
        links = {k: v for k, v in links.items() if v}
        lines = ["Runs this one draws on:", ""]
        for label, rid in links.items():
            exp = self.client.get_run(rid).info.experiment_id
            lines.append(f"- [{label}](#/experiments/{exp}/runs/{rid}) `{rid}`")
        self.log(run_id, tags={**{f"ptx.link.{_tag_key(k)}": v for k, v in links.items()},
                               "mlflow.note.content": "\n".join(lines)})

    @contextmanager
    def system_metrics(self, run_id: str | None, enabled: bool, interval: float = 10.0):
        """While the block runs, sample CPU/GPU utilisation and memory into the run as `system/*` metrics (MLflow's
        monitor; GPU figures need the nvidia-ml-py package). Off unless `enabled` (ptx enables it on GPU runs)."""
        if not enabled or run_id is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_table(self, run_id: str, table, artifact_path: str, file: str) -> None:
        """Log a pyarrow table as `<artifact_path>/<file>` (Parquet)."""
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as d:
            pq.write_table(table, Path(d) / file)
            self.log_artifacts(run_id, d, artifact_path)

    def read_table(self, run_id: str, artifact_path: str, file: str):
        """The pyarrow table a run logged as `<artifact_path>/<file>` (Parquet)."""
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as d:
            local = self.download(run_id, artifact_path, Path(d) / "a")
            return pq.read_table(local / file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (a retried trial carries on logging into its run)."""
        self.client.set_terminated(run_id, "RUNNING")

    def get_run(self, run_id: str) -> RunRecord:
        """The run, or a PtxError when the id does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return _record(self.client.get_run(run_id))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise PtxError(f"MLflow store {self.uri} failed to answer for run '{run_id}' "
                               f"({exc.error_code}: {str(exc).splitlines()[0][:200]})") from None
            raise PtxError(f"run '{run_id}' does not exist in the MLflow store {self.uri}") from None

    # ---- queries ------------------------------------------------------------------------------------
    def find_runs(self, tags: dict | None = None, status: str | None = "FINISHED", order_by: list | None = None,
                  max_results: int = 5000, experiment_ids: list | None = None) -> list[RunRecord]:
        """Runs whose tags equal `tags` (and in `status` when given)."""
        for k, v in (tags or {}).items():
            if v is not None and ("'" in str(v) or "\\" in str(v)):  # MLflow's filter syntax has no escape
                raise PtxError(f"tag filter {k}={v!r}: quotes and backslashes are not allowed in a search value")
        clauses = [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items() if v is not None]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        return [_record(r) for r in self.client.search_runs(experiment_ids or [self.experiment_id],
                                                            " and ".join(clauses), order_by=order_by,
                                                            max_results=max_results)]

    def all_experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def experiment_id_of(self, name: str) -> str | None:
        """The id of experiment `name` in this store, or None."""
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else None

    def all_experiment_names(self) -> list[str]:
        return sorted(e.name for e in self.client.search_experiments())

    def finished_run(self, kind: str, config_hash: str) -> RunRecord | None:
        """A FINISHED run of `kind` with this config hash, or None (the idempotency check)."""
        runs = self.find_runs({"ptx.kind": kind, "ptx.config_hash": config_hash}, status="FINISHED", max_results=1)
        return runs[0] if runs else None

    # ---- artifacts ----------------------------------------------------------------------------------
    def download(self, run_id: str, artifact_path: str, out_dir: str | Path) -> Path:
        """Download one artifact directory safely: no path may escape `out_dir`; nothing half-written."""
        out = Path(out_dir).resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PtxError(f"download target {out} exists and is not an empty directory")
        for path in self._artifact_files(run_id, artifact_path):
            artifact_target(out, artifact_path, path, run_id)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            local = self.client.download_artifacts(run_id, artifact_path, tmp)
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.rmdir()
            shutil.move(local, out)
        return out

    def _artifact_files(self, run_id: str, path: str) -> list[str]:
        files, todo = [], [path]
        while todo:
            for info in self.client.list_artifacts(run_id, todo.pop()):
                (todo if info.is_dir else files).append(info.path)
        if not files:
            raise PtxError(f"run '{run_id}' has no artifact '{path}'")
        return files


def experiment_names(uri: str) -> list[str]:
    """The names of the experiments ptx made in a store (tagged as model training), oldest first."""
    configure_client()
    from mlflow.tracking import MlflowClient

    exps = MlflowClient(tracking_uri=uri).search_experiments(filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = "
                                                                          f"'{EXPERIMENT_KIND}'")
    return [e.name for e in sorted(exps, key=lambda e: e.creation_time or 0)]


DATASET_RACE_TRIES = 3
# what a unique-key violation says: sqlite, PostgreSQL, MySQL (locally, or relayed by an MLflow server)
_DUPLICATE_KEY = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def _duplicate_key(exc: Exception) -> bool:
    return any(m in str(exc) for m in _DUPLICATE_KEY)


def _tag_key(label: str) -> str:
    """A label as an MLflow tag key (letters, digits, _ - . : / and spaces only): "a · b" -> "a/b"."""
    import re

    return re.sub(r"[^\w\-.:/ ]", "", label.replace(" · ", "/"))

