"""Everything MLflow: the store every later stage reads from (runs, lineage tags, artifacts, queries).

Only the client API is used, with explicit run ids, so this works whether or not an MLflow run is active in
the process (inside a Ray trial, a notebook, a script that already called mlflow.start_run).
"""

import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ptx.errors import PtxError

log = logging.getLogger(__name__)

KIND_PROMPT, KIND_TRANSFER, KIND_INDICATORS, KIND_PROJECTOR, KIND_REPORT = (
    "prompt", "transfer", "indicators", "projector", "report")
PROMPT_ARTIFACT = "prompt"  # the artifact sub-directory that holds a prompt run's prompt artifact
DEFAULT_EXPERIMENT = "ptx"
# MLflow 3's UI opens an experiment by its kind: model training goes to the runs table (not the GenAI overview)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's own HTTP retries back off for minutes; keep a dead server's cost bounded (seconds), then fail clearly
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # prompts are small; bars garble CLI errors


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


@dataclass
class Tracker:
    """A handle on one MLflow store and experiment."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    workdir: Path | None = None
    # (run id, metric key, step) points already in the store that `log` must not send again: a retried trial
    # re-runs steps an earlier attempt may have logged (see ptx.sweep.prompt_trainable)
    skip_points: set = field(default_factory=set)

    def __post_init__(self):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables": noise
        wait_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
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

    # ---- runs ---------------------------------------------------------------------------------------
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

    def stored_points(self, run_id: str, keys) -> set:
        """The (run id, key, step) points of these metric keys that the store holds for a run."""
        return {(run_id, k, m.step) for k in keys for m in self.client.get_metric_history(run_id, k)}

    def log_datasets(self, run_id: str, splits: list[dict]) -> None:
        """Record the data a run used (`ptx.data.describe_split` records, plus a `context` such as train or dev) as
        MLflow dataset inputs: the UI's Dataset column, and `runs_on_dataset` finds them later."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], json.dumps({"uri": d["source"]}),
                                       profile=json.dumps({"num_rows": d["rows"], "task": d["task"],
                                                           "split": d["split"]})),
                               [InputTag("mlflow.data.context", d.get("context", d["split"]))]) for d in splits]
        self.client.log_inputs(run_id, datasets=inputs)

    def copy_datasets(self, run_ids, to_run_id: str) -> None:
        """Log on `to_run_id` (e.g. a sweep's parent run) every dataset input the runs `run_ids` logged, once."""
        from mlflow.entities import DatasetInput

        seen = {}
        for rid in run_ids:
            for d in self.client.get_run(rid).inputs.dataset_inputs:
                key = (d.dataset.name, d.dataset.digest, tuple((t.key, t.value) for t in d.tags))
                seen.setdefault(key, DatasetInput(d.dataset, d.tags))
        if seen:
            self.client.log_inputs(to_run_id, datasets=list(seen.values()))

    def experiment_url(self, base: str) -> str:
        """The experiment's runs table in the MLflow UI at `base` (model-training view, not the GenAI overview)."""
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

    def runs_on_dataset(self, name: str, digest: str | None = None, context: str | None = None,
                        experiment_ids: list | None = None) -> list:
        """Every run (any status) that logged dataset `name` (e.g. "sst2/train"), optionally of one digest/context."""
        for v in (name, digest, context):
            if v is not None and ("'" in v or "\\" in v):
                raise PtxError(f"dataset filter {v!r}: quotes and backslashes are not allowed in a search value")
        clauses = [f"dataset.name = '{name}'"] + ([f"dataset.digest = '{digest}'"] if digest else [])
        runs = self.client.search_runs(experiment_ids or self.all_experiment_ids(), " and ".join(clauses),
                                       max_results=5000)

        def used(run) -> bool:  # MLflow matches each clause against any of a run's inputs: check the same input
            return any(d.dataset.name == name and digest in (None, d.dataset.digest)
                       and (context is None or any(t.key == "mlflow.data.context" and t.value == context for t in d.tags))
                       for d in run.inputs.dataset_inputs)

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

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def get_run(self, run_id: str):
        """The run, or a PtxError when the id does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise PtxError(f"MLflow store {self.uri} failed to answer for run '{run_id}' "
                               f"({exc.error_code}: {str(exc).splitlines()[0][:200]})") from None
            raise PtxError(f"run '{run_id}' does not exist in the MLflow store {self.uri}") from None

    # ---- queries ------------------------------------------------------------------------------------
    def find_runs(self, tags: dict | None = None, status: str | None = "FINISHED", order_by: list | None = None,
                  max_results: int = 5000, experiment_ids: list | None = None) -> list:
        """Runs whose tags equal `tags` (and in `status` when given)."""
        for k, v in (tags or {}).items():
            if v is not None and ("'" in str(v) or "\\" in str(v)):  # MLflow's filter syntax has no escape
                raise PtxError(f"tag filter {k}={v!r}: quotes and backslashes are not allowed in a search value")
        clauses = [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items() if v is not None]
        if status:
            clauses.append(f"attributes.status = '{status}'")
        return list(self.client.search_runs(experiment_ids or [self.experiment_id], " and ".join(clauses),
                                            order_by=order_by, max_results=max_results))

    def all_experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def finished_run(self, kind: str, config_hash: str):
        """A FINISHED run of `kind` with this config hash, or None (the idempotency check)."""
        runs = self.find_runs({"ptx.kind": kind, "ptx.config_hash": config_hash}, status="FINISHED", max_results=1)
        return runs[0] if runs else None

    def prompt_runs(self, task: str | None = None, backbone: str | None = None, all_experiments: bool = True) -> list:
        """Finished prompt runs, newest first, optionally filtered by task and backbone."""
        ids = self.all_experiment_ids() if all_experiments else None
        return self.find_runs({"ptx.kind": KIND_PROMPT, "ptx.task": task, "ptx.backbone": backbone},
                              order_by=["attributes.start_time DESC"], experiment_ids=ids)

    def best_prompt_run(self, task: str, backbone: str):
        """The finished vanilla prompt run with the best dev metric for (task, backbone), or a PtxError."""
        runs = [r for r in self.prompt_runs(task, backbone) if "best_dev_metric" in r.data.metrics and is_vanilla(r)]
        if not runs:
            raise PtxError(f"no finished prompt run for task '{task}' on backbone '{backbone}' in {self.uri}")
        return max(runs, key=lambda r: r.data.metrics["best_dev_metric"])

    # ---- artifacts ----------------------------------------------------------------------------------
    def download_prompt(self, run_id: str, out_dir: str | Path) -> Path:
        """Download a prompt run's artifact into `out_dir` (must not exist or be empty)."""
        run = self.get_run(run_id)
        if run.data.tags.get("ptx.kind") != KIND_PROMPT:
            raise PtxError(f"run '{run_id}' is not a prompt run (ptx.kind={run.data.tags.get('ptx.kind')!r})")
        return self.download(run_id, PROMPT_ARTIFACT, out_dir)

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
    from mlflow.tracking import MlflowClient

    exps = MlflowClient(tracking_uri=uri).search_experiments(filter_string=f"tags.`{EXPERIMENT_KIND_TAG}` = "
                                                                          f"'{EXPERIMENT_KIND}'")
    return [e.name for e in sorted(exps, key=lambda e: e.creation_time or 0)]


def _tag_key(label: str) -> str:
    """A label as an MLflow tag key (letters, digits, _ - . : / and spaces only): "a · b" -> "a/b"."""
    import re

    return re.sub(r"[^\w\-.:/ ]", "", label.replace(" · ", "/"))


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


def is_vanilla(run) -> bool:
    """A prompt trained from scratch or imported: not a TPT or projected-init prompt (a later stage's result,
    never a bank source or the best prompt of its task)."""
    tags = run.data.tags
    return not tags.get("ptx.source_run") and tags.get("ptx.init") not in ("artifact", "projected") \
        and not tags.get("ptx.tpt")
