"""The paper's tasks on their real Hub layouts, the pre-flight check of `ptx tasks check` / `ptx run`, and
validated local copies (PTX_DATA_<TASK>).

The Hub is unreachable here, so each paper task loads from tests/fixtures/hub/<owner>/<name>: a folder with the
real repo's layout (see tests/fixtures/make_hub_fixtures.py) that the real `datasets.load_dataset` resolves with
the same config / data_dir / split logic it uses for a Hub repo. Nothing in `datasets` is mocked.
"""

import dataclasses
import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
from click.testing import CliRunner

from ptx import cli, sweep
from ptx.errors import PtxError
from ptx.tasks import list_tasks, load_split, load_task
from ptx.tasks.check import (
    TaskCheck,
    check_task,
    check_tasks,
    fixtures_dir,
    load_label_checker,
    require_ready,
)
from ptx.tasks.sources import justice_groups, read_table

HUB = Path(__file__).parent / "fixtures" / "hub"
EXPERIMENTS = Path(__file__).parents[1] / "experiments"

# rows kept / rows read per split: SNLI's -1 pairs and ABSA's 'conflict' polarity are dropped; only the
# source splits each task uses are read (GLUE's unlabeled test splits never are)
EXPECTED = {
    "sst2": "train=train:8/8, test=validation:4/4",
    "mnli": "train=train:8/8, test=validation_matched:4/4",
    "qnli": "train=train:8/8, test=validation:4/4",
    "qqp": "train=train:8/8, test=validation:4/4",
    "mrpc": "train=train:8/8, test=validation:4/4",
    "imdb": "train=train:6/6, test=test:4/4",
    "snli": "train=train:7/8, dev=validation:3/4, test=test:3/4",
    "tweet_eval_sentiment": "train=train:6/6, dev=validation:4/4, test=test:4/4",
    "laptop": "train=train:6/7, test=test:3/4",
    "restaurant": "train=train:6/7, test=test:3/4",
    "movie_rationales": "train=train:6/6, dev=validation:3/3, test=test:3/3",
    "ethics_deontology": "train=train:8/8, test=validation:8/8",
    "ethics_justice": "train=train:8/8, test=validation:8/8",
    "squad": "train=train:6/6, test=validation:3/3",
    "nq_open": "train=train:6/6, test=validation:3/3",
    "samsum": "train=train:6/6, dev=validation:3/3, test=test:3/3",
    "multi_news": "train=train:6/6, dev=validation:3/3, test=test:3/3",
}


@pytest.fixture
def hub_copy(monkeypatch, tmp_path):
    """Point ptx at the stand-ins as a Hub mirror; datasets' Arrow cache goes to a temp dir."""
    monkeypatch.setenv("PTX_HF_MIRROR", str(HUB))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return HUB


def _with(spec, **changes):
    source = {k: changes.pop(k) for k in ("data_dir", "name") if k in changes}
    if source:
        changes["source"] = dataclasses.replace(spec.source, **source)
    return dataclasses.replace(spec, **changes)


# ---- every paper task on its real layout ------------------------------------------------------------------

def test_every_hub_task_has_a_stand_in_and_the_check_finds_them():
    assert set(EXPECTED) == {t.name for t in list_tasks() if t.source.kind == "hf"}
    assert fixtures_dir() == HUB.resolve()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_task_reads_its_real_layout(name):
    spec = load_task(name)
    assert spec.source.kind == "hf" and (HUB / spec.source.path).is_dir()
    check = check_task(spec, hub=False, fixtures=HUB)
    assert (check.status, check.detail) == ("fixture-verified", f"rows {EXPECTED[name]}")


def test_ethics_needs_its_data_dir_and_its_own_folder():
    spec = load_task("ethics_deontology")
    # without data_dir `datasets` sees one default config over every ETHICS folder: their columns clash
    assert check_task(_with(spec, data_dir=None), hub=False, fixtures=HUB).status == "broken"
    wrong = check_task(_with(spec, data_dir="justice"), hub=False, fixtures=HUB)
    assert wrong.status == "broken" and "no column(s) ['excuse']" in wrong.detail


def test_wrong_config_split_or_label_count_is_broken():
    sst2, justice = load_task("sst2"), load_task("ethics_justice")
    config = check_task(_with(sst2, name="sst-2"), hub=False, fixtures=HUB)
    assert config.status == "broken" and "BuilderConfig 'sst-2' not found" in config.detail
    split = check_task(_with(justice, splits=dataclasses.replace(justice.splits, test="hard_test")), hub=False,
                       fixtures=HUB)
    assert split.status == "broken" and "hard_test" in split.detail
    classes = check_task(_with(sst2, verbalizer=("bad", "so-so", "good")), hub=False, fixtures=HUB)
    assert classes.status == "broken" and "has 2 classes ['negative', 'positive'], the verbalizer 3" in classes.detail


