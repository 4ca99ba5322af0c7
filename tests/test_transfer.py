"""The zero-shot transfer matrix, its resumable Ray/MLflow stage, and TPT's convergence speed-up (tiny backbones)."""

import dataclasses
import io
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from ptx import progress, track
from ptx.backbones import load_backbone
from ptx.bank import prompt_runs
from ptx.config import DataLimits, Resources, StudySpec, TptStage, TransferStage
from ptx.data import collate, encode_split
from ptx.errors import PtxError
from ptx.evaluate import score_prompts
from ptx.prompt import backbone_meta
from ptx.stages.tpt import run_tpt_stage
from ptx.stages.transfer import (
    load_transfer_table,
    plan_units,
    run_transfer_stage,
    transfer_matrix_from_store,
)
from ptx.tasks import load_task
from ptx.train import TrainSettings
from ptx.transfer import KIND_UNIT, RANDOM, chunk_sizes, convergence_speedup, transfer_matrix

TARGETS = ["tweet_sentiment", "drug_sentiment", "bbc_topic"]


def _prompt(bb, task, seed, n_tokens=6, dev=None, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    emb_std = bb.input_embeddings().detach().std()
    meta = {"backbone": backbone_meta(bb), "task": {"name": task}, "insertion": "prepend",
            "dev_metric": {"name": "accuracy", "value": dev}}
    return torch.randn(n_tokens, bb.d_model, generator=gen) * emb_std * scale, meta


def test_matrix_shape_diagonal_and_relative(llama):
    bank = {"tw": _prompt(llama, "tweet_sentiment", 1), "drugA": _prompt(llama, "drug_sentiment", 2),
            "drugB": _prompt(llama, "drug_sentiment", 3), "short": _prompt(llama, "tweet_sentiment", 4, n_tokens=3)}
    table = transfer_matrix(llama, bank, TARGETS, splits=("dev", "test"), limits=16, prompts_per_pass=3)
    df = table.to_pandas()
    assert len(df) == (len(bank) + 1) * len(TARGETS) * 2
    assert set(df.source_prompt_run) == {*bank, RANDOM}
    assert (df[df.source_prompt_run == RANDOM].source_task == RANDOM).all()
    assert set(df.columns) == {"backbone", "source_prompt_run", "source_task", "source_category", "target_task",
                               "target_category", "split", "metric", "value", "relative_value", "n_examples"}
    assert (df.n_examples == 16).all() and (df.backbone == "tiny-llama").all()
    # the diagonal: each prompt on its own task equals its own one-prompt evaluation
    for name, (tensor, meta) in bank.items():
        spec = load_task(meta["task"]["name"])
        for split in ("dev", "test"):
            own = score_prompts(llama, tensor, spec, encode_split(spec, llama, split, limit=16))[0]
            row = df[(df.source_prompt_run == name) & (df.target_task == spec.name) & (df.split == split)]
            assert row.value.item() == pytest.approx(own, abs=1e-12)
    # relative values: ÷ the target's own prompt (the best on dev among several); NaN without one
    dev = df[df.split == "dev"].set_index(["source_prompt_run", "target_task"]).value
    own = {"tweet_sentiment": max(["tw", "short"], key=lambda n: dev[(n, "tweet_sentiment")]),
           "drug_sentiment": max(["drugA", "drugB"], key=lambda n: dev[(n, "drug_sentiment")])}
    for _, r in df.iterrows():
        if r.target_task == "bbc_topic":
            assert math.isnan(r.relative_value)
            continue
        ref = df[(df.source_prompt_run == own[r.target_task]) & (df.target_task == r.target_task)
                 & (df.split == r.split)].value.item()
        assert r.relative_value == pytest.approx(r.value / ref if ref else math.nan, nan_ok=True)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-t5", "tiny-llama"])
def test_batched_prompts_equal_one_at_a_time(name):
    bb = load_backbone(name)
    spec = load_task("tweet_sentiment")
    encoded = encode_split(spec, bb, "dev", limit=12)
    batch = collate(encoded.to_list(), bb.pad_id)
    label_ids = bb.label_ids(spec.verbalizer)
    prompts = torch.stack([_prompt(bb, "tweet_sentiment", s)[0] for s in range(4)])
    with torch.no_grad():
        stacked = bb.label_logits(prompts, batch, label_ids)  # [P, B, L]
        single = torch.stack([bb.label_logits(p, batch, label_ids) for p in prompts])
    assert stacked.shape == (4, len(encoded), len(spec.verbalizer))
    torch.testing.assert_close(stacked, single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(single[0], single[1])  # the prompts do change the logits
    bank = {f"p{i}": _prompt(bb, "tweet_sentiment", i) for i in range(4)}
    one = transfer_matrix(bb, bank, ["tweet_sentiment"], ("dev",), 12, prompts_per_pass=1, random_baseline=False)
    many = transfer_matrix(bb, bank, ["tweet_sentiment"], ("dev",), 12, prompts_per_pass=8, random_baseline=False)
    assert one.column("value").to_pylist() == pytest.approx(many.column("value").to_pylist(), abs=1e-12)


def test_random_baseline_is_several_seeded_prompts_drawn_per_target(llama):
    """The random row is the mean of RANDOM_PROMPTS random prompts drawn for that target (one tensor used to serve
    every target); the own and random prompts' per-example answers come back for the paired test."""
    from ptx.prompt import init_prompt
    from ptx.transfer import RANDOM_PROMPTS, random_prompt_seed

    bank = {"tw": _prompt(llama, "tweet_sentiment", 1)}
    preds: list = []
    df = transfer_matrix(llama, bank, ["tweet_sentiment", "drug_sentiment"], ("dev",), 12, seed=5,
                         predictions=preds).to_pandas()
    p = pd.DataFrame(preds)
    draws = {}
    for target in ("tweet_sentiment", "drug_sentiment"):
        spec = load_task(target)
        encoded = encode_split(spec, llama, "dev", limit=12)
        draws[target] = [init_prompt(llama, 6, "random", seed=random_prompt_seed(5, target, i))
                         for i in range(RANDOM_PROMPTS)]
        scores = [score_prompts(llama, r, spec, encoded)[0] for r in draws[target]]
        row = df[(df.source_prompt_run == RANDOM) & (df.target_task == target)]
        assert row.value.item() == pytest.approx(sum(scores) / RANDOM_PROMPTS, abs=1e-12)
        mine = p[p.target_task == target]
        assert sorted(mine.source_prompt_run.unique()) == sorted(
            [f"random:{i}" for i in range(RANDOM_PROMPTS)] + (["tw"] if target == "tweet_sentiment" else []))
        for i, score in enumerate(scores):  # each random prompt's answers give back its accuracy
            r = mine[mine.source_prompt_run == f"random:{i}"]
            assert len(r) == 12 and (r.pred == r.label).mean() == pytest.approx(score)
    assert not torch.equal(draws["tweet_sentiment"][0], draws["drug_sentiment"][0])  # drawn per target
    assert len(df) == 2 * 2  # still one random row a target beside the bank


def test_tpt_sources_are_ranked_on_data_the_convergence_curve_never_reads():
    """TPT's curve is the target's dev split, so a source is not picked by its zero-shot score there (the winner of
    a noisy dev score starts the curve high on those same examples): by its own task's dev score, or by the
    target's train split when the matrix has one."""
    from ptx.stages.tpt import selection_scores

    rows = [("a1", "a", "t", "dev", 0.9), ("a2", "a", "t", "dev", 0.5),  # a1 looks best on t's dev split
            ("a1", "a", "a", "dev", 0.6), ("a2", "a", "a", "dev", 0.8),  # but a2 is the better prompt of a
            ("random", "random", "t", "dev", 0.99)]
    table = pd.DataFrame(rows, columns=["source_prompt_run", "source_task", "target_task", "split", "value"])
    score = selection_scores(table)
    assert score[("a1", "t")] == 0.6 and score[("a2", "t")] == 0.8 and ("random", "t") not in score
    train = pd.concat([table, pd.DataFrame([("a1", "a", "t", "train", 0.3), ("a2", "a", "t", "train", 0.7)],
                                           columns=table.columns)])
    assert selection_scores(train) == {("a1", "t"): 0.3, ("a2", "t"): 0.7}


def test_package_exports_transfer_matrix_lazily():
    import ptx

    assert ptx.transfer_matrix is transfer_matrix
    with pytest.raises(AttributeError):
        ptx.no_such_name  # noqa: B018


def test_user_errors(llama):
    bert, t5 = load_backbone("tiny-bert"), load_backbone("tiny-t5")
    assert bert.d_model == t5.d_model  # same width: only the name tells them apart
    with pytest.raises(PtxError, match="tiny-bert.*tiny-t5"):
        transfer_matrix(t5, {"b": _prompt(bert, "tweet_sentiment", 0)}, ["tweet_sentiment"], ("dev",), 4)
    with pytest.raises(PtxError, match="width 64.*tiny-llama.*tiny-bert.*width 32"):
        transfer_matrix(bert, {"l": _prompt(llama, "tweet_sentiment", 0)}, ["tweet_sentiment"], ("dev",), 4)
    for bb in (bert, llama):
        with pytest.raises(PtxError, match=f"'samsum' is a generation task.*'{bb.name}'.*seq2seq"):
            transfer_matrix(bb, {"p": _prompt(bb, "tweet_sentiment", 0)}, ["tweet_sentiment", "samsum"], ("dev",), 4)
    with pytest.raises(PtxError, match="prompt bank .* is empty"):
        transfer_matrix(llama, {}, ["tweet_sentiment"], ("dev",), 4)


def test_convergence_speedup_on_hand_made_curves():
    vanilla = [(0, 0.3), (10, 0.5), (20, 0.75), (30, 0.8), (40, 0.8)]
    r = convergence_speedup(vanilla, [(0, 0.5), (10, 0.73), (20, 0.81)])
    assert (r["vanilla_steps"], r["tpt_steps"], r["speedup"], r["flag"]) == (30, 20, 1.5, "ok")
    assert (r["vanilla_steps_90"], r["tpt_steps_90"], r["speedup_90"]) == (20, 10, 2.0)  # 90% of 0.8 = 0.72
    assert (r["vanilla_best"], r["tpt_best"]) == (0.8, 0.81)
    never = convergence_speedup(vanilla, [(0, 0.3), (10, 0.79)])
    assert math.isnan(never["speedup"]) and never["flag"] == "tpt_not_reached" and math.isnan(never["tpt_steps"])
    assert never["speedup_90"] == 2.0 and never["flag_90"] == "ok"
    instant = convergence_speedup(vanilla, [(0, 0.8), (10, 0.8)])
    assert math.isnan(instant["speedup"]) and instant["flag"] == "tpt_at_init"
    flat = convergence_speedup([(0, 0.6), (10, 0.5)], [(0, 0.4), (10, 0.6)])
    assert math.isnan(flat["speedup"]) and flat["flag"] == "vanilla_at_init"
    # dict points, unsorted input, a re-logged step (the later value stands), NaN dropped
    r = convergence_speedup([{"step": 20, "dev_metric": 0.9}, {"step": 10, "dev_metric": 0.4}],
                            [(10, 0.95), (5, float("nan")), (10, 0.2), (20, 0.9)])
    assert (r["tpt_steps"], r["speedup"]) == (20, 1.0)
    with pytest.raises(PtxError, match="empty learning curve"):
        convergence_speedup([], [(0, 1.0)])


def test_a_run_that_never_reaches_is_censored_not_dropped():
    from ptx.transfer import censored_speedups

    vanilla = [(0, 0.5), (10, 0.6), (30, 0.8), (40, 0.7)]
    never = convergence_speedup(vanilla, [(0, 0.3), (20, 0.79), (40, 0.7)])
    assert never["speedup_bound"] == pytest.approx(30 / 40)  # it would have needed more than its 40 steps
    assert math.isnan(convergence_speedup(vanilla, [(0, 0.5), (10, 0.8)])["speedup_bound"])  # reached: no bound
    at_init = convergence_speedup([(0, 0.6), (10, 0.5)], [(0, 0.4), (10, 0.5)])  # vanilla never improved
    assert at_init["flag"] == "vanilla_at_init" and math.isnan(at_init["speedup_bound"])  # undefined, not censored
    rows = [{"flag": "ok", "speedup": 2.0}, {"flag": "ok", "speedup": 0.5},
            {"flag": "tpt_not_reached", "speedup": math.nan, "speedup_bound": 0.8},
            {"flag": "tpt_at_init", "speedup": math.nan}, {"flag": "vanilla_at_init", "speedup": math.nan}]
    c = censored_speedups(rows)
    assert (c["n_runs"], c["n_reached"], c["n_at_init"], c["n_censored"], c["n_undefined"]) == (5, 3, 1, 1, 1)
    # lower median of 4 values: with the censored run at 0 -> [0, 0.5, 2, inf] -> 0.5; at its bound -> 0.8
    assert (c["median_speedup"], c["median_speedup_upper"]) == (0.5, 0.8)
    assert c["mean_speedup_reached"] == 1.25  # (2 + 0.5) / 2: the runs that reached it after step 0, said so
    # most runs never reach: the median says so (0 and a bound) instead of averaging the lucky ones
    bad = censored_speedups([{"flag": "ok", "speedup": 3.0}] + [{"flag": "tpt_not_reached", "speedup_bound": 0.5}] * 2)
    assert (bad["median_speedup"], bad["median_speedup_upper"], bad["mean_speedup_reached"]) == (0.0, 0.5, 3.0)


def test_a_tpt_run_is_never_stopped_on_patience():
    from ptx.prompt_runs import PromptRequest
    from ptx.stages.tpt import tpt_request

    vanilla = PromptRequest(task="sst2", backbone="tiny-bert", settings=TrainSettings(steps=50, patience=2, seed=3))
    tpt = tpt_request(vanilla, "run123")
    assert (tpt.init, tpt.init_from, tpt.settings.patience) == ("artifact", "run123", None)
    assert dataclasses.replace(tpt.settings, patience=2) == vanilla.settings  # nothing else changes


# ---- the stages: real local Ray, real sqlite MLflow ---------------------------------------------------------
stage_test = pytest.mark.slow  # the module's study (train, transfer, TPT on Ray): 45 s to build, 2 nearly idle cores
@pytest.fixture(scope="module")
def study(tmp_path_factory, new_workdir, ray_local):
    from ptx import prompt_runs as stages
    from ptx import sweep

    workdir = new_workdir(tmp_path_factory.mktemp("study"))
    spec = StudySpec(name="tiny-study", backbones=("tiny-bert",), tasks=tuple(TARGETS), seeds=(0,), prompt_length=4,
                     train=TrainSettings(steps=6, eval_every=2, batch_size=8, eval_batch_size=32, lr=0.3),
                     data=DataLimits(train_limit=32, dev_limit=16, test_limit=16),
                     transfer=TransferStage(prompts_per_pass=4, resources=Resources(cpu=1)), tpt=TptStage(),
                     workdir=str(workdir))
    tracker = track.MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}", spec.name, workdir=workdir)
    reqs = sweep.sweep_requests(spec)
    reqs.append(stages.with_settings(reqs[0], seed=1))  # a second seed of tweet_sentiment: one more source
    bank = [stages.run_prompt(r, workdir, tracker) for r in reqs]
    shown = io.StringIO()  # what a person watching sees: a plain line at every change (interval 0)
    with progress.watching(progress.Display(shown, interactive=False, interval=0)), \
            progress.stage("transfer", 0, "pairs"):
        first = run_transfer_stage(spec, tracker, workdir)
    yield {"spec": spec, "tracker": tracker, "workdir": workdir, "bank": bank, "first": first,
           "shown": shown.getvalue()}


def _units(tracker, status="FINISHED"):
    return tracker.find_runs({"ptx.kind": KIND_UNIT}, status=status)


def test_unit_plan_cuts_each_target_into_chunks_that_keep_every_slot_busy():
    # per target: enough chunks for about 3 units a slot over all targets, each at most one pass wide
    assert chunk_sizes(5, 4, 2, 4) == [3, 2]  # the demo: 4 prompts + the random one, 4 targets, 2 cores
    assert chunk_sizes(13, 4, 2, 7) == [7, 6]  # findings: 12 prompts + random; a pass of 7 already gives 8 units
    assert chunk_sizes(5, 1, 2, 8) == [1, 1, 1, 1, 1]  # one target: as many units as sources, no more
    assert chunk_sizes(10, 2, 2, 8) == [4, 3, 3]  # 3 a target (6 units for 2 slots), sizes differ by one at most
    assert chunk_sizes(0, 4, 2, 8) == []
    plan = plan_units(["a", "b"], ["p1", "p2", "p3", "p4"], True, 2, 4)
    assert plan == [("a", ["p1", "p2"], False), ("a", ["p3", "p4"], False), ("a", [], True),
                    ("b", ["p1", "p2"], False), ("b", ["p3", "p4"], False), ("b", [], True)]
    assert plan_units(["a"], ["p1", "p2"], False, 1, 8) == [("a", ["p1"], False), ("a", ["p2"], False)]


def _makespan(costs: list, slots: int) -> float:
    """Finish time of `costs` run in order, each unit on the first free slot (how Ray's FIFO queue hands them out)."""
    free = [0.0] * slots
    for c in costs:
        free.sort()
        free[0] += c
    return max(free)


def test_unit_plan_leaves_no_core_idle_for_long_where_one_task_per_target_did():
    """Four targets of unequal cost (the findings study: drug_condition has half the test examples of the others)
    on 2 slots: one task per target ends with one slot idle for a whole target; the chunk plan ends within 10% of
    the ideal (total work / slots)."""
    per_source = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.5}  # seconds to score one source on each target
    sources = [f"p{i}" for i in range(12)]
    whole = [13 * per_source[t] for t in per_source]  # one task per target: 12 prompts + the random one
    ideal = sum(whole) / 2
    assert _makespan(whole, 2) == pytest.approx(ideal + 13 * 0.25)  # 26 + 6.5 vs the ideal 22.75
    plan = plan_units(list(per_source), sources, True, 2, 7)
    chunked = [(len(names) + rnd) * per_source[t] for t, names, rnd in plan]
    assert sum(chunked) == pytest.approx(sum(whole))  # the same work, cut finer
    assert _makespan(chunked, 2) <= 1.1 * ideal


