"""The report's data half (ptx.report_data), read from a real sqlite MLflow store and checked without any HTML.

The runs are logged here with the tags the stages use (as tests/test_report.py does), with scores chosen so that
every expected value is worked out by hand: dyadic fractions, so that means are exact in floating point.
"""

import math

import numpy as np
import pandas as pd
import pytest
from test_report import _log_transfer, _prompt_run

from ptx import report_data as data
from ptx import track


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_workdir):
    workdir = new_workdir(tmp_path_factory.mktemp("report-data"))
    tracker = track.MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", "mini", workdir=workdir)
    runs = {
        "sst2/0/a": _prompt_run(tracker, "tiny-bert", "sst2", 0, [(0, 0.5), (10, 0.75)], test=0.625),
        "sst2/0/b": _prompt_run(tracker, "tiny-bert", "sst2", 0, [(0, 0.5), (10, 0.5)], extra={"ptx.trial": "b"}),
        "sst2/10": _prompt_run(tracker, "tiny-bert", "sst2", 10, [(0, 0.5), (10, 0.875)]),
        "mnli/2": _prompt_run(tracker, "tiny-bert", "mnli", 2, [(0, 0.25), (10, 0.5)]),
        # neither is a vanilla result: a TPT run (initialised from another prompt) and a failed run
        "tpt": _prompt_run(tracker, "tiny-bert", "sst2", 0, [(0, 0.9), (10, 0.96875)],
                           extra={"ptx.init": "artifact", "ptx.source_run": "x"}),
        "failed": _prompt_run(tracker, "tiny-bert", "mnli", 2, [(0, 0.25), (10, 0.9375)], status="FAILED"),
    }
    cats = {"sst2": "sentiment", "imdb": "sentiment", "mnli": "nli"}
    rel = {("sst2", "imdb"): 0.75, ("imdb", "sst2"): 0.5, ("imdb", "mnli"): 0.25, ("sst2", "mnli"): 0.5,
           ("mnli", "sst2"): 0.375, ("mnli", "imdb"): 0.125}
    rows = []
    for target, tcat in cats.items():
        for source, scat in [*cats.items(), ("random", "random")]:
            r = 1.0 if source == target else 0.25 if source == "random" else rel[source, target]
            rows.append({"backbone": "tiny-bert", "source_prompt_run": "random" if source == "random" else f"p-{source}",
                         "source_task": source, "source_category": scat, "target_task": target,
                         "target_category": tcat, "split": "test", "metric": "accuracy", "value": r / 2,
                         "relative_value": r, "n_examples": 64})
    runs["transfer"] = _log_transfer(tracker, "tiny-bert", pd.DataFrame(rows), workdir)
    runs["indicators"] = tracker.start_run("indicators tiny-bert", {  # died mid-run: still RUNNING
        "ptx.kind": track.KIND_INDICATORS, "ptx.backbone": "tiny-bert", "ptx.study": "mini"})
    runs["projector"] = tracker.start_run("projector mini", {
        "ptx.kind": "stage", "ptx.stage": "projector", "ptx.study": "mini", "ptx.skipped": "true",
        "ptx.skip_reason": "projector.source_backbone is not set"})
    tracker.finish(runs["projector"])
    return data.open_store(tracker, "mini", tmp_path_factory.mktemp("scratch")), runs