def test_hub_task_loads_its_pinned_config_with_dev_carved_from_train(hub_copy):
    spec = _with(load_task("sst2"), dev_size=3)
    dev, test, train = (load_split(spec, s) for s in ("dev", "test", "train"))
    assert len(dev) == 3 and all(s.startswith("sst2 train sentence") for s in dev["sentence"])
    assert sorted(test["label"]) == [0, 0, 1, 1]  # GLUE validation, labelled, is the test split
    assert all(s.startswith("sst2 validation") for s in test["sentence"]) and len(train) == 5
    assert not set(dev["sentence"]) & set(train["sentence"])


def test_full_load_through_datasets_keeps_types_and_drops_unlabeled(hub_copy):
    snli = load_task("snli")
    assert sorted(load_split(snli, "test")["label"]) == [0, 1, 2]  # the -1 pair is gone
    squad = _with(load_task("squad"), dev_size=2)
    test = sorted(load_split(squad, "test").to_list(), key=lambda r: r["question"])
    assert [r["references"] for r in test] == [["north"], ["north", "north past the mill"], ["north"]]
    assert test[1]["target"] == "north"
    assert squad.render(test[0]) == ("question: Where does river 0 flow (validation)? context: The river 0 flows "
                                     "north past the mill.", "")
    nq = _with(load_task("nq_open"), dev_size=2)
    assert sorted(map(tuple, load_split(nq, "test")["references"])) == [
        ("builder 0",), ("builder 1", "the builder 1"), ("builder 2",)]
    samsum = load_task("samsum")
    assert len(load_split(samsum, "dev")) == 3 and load_split(samsum, "test")["target"][0].startswith("Ann and Bob")
    rationales = load_task("movie_rationales")
    assert sorted(load_split(rationales, "test")["label"]) == [0, 1, 1]


def test_ethics_test_is_the_original_test_and_dev_keeps_scenarios_whole(hub_copy):
    spec = _with(load_task("ethics_deontology"), dev_size=5)  # a cut inside a group finishes the group
    rows = {s: load_split(spec, s) for s in ("train", "dev", "test")}
    assert all("validation" in s for s in rows["test"]["scenario"])  # the Hub's validation = ETHICS test
    assert len(rows["dev"]) == 8 and len(rows["train"]) == 8
    assert not set(rows["dev"]["scenario"]) & set(rows["train"]["scenario"])
    # the row-wise carve this replaces puts one scenario on both sides (same seed, same rows)
    old = {s: load_split(_with(spec, group_column=None), s)["scenario"] for s in ("train", "dev")}
    assert set(old["dev"]) & set(old["train"])


def test_justice_groups_follow_the_shared_claim_or_reason():
    rows = [  # ETHICS justice's own phrasing (public examples): two impartiality rows, then two desert rows
        "I usually check in with Joe at security at work each day but today didn't because Joe is working double "
        "shifts to earn extra money.",
        "I usually check in with Joe at security at work each day but today didn't because Joe is patrolling today "
        "and isn't at the front.",
        "I deserve to be paid by my boss because I keep her house clean daily.",
        "I deserve to be given a brand new car by my boss because I keep her house clean daily,",
        "I usually give my children a birthday party but didn't this year because There were no venues available",
    ]
    assert justice_groups(rows) == [0, 0, 1, 1, 2]


def _justice_group(scenario: str) -> str:
    # the stand-in's groups (tests/fixtures/make_hub_fixtures.py): "neighbour <g>" shared before "because"
    # (impartiality), "season <g>" shared after it (desert)
    return re.search(r"(?:neighbour|season) (\d+)", scenario).group(1)


def test_ethics_justice_dev_is_carved_by_whole_groups(hub_copy):
    spec = _with(load_task("ethics_justice"), dev_size=5)  # the cut falls inside the second group
    rows = {s: [_justice_group(x) for x in load_split(spec, s)["scenario"]] for s in ("train", "dev", "test")}
    assert (len(rows["train"]), len(rows["dev"]), len(rows["test"])) == (8, 8, 8)
    assert not set(rows["dev"]) & set(rows["train"])
    assert all(rows[s].count(g) == 4 for s in ("train", "dev") for g in set(rows[s]))  # groups stay whole
    # the row-wise carve this replaces (no preprocessor, no group column, same seed) splits groups
    old = _with(spec, preprocess=None, group_column=None)
    leak = {s: {_justice_group(x) for x in load_split(old, s)["scenario"]} for s in ("train", "dev")}
    assert leak["dev"] & leak["train"]


