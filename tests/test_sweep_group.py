"""Grouped sweeps (train.group_size): a trial trains several prompts; each is still its own MLflow prompt run."""


import pytest
import support
from cli_runner import invoke_cli
from support import SMALL_STUDY

from ptx import sweep, track
from ptx.config import load_study
from ptx.errors import PtxError

# the small study (support.SMALL_STUDY) with two seeds, 48 training examples and three prompts a trial
GROUPED = {"seeds": [0, 1], "train": {**SMALL_STUDY["train"], "group_size": 3},
           "data": {**SMALL_STUDY["data"], "train_limit": 48}}


def write_spec(path, **changes):
    return support.write_spec(path, **{**GROUPED, **changes})


def test_the_plan_is_printed_in_groups(tmp_path):
    spec = load_study(write_spec(tmp_path / "plan.yaml", seeds=[0, 1, 2], resources={"cpu": 2, "gpu": 0.5}))
    plan = sweep.plan(spec)
    assert (plan["group_size"], plan["groups"], plan["trials"]) == (3, 2, 2)
    assert plan["members_per_group"] == [3, 3] and plan["groups_per_gpu"] == 2.0
    # the default rule: 1 on CPU; on GPUs (FIFO grid sweeps) the largest group that fits and leaves a trial per GPU
    # slot: 4 runs of a tiny model, all fit; 1 GPU -> one group of 4; 8 GPUs -> 8 slots, so groups of 1 (4 trials)
    train = {"steps": 12, "batch_size": 8, "lr": 0.05, "eval_every": 3}
    assert sweep.group_size(load_study(write_spec(tmp_path / "cpu.yaml", train=train))) == 1
    gpu = load_study(write_spec(tmp_path / "gpu.yaml", train=train, resources={"cpu": 2, "gpu": 1}, cluster={"gpus": 1}))
    assert sweep.group_size(gpu) == 4
    gpu8 = load_study(write_spec(tmp_path / "gpu8.yaml", train={**train, "group_size": "auto"},
                                 resources={"cpu": 2, "gpu": 1}, cluster={"gpus": 8}))
    assert sweep.group_size(gpu8) == 1


def test_dry_run_prints_the_plan_in_groups(tmp_path):
    path = write_spec(tmp_path / "plan.yaml", seeds=[0, 1, 2], resources={"cpu": 2, "gpu": 0.5})
    code, out, err = invoke_cli("run", path, "--dry-run")
    assert code == 0, err
    assert "study plan: 2 trials = 6 runs" in out
    assert "groups: 2 trial(s) of up to 3 prompts, one backbone copy each (members per group [3, 3], 2 group(s) " \
           "per GPU)" in out
    code, out, _ = invoke_cli("run", path, "--dry-run", "--set", "train.group_size=1")
    assert code == 0 and "study plan: 6 trials = 6 runs" in out and "groups:" not in out


def test_groups_refuse_asha(tmp_path):
    with pytest.raises(PtxError, match=r"train.group_size: 3 puts several prompts in one trial, and ASHA"):
        load_study(write_spec(tmp_path / "asha.yaml", scheduler={"type": "asha"}))


def test_group_requests_keep_members_that_share_a_pass_together(tmp_path):
    spec = load_study(write_spec(tmp_path / "g.yaml", backbones=["tiny-llama", "tiny-bert"]))
    groups = sweep.group_requests(sweep.sweep_requests(spec), 3)
    assert [len(g) for g in groups] == [3, 1, 3, 1]
    assert all(len({r.backbone for r in g}) == 1 for g in groups)
    # a generation task is scored by decoding, not label words: each of its runs is a group of one
    t5 = load_study(write_spec(tmp_path / "t5.yaml", backbones=["tiny-t5"], tasks=["tweet_sentiment", "squad"]))
    groups = sweep.group_requests(sweep.sweep_requests(t5), 3)
    assert [[(r.task, r.settings.seed) for r in g] for g in groups] == [
        [("tweet_sentiment", 0), ("tweet_sentiment", 1)], [("squad", 0)], [("squad", 1)]]


@pytest.mark.ray
@pytest.mark.slow  # two sweeps, one with a retried group: 30 s on 2 nearly idle cores
def test_a_grouped_sweep_logs_every_member_and_a_retried_group_resumes_them_all(tmp_path, new_workdir, ray_local):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    markers = ray_local  # the shared Ray's fault hook (conftest.py), armed while this directory exists
    markers.mkdir()  # the group trial raises once after its step-6 report
    train = {"steps": 9, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32}
    try:
        spec = load_study(write_spec(tmp_path / "grouped.yaml", seeds=[0], train={**train, "group_size": 2}))
        uri = track.resolve_tracking_uri(None, tmp_path)
        summary = sweep.run_sweep(spec, tmp_path, uri, name="grouped")
        fired = list(markers.iterdir())
        assert len(fired) == 1, "the injected failure did not fire"
        for f in fired:
            f.unlink()
        assert summary["errored"] == 0 and summary["trials"] == 2
        tracker = track.MlflowTracker(uri, spec.name)
        runs = tracker.find_runs({"ptx.kind": "prompt"}, status=None)
        assert len(runs) == 2 and all(r.status == "FINISHED" for r in runs)
        # the same config hashes as one run per trial: a later ungrouped study finds and skips them
        assert {r.tags["ptx.config_hash"] for r in runs} == {q.hash() for q in sweep.sweep_requests(spec)}
        assert len({r.tags["ptx.trial_id"] for r in runs}) == 2
        assert len({r.tags["ptx.group_trial"] for r in runs}) == 1
        for r in runs:  # resumed from the group's step-6 checkpoint: every point logged once
            steps = [m.step for m in tracker.client.get_metric_history(r.run_id, "dev_accuracy")]
            assert sorted(steps) == [0, 3, 6, 9], (r.tags["ptx.task"], steps)
            names = {a.path for a in tracker.client.list_artifacts(r.run_id, "prompt")}
            assert names == {"prompt/prompt.json", "prompt/prompt.safetensors"}
        ungrouped = load_study(write_spec(tmp_path / "grouped.yaml", seeds=[0], train={**train, "group_size": 1}))
        again = sweep.run_sweep(ungrouped, tmp_path, uri, name="again")
        assert again["errored"] == 0
        assert len(tracker.find_runs({"ptx.kind": "prompt"}, status=None)) == 2, "a grouped run was trained again"
    finally:
        for f in markers.iterdir():
            f.unlink()
        markers.rmdir()
