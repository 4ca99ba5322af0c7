"""Indicators: embedding similarity, FFN hooks and masks, ON, the actor pool, correlation, the stage, reference check."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from support import NO_REFERENCE, REFERENCE

from ptx import activations as act
from ptx import indicators as ind
from ptx import track
from ptx.bank import local_bank, prompt_runs
from ptx.data import encode_split
from ptx.errors import PtxError
from ptx.stages import indicators as stage
from ptx.tasks import load_task

TINY_KINDS = [("tiny-bert", "prepend", "decoder"), ("tiny-roberta", "paper", "decoder"),
              ("tiny-t5", "prepend", "encoder"), ("tiny-t5", "prepend", "decoder"), ("tiny-llama", "prepend", "decoder")]


def _tracker(tmp_path, experiment="study"):
    return track.MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment, workdir=tmp_path)


# ---- ON ----------------------------------------------------------------------------------------------
def test_overlap_matches_hand_computed_values():
    a = [[1, 1, 0, 0], [1, 1, 1, 1]]
    b = [[1, 0, 1, 0], [1, 1, 0, 0]]
    c = [[0, 0, 0, 0], [0, 0, 1, 1]]
    m = act.overlap_matrices(torch.tensor([a, b, c], dtype=torch.bool), k=1)
    assert m["on.layer_1"][0, 1].item() == pytest.approx(1 / 2)  # |A∩B|=1, |A|=|B|=2
    assert m["on_jaccard.layer_1"][0, 1].item() == pytest.approx(1 / 3)
    assert m["on.layer_2"][0, 1].item() == pytest.approx(2 / math.sqrt(8))  # 2 shared, |A|=4, |B|=2
    assert m["on_jaccard.layer_2"][0, 1].item() == pytest.approx(2 / 4)
    assert m["on"][0, 1].item() == pytest.approx(3 / math.sqrt(6 * 4))  # all layers: 3 shared of 6 and 4
    assert m["on_jaccard"][0, 1].item() == pytest.approx(3 / 7)
    assert m["on.layer_1"][0, 2].item() == 0.0  # an empty mask: overlap defined as 0
    assert m["on.layer_2"][2, 2].item() == pytest.approx(1.0)
    assert m["on.layers_1-1"].equal(m["on.layer_1"])
    two = act.overlap_matrices(torch.tensor([a, b, c], dtype=torch.bool), k=2)
    assert two["on.layers_1-2"].equal(two["on"])


def test_layer_windows_consecutive_and_sliding():
    assert act.layer_windows(12, 3) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert act.layer_windows(12, 3, stride=1)[:2] == [(0, 3), (1, 4)] and len(act.layer_windows(12, 3, 1)) == 10
    assert act.layer_windows(2, 3) == [(0, 2)]  # fewer layers than k: one window of all
    with pytest.raises(PtxError, match="k and stride"):
        act.layer_windows(12, 0)


def test_pairwise_on_equals_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 5, 40, generator=gen) < torch.rand(12, 1, 1, generator=gen)
    masks[3, 1] = False  # an empty layer
    got = act.overlap_matrices(masks, k=2, stride=1)
    for i, j in itertools.product(range(12), repeat=2):
        for name, layers in [("on", range(5)), ("on.layer_2", [1]), ("on.layers_3-4", [2, 3])]:
            a = {(layer, f) for layer in layers for f in range(40) if masks[i, layer, f]}
            b = {(layer, f) for layer in layers for f in range(40) if masks[j, layer, f]}
            cos = len(a & b) / math.sqrt(len(a) * len(b)) if a and b else 0.0
            jac = len(a & b) / len(a | b) if a | b else 0.0
            assert got[name][i, j].item() == pytest.approx(cos, abs=1e-6)
            assert got[name.replace("on", "on_jaccard", 1)][i, j].item() == pytest.approx(jac, abs=1e-6)


def test_masks_round_trip_bit_packed(tmp_path):
    masks = torch.rand(5, 3, 13) > 0.5  # 39 bits per prompt: not a multiple of 8
    meta = {"backbone": "tiny-llama", "probe": "paper", "where": "decoder", "position": "score",
            "prompt_runs": [f"r{i}" for i in range(5)]}
    out = act.save_masks(tmp_path / "acts", masks, meta)
    from safetensors.torch import load_file

    packed = load_file(str(out / act.MASKS_FILE))["masks"]
    assert packed.dtype == torch.uint8 and list(packed.shape) == [5, 5]
    back, got = act.load_masks(out)
    assert back.equal(masks) and got["prompt_runs"] == meta["prompt_runs"] and got["shape"] == [5, 3, 13]
    with pytest.raises(PtxError, match="prompt runs"):
        act.save_masks(tmp_path / "bad", masks, {"prompt_runs": ["x"]})
    import json

    bad = json.loads((out / act.MASKS_META).read_text())
    bad["shape"] = [5, 3, 99]
    (out / act.MASKS_META).write_text(json.dumps(bad))
    with pytest.raises(PtxError, match="do not match"):
        act.load_masks(out)


# ---- embedding similarity ----------------------------------------------------------------------------
def test_embedding_similarities_match_their_definitions():
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1))
    got = ind.embedding_similarities(x)
    cos = torch.nn.functional.cosine_similarity
    for i, j in itertools.product(range(4), repeat=2):
        a, b = x[i], x[j]
        assert got["e_concat_cos"][i, j] == pytest.approx(cos(a.flatten(), b.flatten(), dim=0).item(), abs=1e-5)
        assert got["e_concat_euclid"][i, j] == pytest.approx(1 / (1 + (a - b).norm().item()), abs=1e-5)
        pairs = [(a[s], b[t]) for s in range(3) for t in range(3)]
        assert got["e_avg_cos"][i, j] == pytest.approx(np.mean([cos(u, v, dim=0).item() for u, v in pairs]), abs=1e-5)
        # the paper's code: 1 / (1 + the mean token-pair distance), not the mean of per-pair 1 / (1 + distance)
        assert got["e_avg_euclid"][i, j] == pytest.approx(1 / (1 + np.mean([(u - v).norm().item() for u, v in pairs])),
                                                          abs=1e-5)
        assert got["mean_cos"][i, j] == pytest.approx(cos(a.mean(0), b.mean(0), dim=0).item(), abs=1e-5)
    small_blocks = ind.embedding_similarities(x, block=10)  # the chunked token-pair distances agree
    assert torch.allclose(small_blocks["e_avg_euclid"], got["e_avg_euclid"])
    y = x.clone()
    y[:, 0] = torch.randn(4, 5)  # the paper's RoBERTa layout: row 0 is <mask> at run time
    same = ind.embedding_similarities(y, drop_first=True)
    assert all(torch.allclose(same[k], ind.embedding_similarities(x, drop_first=True)[k]) for k in same)
    assert not torch.allclose(ind.embedding_similarities(y)["e_concat_cos"], got["e_concat_cos"])
    with pytest.raises(PtxError, match="widths differ"):
        ind.embedding_similarities([torch.randn(3, 5), torch.randn(3, 6)])
    with pytest.raises(PtxError, match="lengths differ"):
        ind.stack_prompts([torch.randn(3, 5), torch.randn(4, 5)])


# ---- hooks on every tiny kind ------------------------------------------------------------------------
@pytest.mark.parametrize("name,insertion,where", TINY_KINDS)
def test_hooks_on_every_tiny_kind(tiny, name, insertion, where):
    bb = tiny(name, insertion)
    emb = bb.input_embeddings().detach()
    prompts = emb[torch.randint(0, emb.shape[0], (6, 5), generator=torch.Generator().manual_seed(0))]
    masks = act.capture_activations(bb, prompts, where=where)
    assert masks.shape == (6, bb.n_layers, bb.d_ff) and masks.dtype == torch.bool
    assert 0 < masks.float().mean() < 1
    names = act.hook_names(bb, where)
    assert len(set(names)) == bb.n_layers and all(names)
    if bb.kind.value == "seq2seq":
        assert all(f".{where}." in n or n.startswith(where) for n in names)
    values = act.activation_values(bb, prompts, act.probe_batch(bb), where)
    assert (values[0] - values[1]).abs().max() > 1e-6  # the read position sees the prompt
    # Tiny random BERT/RoBERTa (init std 0.02) barely mix the prompt into the <mask> slot, so a sign rarely
    # flips there; averaged over every position the prompt's own tokens change the mask on every kind.
    mean = act.capture_activations(bb, prompts, position="mean", where=where)
    assert not (mean == mean[0]).all(), "masks must change with the prompt"
    if name in ("tiny-llama", "tiny-t5"):
        assert not (masks == masks[0]).all()
    examples = encode_split(load_task("tweet_sentiment"), bb, "train", limit=6)
    ex = act.capture_activations(bb, prompts, probe="examples", examples=examples, where=where, batch_size=4)
    assert ex.shape == masks.shape
    single = act.capture_activations(bb, prompts[:1], probe="examples", examples=examples, where=where, batch_size=6)
    assert single.equal(ex[:1])  # the mean over examples does not depend on batching


def test_causal_probe_reads_the_start_token(tiny):
    """Decoder-only: the paper probe reads the start token right after the prompt (causal: later tokens can't matter)."""
    bb = tiny("tiny-llama")
    prompts = torch.randn(3, 4, bb.d_model)
    probe = act.probe_batch(bb)
    longer = {**probe, "input_ids": torch.cat([probe["input_ids"], torch.tensor([[20, 21, 22]])], 1),
              "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    short = act.activation_values(bb, prompts, probe)
    long = act.activation_values(bb, prompts, longer, position="last")
    at_start = act.activation_values(bb, prompts, {**longer, "score_index": torch.tensor([0])})
    assert torch.allclose(short, at_start, atol=1e-5) and not torch.allclose(short, long, atol=1e-3)


def test_capture_refuses_bad_input(tiny):
    bb = tiny("tiny-llama")
    with pytest.raises(PtxError, match=r"expected \[P, n_tokens, 64\]"):
        act.capture_activations(bb, torch.randn(2, 3, 32))
    with pytest.raises(PtxError, match="needs an encoded split"):
        act.capture_activations(bb, torch.randn(2, 3, 64), probe="examples")
    with pytest.raises(PtxError, match="unknown probe"):
        act.capture_activations(bb, torch.randn(2, 3, 64), probe="prompt-only")
    with pytest.raises(PtxError, match="unknown position"):
        act.capture_activations(bb, torch.randn(2, 3, 64), position="first")


# ---- the actor pool ----------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow  # two actor pools, one losing an actor: 25 s on 2 nearly idle cores
def test_pool_equals_in_process_and_redoes_a_killed_actor(tiny, ray_local, tmp_path):
    bb = tiny("tiny-llama")
    prompts = torch.randn(10, 4, bb.d_model, generator=torch.Generator().manual_seed(3))
    local = act.capture_activations(bb, prompts, prompts_per_pass=4)
    pooled = stage.compute_bank_activations("tiny-llama", prompts, num_actors=2, chunk_size=4)
    assert pooled.equal(local)
    # test-only fault hook: the first actor that sees the marker deletes it and exits (os._exit) mid-run;
    # here with the examples probe, each prompt read with 4 training examples of its own task
    marker = tmp_path / "kill-once"
    marker.write_text("1")
    tasks = ["tweet_sentiment"] * 5 + ["bbc_topic"] * 5
    redone = stage.compute_bank_activations("tiny-llama", prompts, probe="examples", tasks=tasks, probe_examples=4,
                                          num_actors=2, chunk_size=3, fault_marker=str(marker))
    assert not marker.exists(), "the fault hook did not fire"
    for task, rows in (("tweet_sentiment", slice(0, 5)), ("bbc_topic", slice(5, 10))):
        examples = encode_split(load_task(task), bb, "train", limit=4)
        want = act.capture_activations(bb, prompts[rows], "examples", examples, prompts_per_pass=3)
        assert redone[rows].equal(want), f"{task}: rows differ {(redone[rows] != want).sum((1, 2)).tolist()}"
    with pytest.raises(PtxError, match="one task per prompt"):
        stage.compute_bank_activations("tiny-llama", prompts, probe="examples", tasks=["x"])


# ---- correlation -------------------------------------------------------------------------------------
def _synthetic(n_tasks=5, noise=0.0, seed=0):
    """A bank of one prompt per task and a long-format transfer table with every (source, target) pair."""
    rng = np.random.default_rng(seed)
    tasks = [f"task{i}" for i in range(n_tasks)]
    runs = [f"run{i}" for i in range(n_tasks)]
    rows = []
    for (si, s), (_, t) in itertools.product(enumerate(tasks), repeat=2):
        value = 0.9 if s == t else rng.uniform(0.3, 0.8)
        rows.append({"backbone": "b", "source_prompt_run": runs[si], "source_task": s, "target_task": t,
                     "split": "test", "metric": "accuracy", "value": value})
    table = pd.DataFrame(rows)
    table["relative_value"] = table["value"] / 0.9
    truth = np.zeros((n_tasks, n_tasks))
    for r in table.itertuples():
        truth[runs.index(r.source_prompt_run), tasks.index(r.target_task)] = r.relative_value
    return table, runs, tasks, truth + noise * rng.normal(size=truth.shape)


def test_correlation_known_answers():
    table, runs, tasks, truth = _synthetic()
    mats = {"mono": torch.tensor(np.exp(3 * truth)), "rev": torch.tensor(-truth ** 3)}
    pairs = ind.transfer_pairs(table, mats, runs, tasks)
    assert len(pairs) == 5 * 4 and (pairs["source_task"] != pairs["target_task"]).all()  # self excluded
    summary, per_target = ind.correlate_indicators(pairs, ["mono", "rev"], bootstrap=200, seed=1)
    s = summary.set_index(["indicator", "method"])
    for method in ind.METHODS:
        assert s.loc[("mono", method), "mean_over_targets"] == pytest.approx(1.0) or method == "pearson"
        assert s.loc[("rev", method), "mean_over_targets"] == pytest.approx(-1.0) or method == "pearson"
    assert s.loc[("mono", "spearman"), "pooled"] == pytest.approx(1.0)
    assert s.loc[("mono", "spearman"), "ci_low"] == pytest.approx(1.0)  # every resample is still monotone
    assert (s["n_targets_defined"] == 5).all()
    # a target with two source prompts only: undefined, with a reason, and left out of the mean
    few = table[~((table.target_task == "task0") & table.source_task.isin(["task3", "task4"]))]
    summary2, per2 = ind.correlate_indicators(ind.transfer_pairs(few, mats, runs, tasks), ["mono"], bootstrap=50)
    row = per2[(per2.target_task == "task0") & (per2.method == "spearman")].iloc[0]
    assert math.isnan(row["value"]) and "fewer than 3" in row["reason"] and row["n_sources"] == 2
    assert (summary2["n_targets_defined"] == 4).all()


def test_correlation_matches_scipy_and_is_seeded():
    table, runs, tasks, truth = _synthetic(n_tasks=7, noise=0.2, seed=4)
    pairs = ind.transfer_pairs(table, {"noisy": torch.tensor(truth)}, runs, tasks)
    a, _ = ind.correlate_indicators(pairs, ["noisy"], bootstrap=300, seed=7)
    b, _ = ind.correlate_indicators(pairs, ["noisy"], bootstrap=300, seed=7)
    pd.testing.assert_frame_equal(a, b)
    for method, fn in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr), ("kendall", stats.kendalltau)):
        want = np.mean([fn(g["noisy"], g["y"]).statistic for _, g in pairs.groupby("target_task")])
        row = a[a.method == method].iloc[0]
        assert row["mean_over_targets"] == pytest.approx(want)
        assert row["ci_low"] <= row["mean_over_targets"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
        assert row["pooled"] == pytest.approx(fn(pairs["noisy"], pairs["y"]).statistic)
    x = np.random.default_rng(0).integers(0, 4, (20, 9)).astype(float)  # ties
    y = np.random.default_rng(1).integers(0, 4, (20, 9)).astype(float)
    for method, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau), ("pearson", stats.pearsonr)):
        got = ind.row_corr(x, y, method)
        assert np.allclose(got, [fn(u, v).statistic for u, v in zip(x, y, strict=True)], equal_nan=True)


