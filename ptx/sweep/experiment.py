"""A sweep as one Tune experiment: run prompt requests (run_requests, the Ray adapter's entry; run_sweep for a
study's training stage), its state file, `ptx resume` of an interrupted sweep (with the trials its Tune state never
named), and the trial table of `ptx status`.

The MLflow hierarchy: one parent run per sweep (`ptx.kind=sweep`), one child run per trial. A trial's run id
lives in its checkpoints and in the run's `ptx.trial_id` tag, so a retried or resumed trial reuses its run.
After `fit()`, the driver finalises every trial from its last checkpoint (ptx.sweep.finalisation).
"""

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path

from ptx import guards, track
from ptx.errors import PtxError, SweepInterrupted
from ptx.plan import (
    SweepSettings,
    grid_entries,
    planned_trials,
    request_from,
    search_points,
    sweep_requests,
    sweep_settings,
    unstarted_trials,
)
from ptx.prompt_runs import PromptRequest
from ptx.sweep import cluster
from ptx.sweep.cluster import check_resources, live_nodes
from ptx.sweep.finalisation import finalise, log_sweep_datasets
from ptx.sweep.tuner import build_tuner, feeding_bar, trial_trainable, tune_space

log = logging.getLogger(__name__)
STATE_FILE = "ptx_sweep.json"  # beside the Tune experiment: what `ptx resume` needs to finish the job


def run_requests(requests: list[PromptRequest], settings: SweepSettings, workdir: Path, tracking_uri: str) -> dict:
    """Run prompt requests as one Tune experiment (ptx.plan.SweepSettings say how); finalise every trial and tag
    the best prompts. The sweep's own run (ptx.kind=sweep) is the parent of its trials' runs."""
    s, workdir = settings, Path(workdir)
    res = s.resources
    check_resources(res["cpu"], res["gpu"], res.get("custom"), autoscaling=cluster.joined_cluster())
    guards.check_storage(s.storage_path, len(live_nodes()), cluster.joined_cluster(), s.storage_shared)
    tracker = track.open(tracking_uri, s.experiment, workdir=workdir)
    stage = s.tags.get("ptx.stage")
    parent = tracker.start_run(track.run_name(stage, s.experiment, "sweep"), {
        "ptx.kind": "sweep", "ptx.study": s.experiment, "ptx.experiment_path": f"{s.storage_path}/{s.name}",
        "ptx.config_hash": s.config_hash, "ptx.stage": stage})
    tracker.log(parent, params={"plan": s.plan})
    bases = grid_entries(requests, s.group_size)
    n_trials = len(bases) * search_points(s.search, s.algorithm) * s.num_samples
    # build_tuner's arguments, kept in the state file for the trials `ptx resume` may have to start itself
    build = {"storage_path": s.storage_path, "search": s.search, "algorithm": s.algorithm, "scheduler": s.scheduler,
             "max_concurrent": s.max_concurrent, "max_failures": s.max_failures, "tags": s.tags, "force": s.force,
             "group_size": s.group_size}
    tuner = build_tuner(requests, s.name, workdir, tracking_uri, s.experiment, parent, **build,
                        num_samples=s.num_samples, resources=res, entries=bases)
    _write_state(s.storage_path, s.name, {
        "tracking_uri": tracking_uri, "experiment": s.experiment, "workdir": str(workdir), "parent_run_id": parent,
        "study_file": s.study_file, "name": s.name, "grouped": s.group_size > 1, "resources": res,
        "planned_trials": n_trials, "build": build,
        "planned": None if s.algorithm == "optuna" else planned_trials(bases, s.search, s.num_samples)})
    return _fit_and_finalise(tuner, tracker, parent, workdir, n_trials)


def run_sweep(spec, workdir: Path, tracking_uri: str, storage_path: str | None = None,
              max_concurrent: int | None = None, force: bool = False, requests: list | None = None,
              name: str | None = None, tags: dict | None = None) -> dict:
    """Run a study's training stage (or `requests`) as a Tune experiment; finalise and tag the best prompts."""
    settings = sweep_settings(spec, workdir, name=name, storage_path=storage_path, max_concurrent=max_concurrent,
                              force=force, tags=tags)
    return run_requests(requests or sweep_requests(spec), settings, workdir, tracking_uri)


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
    tracker = track.open(state["tracking_uri"], state["experiment"], workdir=Path(state["workdir"]))
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


# ---- what Tune never started: the planned trials a restored sweep's Tune state does not name (why: ptx.plan) ----
def baked_trial(entry: dict, search: dict | None) -> tuple[list | dict, list[PromptRequest]]:
    """A planned trial as one grid entry with its searched values inside its request(s) (grid values as planned,
    drawn fields drawn now), and its requests."""
    drawn = {k: v.sample() for k, v in tune_space({k: d for k, d in (search or {}).items() if "grid" not in d}).items()}
    point = {**entry["grid"], **drawn}
    members = entry["base"] if isinstance(entry["base"], list) else [entry["base"]]
    reqs = [request_from({**point, "request": m}) for m in members]
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
    baked = [baked_trial(m, b["search"]) for m in missing]  # searched values inside: a plain grid, no search
    return build_tuner([r for _, reqs in baked for r in reqs], rest, Path(state["workdir"]), state["tracking_uri"],
                       state["experiment"], state["parent_run_id"], **{**b, "search": None, "algorithm": "grid"},
                       resources=state.get("resources"), entries=[e for e, _ in baked])


def _fit_and_finalise(tuner, tracker, parent: str, workdir: Path, trials: int = 0, then=None) -> dict:
    """Fit, then finalise the trials; `then(grid)` may return a second Tuner (the trials a resumed sweep's Tune
    state never named), fitted after the first and finalised with it."""
    t0 = time.perf_counter()
    with feeding_bar(trials) as (bar, (base_done, _)):  # the running stage's bar (train, tpt), fed by TrialProgress
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
        bar.update(total=max(bar.total, base_done + len(results)), done=base_done + len(results) - interrupted,
                   note=f"{sum(r.error is not None for r in results)} errored" if any(r.error is not None for r in results)
                   else "")
    wall = time.perf_counter() - t0
    # a server blip at the end costs a wait, not the sweep
    track.wait_reachable(tracker.uri, tries=track.outage_wait_tries(), delay=2.0)
    if interrupted:
        _close_interrupted(tracker, parent)
        raise SweepInterrupted(f"sweep interrupted with {interrupted} of {len(results)} trials unfinished; finish "
                               f"it with: ptx resume {_grid_uri(grid)}")
    summary = finalise(results, tracker, workdir)
    summary["tune_trials"] = len(results)  # trials (a group is one), where summary["trials"] counts prompts
    log_sweep_datasets(tracker, parent, summary["rows"])
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
