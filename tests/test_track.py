"""MLflow tracking of prompt runs: where the store lives, what a run records, batching, idempotency, lineage.

Real sqlite stores in tmp_path, real training of tiny backbones; the only wrapping is a call counter around
`MlflowClient.log_batch` (instrumentation: the real method still runs).
"""

import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import mlflow
import pytest
from cli_runner import invoke_cli
from mlflow.tracking import MlflowClient
from support import prompt_runs

from ptx import bank, track
from ptx.errors import PtxError
from ptx.prompt_runs import PromptRequest, run_prompt
from ptx.train import TrainSettings

pytestmark = pytest.mark.usefixtures("no_env_uri")  # each test names its store (conftest.py)
SMALL = ["--task", "tweet_sentiment", "--backbone", "tiny-llama", "--steps", "4", "--eval-every", "2",
         "--train-limit", "32", "--dev-limit", "16", "--batch-size", "8", "--prompt-length", "4", "--lr", "0.05"]


def small_request(**changes) -> PromptRequest:
    """The request `ptx train SMALL` builds (same hash)."""
    settings = changes.pop("settings", TrainSettings(steps=4, batch_size=8, lr=0.05, eval_every=2, seed=changes.pop("seed", 0)))
    return PromptRequest(task="tweet_sentiment", backbone="tiny-llama", prompt_length=4, train_limit=32, dev_limit=16,
                         settings=settings, **changes)