def test_transfer_pairs_uses_the_target_task_prompts_and_split():
    table, runs, tasks, truth = _synthetic(n_tasks=4)
    dev = table.assign(split="dev", relative_value=0.0)
    both = pd.concat([table, dev])
    mat = torch.arange(16, dtype=torch.float).view(4, 4)
    pairs = ind.transfer_pairs(both, {"m": mat}, runs, tasks)  # test preferred over dev
    assert (pairs["y"] > 0).all()
    row = pairs[(pairs.target_task == "task2") & (pairs.source_run == "run0")].iloc[0]
    assert row["m"] == mat[0, 2].item()  # source prompt vs the target task's own prompt
    two_own = ind.transfer_pairs(table, {"m": mat}, runs, tasks, own_runs={"task2": ["run2", "run3"]})
    assert two_own[(two_own.target_task == "task2") & (two_own.source_run == "run0")]["m"].iloc[0] == 2.5
    assert "run3" not in set(two_own[two_own.target_task == "task2"]["source_run"])
    with pytest.raises(PtxError, match="missing columns"):
        ind.transfer_pairs(table.drop(columns="relative_value"), {"m": mat}, runs, tasks)


# ---- the stage, end to end ---------------------------------------------------------------------------
def _import_bank(tmp_path, tracker, tasks, per_task=2, d=64, backbone="tiny-llama"):
    from ptx.prompt_runs import import_prompt

    gen = torch.Generator().manual_seed(11)
    runs = []
    for task in tasks:
        for k in range(per_task):
            f = tmp_path / f"{task}-{k}.pt"
            torch.save(torch.randn(6, d, generator=gen), f)
            runs.append((import_prompt(f, backbone, task, "prepend", tmp_path, tracker).run_id, task))
    return runs


