"""The Tune experiment of a sweep: its trainable with the trials' resources, its search space and scheduler (one
ASHA per task and backbone), Tune's output, trial names, and the callback that feeds ptx's progress bar.
"""

import contextlib
import os
import time
from pathlib import Path

from ptx import progress
from ptx.plan import grid_entries
from ptx.prompt_runs import PromptRequest
from ptx.sweep.groups import group_trainable
from ptx.sweep.trials import prompt_trainable


def tune_space(space: dict) -> dict:
    """Spec search space -> Tune distributions."""
    from ray import tune

    out = {}
    for key, dist in space.items():
        (kind, arg), = dist.items()
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}.get(kind, lambda a, k=kind: getattr(tune, k)(*a))(
            list(arg))
    return out


def named_trainable(fn):
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
    return tune.with_resources(named_trainable(fn), {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0), **custom})


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
             **tune_space(search or {})}
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


@contextlib.contextmanager
def feeding_bar(trials: int):
    """While a sweep is fitted: the running stage's bar (train, tpt) fed by TrialProgress, `trials` more in its
    total; yields the bar and its (done, total) before this sweep."""
    global _bar, _bar_base
    _bar = progress.current()
    _bar_base = (_bar.done, _bar.total)
    _bar.update(total=_bar.total + trials)
    try:
        yield _bar, _bar_base
    finally:
        _bar = None


class TrialProgress:
    """Tune callback: trials done / total, the best dev figure so far and steps inside running trials (for the ETA).

    Duck-typed rather than a subclass of Tune's Callback: Tune pickles it with the experiment, and the class must
    stay importable without importing Ray. It holds no state; it feeds whatever bar `feeding_bar` opened.
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
