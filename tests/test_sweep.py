"""Sweeps on a real local Ray (2 CPUs) with a real sqlite MLflow store, on tiny backbones."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from support import prompt_runs, write_spec

from ptx import sweep, track
from ptx.config import load_study
from ptx.errors import PtxError
from ptx.sweep import experiment as tune_experiment

pytestmark = pytest.mark.ray  # ray_local: the session's shared local Ray (conftest.py)


def test_asha_sweep_stops_poor_trials_early(ray_local, tmp_path, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    spec = load_study(write_spec(
        tmp_path / "asha.yaml", seeds=[0, 1],
        search={"algorithm": "grid", "space": {"lr": {"grid": [1e-6, 0.05]}}},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2, "metric": "train_loss"},
        train={"steps": 15, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32}))
    uri = track.resolve_tracking_uri(None, tmp_path)
    summary = sweep.run_sweep(spec, tmp_path, uri, max_concurrent=2)
    assert summary["trials"] == 8 and summary["errored"] == 0
    iterations = [r["iterations"] for r in summary["rows"]]
    full = 15 // 3  # one Tune result per evaluation after step 0
    assert max(iterations) == full
    assert min(iterations) < full, f"ASHA stopped no trial early: {iterations}"
    runs = prompt_runs(uri, spec.name)
    assert len(runs) == 8 and all(r.status == "FINISHED" for r in runs)
    best = [r for r in runs if r.tags.get("ptx.best") == "true"]
    assert {(r.tags["ptx.task"], r.tags["ptx.backbone"]) for r in best} == {
        ("tweet_sentiment", "tiny-llama"), ("drug_sentiment", "tiny-llama")}
    assert all(r.tags.get("mlflow.parentRunId") == summary["parent_run_id"] for r in runs)


def _iterations_by_trial(scheduler, tmp_path, name: str) -> dict:
    from ray import tune

    def scripted_trial(config: dict) -> None:
        """The dev score is scripted: the easy task scores ~0.8, the hard one ~0.2; the larger lr is better on
        both. No model: the point is which trials the scheduler lets run. (Nested, so Ray ships it by value.)"""
        req = config["request"]
        base = {"easy": 0.8, "hard": 0.2}[req["task"]] + (0.05 if req["lr"] > 0.01 else 0.0)
        for i in range(1, 7):
            tune.report({"best_dev_metric": base + 0.01 * i})

    grid = [{"task": task, "backbone": "tiny-llama", "lr": lr} for task, lr in
            (("easy", 0.001), ("hard", 0.001), ("hard", 0.05))]
    tuner = tune.Tuner(scripted_trial, param_space={"request": tune.grid_search(grid)},
                       tune_config=tune.TuneConfig(metric="best_dev_metric", mode="max", scheduler=scheduler,
                                                   max_concurrent_trials=1, reuse_actors=True),  # grid order
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
    return {(r.config["request"]["task"], r.config["request"]["lr"]): r.metrics["training_iteration"]
            for r in tuner.fit()}


def test_asha_ranks_trials_within_their_task_so_a_hard_task_keeps_its_best_trial(ray_local, tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from ptx.prompt_runs import PromptRequest
    from ptx.train import TrainSettings

    reqs = [PromptRequest(task="easy", backbone="tiny-llama", settings=TrainSettings(steps=6, eval_every=1))]
    asha = {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 6}
    grouped = _iterations_by_trial(sweep.make_scheduler(asha, reqs), tmp_path, "grouped")
    # the hard task's first trial has no rival of its task at any rung: it runs to the end; its better trial
    # (lr 0.05) beats it at every rung and also runs to the end
    assert grouped == {("easy", 0.001): 6, ("hard", 0.001): 6, ("hard", 0.05): 6}
    # ungrouped ASHA (the code before this change) on the same trials: the hard task's trials meet the easy
    # task's score at the first rung and both stop there, its best trial included
    plain = _iterations_by_trial(ASHAScheduler(time_attr="training_iteration", max_t=6, grace_period=1,
                                               reduction_factor=2), tmp_path, "plain")
    assert plain[("hard", 0.05)] == 1 and plain[("hard", 0.001)] == 1


def test_failed_trial_retries_from_checkpoint(ray_local, tmp_path, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    spec = load_study(write_spec(tmp_path / "retry.yaml", tasks=["tweet_sentiment"]))
    uri = track.resolve_tracking_uri(None, tmp_path)
    ray_local.mkdir()  # arms the hook: the trial raises once after its step-6 report
    try:
        summary = sweep.run_sweep(spec, tmp_path, uri)
    finally:
        fired = list(ray_local.iterdir())
        for f in fired:
            f.unlink()
        ray_local.rmdir()
    assert len(fired) == 1, "the injected failure did not fire"
    assert summary["errored"] == 0 and summary["trials"] == 1
    runs = prompt_runs(uri, spec.name)
    assert len(runs) == 1 and runs[0].status == "FINISHED"  # the retry reused the trial's run
    client = track.MlflowTracker(uri, spec.name).client
    # resumed from the step-6 checkpoint: every evaluation step of the whole run is in the store exactly once, the
    # ones before the failure (not logged again) and the ones after it (logged by the retry)
    for key, expected in (("dev_accuracy", [0, 3, 6, 9, 12]), ("best_dev_metric", [0, 3, 6, 9, 12]),
                          ("train_loss", [3, 6, 9, 12])):
        steps = [m.step for m in client.get_metric_history(runs[0].run_id, key)]
        assert sorted(steps) == expected, f"{key}: steps {sorted(steps)}, expected each of {expected} once"


def test_ray_workers_start_with_mlflow_telemetry_off(ray_local):
    """Every Ray worker of a sweep imports mlflow with its telemetry off (track.TELEMETRY_ENV). With it on, an
    offline worker's telemetry thread removed its session id from os.environ while `requests` read os.environ:
    at 500 trials two trials' first log-batch failed with KeyError('_MLFLOW_TELEMETRY_SESSION_ID')."""
    import ray

    @ray.remote(num_cpus=0)
    def probe():
        import mlflow  # noqa: F401  (the telemetry client is made, or not, on import)
        from mlflow.telemetry.client import get_telemetry_client

        return os.environ.get("MLFLOW_DISABLE_TELEMETRY"), get_telemetry_client() is None

    assert ray.get(probe.remote()) == ("true", True)


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_asks_for_each_trials_resources_again(grouped):
    """Tune keeps no trial's resources in its saved experiment state: it asks the trainable again on restore.
    `ptx resume` used to restore a bare trainable, so every resumed trial asked {cpu: 1}: no GPU share, no custom
    node resource (the head-restart test of test_multinode.py caught a resumed trial running on the head). It now
    rebuilds the request from the sweep's state file."""
    state = {"grouped": grouped, "resources": {"cpu": 2.0, "gpu": 0.25, "custom": {"worker_node": 0.5}}}
    request = sweep.resumed_trainable(state).default_resource_request({})
    assert request.bundles == [{"CPU": 2.0, "GPU": 0.25, "worker_node": 0.5}]