def _as_trained(workdir, tracker, bank) -> None:
    """Make an imported bank look trained: prompt.json records a random init of (seed k, task), the run its seed
    tag, as run_prompt writes them (training itself would add minutes here and nothing to what is checked)."""
    from ptx.prompt import init_record

    seen: dict = {}
    for rid, task in bank:
        k = seen[task] = seen.get(task, -1) + 1
        meta_file = workdir / "prompts" / rid / "prompt.json"
        meta = json.loads(meta_file.read_text())
        meta["init"], meta["seed"] = init_record("random", k, task), k
        meta_file.write_text(json.dumps(meta, sort_keys=True))
        tracker.client.set_tag(rid, "ptx.seed", str(k))


def test_bank_inits_rebuilds_each_start_or_none(tiny, tmp_path):
    from ptx.prompt import backbone_meta, init_prompt, init_record, save_prompt

    bb = tiny("tiny-llama")
    ids = []
    for k, (task, mode) in enumerate([("sst2", "random"), ("mnli", "vocab"), ("qqp", "text")]):
        meta = {"backbone": backbone_meta(bb), "seed": 1, "task": {"name": task, "version": 1},
                "init": init_record(mode, 1, task, text="the movie was great" if mode == "text" else None)}
        save_prompt(tmp_path / "prompts" / f"r{k}", torch.zeros(5, bb.d_model), meta)
        ids.append(f"r{k}")
    inits = ind.bank_inits(local_bank(tmp_path, ids), "tiny-llama", "prepend")
    torch.testing.assert_close(inits, torch.stack([init_prompt(bb, 5, "random", seed=1, task="sst2"),
                                                   init_prompt(bb, 5, "vocab", seed=1, task="mnli"),
                                                   init_prompt(bb, 5, "text", text="the movie was great")]))
    meta = {"backbone": backbone_meta(bb), "init": {"mode": "imported", "source": "x.pt"}}
    save_prompt(tmp_path / "prompts" / "imp", torch.zeros(5, bb.d_model), meta)
    assert ind.bank_inits(local_bank(tmp_path, [*ids, "imp"]), "tiny-llama", "prepend") is None  # no _disp rows then