@pytest.mark.ray
@stage_test
def test_transfer_stage_progress_moves_as_each_chunk_lands(study):
    """3 targets x (4 prompts + the random one) on 2 slots: chunks of 3 and 2 sources (6 Ray tasks), so the line
    moves 6 times, by 3 or 2 pairs, to 15 pairs."""
    done = sorted({int(m) for m in re.findall(r"^\[transfer\] (\d+)/15 pairs", study["shown"], re.M)})
    steps = [b - a for a, b in zip(done, done[1:], strict=False)]
    assert done[0] == 0 and done[-1] == 15 and sorted(steps) == [2, 2, 2, 3, 3, 3], study["shown"]


@pytest.mark.ray
@stage_test
def test_transfer_stage_logs_and_resumes_only_missing_units(study):
    spec, tracker, workdir = study["spec"], study["tracker"], study["workdir"]
    first = study["first"]
    assert (first["computed"], first["skipped"]) == (3, 0)
    table = load_transfer_table(tracker, "tiny-bert", spec.name)
    assert len(table) == (len(study["bank"]) + 1) * len(TARGETS) * 2
    assert set(table.source_prompt_run) == {r.run_id for r in study["bank"]} | {RANDOM}
    run_id = first["backbones"]["tiny-bert"]["run_id"]
    logged = {Path(a.path).name for a in tracker.client.list_artifacts(run_id, "transfer")}
    assert {"transfer.parquet", "heatmap_dev.png", "heatmap_test.png", "predictions.parquet"} <= logged
    preds = tracker.read_table(run_id, "transfer", "predictions.parquet").to_pandas()  # the paired test's input
    assert set(preds.target_task) == set(TARGETS) and (preds.groupby(["target_task", "split", "source_prompt_run"])
                                                       .size() == 16).all()
    # interrupt: one unit was killed mid-run (left RUNNING), another never started (no run)
    units = {r.tags["ptx.task"]: r.run_id for r in _units(tracker)}
    assert set(units) == set(TARGETS)
    tracker.client.set_terminated(units["bbc_topic"], "RUNNING")
    tracker.client.delete_run(units["drug_sentiment"])
    second = run_transfer_stage(spec, tracker, workdir)
    assert (second["computed"], second["skipped"]) == (2, 1)
    assert len(_units(tracker)) == 3  # tweet's old unit + two new ones
    resumed = load_transfer_table(tracker, "tiny-bert", spec.name)
    key = ["target_task", "split", "source_prompt_run"]
    a, b = (t.sort_values(key).reset_index(drop=True) for t in (table, resumed))
    assert a[key].equals(b[key])
    assert a.value.tolist() == pytest.approx(b.value.tolist(), abs=1e-12)
    # the notebook API computes the same matrix straight from the store
    nb = transfer_matrix_from_store(tracker.uri, "tiny-bert", tasks=TARGETS, splits=("dev",), limits=16,
                                    experiment=spec.name, workdir=workdir, seed=spec.seeds[0])
    dev = a[a.split == "dev"].reset_index(drop=True)
    nb = nb.sort_values(key).reset_index(drop=True)
    assert nb[key].equals(dev[key]) and nb.value.tolist() == pytest.approx(dev.value.tolist(), abs=1e-12)
    third = run_transfer_stage(spec, tracker, workdir)
    assert third["computed"] == 0 and third["backbones"]["tiny-bert"]["reused"]
    assert third["backbones"]["tiny-bert"]["run_id"] == second["backbones"]["tiny-bert"]["run_id"]