def test_training_keeps_each_seeds_best_vanilla_run(store):
    st, runs = store
    got = data.training(st)
    assert got.n_runs == 4 and got.trials == 2  # the TPT and the failed run left out; sst2 seed 0 ran twice
    assert got.seeds == ["0", "2", "10"] and got.test_seeds == {"0"}  # numeric order, not string order
    expected = pd.DataFrame({
        "backbone": ["tiny-bert"] * 3, "category": ["nli", "sentiment", "sentiment"], "task": ["mnli", "sst2", "sst2"],
        "seed": ["2", "0", "10"], "best_dev": [0.5, 0.75, 0.875], "test": [math.nan, 0.625, math.nan],
        "run_id": [runs["mnli/2"], runs["sst2/0/a"], runs["sst2/10"]], "trials": [1, 2, 1]})
    pd.testing.assert_frame_equal(got.cells, expected, check_exact=True)
    tasks = pd.DataFrame({"backbone": ["tiny-bert"] * 2, "category": ["nli", "sentiment"], "task": ["mnli", "sst2"],
                          "metric": ["accuracy"] * 2, "mean_dev": [0.5, (0.75 + 0.875) / 2]})
    pd.testing.assert_frame_equal(got.tasks, tasks, check_exact=True)
    assert got.facts == {"prompt_runs": 4, "tasks": 2}
    assert set(got.runs) == {runs["mnli/2"], runs["sst2/0/a"], runs["sst2/10"]}


def test_transfer_summarises_categories_from_the_logged_table(store):
    st, runs = store
    got = data.transfer(st)
    assert list(got) == ["tiny-bert"]
    m = got["tiny-bert"]
    assert m.run.run_id == runs["transfer"] and (m.splits, m.split) == (["test"], "test")
    assert (m.metrics, m.n_sources) == ("accuracy", 3)
    # off-diagonal pairs: same category sst2<->imdb (0.75, 0.5); cross the other four; the random prompt 0.25 x 3
    summary = {k: {f: v[f] for f in ("mean", "n", "mean_value")} for k, v in m.summary.items()}
    assert summary == {"same": {"mean": 0.625, "n": 2, "mean_value": 0.3125},
                       "cross": {"mean": 0.3125, "n": 4, "mean_value": 0.15625},
                       "random": {"mean": 0.25, "n": 3, "mean_value": 0.125}}
    assert sorted(m.summary["cross"]["values"]) == [0.125, 0.25, 0.375, 0.5]
    bank = pd.DataFrame({"source_task": ["mnli", "imdb", "sst2"], "source_category": ["nli", "sentiment", "sentiment"],
                         "source_prompt_run": ["p-mnli", "p-imdb", "p-sst2"]})
    pd.testing.assert_frame_equal(m.bank.reset_index(drop=True), bank)
    facts = {k: v for k, v in m.facts.items() if k not in ("same_vs_cross", "own_vs_random")}
    assert facts == {"split": "test", "run_id": runs["transfer"], "same_mean": 0.625, "same_n": 2,
                     "cross_mean": 0.3125, "cross_n": 4, "random_mean": 0.25, "random_n": 3}
    own = m.facts["own_vs_random"]  # no predictions logged: each task's own prompt, no paired test
    assert [(o["target_task"], o["own"], o["random"], o["n"]) for o in own] == [
        ("imdb", 0.5, 0.125, 64), ("mnli", 0.5, 0.125, 64), ("sst2", 0.5, 0.125, 64)]
    assert all(o["finding"].test == data.NO_PREDICTIONS for o in own)


def test_stages_without_a_finished_run_are_not_run(store):
    st, runs = store
    assert data.tpt(st) == data.NotRun("TPT", None)
    ind = data.indicators(st)
    assert isinstance(ind, data.NotRun) and ind.stage == "indicators"
    assert (ind.latest.run_id, ind.latest.status) == (runs["indicators"], "RUNNING")


def test_a_skipped_projector_stage_carries_its_reason(store):
    st, runs = store
    got = data.projector(st)
    assert got.run.run_id == runs["projector"] and got.skipped == "projector.source_backbone is not set"
    assert got.facts == {"skipped": "projector.source_backbone is not set", "run_id": runs["projector"]}
    assert (got.models, got.zero_shot, got.tpt) == ([], None, None)


def test_plain_facts_are_json_safe():
    assert data.plain({"a": np.float64("nan"), "b": (np.int64(2), 0.5), "c": [math.inf]}) == {
        "a": None, "b": [2, 0.5], "c": [None]}