@pytest.mark.ray
def test_indicators_stage_logs_everything(tiny, ray_local, tmp_path, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    import yaml

    from ptx.activations import load_masks
    from ptx.config import load_study

    tasks = ["tweet_sentiment", "drug_sentiment", "drug_condition", "bbc_topic"]
    tracker = _tracker(tmp_path)
    bank = _import_bank(tmp_path, tracker, tasks)
    _as_trained(tmp_path, tracker, bank)
    rng = np.random.default_rng(0)
    table = pd.DataFrame([{"backbone": "tiny-llama", "source_prompt_run": r, "source_task": s, "target_task": t,
                           "split": "dev", "metric": "accuracy", "value": v, "relative_value": v / 0.8}
                          for (r, s), t in itertools.product(bank, tasks) for v in [rng.uniform(0.2, 0.8)]])
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "study", "backbones": ["tiny-llama"], "tasks": tasks,
                                         "indicators": {"num_actors": 2, "bootstrap": 100, "windows": 1}}))
    spec = load_study(spec_file)
    with pytest.raises(PtxError, match="run the transfer stage first"):  # ptx.transfer finds no transfer run
        stage.run_indicators_stage(spec, tracker, tmp_path)
    result = stage.run_indicators_stage(spec, tracker, tmp_path, transfer_table=table)
    assert result["computed"] == 1 and result["skipped"] == 0
    out = result["backbones"]["tiny-llama"]
    run = tracker.get_run(out["run_id"])
    assert run.tags["ptx.kind"] == "indicators" and run.tags["ptx.study"] == "study"
    assert {"spearman.on", "spearman.e_concat_cos", "kendall.on_jaccard", "spearman.on.layer_2"} <= set(run.metrics)
    files = {f.path for f in tracker.client.list_artifacts(out["run_id"], "tables")}
    assert {"tables/correlations.parquet", "tables/recommendations.parquet", "tables/indicators.parquet"} <= files
    local = tracker.download(out["run_id"], "activations", tmp_path / "dl")
    masks, meta = load_masks(local)
    assert meta["prompt_runs"] == [r for r, _ in bank] and masks.shape == (8, 2, 128)
    assert meta["hook_modules"] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    assert meta["backbone_kind"] == "causal_lm" and "gate_proj" in meta["active"]
    art = Path(out["artifacts"])
    recs = pd.read_parquet(art / "tables" / "recommendations.parquet")
    on = recs[(recs.indicator == "on") & (recs.target_task == "bbc_topic")].sort_values("rank")
    assert len(on) == 6 and on["score"].is_monotonic_decreasing and "bbc_topic" not in set(on["source_task"])
    summary = pd.read_parquet(art / "tables" / "correlations.parquet").set_index(["indicator", "method"])
    assert summary.loc[("on", "spearman"), "n_targets_defined"] == 4
    assert summary.loc[("on", "spearman"), "mean_over_targets"] == pytest.approx(run.metrics["spearman.on"])
    assert out["spearman"]["on"] == pytest.approx(run.metrics["spearman.on"])
    assert len(list((art / "tables" / "plots").glob("scatter_*.png"))) == 14  # 7 raw, 7 displacement
    # displacement from the rebuilt inits beside the raw indicators; within-seed: 4 targets x 2 seeds defined
    assert {"spearman.on_disp", "spearman.e_avg_cos_disp", "kendall.on_jaccard_disp"} <= set(run.metrics)
    assert summary.loc[("on_disp", "spearman"), "n_targets_defined"] == 4
    assert (summary.xs("spearman", level="method")["n_within_seed"] == 8).all()
    from ptx.stages.tpt import _indicator_sources  # TPT's `tpt.source: indicator:on` reads this run

    picks = _indicator_sources(tracker, "tiny-llama", "study", "on")
    top = on.iloc[0]
    assert picks["bbc_topic"] == (top["source_run"], top["source_task"])
    again = stage.run_indicators_stage(spec, tracker, tmp_path, transfer_table=table)
    assert again["backbones"]["tiny-llama"] == {"run_id": out["run_id"], "reused": True} and again["skipped"] == 1


