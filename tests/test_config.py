"""The study spec (ptx.config): every shipped spec loads and plans, errors are gathered into one message naming the
file, field, expected and found values, and the fields that reach every request (init, token cap) or must keep
the config hash (storage_shared, fields added later at their legacy value)."""

import dataclasses
from pathlib import Path

import pytest
from cli_runner import invoke_cli
from support import write_spec

from ptx import sweep
from ptx.config import config_hash, load_study
from ptx.errors import PtxError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec_file", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_dry_run_of_every_shipped_spec(spec_file):
    code, out, err = invoke_cli("run", spec_file, "--dry-run")
    assert code == 0, err
    spec = load_study(spec_file)
    n = len(spec.backbones) * len(spec.tasks) * len(spec.seeds)
    assert f"{n} trials" in out or "trials =" in out


def test_spec_errors_are_collected(tmp_path):
    bad = write_spec(tmp_path / "bad.yaml", tasks=["tweet_sentimnt"], backbones=["tiny-lama"], lernrate=1,
                     scheduler={"type": "hyperband"})
    with pytest.raises(PtxError) as err:
        load_study(bad)
    msg = str(err.value)
    assert "4 error(s)" in msg and "bad.yaml" in msg
    assert "did you mean 'tweet_sentiment'" in msg and "did you mean 'tiny-llama'" in msg
    assert "lernrate: unknown key" in msg and "scheduler.type" in msg


def test_init_mode_and_init_text_are_checked_and_reach_every_request(tmp_path):
    with pytest.raises(PtxError, match=r"init: expected one of .*found 'vocb'; did you mean 'vocab'"):
        load_study(write_spec(tmp_path / "typo.yaml", init="vocb"))
    with pytest.raises(PtxError, match=r"init_text: init 'text' needs a non-empty init_text, found None"):
        load_study(write_spec(tmp_path / "notext.yaml", init="text"))
    spec = load_study(write_spec(tmp_path / "text.yaml", init="text", init_text="Say the label."))
    reqs = sweep.sweep_requests(spec)
    assert len(reqs) == 2 and {(r.init, r.init_text) for r in reqs} == {("text", "Say the label.")}
    other = load_study(write_spec(tmp_path / "text2.yaml", init="text", init_text="Another start."))
    assert sweep.sweep_requests(other)[0].hash() != reqs[0].hash()  # the init text is part of the config


def test_study_token_cap_reaches_requests_and_cuts_the_encoded_inputs(tmp_path):
    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.tasks import load_task

    data = {"train_limit": 64, "dev_limit": 16, "test_limit": 16}
    with pytest.raises(PtxError, match=r"data.max_length: expected a whole number ≥ 8 or null, found 4"):
        load_study(write_spec(tmp_path / "tiny.yaml", data={**data, "max_length": 4}))
    plain = sweep.sweep_requests(load_study(write_spec(tmp_path / "plain.yaml")))
    capped = sweep.sweep_requests(load_study(write_spec(tmp_path / "cap.yaml", data={**data, "max_length": 24})))
    assert {r.max_length for r in capped} == {24} and {r.max_length for r in plain} == {None}
    assert capped[0].hash() != plain[0].hash()
    # unset, the field leaves the hash of requests made before it existed unchanged
    before = dataclasses.asdict(plain[0])
    before["settings"].pop("compile"), before.pop("max_length"), before["settings"].pop("group_size")
    before["settings"].pop("label_loss")  # at its legacy value, like max_length unset: left out of the hash
    assert plain[0].hash() == config_hash(before)
    backbone = load_backbone("tiny-llama")
    own = load_task("drug_sentiment")
    assert load_task("drug_sentiment", max_length=10_000).max_length == own.max_length  # a cap never raises it
    long = encode_split(own, backbone, "train", limit=32, use_cache=False)
    short = encode_split(load_task("drug_sentiment", max_length=24), backbone, "train", limit=32, use_cache=False)
    assert max(long["length"]) > 24 >= max(short["length"])
    assert all(s <= lo for s, lo in zip(short["length"], long["length"], strict=True))


def test_paper_studies_set_the_papers_loss_and_dropout():
    t5 = load_study(REPO / "experiments" / "paper_t5_base.yaml")
    roberta = load_study(REPO / "experiments" / "paper_roberta_base.yaml")
    assert (t5.train.label_loss, t5.train.dropout) == ("full_vocab", True)
    assert (roberta.train.label_loss, roberta.train.dropout) == ("label_words", True)


def test_storage_shared_is_a_spec_flag_that_keeps_the_hash(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nbackbones: [tiny-bert]\ntasks: [sst2]\n")
    plain, shared = load_study(spec), load_study(spec, ["storage_shared=true"])
    assert shared.storage_shared is True and plain.storage_shared is False
    assert plain.hash() == shared.hash()  # an existing Tune experiment of the spec still resumes


def test_sweep_settings_carry_the_hash_and_plan_of_the_spec_as_the_sweep_runs_it(tmp_path):
    """The Ray adapter takes requests and settings, not a spec. run_sweep's settings carry the spec's own hash and
    plan; TPT's (no search, FIFO) those of the spec with its search and scheduler replaced: what the sweep's run
    carried when TPT handed the adapter such a spec."""
    from ptx.config import Scheduler, Search

    spec = load_study(write_spec(tmp_path / "s.yaml", seeds=[0, 1],
                                 search={"algorithm": "grid", "space": {"lr": {"grid": [0.1, 0.2, 0.3]}}},
                                 scheduler={"type": "asha", "grace_period": 1}))
    train = sweep.sweep_settings(spec, tmp_path, max_concurrent=3, tags={"ptx.stage": "train"})
    assert (train.config_hash, train.plan) == (spec.hash(), sweep.plan(spec))
    assert (train.name, train.experiment, train.max_concurrent, train.tags) == (spec.name, spec.name, 3,
                                                                               {"ptx.stage": "train"})
    assert train.storage_path == str((tmp_path / "ray_results").resolve())
    assert (train.search, train.algorithm, train.scheduler) == (spec.search.space, "grid",
                                                                dataclasses.asdict(spec.scheduler))
    assert train.plan["search_points"] == 3 and train.plan["scheduler"] == "asha"
    tpt = sweep.sweep_settings(spec, tmp_path, name=f"{spec.name}-tpt", search=Search(), scheduler=Scheduler())
    plain = dataclasses.replace(spec, search=Search(), scheduler=Scheduler())
    assert (tpt.config_hash, tpt.plan) == (plain.hash(), sweep.plan(plain)) and tpt.config_hash != spec.hash()
    assert (tpt.name, tpt.experiment, tpt.search, tpt.scheduler["type"]) == (f"{spec.name}-tpt", spec.name, {}, "fifo")
    runs = len(spec.backbones) * len(spec.tasks) * 2  # two seeds
    assert (tpt.plan["search_points"], tpt.plan["trials"], train.plan["trials"]) == (1, runs, 3 * runs)
