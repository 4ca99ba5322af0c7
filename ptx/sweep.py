"""Everything Ray: connecting, Tune sweeps of prompt runs (checkpoint, retry, resume), task maps, actor pools.

The MLflow hierarchy: one parent run per sweep (`ptx.kind=sweep`), one child run per trial. A trial's run id
lives in its checkpoints and in the run's `ptx.trial_id` tag, so a retried or resumed trial reuses its run.
After `fit()`, the driver finalises every trial from its last checkpoint (a trial stopped early by ASHA, or one
that errored, still gets its best prompt logged) and tags the best prompt per (task, backbone).
"""

import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from ptx import guards, progress, track
from ptx.errors import PtxError, SweepInterrupted
from ptx.packing import MAX_AUTO_GROUP
from ptx.prompt_runs import PromptRequest, run_prompt
from ptx.train import TrainSettings, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)
STATE_FILE = "ptx_sweep.json"  # beside the Tune experiment: what `ptx resume` needs to finish the job
FAIL_ONCE_ENV = "PTX_FAIL_ONCE_AT_STEP"  # fault-injection hook for tests: "STEP:MARKER_DIR"
HOLD_ENV = "PTX_HOLD_AT_STEP"  # test hook: "STEP:DIR", a trial waits after reporting STEP until DIR/release exists
_joined_cluster = False  # connected with --address (an autoscaler may add nodes) rather than a local Ray


# ---- connecting -------------------------------------------------------------------------------------
def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> str | None:
    """Join a cluster (`auto`, HOST:PORT, ray://HOST:10001) or start a local Ray; returns the dashboard URL."""
    import ray

    global _joined_cluster
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or None
    _joined_cluster = bool(address)
    env = {"env_vars": {k: os.environ[k] for k in ("PTX_CACHE_DIR", "MLFLOW_TRACKING_URI", FAIL_ONCE_ENV, HOLD_ENV,
                                                    "HF_HUB_OFFLINE") if k in os.environ}}
    env["env_vars"].update(track.disable_telemetry())  # every worker starts with MLflow's telemetry off
    env["worker_process_setup_hook"] = "ptx.progress.quiet_worker_exit"  # no shutdown traceback on the terminal
    if address and address != "auto":
        _check_reachable(address)
    # Ray's note that token authentication is on is replaced by ptx's own line on how to log in (dashboard_login)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        if address:
            ctx = ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
        else:
            # "local": a Ray of our own. Without an address, ray.init joins the cluster that `ray start` last
            # recorded on this machine (/tmp/ray/ray_current_cluster): someone else's, or a dead one
            ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                           dashboard_host="127.0.0.1", runtime_env=env, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PtxError(f"cannot reach a Ray cluster at --address {address!r}: {str(exc).splitlines()[0]}") from None
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect to HOST:PORT first: Ray itself waits minutes on an unreachable GCS."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PtxError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PtxError(f"cannot reach a Ray cluster at --address {address!r}: {exc}") from None


def dashboard_login() -> str | None:
    """How a person gets into this cluster's dashboard (token authentication), or None when it is off."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        if not is_token_auth_enabled():
            return None
    except ImportError:  # a Ray without token authentication
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "the token in $RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"the token in {os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = "the token from `ray get-auth-token` (file ~/.ray/auth_token)"
    return f"paste {where} into its login box"


def dashboard_token() -> str | None:
    """The token this process authenticates to Ray with (for a browser session), or None when there is none."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None
    except ImportError:
        return None


def running_dashboard(address: str | None = None) -> tuple[str | None, str | None]:
    """(dashboard URL, how to log in) of the Ray cluster at `address`, else of one running on this machine; never
    starts one. (None, None) when there is none."""
    import ray
    from ray._private.services import find_gcs_addresses

    if ray.is_initialized():
        return _dashboard_url(ray.get_runtime_context()), dashboard_login()
    if address is None and not find_gcs_addresses():
        return None, None
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ctx = ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError):
        return None, None
    try:
        return _dashboard_url(ctx), dashboard_login()
    finally:
        ray.shutdown()


def _dashboard_url(ctx) -> str | None:
    url = getattr(ctx, "dashboard_url", None)
    if url is None:  # a runtime context: ask the worker
        import ray

        url = ray._private.worker.get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url


def check_resources(cpu: float, gpu: float, custom: dict | None = None, autoscaling: bool = False) -> None:
    """Refuse a per-trial request that no node in the cluster can satisfy (before any trial starts).

    On a cluster joined with --address the autoscaler may still add a node type that fits, so there the
    mismatch is only a warning.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": cpu, "GPU": gpu, **(custom or {})}
    for node in nodes:
        if all(node.get(k, 0) >= v for k, v in need.items() if v):
            return
    best = {k: max((n.get(k, 0) for n in nodes), default=0) for k in need}
    if autoscaling:
        log.warning("no running node fits %s per trial (largest offers %s); waiting for the autoscaler", need, best)
        return
    raise PtxError(f"resources per trial {need} exceed every node of the cluster (largest node offers {best})")


def live_nodes() -> list[dict]:
    """The alive nodes of the connected cluster: {"ip", "id", "resources"} with Ray's per-node bookkeeping keys dropped."""
    import ray

    skip = ("node:", "accelerator_type:", "memory", "object_store_memory")
    return [{"ip": n.get("NodeManagerAddress"), "id": n.get("NodeID", "")[:8],
             "resources": {k: v for k, v in n["Resources"].items() if not k.startswith(skip)}}
            for n in ray.nodes() if n.get("Alive")]


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---- the Tune sweep ---------------------------------------------------------------------------------
def _tune_space(space: dict) -> dict:
    """Spec search space -> Tune distributions."""
    from ray import tune

    out = {}
    for key, dist in space.items():
        (kind, arg), = dist.items()
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}.get(kind, lambda a, k=kind: getattr(tune, k)(*a))(
            list(arg))
    return out


def _request_from(config: dict) -> PromptRequest:
    """Trial config (a base request + searched fields) -> PromptRequest."""
    base = dict(config["request"])
    settings = dict(base.pop("settings"))
    for key, value in config.items():
        if key in {f.name for f in dataclasses.fields(TrainSettings)}:
            settings[key] = value
        elif key in ("prompt_length", "init"):
            base[key] = value
    return PromptRequest(**base, settings=TrainSettings(**settings))


def _find_trial_run(tracker, trial_id: str, sweep_run: str):
    runs = tracker.find_runs({"ptx.trial_id": trial_id, "ptx.sweep_run": sweep_run}, status=None, max_results=1)
    return runs[0].run_id if runs else None