@pytest.mark.slow
def test_recommend_ranks_other_tasks_prompts(ptx_cache_dir, tmp_path, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    tracker = _tracker(tmp_path)
    _import_bank(tmp_path, tracker, ["tweet_sentiment", "drug_sentiment", "bbc_topic"], per_task=1)
    rows = stage.recommend("bbc_topic", "tiny-llama", tracker, tmp_path, top_k=3, probe_steps=2)
    assert [r["rank"] for r in rows] == [1, 2]  # the bank's own bbc_topic prompt is never a source
    assert {r["source_task"] for r in rows} == {"tweet_sentiment", "drug_sentiment"}
    assert rows[0]["on"] >= rows[1]["on"] and all(0 <= r["on"] <= 1 for r in rows)
    with pytest.raises(PtxError, match="train or import a bank first"):
        stage.recommend("bbc_topic", "tiny-bert", tracker, tmp_path)


# ---- the authors' released prompts -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_dir(), reason=NO_REFERENCE)
def test_reference_prompts_import_and_correlate(ptx_cache_dir, tmp_path, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    from ptx.prompt import import_torch_prompt
    from ptx.prompt_runs import import_prompt

    tracker = _tracker(tmp_path, "reference")
    files = sorted((REFERENCE / "prompts").glob("*/*.pt"))
    assert len(files) == 44
    for f in files:
        if f.stem == "random":  # not a task: read through the same safe reader, refused as a bank task
            assert import_torch_prompt(f, 768, "roberta-base").shape == (100, 768)
            with pytest.raises(PtxError, match="random"):
                import_prompt(f, f.parent.name, f.stem, "paper", tmp_path, tracker)
            continue
        run = import_prompt(f, f.parent.name, f.stem, "paper" if "roberta" in f.parent.name else "prepend",
                            tmp_path, tracker)
        assert tracker.get_run(run.run_id).tags["ptx.origin"] == "imported"
    with pytest.raises(PtxError, match=r"\[100, 1024\] does not fit backbone 'roberta-base'"):
        import_prompt(REFERENCE / "prompts/roberta-large/sst2.pt", "roberta-base", "sst2", "paper", tmp_path, tracker)
    assert len(prompt_runs(tracker)) == 43
    df = stage.reference_check(REFERENCE, tracker, tmp_path, bootstrap=100)
    assert len(prompt_runs(tracker)) == 43  # idempotent: nothing imported twice
    spear = df[df.method == "spearman"].set_index(["backbone", "indicator"])
    assert spear.loc[("roberta-base", "e_concat_cos"), "n_targets_defined"] == 13
    assert spear.loc[("t5-base", "mean_cos"), "n_targets_defined"] == 17  # the t5 'random' source is left out
    # recomputed independently: cosine of the flattened prompts (RoBERTa: row 0 left out), Spearman against the
    # zero-shot score per target over its source prompts (relative or not: one ranking), averaged over targets
    zs = pd.read_csv(REFERENCE / "zero_shot_transfer.csv").query("backbone == 'roberta-base'")
    flat = {f.stem: torch.load(f, weights_only=True)[1:].flatten().double()
            for f in (REFERENCE / "prompts" / "roberta-base").glob("*.pt") if f.stem != "random"}
    rhos = []
    for target in sorted(flat):
        rows = zs[(zs.target_task == target) & (zs.source_prompt != target) & zs.source_prompt.isin(list(flat))]
        x = [torch.nn.functional.cosine_similarity(flat[src], flat[target], dim=0).item() for src in rows.source_prompt]
        rhos.append(stats.spearmanr(x, rows.value).statistic)
    assert spear.loc[("roberta-base", "e_concat_cos"), "mean_over_targets"] == pytest.approx(np.mean(rhos), abs=1e-6)
    assert (spear["ci_low"] <= spear["ci_high"]).all()
    runs = tracker.find_runs({"ptx.kind": "indicators", "ptx.study": "reference-check"})
    assert sorted(r.tags["ptx.backbone"] for r in runs) == ["roberta-base", "roberta-large", "t5-base"]