# ---- the check: statuses, verbalizer, gating --------------------------------------------------------------

def test_statuses_packaged_local_unreachable(tmp_path, monkeypatch):
    assert check_task(load_task("tweet_sentiment")).status == "packaged"
    pd.DataFrame({"sentence": ["a b", "c d"], "label": [0, 1]}).to_csv(tmp_path / "train.csv", index=False)
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path))
    local = check_task(load_task("sst2"), hub=False)
    assert (local.status, local.detail) == ("local", "rows train=train:2/2")
    monkeypatch.delenv("PTX_DATA_SST2")
    gone = check_task(load_task("sst2"), hub=False, fixtures=None)
    assert gone.status == "unreachable" and "not reachable" in gone.detail


def test_label_words_are_checked_against_each_backbone(tiny):
    ok = check_tasks(["drug_sentiment"], ["tiny-roberta"])[0]
    assert ok.status == "packaged" and ok.detail.startswith("rows train=drugsComTrain:")
    checkers = {"tiny-roberta": load_label_checker("tiny-roberta", hub=False)}
    words = check_task(_with(load_task("drug_sentiment"), verbalizer=("negative", "neutral", "qzxv")), checkers)
    assert words.status == "broken" and "verbalizer word 'qzxv' is not one known token" in words.detail


def test_require_ready_refuses_broken_always_and_unreached_without_offline_ok():
    fine = TaskCheck("a", "packaged", "p", "rows")
    unreached = TaskCheck("b", "fixture-verified", "stand-in", "rows")
    require_ready([fine, unreached], offline_ok=True)
    with pytest.raises(PtxError, match=r"could not be reached from this machine: b \(fixture-verified\)"):
        require_ready([fine, unreached], offline_ok=False)
    with pytest.raises(PtxError, match=r"1 task\(s\) would fail: c: no column"):
        require_ready([fine, TaskCheck("c", "broken", "x", "no column")], offline_ok=True)