@pytest.mark.ray
@stage_test
def test_tpt_stage_records_speedup(study):
    from dataclasses import replace

    spec, tracker, workdir = study["spec"], study["tracker"], study["workdir"]
    with pytest.raises(PtxError, match="indicators stage must run first"):
        run_tpt_stage(replace(spec, tpt=TptStage(source="indicator:on")), tracker, workdir)
    with pytest.raises(PtxError, match="tpt.source.*'bbc_topik'; did you mean 'bbc_topic'"):
        run_tpt_stage(replace(spec, tpt=TptStage(source="bbc_topik")), tracker, workdir)
    vanilla_before = {r.run_id for r in prompt_runs(tracker, backbone="tiny-bert")}
    out = run_tpt_stage(spec, tracker, workdir)
    assert [s["target_task"] for s in out["skipped"]] == ["bbc_topic"]  # no same-category source
    rows = {r["target_task"]: r for r in out["backbones"]["tiny-bert"]["table"]}
    assert set(rows) == {"tweet_sentiment", "drug_sentiment"}
    assert rows["tweet_sentiment"]["source_task"] == "drug_sentiment"
    assert rows["drug_sentiment"]["source_task"] == "tweet_sentiment"
    new = [r for r in prompt_runs(tracker, backbone="tiny-bert") if r.run_id not in vanilla_before]
    assert sorted(r.tags["ptx.init"] for r in new) == ["artifact", "artifact"]  # vanilla PT was reused
    seeds = pd.read_parquet(Path(out["backbones"]["tiny-bert"]["parquet"]).with_name("tpt_seeds.parquet"))
    for _, r in seeds.iterrows():
        assert tracker.get_run(r.tpt_run).tags["ptx.source_run"] == r.source_prompt_run
        metric = f"dev_{r.metric}"
        vanilla, tpt = (sorted((m.step, m.value) for m in tracker.client.get_metric_history(run, metric))
                        for run in (r.vanilla_run, r.tpt_run))
        best = max(v for _, v in vanilla)  # the expected figures, worked out here from the raw curves
        v_steps = min(s for s, v in vanilla if v >= best)
        t_steps = min((s for s, v in tpt if v >= best), default=None)
        assert r.vanilla_best == pytest.approx(tracker.get_run(r.vanilla_run).metrics["best_dev_metric"])
        if v_steps == 0:
            assert r.flag == "vanilla_at_init"
        elif t_steps is None:
            assert r.flag == "tpt_not_reached" and r.speedup_bound == pytest.approx(v_steps / tpt[-1][0])
        elif t_steps == 0:
            assert r.flag == "tpt_at_init"
        else:
            assert r.flag == "ok" and r.speedup == pytest.approx(v_steps / t_steps)
        assert tpt[-1][0] == spec.train.steps  # TPT ran its whole budget
    for target, row in rows.items():  # per target: every seed counted, reached or censored
        g = seeds[seeds.target_task == target]
        assert (row["n_seeds"], row["n_reached"], row["n_censored"]) == (
            len(g), int(g.flag.isin(["ok", "tpt_at_init"]).sum()), int((g.flag == "tpt_not_reached").sum()))
    tpt_runs = tracker.find_runs({"ptx.kind": "tpt", "ptx.study": spec.name})
    assert len(tpt_runs) == 1
    logged = {Path(a.path).name for a in tracker.client.list_artifacts(tpt_runs[0].run_id, "tpt")}
    assert {"tpt.parquet", "tpt_seeds.parquet", "curves_tweet_sentiment.png"} <= logged