def test_a_cut_tune_state_is_refused_or_dropped_before_tune_reads_it(tmp_path, caplog):
    """Tune copies its state to storage_path by truncating each target first; a driver killed mid-copy left both
    files empty and Tune's restore silently started over with an empty config (CI: 2 of 4 runs, exit 0)."""
    import pickle

    searcher = pickle.dumps({"_live_trials": {"a_00000"}, "counter": 2})
    (tmp_path / "experiment_state-2026-12-01_10-00-00.json").write_text('{"trial_data": []}')
    (tmp_path / "experiment_state-2026-12-02_10-00-00.json").write_text('{"trial_data": [[{"trial_id": "a_0')
    with pytest.raises(PtxError, match=r"experiment_state-2026-12-02_10-00-00.json: Tune's saved trial list is cut "
                                       r"short \(34 bytes"):
        sweep.check_tune_state(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-02_10-00-00.json").write_text('{"trial_data": []}')
    (tmp_path / "basic-variant-state-2026-12-02_10-00-00.json").write_bytes(searcher)
    sweep.check_tune_state(str(tmp_path))  # whole: kept
    assert (tmp_path / "basic-variant-state-2026-12-02_10-00-00.json").read_bytes() == searcher
    (tmp_path / "basic-variant-state-2026-12-01_10-00-00.json").write_bytes(searcher)  # an earlier session's
    (tmp_path / "basic-variant-state-2026-12-02_10-00-00.json").write_bytes(searcher[:len(searcher) // 2])
    sweep.check_tune_state(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_state-2026-12-01_10-00-00.json",
                                                         "experiment_state-2026-12-02_10-00-00.json"]
    assert "searcher state is cut short" in caplog.text
    (tmp_path / "search_gen_state-2026-12-02_10-00-00.json").write_bytes(b"")  # an Optuna sweep's, emptied
    (tmp_path / "searcher-state-2026-12-02_10-00-00.pkl").write_bytes(searcher)
    sweep.check_tune_state(str(tmp_path))
    assert not list(tmp_path.glob("search*"))


def test_unstarted_trials_are_the_planned_ones_no_trial_config_covers():
    """The state file's plan against the trial configs Tune's saved state holds: what `ptx resume` runs itself."""
    a = {"task": "a", "settings": {"seed": 0, "lr": 0.3}}
    b = {"task": "b", "settings": {"seed": 0, "lr": 0.3}}
    search = {"lr": {"grid": [0.1, 0.2]}, "prompt_length": {"choice": [4, 8]}}
    planned = sweep.planned_trials([a, b], search, num_samples=2)
    assert len(planned) == 8 and planned[0] == {"base": a, "grid": {"lr": 0.1}}
    # Tune's configs: a drawn prompt_length and a state file's JSON round trip do not hide a covered trial
    configs = [{"request": a, "lr": 0.1, "prompt_length": 8, "const": {}}, {"request": a, "lr": 0.2, "prompt_length": 4},
               {"request": a, "lr": 0.1, "prompt_length": 4}, {"request": b, "lr": 0.2, "prompt_length": 8}]
    missing = sweep.unstarted_trials(planned, configs)
    assert missing == [{"base": a, "grid": {"lr": 0.2}}, {"base": b, "grid": {"lr": 0.1}},
                       {"base": b, "grid": {"lr": 0.1}}, {"base": b, "grid": {"lr": 0.2}}]
    assert sweep.unstarted_trials(planned, configs + [{"request": a, "lr": 0.2}, {"request": b, "lr": 0.2}]
                                  + [{"request": b, "lr": 0.1}] * 2) == []


def test_an_unstarted_trial_carries_its_searched_values_in_its_request():
    req = dataclasses.asdict(sweep.PromptRequest(task="tweet_sentiment", backbone="tiny-llama",
                                                 settings=sweep.TrainSettings(steps=6, lr=0.3, seed=1)))
    entry, (built,) = tune_experiment.baked_trial({"base": req, "grid": {"lr": 0.05}}, {"lr": {"grid": [0.05, 0.5]},
                                                                        "prompt_length": {"choice": [7]}})
    assert (built.settings.lr, built.prompt_length, built.settings.seed, built.settings.steps) == (0.05, 7, 1, 6)
    assert entry == dataclasses.asdict(built)
    group, members = tune_experiment.baked_trial({"base": [req, {**req, "task": "drug_sentiment"}], "grid": {"lr": 0.5}}, None)
    assert [m.settings.lr for m in members] == [0.5, 0.5] and [g["task"] for g in group] == [
        "tweet_sentiment", "drug_sentiment"]


def test_rerun_reuses_finished_runs(ray_local, tmp_path, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    spec = load_study(write_spec(tmp_path / "again.yaml", tasks=["drug_sentiment"]))
    uri = track.resolve_tracking_uri(None, tmp_path)
    sweep.run_sweep(spec, tmp_path, uri, name="first")
    (first,) = prompt_runs(uri, spec.name)
    client = track.MlflowTracker(uri, spec.name).client
    keys = ("dev_accuracy", "train_loss", "best_dev_metric")
    before = {k: [(m.step, m.timestamp) for m in client.get_metric_history(first.run_id, k)] for k in keys}
    summary = sweep.run_sweep(spec, tmp_path, uri, name="second")
    assert summary["errored"] == 0
    assert len(prompt_runs(uri, spec.name)) == 1, "the same config trained twice"
    # nothing was trained again: the run's curves and its end are exactly those of the first sweep
    (again,) = prompt_runs(uri, spec.name)
    assert again.run_id == first.run_id and again.end_time == first.end_time
    assert {k: [(m.step, m.timestamp) for m in client.get_metric_history(first.run_id, k)] for k in keys} == before
    assert before["dev_accuracy"], "the first sweep logged no curve"


# grouped: the four runs as two trials of two prompts each (train.group_size 2; ptx.train_group).
# search-state-cut: with max_concurrent 2, Tune creates trials 3 and 4 only when a slot frees up; its saved state
# lists trials 1 and 2, and the other two live only in its searcher's state, a second file. A kill during Tune's copy
# of that file leaves it cut short, and Tune's restore then started over with an empty config (CI: 2 of 4 runs, exit
# 0). The case cuts the file in half after the kill: ptx drops it and runs the planned trials Tune never named.
# s3: the same with storage_path=s3://... on an S3-compatible server started by the test (moto's server mode on
# 127.0.0.1), the documented multi-node setting: Tune's state and checkpoints, ptx's state file, the kill's cut and
# the resume all go through object storage.
@pytest.mark.slow  # two local Rays in subprocesses (the killed sweep's, the resume's): 60-90 s each at load 1-6
@pytest.mark.parametrize("group,lose_search_state,storage",
                         [(1, False, "local"), (1, True, "local"), (2, False, "local"), (1, False, "s3")],
                         ids=["alone", "search-state-cut", "grouped", "s3"])
def test_killed_driver_is_finished_by_resume(tmp_path, new_workdir, group, lose_search_state, storage, request):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    steps = 18  # held at step 12 until the kill, so they need not be long: two evaluations are left to the resume
    train = {"steps": steps, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32}
    s3_env = request.getfixturevalue("s3_server") if storage == "s3" else {}
    results = Storage(f"s3://{S3_BUCKET}/ray-results" if s3_env else str(tmp_path / "ray_results"))
    spec_path = write_spec(tmp_path / "killed.yaml", seeds=[0, 1],
                           train={**train, "group_size": group} if group > 1 else train,
                           **({"storage_path": results.uri} if s3_env else {}))
    n_trials = 4 // group
    running = min(n_trials, 2)  # max_concurrent 2: Tune creates trials 3 and 4 only as trials 1 and 2 end
    hold = tmp_path / "hold"  # the running trials wait after their step-12 report (sweep.HOLD_ENV): none can end
    hold.mkdir()  # before the kill (CI's quick box once finished a grouped trial first and finalised it)
    env = {**os.environ, **s3_env, "PTX_WORKDIR": str(tmp_path), sweep.HOLD_ENV: f"12:{hold}"}
    env.pop(sweep.FAIL_ONCE_ENV, None)
    ptx = [sys.executable, "-m", "ptx", ]
    driver = subprocess.Popen([*ptx, "sweep", str(spec_path), "--workdir", str(tmp_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 420  # a loaded 2-core box may take minutes to start Ray and the first trials
    # kill once the running trials are held and Tune's storage holds four of a trial's results (so three registered
    # checkpoints): Tune copies its state there only every 10 s or so, and that state may name any of them
    while time.time() < deadline and (len(list(hold.glob("held-*"))) < running or
                                      max(map(results.registered_results, results.trials()), default=0) < 4):
        assert driver.poll() is None, "the sweep ended before the kill"
        time.sleep(0.2)
    # and between two of those copies: a kill inside one cuts the files short (check_tune_state's business, tested on
    # its own above and by search-state-cut)
    while time.time() < deadline and not results.between_state_copies():
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-sweep
    (hold / "release").write_text("1")  # the resume's trials run through
    assert driver.wait() == -signal.SIGKILL, "the sweep ended before the kill"
    trial_dirs = results.trials()
    assert max(map(results.registered_results, trial_dirs), default=0) >= 4, "no trial got far enough before the kill"
    for trial in trial_dirs:  # none was deleted: a killed driver's saved state may name any of them
        expected = {f"checkpoint_{i:06d}" for i in range(results.registered_results(trial) - 1)}
        assert expected <= set(results.names(trial, "checkpoint_")), (trial, results.names(trial))
    (experiment,) = results.experiments()
    state = tune_experiment._read_state(results.uri_of(experiment))
    assert state["resources"] == {"cpu": 1.0, "gpu": 0.0, "custom": {}}
    assert state["planned_trials"] == n_trials and len(state["planned"]) == n_trials
    searcher_files = [f"{experiment}/{n}" for n in results.names(experiment, "basic-variant-state-")]
    (saved,) = [json.loads(results.read(f"{experiment}/{n}")) for n in results.names(experiment, "experiment_state-")]
    listed = len(saved["trial_data"])
    assert listed == running, saved["trial_data"]  # trials 3 and 4 live only in the searcher's state
    assert len(searcher_files) == 1 and results.read(searcher_files[0]).endswith(b"."), results.names(experiment)
    if lose_search_state:  # as a kill mid-copy leaves it
        whole = results.read(searcher_files[0])
        results.write(searcher_files[0], whole[:len(whole) // 2])
    experiment_uri = results.uri_of(experiment)
    out = subprocess.run([*ptx, "resume", experiment_uri], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ": 4 trials, 0 errored" in out.stdout, out.stdout[-1000:] + out.stderr[-2000:]  # prompts, grouped or not
    unstarted = re.search(r"names (\d) of the 4 planned trials .* running the (\d) others as (\S+)", out.stderr)
    # with the searcher's state cut, Tune knows only the two held trials: ptx runs the other two beside them
    assert bool(unstarted) == lose_search_state, out.stderr[-2000:]
    assert ("searcher state is cut short" in out.stderr) == lose_search_state, out.stderr[-2000:]
    if unstarted:
        assert unstarted.groups() == ("2", "2", f"{experiment_uri}-rest")
    uri = track.resolve_tracking_uri(None, tmp_path)
    runs = prompt_runs(uri, "killed")
    assert len(runs) == 4, [r.tags.get("ptx.trial_id") for r in runs]
    assert sorted(r.name for r in runs) == sorted(f"{t} · tiny-llama · s{s}" for t in ("tweet_sentiment", "drug_sentiment")
                                                  for s in (0, 1))  # each planned run once
    assert len({r.tags["ptx.trial_id"] for r in runs}) == 4
    assert all(r.status == "FINISHED" for r in runs)
    client = track.MlflowTracker(uri, "killed").client
    for r in runs:
        names = {a.path for a in client.list_artifacts(r.run_id, "prompt")}
        assert names == {"prompt/prompt.json", "prompt/prompt.safetensors"}
    if group > 1:  # every member resumed in its own run: two per group trial
        assert sorted(Counter(r.tags["ptx.group_trial"] for r in runs).values()) == [2, 2]
    for r in runs:  # every variant: each point of each curve logged exactly once across the kill and the resume
        for key, first in (("dev_accuracy", 0), ("best_dev_metric", 0), ("train_loss", 3)):
            points = [m.step for m in client.get_metric_history(r.run_id, key)]
            assert sorted(points) == list(range(first, steps + 1, 3)), (r.tags["ptx.trial_id"], key, points)
    status = subprocess.run([*ptx, "status", experiment_uri], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("TERMINATED") == n_trials
    # finalised trials keep only their last checkpoint: all of them now, with those the resume ran beside the first
    trials = [t for e in (experiment, f"{experiment}-rest") for t in results.dirs(e)]
    assert bool(results.dirs(f"{experiment}-rest")) == bool(unstarted)
    assert sorted(len(results.names(trial, "checkpoint_")) for trial in trials) == [1] * n_trials


@pytest.mark.slow  # two local Rays (the sweep's, the resume's) and 150-step trials: 1-2 min idle, 4-7 min at load 25
def test_sigterm_stops_the_sweep_like_ctrl_c_and_resume_finishes_it(tmp_path):
    """A real SIGTERM to a real `ptx sweep` (as a scheduler, `kill` or `docker stop` sends it) stops the trials,
    closes their runs and the sweep's KILLED and leaves a resumable experiment; `ptx resume` then finishes each
    trial exactly once. Before the fix, Ray's driver handler unwound past Tune: the runs stayed RUNNING."""
    spec_path = write_spec(tmp_path / "termed.yaml", tasks=["tweet_sentiment"], seeds=[0, 1],
                           train={"steps": 150, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32})
    hold = tmp_path / "hold"  # both trials wait after their step-9 report (sweep.HOLD_ENV) until the signal
    hold.mkdir()
    env = {**os.environ, "PTX_WORKDIR": str(tmp_path), sweep.HOLD_ENV: f"9:{hold}"}
    env.pop(sweep.FAIL_ONCE_ENV, None)
    ptx = [sys.executable, "-m", "ptx"]
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([*ptx, "sweep", str(spec_path), "--workdir", str(tmp_path)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    results = tmp_path / "ray_results"
    try:
        deadline = time.time() + 420  # a local Ray and two trial workers starting on a loaded 2-core box
        while time.time() < deadline and len(list(hold.glob("held-*"))) < 2:
            assert driver.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert len(list(hold.glob("held-*"))) == 2, "no trial got going in time"
        driver.send_signal(signal.SIGTERM)  # to the driver alone, not its process group
        (hold / "release").write_text("1")  # the trials go on until Tune stops them
        rc = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 130, f"exit {rc}:\n{text[-3000:]}"
    experiment = next(p for p in results.iterdir() if p.is_dir())
    assert f"interrupted: sweep interrupted with 2 of 2 trials unfinished; finish it with: ptx resume {experiment}" \
        in text, text[-3000:]
    # the stage's closing progress line counts no stopped trial as done (it said "2/2 trials" before the fix)
    counts = re.findall(r"\[train\] (\d+)/2 trials", text)
    assert counts and counts[-1] == "0", (counts, text[-3000:])
    uri = track.resolve_tracking_uri(None, tmp_path)
    tracker = track.MlflowTracker(uri, "termed")
    runs = prompt_runs(uri, "termed")
    assert sorted(r.status for r in runs) == ["KILLED", "KILLED"]
    (parent,) = tracker.find_runs({"ptx.kind": "sweep"}, status=None)
    assert parent.status == "KILLED"
    steps_at_stop = {r.run_id: max(m.step for m in tracker.client.get_metric_history(r.run_id,
                                                                                           "dev_accuracy"))
                     for r in runs}
    assert all(step < 150 for step in steps_at_stop.values()), steps_at_stop  # stopped mid-training
    out = subprocess.run([*ptx, "resume", str(experiment)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = prompt_runs(uri, "termed")
    assert sorted(r.run_id for r in after) == sorted(steps_at_stop), "a resumed trial opened a second run"
    assert all(r.status == "FINISHED" for r in after)
    assert tracker.client.get_run(parent.run_id).info.status == "FINISHED"
    for r in after:
        got = [m.step for m in tracker.client.get_metric_history(r.run_id, "dev_accuracy")]
        assert sorted(got) == list(range(0, 151, 3)), (r.run_id, sorted(got))  # each step exactly once
        names = {a.path for a in tracker.client.list_artifacts(r.run_id, "prompt")}
        assert names == {"prompt/prompt.json", "prompt/prompt.safetensors"}


class Storage:
    """Tune's storage_path, a local directory or an s3:// URI, read through pyarrow as Tune and ptx write it."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = tune_experiment._storage_fs(uri)

    def uri_of(self, path: str) -> str:
        return f"s3://{path}" if self.uri.startswith("s3://") else path

    def _infos(self, path: str) -> list:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    def dirs(self, path: str) -> list[str]:
        import pyarrow.fs as pafs

        return sorted(i.path for i in self._infos(path) if i.type == pafs.FileType.Directory)

    def names(self, path: str, prefix: str = "") -> list[str]:
        return sorted(i.base_name for i in self._infos(path) if i.base_name.startswith(prefix))

    def experiments(self) -> list[str]:
        return [d for d in self.dirs(self.root) if not d.endswith("-rest")]

    def trials(self) -> list[str]:
        return [t for e in self.experiments() for t in self.dirs(e)]

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def registered_results(self, trial_dir: str) -> int:
        """How many results of a trial Tune's driver has processed (it appends each to result.json, in order)."""
        try:
            lines = self.read(f"{trial_dir}/result.json").decode().splitlines()
        except OSError:
            return 0
        return sum(1 for line in lines if line.strip().endswith("}"))

    def between_state_copies(self) -> bool:
        """Tune's last copy of its experiment state to storage is whole and 0.3-5 s old (the next comes ~10 s
        after the one before)."""
        states = [i for e in self.experiments() for i in self._infos(e) if i.base_name.startswith("experiment_state-")]
        try:
            json.loads(self.read(states[0].path))
            return len(states) == 1 and 0.3 < time.time() - states[0].mtime.timestamp() < 5
        except (IndexError, OSError, ValueError):
            return False


S3_BUCKET = "ptx-killed-driver"


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """An S3-compatible server for the test alone: moto's server mode on 127.0.0.1, one bucket. Returns the
    environment that points boto3, pyarrow and Ray Tune at it (test credentials: moto checks none)."""
    from support import free_port, tail

    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    log = tmp_path / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import boto3

        for name, value in env.items():
            monkeypatch.setenv(name, value)  # this process reads the bucket through pyarrow too
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"moto server exited:\n{tail(log)}"
            try:
                boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # not listening yet
                assert time.monotonic() < deadline, f"moto server not up after 120 s:\n{tail(log)}"
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow  # four `ptx` processes, two of them starting a local Ray: 50 s on 2 nearly idle cores
def test_bad_cli_inputs_exit_2(tmp_path):
    env = {**os.environ}
    ptx = [sys.executable, "-m", "ptx"]
    big = write_spec(tmp_path / "big.yaml", resources={"cpu": 1, "gpu": 4})
    cases = [
        ([*ptx, "sweep", str(big), "--workdir", str(tmp_path / "big")], "exceed every node"),
        ([*ptx, "sweep", str(write_spec(tmp_path / "ok.yaml")), "--address", "127.0.0.1:1", "--workdir",
          str(tmp_path / "ok")], "cannot reach a Ray cluster"),
        ([*ptx, "resume", str(tmp_path)], "not a Tune experiment"),
        ([*ptx, "status", str(tmp_path)], "not a Tune experiment"),
    ]
    # the four are independent (a workdir each, their own local Rays): started together, they wait on their imports
    # and Ray start-ups side by side rather than one after the other
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, _ in cases]
    try:
        for proc, (cmd, expected) in zip(procs, cases, strict=True):
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 2, (cmd, stderr[-1500:])
            last = [line for line in stderr.splitlines() if line.startswith("error:")]
            assert last and expected in last[-1], stderr[-1500:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