def _maybe_fail(step: int) -> None:
    """Test hook: raise once at STEP (a marker file records that it happened)."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    at, marker_dir = spec.split(":", 1)
    if not Path(marker_dir).is_dir():  # armed only while the marker directory exists
        return
    from ray import tune

    marker = Path(marker_dir) / f"failed-{tune.get_context().get_trial_id()}"
    if step >= int(at) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def _maybe_hold(step: int) -> None:
    """Test hook: once a trial's report of STEP has returned (Tune's driver has processed that result and
    registered its checkpoint: function trainables report synchronously), the trial writes DIR/held-<trial id>
    holding the step and waits until DIR/release exists. A fault test then kills a node or the head at a known
    point, with no trial able to finish or run ahead first. Armed while DIR exists and DIR/release does not."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    at, hold_dir = spec.split(":", 1)
    release = Path(hold_dir) / "release"
    if step < int(at) or not Path(hold_dir).is_dir() or release.exists():
        return
    from ray import tune

    held = Path(hold_dir) / f"held-{tune.get_context().get_trial_id()}"
    tmp = held.with_suffix(".tmp")
    tmp.write_text(str(step))
    tmp.rename(held)
    while not release.exists():
        time.sleep(0.1)


def _after_report(step: int) -> None:
    """The test hooks a trial runs after each checkpointed report (inert unless their variables are set)."""
    _maybe_fail(step)
    _maybe_hold(step)


def _curve_metrics(curve: list[dict], metric: str) -> list[dict]:
    """The points `run_prompt` logs at each evaluation (dev metric, train loss, best so far), from a checkpoint's curve."""
    best, out = float("-inf"), []
    for p in curve:
        best = max(best, p["dev_metric"])
        out.append({"step": p["step"], f"dev_{metric}": p["dev_metric"], "train_loss": p.get("train_loss"),
                    "best_dev_metric": best})
    return out