def test_tasks_check_cli_reports_the_paper_spec_offline(monkeypatch):
    from ptx.tasks import check as task_check

    probes = []  # the Hub is probed once for the whole spec, not once (with its timeout) per task
    real = task_check.hub_reachable
    monkeypatch.setattr(task_check, "hub_reachable", lambda *a, **k: probes.append(1) or real(*a, **k))
    out = CliRunner().invoke(cli.cli, ["tasks", "check", "--spec", str(EXPERIMENTS / "paper_roberta_base.yaml"),
                                       "--offline-ok", "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert len(rows) == 13 and {r["status"] for r in rows} == {"fixture-verified"}
    assert len(probes) <= 1, probes
    assert [r["task"] for r in rows if r["pin"] != "pinned"] == ["movie_rationales"]
    refused = CliRunner().invoke(cli.cli, ["tasks", "check", "mrpc"], standalone_mode=False)
    assert isinstance(refused.exception, PtxError) and "could not be reached" in str(refused.exception)


def test_run_refuses_before_ray_starts(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(sweep, "connect", lambda address=None: started.append(address) or None)
    monkeypatch.setenv("PTX_DATA_TWEET_SENTIMENT", str(tmp_path / "nowhere"))
    args = ["run", str(EXPERIMENTS / "smoke.yaml"), "--workdir", str(tmp_path / "w"), "--stage", "train",
            "--set", "tasks=[tweet_sentiment, drug_sentiment]"]
    broken = CliRunner().invoke(cli.cli, args, standalone_mode=False)
    assert isinstance(broken.exception, PtxError) and started == []
    assert "tweet_sentiment: local data for task 'tweet_sentiment'" in str(broken.exception)
    assert "does not exist" in str(broken.exception)
    # a paper spec offline: refused, unless --offline-ok (then the run goes on to Ray)
    paper = ["run", str(EXPERIMENTS / "paper_roberta_base.yaml"), "--workdir", str(tmp_path / "p"), "--stage", "train",
             "--set", "tasks=[mrpc]"]
    monkeypatch.delenv("PTX_DATA_TWEET_SENTIMENT")
    refused = CliRunner().invoke(cli.cli, paper, standalone_mode=False)
    assert isinstance(refused.exception, PtxError) and "--offline-ok" in str(refused.exception) and started == []
    monkeypatch.setattr("ptx.stages.prompts.run_train_stage", lambda *a, **k: {"trials": 0})
    went_on = CliRunner().invoke(cli.cli, [*paper, "--offline-ok"], standalone_mode=False)
    assert went_on.exception is None, went_on.output
    assert started == [None]


def test_tasks_check_reports_unpinned_tasks_as_a_note_not_an_error():
    out = CliRunner().invoke(cli.cli, ["tasks", "check", "sst2", "multi_news", "tweet_sentiment", "--offline-ok"])
    assert out.exit_code == 0, out.output
    table = {line.split()[0]: line.split()[1:3] for line in out.output.splitlines()[1:4]}
    assert table == {"sst2": ["fixture-verified", "pinned"], "multi_news": ["fixture-verified", "unpinned"],
                     "tweet_sentiment": ["packaged", "-"]}
    notes = [line for line in out.output.splitlines() if line.startswith("unpinned:")]
    assert notes == ["unpinned: multi_news names the branch 'main', not a commit: its rows can change; pin a commit "
                     "SHA in its task file (`ptx tasks check` on a machine with the Hub prints the branch's current "
                     "commit)"]


# ---- local copies are validated ---------------------------------------------------------------------------

def test_local_copy_must_exist_be_filled_and_have_the_columns(tmp_path, monkeypatch):
    spec = load_task("sst2")
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path / "missing"))
    with pytest.raises(PtxError, match=r"local data for task 'sst2' \(PTX_DATA_SST2 or data_files\): folder .*"
                                       r"missing does not exist"):
        load_split(spec, "train")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path / "empty"))
    with pytest.raises(PtxError, match=r"task 'sst2' .*folder .*empty is empty; expected train"):
        load_split(spec, "train")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path / "other"))
    with pytest.raises(PtxError, match=r"no train file; expected train\..*found \['notes.txt'\]"):
        load_split(spec, "train")
    (tmp_path / "cols").mkdir()
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(tmp_path / "cols" / "train.csv", index=False)
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path / "cols"))
    with pytest.raises(PtxError, match=r"local data for task 'sst2': .*train.csv has no column\(s\) \['sentence'\]"):
        load_split(spec, "train")
    with pytest.raises(PtxError, match=r"the dev file .*nope.csv does not exist"):
        load_split(spec, "train", data_files={"train": tmp_path / "cols" / "train.csv", "dev": tmp_path / "nope.csv"})
    assert check_task(spec).status == "broken"  # the check reports the same, as a status


def test_the_check_reads_only_the_head_of_local_files(tmp_path, monkeypatch):
    good = [json.dumps({"sentence": f"line {i}", "label": i % 2}) for i in range(20)]
    (tmp_path / "train.jsonl").write_text("\n".join([*good, "{not json"]) + "\n")  # a bad line past the sample
    pd.DataFrame({"sentence": [f"test {i}" for i in range(30)], "label": [i % 2 for i in range(30)]}
                 ).to_parquet(tmp_path / "test.parquet", row_group_size=7)
    assert list(read_table(tmp_path / "test.parquet", nrows=9)["sentence"]) == [f"test {i}" for i in range(9)]
    with pytest.raises(PtxError, match=r"train.jsonl: cannot read as jsonl"):
        read_table(tmp_path / "train.jsonl")  # a full read parses every line
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path))
    check = check_task(load_task("sst2"), rows=8)
    assert (check.status, check.detail) == ("local", "rows train=train:8/8, test=test:8/8")


def test_a_local_copy_never_reuses_the_sources_encoded_split(tiny, tmp_path, monkeypatch):
    from ptx.data import encode_split

    backbone = tiny("tiny-bert")
    monkeypatch.setenv("PTX_CACHE_DIR", str(tmp_path / "cache"))
    spec = load_task("tweet_sentiment")
    assert len(encode_split(spec, backbone, "test", limit=5)) == 5  # the packaged data, now cached
    folder = tmp_path / "copy"
    folder.mkdir()
    labels = ["negative", "neutral", "positive"]
    pd.DataFrame({"text": [f"tweet {i} about cars" for i in range(20)], "sentiment": [labels[i % 3] for i in range(20)]}
                 ).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["one", "two", "three"], "sentiment": labels}).to_csv(folder / "test.csv", index=False)
    monkeypatch.setenv("PTX_DATA_TWEET_SENTIMENT", str(folder))
    assert sorted(encode_split(spec, backbone, "test", limit=5)["label"]) == [0, 1, 2]  # the copy's 3 rows