def uri_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def test_train_logs_everything_into_the_workdir_store(tmp_path, monkeypatch):
    cwd, wd = tmp_path / "elsewhere", tmp_path / "wd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, err = invoke_cli("train", *SMALL, "--workdir", wd)
    assert code == 0, err
    assert list(cwd.rglob("*")) == [], "nothing may be written under the current directory"
    assert (wd / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    (run,) = prompt_runs(f"sqlite:///{wd / 'mlflow.db'}")
    rid = run.run_id
    assert rid in out and run.status == "FINISHED"

    # artifacts physically under the workdir, identical to the local copy
    art_root = uri_path(run.artifact_uri)
    assert art_root.is_relative_to(wd.resolve()), art_root
    assert sorted(a.path for a in client.list_artifacts(rid, "prompt")) == ["prompt/prompt.json",
                                                                            "prompt/prompt.safetensors"]
    for name in ("prompt.json", "prompt.safetensors"):
        assert (art_root / "prompt" / name).read_bytes() == (wd / "prompts" / rid / name).read_bytes()

    # params are the resolved request
    p = run.params
    assert (p["task"], p["backbone"], p["prompt_length"], p["settings.steps"], p["settings.lr"], p["train_limit"]) == \
        ("tweet_sentiment", "tiny-llama", "4", "4", "0.05", "32")
    # lineage tags
    t = run.tags
    assert (t["ptx.kind"], t["ptx.task"], t["ptx.backbone"], t["ptx.seed"]) == ("prompt", "tweet_sentiment", "tiny-llama", "0")
    assert t["ptx.config_hash"] == small_request().hash()
    assert "ptx.source_run" not in t  # not a transfer init
    # the learning curve: one point per evaluation, step 0 (the init) included
    dev = client.get_metric_history(rid, "dev_accuracy")
    assert sorted(m.step for m in dev) == [0, 2, 4]
    assert sorted(m.step for m in client.get_metric_history(rid, "train_loss")) == [2, 4]
    best = sorted(client.get_metric_history(rid, "best_dev_metric"), key=lambda m: m.step)
    assert [m.step for m in best] == [0, 2, 4]
    assert best[-1].value == max(m.value for m in dev) == run.metrics["best_dev_metric"]
    assert all(a.value <= b.value for a, b in zip(best, best[1:], strict=False))


def test_tracking_uri_from_option_and_from_env(tmp_path, empty_db, monkeypatch):
    wd = tmp_path / "wd"
    opt_db, env_db = tmp_path / "opt.db", tmp_path / "env.db"
    for db in (opt_db, env_db):
        shutil.copy(empty_db, db)
    args = ["train", *SMALL, "--steps", "1", "--eval-every", "1", "--workdir", wd]
    code, _, err = invoke_cli(*args, "--tracking-uri", f"sqlite:///{opt_db}")
    assert code == 0, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    code, _, err = invoke_cli(*args, "--seed", "1")
    assert code == 0, err
    assert not (wd / "mlflow.db").exists()
    (a,) = prompt_runs(f"sqlite:///{opt_db}")
    (b,) = prompt_runs(f"sqlite:///{env_db}")
    assert (a.tags["ptx.seed"], b.tags["ptx.seed"]) == ("0", "1")
    for run in (a, b):  # artifacts still go under the workdir
        assert uri_path(run.artifact_uri).is_relative_to(wd.resolve())
        assert (uri_path(run.artifact_uri) / "prompt" / "prompt.safetensors").is_file()


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file:///tmp/ptx-test-mlruns", "file:./mlruns"])
def test_file_store_is_refused(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke_cli("train", *SMALL, "--workdir", tmp_path / "wd", "--tracking-uri", uri)
    assert code == 2
    assert err.count("\n") == 1 and "file store" in err and uri in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, _, err = invoke_cli("prompts", "list", "--workdir", tmp_path / "wd")
    assert code == 2 and "file store" in err
    assert not (tmp_path / "mlruns").exists() and not Path("/tmp/ptx-test-mlruns").exists()


def test_transfer_init_comes_through_mlflow(wd, tmp_path):
    tracker = track.MlflowTracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    src = run_prompt(small_request(), wd, tracker=tracker)
    # drop the local copy: the init prompt can then only come from the MLflow store
    for f in src.artifact.iterdir():
        f.unlink()
    src.artifact.rmdir()
    code, out, err = invoke_cli("train", *SMALL, "--init-from", src.run_id, "--workdir", wd)
    assert code == 0, err
    runs = {r.run_id: r for r in prompt_runs(tracker.uri)}
    (new_id,) = set(runs) - {src.run_id}
    assert runs[new_id].tags["ptx.source_run"] == src.run_id
    assert runs[new_id].tags["ptx.init"] == "artifact"
    fetched = wd / "prompts" / src.run_id / "prompt.safetensors"  # the one local home of a fetched prompt
    stored = uri_path(runs[src.run_id].artifact_uri) / "prompt" / "prompt.safetensors"
    assert fetched.read_bytes() == stored.read_bytes()
    # the new run started from the source's best prompt: its step-0 dev score is the source's best
    step0 = [m.value for m in tracker.client.get_metric_history(new_id, "dev_accuracy") if m.step == 0]
    assert step0 == [pytest.approx(src.best_metric)]
    from ptx.prompt import load_prompt

    assert load_prompt(wd / "prompts" / new_id).meta["init"] == {"mode": "artifact", "source": src.run_id}


def test_metric_logging_is_batched(wd, tmp_path):
    tracker = track.MlflowTracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    calls = []
    real_batch, real_metric = tracker.client.log_batch, tracker.client.log_metric

    def counted_batch(*a, **kw):
        calls.append(kw)
        return real_batch(*a, **kw)

    def counted_metric(*a, **kw):
        calls.append("log_metric")
        return real_metric(*a, **kw)

    tracker.client.log_batch, tracker.client.log_metric = counted_batch, counted_metric
    rid = tracker.start_run("batching", {"ptx.kind": "test"})
    tracker.log(rid, {f"m{i}": i for i in range(2500)}, step=1)
    assert len(calls) == 3  # MLflow takes at most 1000 metrics a request
    calls.clear()
    tracker.log(rid, params={f"p{i}": i for i in range(250)})
    assert len(calls) == 3  # and at most 100 params
    calls.clear()
    tracker.log(rid, {"a": 1.0, "b": 2.0}, step=3, tags={"t": "x"})
    tracker.log(rid)  # nothing to log: no request
    assert len(calls) == 1
    calls.clear()
    tracker.log_curve(rid, [{"step": s, "x": s, "y": -s, "z": None} for s in range(700)])
    assert len(calls) == 2  # 1400 points in 1000-metric batches
    assert len(tracker.client.get_metric_history(rid, "x")) == 700
    calls.clear()

    run = run_prompt(small_request(settings=TrainSettings(steps=6, batch_size=8, lr=0.05, eval_every=2)), wd,
                     tracker=tracker)
    evals = len(tracker.client.get_metric_history(run.run_id, "dev_accuracy"))
    assert evals == 4  # steps 0, 2, 4, 6
    assert "log_metric" not in calls
    assert len(calls) <= evals + 2  # params once, one request per evaluation, one summary


def test_an_active_mlflow_run_is_left_alone(wd, tmp_path):
    uri = track.resolve_tracking_uri(None, wd)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("outer")
        with mlflow.start_run() as outer:
            tracker = track.MlflowTracker(uri, workdir=wd)
            run = run_prompt(small_request(), wd, tracker=tracker)
            assert mlflow.active_run().info.run_id == outer.info.run_id
        client = MlflowClient(uri)
        outer_run, ptx_run = client.get_run(outer.info.run_id), client.get_run(run.run_id)
        assert run.run_id != outer.info.run_id
        assert outer_run.data.metrics == {} and outer_run.data.params == {}
        assert not any(k.startswith("ptx.") for k in outer_run.data.tags)
        assert client.list_artifacts(outer.info.run_id) == []
        assert ptx_run.info.status == "FINISHED" and ptx_run.info.experiment_id == tracker.experiment_id
        assert "mlflow.parentRunId" not in ptx_run.data.tags
        assert ptx_run.data.metrics["best_dev_metric"] == pytest.approx(run.best_metric)
    finally:
        mlflow.set_tracking_uri(None)


def test_same_request_reuses_the_finished_run_and_force_trains_again(wd, tmp_path):
    code, out1, err = invoke_cli("train", *SMALL, "--workdir", wd)
    assert code == 0, err
    code, out2, err = invoke_cli("train", *SMALL, "--workdir", wd)
    assert code == 0, err
    tracker = track.MlflowTracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    (first,) = prompt_runs(tracker.uri)
    assert "reused finished run " + first.run_id in out2 and "trained " + first.run_id in out1

    # the library call reuses it too, and fetches the prompt through MLflow when this workdir lost its copy
    local = wd / "prompts" / first.run_id
    for f in local.iterdir():
        f.unlink()
    again = run_prompt(small_request(), wd, tracker=tracker)
    assert again.reused and again.run_id == first.run_id
    assert (local / "prompt.safetensors").is_file()
    assert len(prompt_runs(tracker.uri)) == 1

    code, out3, err = invoke_cli("train", *SMALL, "--workdir", wd, "--force")
    assert code == 0, err
    runs = prompt_runs(tracker.uri)
    assert len(runs) == 2 and len({r.tags["ptx.config_hash"] for r in runs}) == 1
    assert "trained " in out3 and first.run_id not in out3


def test_unknown_run_and_tracker_errors_are_user_errors(wd, tmp_path):
    tracker = track.MlflowTracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    with pytest.raises(PtxError, match="does not exist"):
        tracker.get_run("0123456789abcdef0123456789abcdef")
    with pytest.raises(PtxError, match="quotes"):
        bank.prompt_runs(tracker, task="x' or '1'='1")


def test_tag_best_ranks_vanilla_runs_only(wd):
    """A TPT run scoring higher than the vanilla prompt it started from never takes the ptx.best tag."""
    tracker = track.MlflowTracker(f"sqlite:///{wd}/mlflow.db", "tags", workdir=wd)
    base = {"ptx.kind": track.KIND_PROMPT, "ptx.task": "sst2", "ptx.backbone": "tiny-bert"}
    ids = {}
    for name, score, extra in (("vanilla_a", 0.6, {"ptx.init": "random"}), ("vanilla_b", 0.7, {"ptx.init": "vocab"}),
                               ("tpt", 0.9, {"ptx.init": "artifact", "ptx.source_run": "x"}),
                               ("projected", 0.95, {"ptx.init": "artifact", "ptx.tpt": "projector"})):
        ids[name] = tracker.start_run(name, {**base, **extra})
        tracker.log(ids[name], {"best_dev_metric": score})
        tracker.finish(ids[name])
    bank.tag_best(tracker, {("sst2", "tiny-bert")})
    tags = {name: tracker.get_run(rid).tags.get("ptx.best") for name, rid in ids.items()}
    assert tags == {"vanilla_a": "false", "vanilla_b": "true", "tpt": "false", "projected": "false"}
    # `ptx prompts best` reads the same rule: the TPT and projected runs score higher, the vanilla one is best
    assert bank.best_prompt_run(tracker, "sst2", "tiny-bert").run_id == ids["vanilla_b"]




def test_experiment_kind_datasets_links_and_system_metrics(wd):
    """What the MLflow UI shows: the runs table (experiment kind), each run's data (dataset inputs), a run's links,
    system metrics (forced on here; ptx switches them on for runs on a GPU)."""
    from ptx.data import describe_split

    tracker = track.MlflowTracker(f"sqlite:///{wd / 'mlflow.db'}", "kinds", workdir=wd)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags[track.EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracker.client.delete_experiment_tag(tracker.experiment_id, track.EXPERIMENT_KIND_TAG)  # an older experiment
    track.MlflowTracker(tracker.uri, "kinds", workdir=wd)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[track.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run = run_prompt(small_request(), wd, tracker=tracker)
    got = tracker.get_run(run.run_id)
    assert got.name == "tweet_sentiment · tiny-llama · s0"
    ds = {d.name: d for d in got.datasets}
    assert set(ds) == {"tweet_sentiment/train", "tweet_sentiment/dev"}
    assert ds["tweet_sentiment/train"].source_type == "package" and "num_rows\": 32" in ds["tweet_sentiment/train"].profile
    assert [r.run_id for r in tracker.runs_on_dataset("tweet_sentiment/train", context="train")] == [run.run_id]
    assert tracker.runs_on_dataset("tweet_sentiment/train", context="dev") == []  # trained on it, not selected on it
    assert tracker.runs_on_dataset("tweet_sentiment/dev", ds["tweet_sentiment/dev"].digest, "dev")[0].run_id == run.run_id
    with pytest.raises(PtxError, match="quotes"):
        tracker.runs_on_dataset("x' or '1'='1")
    # the digest follows the data: two different encoded splits differ, the same one is stable
    import datasets

    spec = SimpleNamespace(name="t", source=SimpleNamespace(kind="files", files=(("train", "/d/train.csv"),)),
                           splits=SimpleNamespace(train="train"))
    a = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "label": [0, 1]})
    b = datasets.Dataset.from_dict({"input_ids": [[1], [2, 3]], "label": [0, 1]})  # same tokens, split differently
    assert describe_split(spec, "train", a)["digest"] == describe_split(spec, "train", a)["digest"]
    assert describe_split(spec, "train", a)["digest"] != describe_split(spec, "train", b)["digest"]
    assert describe_split(spec, "train", a)["source"] == "/d/train.csv"
    # links and system metrics
    other = tracker.start_run(track.run_name("report", "kinds"), {"ptx.kind": "report"})
    tracker.link_runs(other, {got.name: run.run_id})
    tags = tracker.get_run(other).tags
    assert tags["ptx.link.tweet_sentiment/tiny-llama/s0"] == run.run_id
    assert f"(#/experiments/{tracker.experiment_id}/runs/{run.run_id})" in tags["mlflow.note.content"]
    with tracker.system_metrics(other, enabled=True, interval=0.2):
        import time

        # until the monitor's first logging lands, not a fixed time: under load 1.5 s was sometimes too short
        deadline = time.monotonic() + 60
        while ("system/cpu_utilization_percentage" not in tracker.get_run(other).metrics
               and time.monotonic() < deadline):
            time.sleep(0.1)
    assert "system/cpu_utilization_percentage" in tracker.get_run(other).metrics
    with tracker.system_metrics(run.run_id, enabled=False):
        pass
    assert not any(k.startswith("system/") for k in tracker.get_run(run.run_id).metrics)


def test_outage_wait_tries_from_the_environment(monkeypatch):
    monkeypatch.delenv("PTX_MLFLOW_WAIT_TRIES", raising=False)
    assert track.outage_wait_tries() == 8
    monkeypatch.setenv("PTX_MLFLOW_WAIT_TRIES", "1")
    assert track.outage_wait_tries() == 1
    monkeypatch.setenv("PTX_MLFLOW_WAIT_TRIES", "0")
    with pytest.raises(PtxError, match=r"PTX_MLFLOW_WAIT_TRIES: expected a whole number >= 1, found '0'"):
        track.outage_wait_tries()


# ---- the tracker seam: records, the null tracker, the bank, one prompt-metadata builder --------------------
def test_null_tracker_stores_nothing_and_finds_nothing(tmp_path):
    """`--no-track`: every write is a no-op, every query is empty, and asking for a stored run names the cause."""
    null = track.NullTracker(workdir=tmp_path)
    assert isinstance(null, track.Tracker) and not null.enabled and null.uri == ""
    rid = null.start_run("x", {"ptx.kind": "prompt"})
    assert rid is None
    null.log(rid, {"m": 1.0}, step=1, params={"p": 1}, tags={"t": "v"})
    null.log_curve(rid, [{"step": 1, "m": 1.0}])
    null.set_tags(rid, {"t": "v"})
    null.log_artifacts(rid, tmp_path, "prompt")
    null.finish(rid)
    with null.system_metrics(rid, enabled=True):
        pass
    assert null.find_runs({"ptx.kind": "prompt"}) == [] and bank.bank_runs(null, "tiny-bert") == []
    assert bank.prompt_runs(null) == [] and bank.select_runs(null, "tiny-bert", mode="best") == []
    assert null.finished_run("prompt", "h") is None and null.metric_history("r", "m") == []
    assert null.stored_points("r", ["m"]) == set() and null.for_experiment("other").experiment == "other"
    for ask in (lambda: null.get_run("abc"), lambda: bank.fetch_prompt(null, "abc", tmp_path),
                lambda: bank.best_prompt_run(null, "sst2", "tiny-bert")):
        with pytest.raises(PtxError, match="no MLflow store is configured|no finished prompt run"):
            ask()
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_queries_return_plain_run_records(wd):
    """The store answers with frozen ptx records of plain values (no MLflow object leaves ptx.track)."""
    import dataclasses

    tracker = track.MlflowTracker(f"sqlite:///{wd / 'mlflow.db'}", "records", workdir=wd)
    parent = tracker.start_run("parent", {"ptx.kind": "sweep"})
    rid = tracker.start_run(track.run_name("child", "a"), {"ptx.kind": "test", "ptx.n": 3, "ptx.none": None}, parent)
    tracker.log(rid, {"loss": 2.0}, step=1, params={"opt": {"lr": 0.1}})
    tracker.log(rid, {"loss": 1.5}, step=2)
    tracker.set_tags(rid, {"ptx.extra": "yes"})
    tracker.finish(rid)
    got = tracker.get_run(rid)
    assert type(got) is track.RunRecord and got.run_id == rid and got.name == "child · a"
    assert got.status == "FINISHED" and got.experiment_id == tracker.experiment_id and got.parent_run_id == parent
    assert {k: v for k, v in got.tags.items() if k.startswith("ptx.")} == {"ptx.kind": "test", "ptx.n": "3",
                                                                         "ptx.extra": "yes"}
    assert got.params == {"opt.lr": "0.1"} and got.metrics == {"loss": 1.5}
    assert got.start_time > 0 and got.end_time >= got.start_time and got.artifact_uri.startswith("file:")
    assert [(p.step, p.value) for p in tracker.metric_history(rid, "loss")] == [(1, 2.0), (2, 1.5)]
    assert all(type(p) is track.MetricPoint for p in tracker.metric_history(rid, "loss"))
    (found,) = tracker.find_runs({"ptx.kind": "test"})
    assert found == got and type(found) is track.RunRecord
    assert tracker.finished_run("test", "nope") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.status = "RUNNING"
    tracker.reopen(rid)
    assert tracker.get_run(rid).status == "RUNNING" and tracker.find_runs({"ptx.kind": "test"}) == []
    assert track.MlflowTracker(tracker.uri, "records").for_experiment("records").experiment_id == tracker.experiment_id


def test_the_bank_picks_vanilla_runs_the_best_per_task_and_fetches_to_one_dir(wd):
    """One query (vanilla finished prompt runs), one best-of, one local home (<workdir>/prompts/<run id>)."""
    import torch

    from ptx.prompt import load_prompt, prompt_meta, save_prompt

    tracker = track.MlflowTracker(f"sqlite:///{wd / 'mlflow.db'}", "bank", workdir=wd)
    ids = {}
    for name, task, score, extra in (("a0", "sst2", 0.6, {}), ("a1", "sst2", 0.8, {}), ("b0", "rte", None, {}),
                                     ("tpt", "sst2", 0.99, {"ptx.init": "artifact", "ptx.source_run": "x"}),
                                     ("other_bb", "sst2", 0.9, {"ptx.backbone": "tiny-llama"})):
        rid = ids[name] = tracker.start_run(name, {"ptx.kind": track.KIND_PROMPT, "ptx.task": task,
                                                   "ptx.backbone": "tiny-bert", "ptx.init": "random", **extra})
        tracker.log(rid, {"best_dev_metric": score})
        src = save_prompt(wd / "src" / name, torch.full((2, 4), float(len(name))), prompt_meta(
            config_hash=name, run_id=rid, backbone={"name": "tiny-bert", "d_model": 4}, task={"name": task}, verbalizer=None,
            insertion="prepend", init={"mode": "random"}))
        tracker.log_artifacts(rid, src, track.PROMPT_ARTIFACT)
        tracker.finish(rid)
    assert [r.run_id for r in bank.bank_runs(tracker, "tiny-bert")] == [ids["a0"], ids["a1"], ids["b0"]]  # oldest first
    assert [r.run_id for r in bank.bank_runs(tracker, "tiny-bert", tasks={"rte"})] == [ids["b0"]]
    assert bank.best_prompt_run(tracker, "sst2", "tiny-bert").run_id == ids["a1"]  # the TPT run scores higher: not vanilla
    with pytest.raises(PtxError, match="no finished prompt run for task 'rte'"):  # b0 has no dev metric
        bank.best_prompt_run(tracker, "rte", "tiny-bert")
    assert [r.run_id for r in bank.select_runs(tracker, "tiny-bert", mode="best")] == [ids["a1"], ids["b0"]]
    tracker.set_tags(ids["a0"], {"ptx.best": "true"})  # the tag a sweep set wins over a later, better run
    assert [r.run_id for r in bank.select_runs(tracker, "tiny-bert", mode="best")] == [ids["a0"], ids["b0"]]
    with pytest.raises(PtxError, match="transfer.sources: expected 'all' or 'best', found 'top'"):
        bank.select_runs(tracker, "tiny-bert", mode="top")
    local = bank.fetch_prompt(tracker, ids["a1"], wd)
    assert local == wd.resolve() / "prompts" / ids["a1"] == track.prompt_dir(wd, ids["a1"])
    assert torch.equal(load_prompt(local).prompt, torch.full((2, 4), 2.0))
    (local / "prompt.safetensors").write_bytes(b"kept")  # present: never downloaded again
    assert bank.fetch_prompt(tracker, ids["a1"], wd) == local and (local / "prompt.safetensors").read_bytes() == b"kept"
    partial = track.prompt_dir(wd, ids["a0"])
    partial.mkdir(parents=True)
    (partial / "prompt.safetensors").write_bytes(b"half")  # an interrupted fetch: replaced
    assert load_prompt(bank.fetch_prompt(tracker, ids["a0"], wd)).prompt.shape == (2, 4)


def test_every_prompt_writer_records_the_same_metadata_keys(wd, tmp_path):
    """A trained prompt, a trial closed from its checkpoint (ptx.sweep.finalisation) and an imported prompt carry the
    same prompt.json keys; the closed trial records the backbone revision and why it stopped."""
    import dataclasses

    import torch

    from ptx.prompt import load_prompt
    from ptx.prompt_runs import import_prompt
    from ptx.sweep.finalisation import _finalise_run

    tracker = track.MlflowTracker(f"sqlite:///{wd / 'mlflow.db'}", "writers", workdir=wd)
    req = small_request()
    trained = load_prompt(run_prompt(req, wd, tracker=tracker).artifact).meta
    tags = {k: v for k, v in tracker.get_run(trained["mlflow_run_id"]).tags.items() if k.startswith("ptx.")}
    trial = tracker.start_run("trial", tags)  # a trial the scheduler stopped: RUNNING, its best in the checkpoint
    state = {"best_prompt": torch.zeros(4, trained["backbone"]["d_model"]), "best_step": 2, "best_metric": 0.5,
             "curve": [{"step": 2, "dev_metric": 0.5}]}
    row = _finalise_run(dataclasses.asdict(req), trial, state, SimpleNamespace(error=None, metrics={}), tracker, wd)
    assert row["run_id"] == trial and tracker.get_run(trial).status == "FINISHED"
    finalised = load_prompt(wd / "prompts" / trial).meta
    torch.save(torch.zeros(4, 8), tmp_path / "p.pt")
    imported = load_prompt(import_prompt(tmp_path / "p.pt", "tiny-llama", "tweet_sentiment", "prepend", tmp_path / "i",
                                         d_model=8).artifact).meta
    assert set(trained) == set(finalised) == set(imported)
    assert finalised["backbone"] == trained["backbone"] and trained["backbone"]["revision"] is not None
    assert (finalised["stopped"], trained["stopped"], imported["stopped"]) == ("scheduler", "max_steps", None)
    assert finalised["init"] == trained["init"] and finalised["config_hash"] == trained["config_hash"]


def test_two_trials_logging_one_dataset_at_once_both_record_it(wd):
    """Two trials that log the same split into a fresh store at once race on MLflow's dataset key: both look the
    dataset up, neither finds it, both insert, and the slower insert fails on the key (seen in a real study: the
    trial errored and had to be retried). The interleaving is forced, not hoped for: a SQLAlchemy hook on the store's
    engine runs the second tracker's whole log_datasets (its own thread, its own connection) just before the first
    one's INSERT into `datasets` executes. Both runs must end up with the one dataset, the first after a retry."""
    import threading

    from sqlalchemy import event

    uri = f"sqlite:///{wd / 'mlflow.db'}"
    first, second = (track.MlflowTracker(uri, "race", workdir=wd) for _ in range(2))
    run_a, run_b = first.start_run("a", {}), second.start_run("b", {})
    split = {"name": "tweet_sentiment/train", "digest": "0123abcd", "source_type": "local", "source": "cache",
             "rows": 32, "task": "tweet_sentiment", "split": "train", "context": "train"}
    engine = first.client._tracking_client.store.engine
    raced: list = []

    def interleave(conn, cursor, statement, parameters, context, executemany):
        if not raced and statement.lstrip().upper().startswith("INSERT INTO DATASETS"):
            raced.append(statement)
            other = threading.Thread(target=lambda: raced.append(second.log_datasets(run_b, [split]) or "b logged"))
            other.start()
            other.join(timeout=60)

    event.listen(engine, "before_cursor_execute", interleave)
    try:
        first.log_datasets(run_a, [split])
    finally:
        event.remove(engine, "before_cursor_execute", interleave)
    assert raced[1:] == ["b logged"]  # the race happened: the second writer inserted first
    client = MlflowClient(uri)
    for run_id in (run_a, run_b):
        logged = [(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs]
        assert logged == [("tweet_sentiment/train", "0123abcd")]
    import sqlite3

    with sqlite3.connect(wd / "mlflow.db") as db:  # one dataset row, two inputs pointing at it
        assert db.execute("SELECT COUNT(*) FROM datasets").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM inputs").fetchone() == (2,)