@pytest.mark.ray
@stage_test
def test_tpt_runs_each_source_mode_and_reuses_shared_runs(study):
    """tpt.sources [best_same_category, best_cross_category]: one TPT run per (target, source); the vanilla runs
    and the same-category TPT runs of the single-mode test above are reused by their hash, not retrained."""
    from dataclasses import replace

    spec, tracker, workdir = study["spec"], study["tracker"], study["workdir"]
    run_tpt_stage(spec, tracker, workdir)  # the single-mode stage (a no-op when the test above ran first)
    before = {r.run_id for r in prompt_runs(tracker, backbone="tiny-bert")}
    both = replace(spec, tpt=TptStage(sources=("best_same_category", "best_cross_category")))
    out = run_tpt_stage(both, tracker, workdir)
    assert [(s["target_task"], s["source_mode"]) for s in out["skipped"]] == [("bbc_topic", "best_same_category")]
    table = load_transfer_table(tracker, "tiny-bert", spec.name)
    dev = table[(table.split == "dev") & (table.source_prompt_run != "random")]
    rows = {(r["source_mode"], r["target_task"]): r for r in out["backbones"]["tiny-bert"]["table"]}
    assert set(rows) == {("best_same_category", "tweet_sentiment"), ("best_same_category", "drug_sentiment"),
                         ("best_cross_category", "tweet_sentiment"), ("best_cross_category", "drug_sentiment"),
                         ("best_cross_category", "bbc_topic")}
    for target in ("tweet_sentiment", "drug_sentiment"):
        assert rows["best_cross_category", target]["source_task"] == "bbc_topic"
    # picked by each candidate's score on its own task's dev split, never on bbc_topic's dev split (TPT's curve)
    own_dev = dev[dev.source_task == dev.target_task].set_index("source_prompt_run").value
    cands = sorted(dev[(dev.target_task == "bbc_topic") & (dev.source_category != "topic")].source_prompt_run)
    assert rows["best_cross_category", "bbc_topic"]["source_prompt_run"] == max(cands, key=lambda r: own_dev[r])
    new = [r for r in prompt_runs(tracker, backbone="tiny-bert") if r.run_id not in before]
    assert len(new) == 3 and {r.tags["ptx.source_run"] for r in new} == {
        rows["best_cross_category", t]["source_prompt_run"] for t in ("tweet_sentiment", "drug_sentiment", "bbc_topic")}
    assert tracker.get_run(out["backbones"]["tiny-bert"]["run_id"]).params["source"] == (
        "best_same_category,best_cross_category")

def test_tpt_sources_left_unset_keep_every_existing_study_hash():
    """A study's hash names its MLflow experiment and lets a later study reuse its runs: adding `tpt.sources`
    must not move the hash of any spec that does not set it (this value is the hash before the field existed)."""
    spec = StudySpec(name="h", backbones=("tiny-bert",), tasks=("sst2",))
    assert spec.hash() == "3cb026e55c75a024"
    both = dataclasses.replace(spec, tpt=TptStage(sources=("best_same_category", "best_cross_category")))
    assert both.hash() != spec.hash() and both.tpt.source_modes == ("best_same_category", "best_cross_category")
    assert spec.tpt.source_modes == ("best_same_category",)