def prompt_trainable(config: dict) -> None:
    """One Tune trial = one prompt run; reports each dev evaluation with a checkpoint."""
    import ray
    from ray import tune

    from ptx.tasks import load_task

    const = config["const"]
    if const.get("quiet"):  # a line per checkpoint from every trial is noise beside the driver's progress line
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    req = _request_from(config)
    # a trial (re)started while the MLflow server is down waits for it (80 s at most) instead of failing in 12 s:
    # an outage then costs a trial one retry, not all of them (docs/fault_tolerance.md)
    track.wait_reachable(const["tracking_uri"], tries=track.outage_wait_tries(), delay=2.0)
    tracker = track.MlflowTracker(const["tracking_uri"], const["experiment"], workdir=Path(const["workdir"]))
    trial_id = tune.get_context().get_trial_id()
    resume, run_id = None, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_checkpoint(d)
        run_id = resume.get("mlflow_run_id")
    run_id = run_id or _find_trial_run(tracker, trial_id, const["parent_run_id"])
    if run_id:  # reopened: an earlier attempt may have closed it (FAILED, or KILLED by an interrupted sweep)
        tracker.reopen(run_id)
    node = ray.get_runtime_context().get_node_id()  # which node ran (the latest attempt of) this trial
    if run_id:  # a retry (a failure, a lost node, an MLflow outage): the store keeps each point exactly once
        metric = load_task(req.task).metric
        tracker.skip_points |= tracker.stored_points(run_id, (f"dev_{metric}", "train_loss", "best_dev_metric"))
        tracker.set_tags(run_id, {"ptx.node": node})
        if resume is not None:  # resend what the last attempt could not log (e.g. while the server was down)
            tracker.log_curve(run_id, _curve_metrics(resume["curve"], metric))

    def report(metrics: dict, step: int, state: dict | None):
        if state is None or "prompt" not in state:  # the step-0 evaluation: logged to MLflow, not a Tune result
            return
        metrics = {**metrics, "step": step, "mlflow_run_id": state.get("mlflow_run_id")}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(state, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        _after_report(step)

    tags = {"ptx.trial_id": trial_id, "ptx.sweep_run": const["parent_run_id"], "ptx.study": const["study"],
            "ptx.node": node, **const.get("tags", {})}
    run = run_prompt(req, const["workdir"], tracker=tracker, parent_run_id=const["parent_run_id"],
                     report=report, resume=resume, run_id=run_id, extra_tags=tags, force=const.get("force", False))
    if run.reused:  # this config already has a finished run (an earlier sweep): report it and stop
        tune.report({"best_dev_metric": run.best_metric, "mlflow_run_id": run.run_id, "reused": True, "step": 0})


def _named_trainable(fn):
    """A trainable function (prompt_trainable, group_trainable) as Tune's trainable class, its actors showing their
    trial's name (task-backbone-seed-id) in the dashboard's Actors view (the Repr column) instead of the function's
    name; Tune's trainable name is unchanged, so sweeps started before still restore."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(fn)
    return type("PromptTrial", (base,), {"__repr__": lambda self: self.trial_name, "__module__": __name__})


def trial_trainable(grouped: bool, resources: dict | None):
    """The trainable of a sweep's trials with their resource request ({cpu, gpu, custom} as in a spec), for a new
    sweep and for `ptx resume` alike: Tune keeps no trial's resources in its saved experiment state, it asks the
    trainable again on restore, so a bare trainable would resume every trial at {cpu: 1} (no GPU share, no custom
    node resource)."""
    from ray import tune

    res = dict(resources or {"cpu": 1})
    custom = res.pop("custom", None) or {}
    fn = group_trainable if grouped else prompt_trainable
    return tune.with_resources(_named_trainable(fn), {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0), **custom})


def build_tuner(requests: list[PromptRequest], name: str, workdir: Path, tracking_uri: str, experiment: str,
                parent_run_id: str, storage_path: str, search: dict | None = None, algorithm: str = "grid",
                num_samples: int = 1, scheduler: dict | None = None, resources: dict | None = None,
                max_concurrent: int | None = None, max_failures: int = 2, tags: dict | None = None,
                force: bool = False, metric_name: str = "best_dev_metric", group_size: int = 1,
                entries: list | None = None):
    """A Tune experiment over a list of base requests (x an optional search space); group_size > 1: one trial
    trains that many requests together (group_trainable). `entries`: the grid's requests (or groups) as dicts, when
    the caller has them already (grid_entries), or with searched values baked in (what `ptx resume` runs of a sweep
    Tune never started)."""
    from ray import tune

    # checkpoints at every evaluation are the point (resume); Tune's warning about that is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a reused run reports no train_loss
    trainable = trial_trainable(group_size > 1, resources)
    const = {"tracking_uri": tracking_uri, "experiment": experiment, "workdir": str(workdir), "study": name,
             "parent_run_id": parent_run_id, "tags": tags or {}, "force": force, "quiet": not progress.verbosity()}
    entries = grid_entries(requests, group_size) if entries is None else entries
    space = {"group" if group_size > 1 else "request": tune.grid_search(entries), "const": const,
             **_tune_space(search or {})}
    sched = make_scheduler(scheduler, requests)
    search_alg = None
    if algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
        if max_concurrent:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=max_concurrent)
    metric_name = (scheduler or {}).get("metric") or metric_name
    ranked = (scheduler or {}).get("type") == "asha" or search_alg is not None
    tune_config = tune.TuneConfig(
        metric=metric_name if ranked else None, mode=("min" if metric_name.endswith("loss") else "max") if ranked else None,
        scheduler=sched, search_alg=search_alg, num_samples=num_samples,
        max_concurrent_trials=max_concurrent, reuse_actors=True, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    # every checkpoint stays until `finalise`: Tune saves its experiment state only every 10 s or so, and one it
    # deleted in between (num_to_keep) leaves a killed driver's saved state naming a checkpoint that is gone, a
    # trial `ptx resume` can then not restore
    run_config = tune.RunConfig(name=name, storage_path=storage_path,
                                failure_config=tune.FailureConfig(max_failures=max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=None), callbacks=[TrialProgress()],
                                **_tune_output(progress.verbosity()))
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def grid_entries(requests: list[PromptRequest], group_size: int) -> list:
    """A sweep's grid: each trial's request as a dict, or with group_size > 1 each group as a list of them."""
    if group_size > 1:
        return [[dataclasses.asdict(r) for r in g] for g in group_requests(requests, group_size)]
    return [dataclasses.asdict(r) for r in requests]


def make_scheduler(scheduler: dict | None, requests: list):
    """FIFO, or ASHA keyed by (task, backbone): one ASHA per group, so a trial is only ever compared with trials
    of its own task and backbone (a hard task's trials are not stopped because an easy task scores higher)."""
    from ray.tune.schedulers import FIFOScheduler

    if not scheduler or scheduler.get("type") != "asha":
        return FIFOScheduler()
    steps = max(r.settings.steps // r.settings.eval_every + 1 for r in requests)
    return _grouped_scheduler_class()({"time_attr": "training_iteration", "max_t": scheduler.get("max_t") or steps,
                                       "grace_period": scheduler.get("grace_period", 2),
                                       "reduction_factor": scheduler.get("reduction_factor", 2)})


def trial_group(trial) -> tuple:
    """The (task, backbone) a trial belongs to: the unit within which trials may be ranked."""
    req = trial.config.get("request", {})
    return req.get("task"), req.get("backbone")


def _grouped_scheduler_class():
    """GroupedScheduler, built on first use (Ray is imported only when a sweep needs it); pickled by reference
    through this module's __getattr__, so a restored sweep finds it."""
    global _GroupedScheduler
    if _GroupedScheduler is not None:
        return _GroupedScheduler
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    class GroupedScheduler(FIFOScheduler):
        """One ASHA scheduler per (task, backbone) inside one Tune experiment (one resource pool): each trial's
        results reach only its group's ASHA, whose rungs hold that group's results only. Pending trials are
        started first-in first-out across groups, as FIFO does."""

        def __init__(self, asha: dict):
            super().__init__()
            self._asha, self._groups, self._metric, self._mode = dict(asha), {}, None, None

        def set_search_properties(self, metric, mode, **spec) -> bool:
            if (self._metric and metric) or (self._mode and mode):
                return False
            self._metric, self._mode = metric or self._metric, mode or self._mode
            return True

        def _for(self, trial):
            key = trial_group(trial)
            if key not in self._groups:
                self._groups[key] = ASHAScheduler(metric=self._metric, mode=self._mode, **self._asha)
            return self._groups[key]

        def on_trial_add(self, tune_controller, trial):
            self._for(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._for(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._for(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._for(trial).on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return "ASHA per (task, backbone): " + "; ".join(
                f"{t}/{b}: {s.debug_string().splitlines()[0]}" for (t, b), s in self._groups.items())

    GroupedScheduler.__module__, GroupedScheduler.__qualname__ = __name__, "GroupedScheduler"
    _GroupedScheduler = GroupedScheduler
    return GroupedScheduler


_GroupedScheduler = None


def __getattr__(name: str):
    if name == "GroupedScheduler":
        return _grouped_scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_bar = None  # the progress bar of the sweep being fitted (driver side; TrialProgress feeds it)
_bar_base = (0, 0)  # its (done, total) before this sweep


class TrialProgress:
    """Tune callback: trials done / total, the best dev figure so far and steps inside running trials (for the ETA).

    Duck-typed rather than a subclass of Tune's Callback: Tune pickles it with the experiment, and the class must
    stay importable without importing Ray. It holds no state; it feeds whatever bar `_fit_and_finalise` opened.
    """

    def __init__(self, metric: str = "best_dev_metric"):
        self.metric = metric
        self._last = 0.0

    def on_step_end(self, iteration=None, trials=(), **info) -> None:
        now = time.monotonic()
        if _bar is None or now - self._last < 0.5:
            return
        self._last = now
        self.show(trials)

    def on_trial_complete(self, iteration=None, trials=(), trial=None, **info) -> None:
        if _bar is not None:
            self.show(trials)

    on_trial_error = on_trial_complete

    def show(self, trials) -> None:
        states = [t.status for t in trials]
        finished = {"TERMINATED", "ERROR"}
        base_done, base_total = _bar_base
        done, total = sum(s in finished for s in states), max(_bar.total - base_total, len(trials))
        bests = [(t.last_result or {}).get(self.metric) for t in trials]
        steps_done = steps_all = 0
        for t, state in zip(trials, states, strict=True):
            config = t.config or {}
            req = config.get("request") or (config.get("group") or [{}])[0]  # a grouped trial: its first request
            n = config.get("steps") or req.get("settings", {}).get("steps") or 1
            steps_all += n
            steps_done += n if state in finished else min(n, (t.last_result or {}).get("step") or 0)
        steps_all += (total - len(trials)) * (steps_all / max(1, len(trials)))  # trials not created yet
        running, errored = states.count("RUNNING"), states.count("ERROR")
        note = f"{running} running" + (f", {errored} errored" if errored else "")
        _bar.update(done=base_done + done, total=base_total + total, best=max((b for b in bests if isinstance(b, int | float)), default=None),
                    fraction=steps_done / steps_all if steps_all else None, note=note)

    def get_state(self):
        return None

    def set_state(self, state) -> None:
        pass

    def __getattr__(self, name):  # every other Tune hook: nothing to do
        if name.startswith("on_") or name == "setup":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _tune_output(verbose: int) -> dict:
    """Tune's own output: silent by default (ptx's progress line says it all; warnings and errors still log);
    with -v Tune's trial table every 30 s, in columns that fit 100 characters."""
    from ray.tune import CLIReporter

    # Tune's newer output engine prints an experiment box even when silent and ignores a given reporter
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if not verbose:
        return {"verbose": 0}
    reporter = CLIReporter(parameter_columns={"request/task": "task", "request/settings/seed": "seed"},
                           metric_columns={"step": "step", "best_dev_metric": "best"}, max_column_length=16,
                           max_report_frequency=30, max_progress_rows=20, print_intermediate_tables=True)
    return {"verbose": 1 if verbose == 1 else 2, "progress_reporter": reporter}


def _trial_name(trial) -> str:
    """Readable names for the dashboard: task-backbone-seed-trialid."""
    req = trial.config.get("request") or (trial.config.get("group") or [{}])[0]
    seed = trial.config.get("seed", req.get("settings", {}).get("seed"))
    if "group" in trial.config:
        return f"group{len(trial.config['group'])}-{str(req.get('backbone')).replace('/', '_')}-{trial.trial_id}"
    return f"{req.get('task')}-{str(req.get('backbone')).replace('/', '_')}-s{seed}-{trial.trial_id}"


def study_request(spec, task: str, backbone: str, seed: int, settings=None, **changes) -> PromptRequest:
    """The vanilla prompt-tuning request a study makes for (task, backbone, seed); later stages (TPT, projector)
    build theirs here too, so the same request hashes the same and its finished run is reused."""
    req = PromptRequest(task=task, backbone=backbone, insertion=spec.insertion, prompt_length=spec.prompt_length,
                        init=spec.init, init_text=spec.init_text, train_limit=spec.data.train_limit,
                        dev_limit=spec.data.dev_limit, max_length=spec.data.max_length,
                        settings=dataclasses.replace(settings or spec.train, seed=seed))
    return dataclasses.replace(req, **changes)


def sweep_requests(spec) -> list[PromptRequest]:
    """The grid of base requests of a study's training stage: backbones x tasks x seeds."""
    return [study_request(spec, task, backbone, seed)
            for backbone in spec.backbones for task in spec.tasks for seed in spec.seeds]


def plan(spec) -> dict:
    """What a sweep would run: trial count, resources, concurrency (nothing is started)."""
    from math import prod

    reqs = sweep_requests(spec)
    grid_points = prod(len(d.get("grid", d.get("choice", [None]))) if spec.search.algorithm == "grid" else 1
                       for d in spec.search.space.values()) if spec.search.space else 1
    n = len(reqs) * grid_points * spec.search.num_samples
    per_trial = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, **spec.resources.custom}
    size = group_size(spec)
    if size > 1:  # a trial is a group: members per group, and how many groups share one GPU
        groups = len(group_requests(reqs, size))
        n = groups * grid_points * spec.search.num_samples
        grouping = {"group_size": size, "groups": groups, "members_per_group": [len(g) for g in group_requests(reqs, size)],
                    "groups_per_gpu": round(1 / spec.resources.gpu, 2) if spec.resources.gpu else None}
    else:
        grouping = {"group_size": 1}
    return {**grouping, "study": spec.name, "trials": n, "base_runs": len(reqs), "search_points": grid_points,
            "samples": spec.search.num_samples, "scheduler": spec.scheduler.type, "resources_per_trial": per_trial,
            "max_concurrent": spec.max_concurrent, "steps_per_trial": spec.train.steps, "stages": list(spec.stages)}


def run_sweep(spec, workdir: Path, tracking_uri: str, storage_path: str | None = None,
              max_concurrent: int | None = None, force: bool = False, requests: list | None = None,
              name: str | None = None, tags: dict | None = None) -> dict:
    """Run a study's training stage (or `requests`) as a Tune experiment; finalise and tag the best prompts."""
    name = name or spec.name
    storage = storage_path or spec.storage_path or str(Path(workdir) / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    check_resources(spec.resources.cpu, spec.resources.gpu, spec.resources.custom, autoscaling=_joined_cluster)
    guards.check_storage(storage, len(live_nodes()), _joined_cluster, spec.storage_shared)
    tracker = track.MlflowTracker(tracking_uri, spec.name, workdir=workdir)
    stage = (tags or {}).get("ptx.stage")
    parent = tracker.start_run(track.run_name(stage, spec.name, "sweep"), {
        "ptx.kind": "sweep", "ptx.study": spec.name, "ptx.experiment_path": f"{storage}/{name}",
        "ptx.config_hash": spec.hash(), "ptx.stage": stage})
    the_plan = plan(spec)
    tracker.log(parent, params={"plan": the_plan})
    reqs, size = requests or sweep_requests(spec), group_size(spec)
    bases = grid_entries(reqs, size)
    n_trials = len(bases) * the_plan["search_points"] * spec.search.num_samples
    # build_tuner's arguments, kept in the state file for the trials `ptx resume` may have to start itself
    build = {"storage_path": storage, "search": spec.search.space, "algorithm": spec.search.algorithm,
             "scheduler": dataclasses.asdict(spec.scheduler), "max_concurrent": max_concurrent or spec.max_concurrent,
             "max_failures": spec.max_failures, "tags": tags or {}, "force": force, "group_size": size}
    tuner = build_tuner(reqs, name, Path(workdir), tracking_uri, spec.name, parent, **build,
                        num_samples=spec.search.num_samples, resources=dataclasses.asdict(spec.resources), entries=bases)
    _write_state(storage, name, {"tracking_uri": tracking_uri, "experiment": spec.name, "workdir": str(workdir),
                                 "parent_run_id": parent, "study_file": spec.source_file, "name": name,
                                 "grouped": size > 1, "resources": dataclasses.asdict(spec.resources),
                                 "planned_trials": n_trials, "build": build,
                                 "planned": None if spec.search.algorithm == "optuna"
                                 else planned_trials(bases, spec.search.space, spec.search.num_samples)})
    return _fit_and_finalise(tuner, tracker, parent, Path(workdir), n_trials)


def _storage_fs(path: str):
    """A sweep's storage (a URI, or a local or shared directory) as a pyarrow filesystem and the root path in it."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), str(Path(path).resolve()))


def _write_state(storage: str, name: str, state: dict) -> None:
    import json

    fs, root = _storage_fs(storage)
    fs.create_dir(f"{root}/{name}", recursive=True)
    with fs.open_output_stream(f"{root}/{name}/{STATE_FILE}.tmp") as f:  # written whole, then renamed
        f.write(json.dumps(state, sort_keys=True).encode())
    fs.move(f"{root}/{name}/{STATE_FILE}.tmp", f"{root}/{name}/{STATE_FILE}")


def _read_state(path: str) -> dict:
    import json

    fs, root = _storage_fs(path)
    try:
        with fs.open_input_stream(f"{root}/{STATE_FILE}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        raise PtxError(f"{path} is not a ptx sweep: {STATE_FILE} is missing") from None


def resumed_trainable(state: dict):
    """The trainable `ptx resume` restores a sweep with: the sweep's own, with the resources its state file names."""
    return trial_trainable(bool(state.get("grouped")), state.get("resources"))


def resume_sweep(path: str, restart_errored: bool = False) -> dict:
    """Restore an interrupted sweep (e.g. its driver was killed) and finish it."""
    from ray import tune

    path = path if "://" in path else str(Path(path).expanduser().resolve())
    if not tune.Tuner.can_restore(path):
        raise PtxError(f"{path} is not a Tune experiment directory (no experiment state found)")
    state = _read_state(path)
    check_tune_state(path)
    if "resources" not in state:  # written before the state file kept them
        log.warning("%s/%s names no trial resources: the trials resume at {cpu: 1}", path, STATE_FILE)
    trainable = resumed_trainable(state)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # as build_tuner's _tune_output: no experiment box from Tune
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                               resume_errored=not restart_errored, restart_errored=restart_errored)
    tracker = track.MlflowTracker(state["tracking_uri"], state["experiment"], workdir=Path(state["workdir"]))
    tracker.reopen(state["parent_run_id"])  # reopened (KILLED if the sweep was interrupted)
    summary = _fit_and_finalise(tuner, tracker, state["parent_run_id"], Path(state["workdir"]),
                                then=lambda grid: _unstarted_trials_tuner(state, trainable, _grid_uri(grid)))
    short = state.get("planned_trials", 0) - summary["tune_trials"]
    if short > 0:  # an Optuna sweep (its trials cannot be listed ahead) whose searcher state was lost
        tracker.finish(state["parent_run_id"], "FAILED")
        raise PtxError(f"{path}: the sweep planned {state['planned_trials']} trials but its saved Tune state named "
                       f"{summary['tune_trials']}; start it again with `ptx sweep` (finished runs are reused)")
    return summary


def check_tune_state(path: str) -> None:
    """Tune's saved state, checked before Tune reads it. Every ~10 s Tune copies its trial list
    (experiment_state-*.json) and its searcher's state (a pickle) from the driver's staging directory to storage_path
    with pyarrow, which truncates each target first: a driver killed mid-copy leaves them cut short. Tune's restore
    then logs "Failed to restore the run state" and starts the experiment again, with an empty config (seen: the
    resume exited 0 having finished nothing new). A cut trial list cannot be restored: a PtxError says so. A cut
    searcher state is dropped (all of them: an older session's would name trials twice); the trials it alone knew
    are then run by `ptx resume` from the state file's plan."""
    import json

    import pyarrow.fs as pafs

    fs, root = _storage_fs(path)
    files = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File}
    lists = sorted(n for n in files if n.startswith("experiment_state-") and n.endswith(".json"))
    if lists:
        with fs.open_input_stream(f"{root}/{lists[-1]}") as f:
            text = f.read()
        try:
            json.loads(text.decode())
        except ValueError:
            raise PtxError(f"{root}/{lists[-1]}: Tune's saved trial list is cut short ({len(text)} bytes; the driver "
                           f"was killed while Tune copied it) and cannot be restored; move {root} away and run "
                           f"`ptx sweep` again (finished runs are reused)") from None
    kinds = ("basic-variant-state-", "search_gen_state-", "searcher-state-")  # grid/random; Optuna's two
    searchers = sorted(n for n in files if n.startswith(kinds))
    for kind in kinds:
        newest = max((n for n in searchers if n.startswith(kind)), default=None)  # the name ends with its session
        if newest is None:
            continue
        with fs.open_input_stream(f"{root}/{newest}") as f:
            data = f.read()
        if not data.endswith(b"."):  # every pickle ends with its STOP opcode
            log.warning("%s/%s: Tune's saved searcher state is cut short (%d bytes; the driver was killed while Tune "
                        "copied it); dropped, the trials it alone knew are run from %s's plan", root, newest,
                        len(data), STATE_FILE)
            for name in searchers:
                fs.delete_file(f"{root}/{name}")
            return


# ---- what Tune never started ------------------------------------------------------------------------------
# With max_concurrent, Tune creates a grid's trials only as slots free up, and its saved experiment state lists
# only the trials created so far; the rest live in its searcher's state, a second file saved after the trial list.
# A sweep restored without it (a lost file, or one cut short: check_tune_state drops it) finishes the trials it
# lists and nothing else, with no error. So the state file names every planned trial, and `ptx resume` runs the missing
# ones itself, as a second experiment beside the first.
def planned_trials(bases: list, search: dict | None, num_samples: int) -> list[dict]:
    """Every trial a sweep plans: its request (or group) and the values of its grid-searched fields, num_samples
    times each. Fields drawn from a distribution are left out: any draw is as good as the one never made."""
    import itertools

    grid_keys = sorted(k for k, dist in (search or {}).items() if "grid" in dist)
    combos = list(itertools.product(*[search[k]["grid"] for k in grid_keys]))
    return [{"base": b, "grid": dict(zip(grid_keys, c, strict=True))} for b in bases for c in combos for _ in range(num_samples)]


def unstarted_trials(planned: list[dict], configs: list[dict]) -> list[dict]:
    """The planned trials no trial config covers (counted: num_samples repeats a point)."""
    import json
    from collections import Counter

    def key(base, grid) -> str:
        return json.dumps({"base": base, "grid": grid}, sort_keys=True, default=str)

    grid_keys = sorted(planned[0]["grid"]) if planned else []
    have = Counter(key(c.get("group", c.get("request")), {k: c.get(k) for k in grid_keys}) for c in configs)
    missing = []
    for p in planned:
        k = key(p["base"], p["grid"])
        if have[k]:
            have[k] -= 1
        else:
            missing.append(p)
    return missing


def _baked(entry: dict, search: dict | None) -> tuple[list | dict, list[PromptRequest]]:
    """A planned trial as one grid entry with its searched values inside its request(s) (grid values as planned,
    drawn fields drawn now), and its requests."""
    drawn = {k: v.sample() for k, v in _tune_space({k: d for k, d in (search or {}).items() if "grid" not in d}).items()}
    point = {**entry["grid"], **drawn}
    members = entry["base"] if isinstance(entry["base"], list) else [entry["base"]]
    reqs = [_request_from({**point, "request": m}) for m in members]
    as_dicts = [dataclasses.asdict(r) for r in reqs]
    return (as_dicts if isinstance(entry["base"], list) else as_dicts[0]), reqs


def _unstarted_trials_tuner(state: dict, trainable, experiment_path: str):
    """After a resumed sweep: a Tuner for the planned trials its Tune state never named (None if there are none,
    or the state file lists no plan). Its experiment sits beside the first, NAME-rest; resumed if it exists."""
    from ray import tune
    from ray.tune import ExperimentAnalysis

    if not state.get("planned"):
        return None
    missing = unstarted_trials(state["planned"], [t.config for t in ExperimentAnalysis(experiment_path).trials])
    if not missing:
        return None
    b = state["build"]
    rest = f"{state['name']}-rest"
    rest_path = f"{b['storage_path']}/{rest}"
    log.warning("%s: its saved Tune state names %d of the %d planned trials (the rest were never started and "
                "Tune's record of them is missing); running the %d others as %s", experiment_path,
                len(state["planned"]) - len(missing), len(state["planned"]), len(missing), rest_path)
    if tune.Tuner.can_restore(rest_path):  # a resume of the resume
        return tune.Tuner.restore(rest_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    baked = [_baked(m, b["search"]) for m in missing]  # searched values inside: a plain grid, no search
    return build_tuner([r for _, reqs in baked for r in reqs], rest, Path(state["workdir"]), state["tracking_uri"],
                       state["experiment"], state["parent_run_id"], **{**b, "search": None, "algorithm": "grid"},
                       resources=state.get("resources"), entries=[e for e, _ in baked])


def _fit_and_finalise(tuner, tracker, parent: str, workdir: Path, trials: int = 0, then=None) -> dict:
    """Fit, then finalise the trials; `then(grid)` may return a second Tuner (the trials a resumed sweep's Tune
    state never named), fitted after the first and finalised with it."""
    global _bar, _bar_base
    t0 = time.perf_counter()
    _bar = progress.current()  # the running stage's bar (train, tpt), fed by TrialProgress
    _bar_base = (_bar.done, _bar.total)
    _bar.update(total=_bar.total + trials)
    try:
        with _sigterm_stops_tune():
            grid = tuner.fit()
        results = list(grid)
        interrupted = _interrupted_trials(grid)  # stopped by Ctrl-C or SIGTERM: not done, whatever Tune says
        rest = then(grid) if then is not None and not interrupted else None
        if rest is not None:  # interrupted, it is resumed by resuming the first (which runs it again)
            with _sigterm_stops_tune():
                rest_grid = rest.fit()
            results += list(rest_grid)
            interrupted = _interrupted_trials(rest_grid)
        _bar.update(total=max(_bar.total, _bar_base[0] + len(results)), done=_bar_base[0] + len(results) - interrupted,
                    note=f"{sum(r.error is not None for r in results)} errored" if any(r.error is not None for r in results)
                    else "")
    finally:
        _bar = None
    wall = time.perf_counter() - t0
    # a server blip at the end costs a wait, not the sweep
    track.wait_reachable(tracker.uri, tries=track.outage_wait_tries(), delay=2.0)
    if interrupted:
        _close_interrupted(tracker, parent)
        raise SweepInterrupted(f"sweep interrupted with {interrupted} of {len(results)} trials unfinished; finish "
                               f"it with: ptx resume {_grid_uri(grid)}")
    summary = finalise(results, tracker, workdir)
    summary["tune_trials"] = len(results)  # trials (a group is one), where summary["trials"] counts prompts
    _log_sweep_datasets(tracker, parent, summary["rows"])
    summary.update(wall_seconds=wall, experiment_path=_grid_uri(grid), parent_run_id=parent)
    tracker.log(parent, {"trials": summary["trials"], "errored": summary["errored"], "wall_seconds": wall})
    tracker.finish(parent, "FINISHED" if not summary["errored"] else "FAILED")
    return summary


@contextlib.contextmanager
def _sigterm_stops_tune():
    """While Tune runs, SIGTERM does what Ctrl-C does: Tune's SIGINT handler stops the trials and saves the
    experiment state (a second signal stops at once). Without this, Ray's driver handler (`sys.exit`) would
    unwind past Tune's loop and leave its trials' runs RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_trials(grid) -> int:
    """How many trials a Ctrl-C / SIGTERM left unfinished. After an interrupt Tune's cleanup marks the stopped
    trials TERMINATED in memory, so the result grid cannot tell; the experiment state it saved just before the
    cleanup can (PENDING/PAUSED there). Read only when some trial ended neither with `done` nor with an error."""
    if all(r.error is not None or (r.metrics or {}).get("done") for r in grid):
        return 0
    from ray.tune import ExperimentAnalysis

    return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(_grid_uri(grid)).trials)


def _grid_uri(grid) -> str:
    """A result grid's experiment as a URI: for object storage Tune gives the path without its scheme
    (bucket/...), which ExperimentAnalysis and `ptx resume` would take for a local directory."""
    path = grid.experiment_path
    scheme = {"s3": "s3", "gcs": "gs"}.get(getattr(grid.filesystem, "type_name", ""))
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def _close_interrupted(tracker, parent: str) -> None:
    """Mark the runs of an interrupted sweep KILLED (its unfinished trials' and its own); `ptx resume` reopens
    them: a resumed trial logs into its run again and the parent is finished by the resumed sweep."""
    for run in tracker.find_runs({"ptx.sweep_run": parent}, status="RUNNING"):
        tracker.finish(run.run_id, "KILLED")
    tracker.finish(parent, "KILLED")


def finalise(grid, tracker, workdir: Path) -> dict:
    """Close every trial's MLflow run from its last checkpoint; tag the best prompt per (task, backbone)."""
    rows, errored = [], 0
    for result in grid:
        if not result.config:  # failed before its first result (Tune knows no config then): nothing to close
            errored += 1
            rows.append({"task": None, "backbone": None, "seed": None, "run_id": None, "best": None,
                         "error": str(result.error).splitlines()[0] if result.error else "no result",
                         "iterations": 0})
            continue
        if result.error is not None:
            errored += 1
        if "group" in result.config:
            rows += _finalise_group(result, tracker, workdir)
            _prune_checkpoints(result)
            continue
        req = result.config["request"]
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                state = load_checkpoint(d)
            run_id = state.get("mlflow_run_id") or run_id
        else:
            state = None
        rows.append(_finalise_run(req, run_id, state, result, tracker, workdir))
        _prune_checkpoints(result)
    tracker.tag_best({(r["task"], r["backbone"]) for r in rows if r["task"] is not None})
    return {"trials": len(rows), "errored": errored, "rows": rows}


def _finalise_run(req: dict, run_id: str | None, state: dict | None, result, tracker, workdir: Path) -> dict:
    """Close one prompt run from its last checkpoint (unless it finished itself); its row of the summary."""
    from ptx.prompt import init_record, prompt_meta, save_prompt
    from ptx.tasks import load_task

    if run_id:
        run = tracker.get_run(run_id)
        if run.status != "FINISHED" and state is not None:
            # stopped early by the scheduler, or errored after its retries: keep the last good checkpoint
            spec = load_task(req["task"])
            stopped = "error" if result.error else "scheduler"
            art = track.prompt_dir(workdir, run_id)
            if not (art / "prompt.json").exists():
                bmeta = _backbone_meta_from(run, state)
                meta = prompt_meta(
                    config_hash=run.tags.get("ptx.config_hash"), run_id=run_id, backbone=bmeta,
                    task={"name": spec.name, "version": spec.version}, verbalizer=spec.label_words(bmeta.get("kind")),
                    insertion=req.get("insertion", "prepend"),
                    init=init_record("artifact" if req.get("init_from") else req.get("init"), req["settings"]["seed"],
                                     spec.name, spec.instruction(req["init_text"]) if req.get("init_text") else None,
                                     run.tags.get("ptx.source_run")),
                    seed=req["settings"]["seed"], best_step=state["best_step"],
                    dev_metric={"name": spec.metric, "value": state["best_metric"]}, stopped=stopped)
                save_prompt(art, state["best_prompt"], meta)
            tracker.log_curve(run_id, [{"step": p["step"], f"dev_{spec.metric}": p["dev_metric"]} for p in state["curve"]])
            tracker.log(run_id, {"best_dev_metric": state["best_metric"]}, step=state["best_step"],
                        tags={"ptx.stopped": stopped, "ptx.best_step": state["best_step"]})
            tracker.log_artifacts(run_id, art, track.PROMPT_ARTIFACT)
            tracker.finish(run_id, "FAILED" if result.error else "FINISHED")
    return {"task": req["task"], "backbone": req["backbone"], "seed": req["settings"]["seed"],
            "run_id": run_id, "best": (state or {}).get("best_metric", (result.metrics or {}).get("best_dev_metric")),
            "error": str(result.error).splitlines()[0] if result.error else None,
            "iterations": (result.metrics or {}).get("training_iteration")}


def _prune_checkpoints(result) -> None:
    """Delete a finalised trial's superseded checkpoints; its latest stays (Tune's final state names it)."""
    import pyarrow.fs as pafs

    if result.checkpoint is None:
        return
    fs, keep = result.checkpoint.filesystem, result.checkpoint.path.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(keep.rsplit("/", 1)[0])):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and info.path.rstrip("/") != keep:
            fs.delete_dir(info.path)


def _log_sweep_datasets(tracker, parent: str, rows: list) -> None:
    """The sweep's run lists the splits its trials used: the runs table shows data beside the collapsed trials."""
    try:
        tracker.copy_datasets([r["run_id"] for r in rows if r["run_id"]], parent)
    except Exception as exc:  # lineage on the parent is a convenience; the trials' own inputs are logged
        log.warning("could not log the sweep's datasets on run %s: %s", parent, exc)


def _backbone_meta_from(run, state) -> dict:
    """The backbone record of a trial's prompt, from the run's tags (the backbone itself is not loaded here)."""
    return {"name": run.tags.get("ptx.backbone"), "revision": run.tags.get("ptx.backbone_revision"),
            "kind": run.tags.get("ptx.backbone_kind"), "d_model": int(state["best_prompt"].shape[1])}


def experiment_exists(path: str) -> bool:
    """Whether a Tune experiment that `ptx resume` could restore lives at `path` (a local dir or storage URI)."""
    from ray import tune

    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # a storage URI that does not exist yet
        return False


def trial_table(path: str) -> list[dict]:
    """The trial table of a sweep (state, task, backbone, seed, best metric, MLflow run id), with the trials of
    its NAME-rest experiment when `ptx resume` ran one."""
    from ray import tune

    path = path if "://" in path else str(Path(path).expanduser().resolve())
    if not tune.Tuner.can_restore(path):
        raise PtxError(f"{path} is not a Tune experiment directory (no experiment state found)")
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(path).trials
    if tune.Tuner.can_restore(f"{path}-rest"):  # the trials its Tune state never named, run by `ptx resume`
        trials += ExperimentAnalysis(f"{path}-rest").trials
    rows = []
    for trial in trials:
        req, last = trial.config.get("request", {}), trial.last_result or {}
        rows.append({"trial": trial.trial_id, "state": trial.status, "task": req.get("task"),
                     "backbone": req.get("backbone"), "seed": req.get("settings", {}).get("seed"),
                     "best": last.get("best_dev_metric"), "iter": last.get("training_iteration"),
                     "run_id": last.get("mlflow_run_id")})
    return rows


# ---- groups: many prompts per trial, one backbone pass (ptx.train_group) ------------------------------
# train.group_size null or auto on GPUs: the largest group whose trial fits its GPU share (ptx.memory's model of the
# peak, ptx.packing) and leaves at least as many trials as the cluster's GPU slots, at most GPU_GROUP_SIZE (the
# largest group benchmarks/gpu.sh measures); on CPU, where time follows FLOPs and grouping measured no faster, 1.
GPU_GROUP_SIZE = MAX_AUTO_GROUP


def group_size(spec) -> int:
    """Prompts per trial: train.group_size when a number, else on GPUs the memory plan's (smallest over the
    backbones; ptx.config.gpu_plans), else 1."""
    if isinstance(spec.train.group_size, int):
        return spec.train.group_size
    sizes = [p.group_size for p in spec.gpu_plans()] if spec.resources.gpu > 0 else []
    return min(sizes) if sizes else 1


def group_requests(requests: list[PromptRequest], size: int) -> list[list[PromptRequest]]:
    """Requests in groups of at most `size` that can share one pass (same backbone, insertion, prompt length, bf16,
    dropout); a generation task (scored by decoding) or a full-vocabulary loss is a group of one, trained by
    train_prompt."""
    from ptx.tasks import load_task

    by: dict = {}
    for i, r in enumerate(requests):
        alone = load_task(r.task).kind == "generation" or r.settings.label_loss != "label_words"
        key = (r.backbone, r.insertion, r.prompt_length, r.settings.bf16, r.settings.dropout)
        by.setdefault(("alone", i) if alone else key, []).append(r)
    return [reqs[i:i + size] for reqs in by.values() for i in range(0, len(reqs), size)]


def save_group_checkpoint(states: dict, directory) -> None:
    """A group's checkpoint: member i's training state in m<i>/ (train.save_checkpoint's format)."""
    for i, state in states.items():
        sub = Path(directory) / f"m{i}"
        sub.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state, sub)


def load_group_checkpoint(directory) -> dict:
    """{member index: state} from a group checkpoint."""
    return {int(d.name[1:]): load_checkpoint(d) for d in Path(directory).iterdir() if d.is_dir() and d.name[:1] == "m"}


def group_trainable(config: dict) -> None:
    """One Tune trial = a group of prompt runs trained together; each member is still its own MLflow run."""
    import ray
    from ray import tune

    from ptx.backbones import load_backbone
    from ptx.prompt_runs import PromptRun, start_prompt_run
    from ptx.train import train_prompt
    from ptx.train_group import GroupMember, train_group

    const = config["const"]
    if const.get("quiet"):  # as in prompt_trainable: no line per checkpoint
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    reqs = [_request_from({**config, "request": r}) for r in config["group"]]
    track.wait_reachable(const["tracking_uri"], tries=track.outage_wait_tries(), delay=2.0)
    tracker = track.MlflowTracker(const["tracking_uri"], const["experiment"], workdir=Path(const["workdir"]))
    trial_id, parent = tune.get_context().get_trial_id(), const["parent_run_id"]
    states: dict = {}
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            states = load_group_checkpoint(d)
    node = ray.get_runtime_context().get_node_id()
    backbone = load_backbone(reqs[0].backbone, insertion=reqs[0].insertion)  # one copy for the whole group
    latest: dict = dict(states)  # member index -> its last checkpoint state
    members, started, reused = [], [], []

    def member_report(i: int):
        def report(metrics: dict, step: int, state: dict | None):
            if state is not None and "prompt" in state:
                latest[i] = state
        return report

    for i, req in enumerate(reqs):
        member_trial = f"{trial_id}/m{i}"  # what ptx.trial_id is for a run of its own trial
        resume = states.get(i)
        run_id = (resume or {}).get("mlflow_run_id") or _find_trial_run(tracker, member_trial, parent)
        if run_id and tracker.get_run(run_id).status == "FINISHED":  # finished before the group was stopped
            reused.append(run_id)
            continue
        if run_id and resume is None:
            tracker.reopen(run_id)
        if run_id:  # a retried group: the store keeps each point exactly once, as in prompt_trainable
            from ptx.tasks import load_task

            metric = load_task(req.task).metric
            tracker.skip_points |= tracker.stored_points(run_id, (f"dev_{metric}", "train_loss", "best_dev_metric"))
            tracker.set_tags(run_id, {"ptx.node": node})
            if resume is not None:
                tracker.log_curve(run_id, _curve_metrics(resume["curve"], metric))
        tags = {"ptx.trial_id": member_trial, "ptx.group_trial": trial_id, "ptx.sweep_run": parent,
                "ptx.study": const["study"], "ptx.node": node, **const.get("tags", {})}
        run = start_prompt_run(req, const["workdir"], tracker, parent, const.get("force", False),
                               report=member_report(i), run_id=run_id, backbone=backbone, extra_tags=tags)
        if isinstance(run, PromptRun):  # this config already has a finished run (an earlier study)
            reused.append(run.run_id)
            continue
        started.append(run)
        members.append(GroupMember(run.spec, run.init, run.train, run.dev, req.settings, report=run.log_and_report,
                                   resume=resume, name=f"{req.task}/s{req.settings.seed}"))

    def checkpoint():
        live = {i: s for i, s in latest.items()}
        metrics = {"step": max(s["step"] for s in live.values()), "members": len(reqs), "reused": len(reused),
                   "best_dev_metric": sum(s["best_metric"] for s in live.values()) / len(live),
                   "mlflow_run_ids": ",".join(str(s.get("mlflow_run_id")) for s in live.values())}
        with tempfile.TemporaryDirectory() as d:
            save_group_checkpoint(live, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        _after_report(metrics["step"])

    def train_members() -> list:
        if len(members) == 1 and members[0].spec.kind == "generation":  # a group of one, trained by train_prompt
            m, run = members[0], started[0]

            def solo_report(metrics: dict, step: int, state: dict | None = None):
                run.log_and_report(metrics, step, state)
                if state is not None:
                    checkpoint()

            return [train_prompt(backbone, m.spec, m.init, m.train_data, m.dev_data, m.settings, report=solo_report,
                                 resume=m.resume)]
        return train_group(backbone, members, on_evaluated=checkpoint)

    if members:
        try:
            results = train_members()
        except BaseException:
            for run in started:
                run.fail()
            raise
        failed = []
        for run, result in zip(started, results, strict=True):
            try:
                run.finish(result)
            except PtxError as exc:  # a diverged member fails alone; the others are logged
                failed.append(str(exc))
        if failed:
            raise PtxError(f"{len(failed)} of {len(reqs)} group members failed: " + "; ".join(failed))
    else:
        tune.report({"best_dev_metric": float("nan"), "reused": len(reused), "step": 0})


def _finalise_group(result, tracker, workdir: Path) -> list[dict]:
    """The rows of a group trial: each member closed from its own state in the group's last checkpoint."""
    states = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            states = load_group_checkpoint(d)
    trial_id = (result.metrics or {}).get("trial_id")
    parent = result.config["const"]["parent_run_id"]
    rows = []
    for i, req in enumerate(result.config["group"]):
        state = states.get(i)
        run_id = (state or {}).get("mlflow_run_id") or (trial_id and _find_trial_run(tracker, f"{trial_id}/m{i}", parent))
        if run_id is None and not state:  # reused from an earlier study: nothing of this trial to close
            done = tracker.finished_run(track.KIND_PROMPT, _request_from({**result.config, "request": req}).hash())
            run_id = done.run_id if done is not None else None
        rows.append(_finalise_run(req, run_id, state, result, tracker, workdir))
    return rows


# ---- generic distribution for the other stages ------------------------------------------------------
def map_tasks(fn, items: list, resources: dict | None = None, names: list[str] | None = None, on_done=None,
              on_units=None) -> list:
    """Run fn(item) as one Ray task per item (readable names), results in order; a failed item raises.

    on_done(i, result) runs on the driver as each item finishes; on_units(n) receives the units a task reports
    while it runs (`report_units` inside fn), relayed to the driver about once a second.
    """
    import ray

    res = dict(resources or {"cpu": 1})
    custom = res.pop("custom", None) or {}
    relay = _Relay.options(num_cpus=0).remote() if on_units else None
    target = _with_relay if relay is not None else fn
    remote = ray.remote(target)  # options() once per call: Ray's options() result has no options() of its own
    opts = {"num_cpus": res.get("cpu", 1), "num_gpus": res.get("gpu", 0), "resources": custom or None,
            "max_retries": 2, "retry_exceptions": False}
    refs = [remote.options(name=(names[i] if names else f"{fn.__name__}-{i}"), **opts).remote(
        *((fn, item, relay) if relay is not None else (item,))) for i, item in enumerate(items)]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(items)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if relay is not None:
                units = ray.get(relay.take.remote())
                if units:
                    on_units(units)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                if on_done is not None:
                    on_done(index[ref], results[index[ref]])
        if relay is not None:  # what the last tasks reported after the last poll
            units = ray.get(relay.take.remote())
            if units:
                on_units(units)
    finally:
        if relay is not None:
            ray.kill(relay)
    return results


class _RelayState:
    """A counter that Ray tasks add their finished units to and the driver drains (see map_tasks)."""

    def __init__(self):
        self.units = 0

    def add(self, n: int) -> None:
        self.units += n

    def take(self) -> int:
        n, self.units = self.units, 0
        return n


class _LazyRelay:
    """ray.remote(_RelayState), made on first use: nothing registers with Ray at import time."""

    _cls = None

    def options(self, **opts):
        import ray

        if _LazyRelay._cls is None:
            _LazyRelay._cls = ray.remote(_RelayState)
        return _LazyRelay._cls.options(**opts)


_Relay = _LazyRelay()
_relay = None  # inside a task started by map_tasks(on_units=...): the driver's relay actor


def _with_relay(fn, item, relay):
    global _relay
    _relay = relay
    try:
        return fn(item)
    finally:
        _relay = None


def report_units(n: int) -> None:
    """Inside a map_tasks task: `n` more units done (shown on the driver's progress bar); elsewhere nothing."""
    if _relay is not None and n:
        _relay.add.remote(int(n))


def map_actors(actor_factory, method: str, items: list, num_actors: int = 2, resources: dict | None = None,
               name: str = "worker", max_resubmits: int = 3, init_args: tuple = (), on_done=None) -> list:
    """Map items over a pool of actors (each built once, `cls(*init_args)`); a dead actor's work is redone.

    on_done(i, result) runs on the driver as each item finishes (progress)."""
    import ray
    from ray.exceptions import RayActorError

    res = dict(resources or {"cpu": 1})
    custom = res.pop("custom", None) or {}
    # one options() call per actor (an options wrapper has no .options); a per-call token keeps names unique
    # while a previous pool's actors are still being torn down
    opts = dict(num_cpus=res.get("cpu", 1), num_gpus=res.get("gpu", 0), resources=custom or None, max_restarts=0)
    cls, token = ray.remote(actor_factory), os.urandom(3).hex()
    actors = [cls.options(name=f"{name}-{i}-{os.getpid()}-{token}", **opts).remote(*init_args)
              for i in range(max(1, min(num_actors, len(items))))]
    results: list = [None] * len(items)
    pending = list(range(len(items)))
    attempts = [0] * len(items)
    in_flight: dict = {}
    spawned = len(actors)
    while pending or in_flight:
        while pending and actors:
            i, actor = pending.pop(0), actors.pop(0)
            in_flight[getattr(actor, method).remote(items[i])] = (i, actor)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        i, actor = in_flight.pop(done[0])
        try:
            results[i] = ray.get(done[0])
            actors.append(actor)
            if on_done is not None:
                on_done(i, results[i])
        except RayActorError:
            attempts[i] += 1
            if attempts[i] > max_resubmits:
                raise PtxError(f"item {i} failed on {attempts[i]} actors; giving up") from None
            log.warning("actor died while processing item %d; resubmitting to a new actor", i)
            # a node that just died still looks alive to Ray for a few seconds (missed health checks): back off
            # so the new actor is not placed on it again and the item's budget is not spent there
            time.sleep(min(2.0 ** attempts[i], 8.0))
            pending.insert(0, i)
            actors.append(cls.options(name=f"{name}-{spawned}-{os.getpid()}-{token}", **opts).remote(*init_args))
            spawned += 1
    return results
