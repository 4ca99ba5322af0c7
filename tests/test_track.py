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

from ptx import track
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


def prompt_runs(client: MlflowClient) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids, "tags.`ptx.kind` = 'prompt'"))


def test_train_logs_everything_into_the_workdir_store(tmp_path, monkeypatch):
    cwd, wd = tmp_path / "elsewhere", tmp_path / "wd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, err = invoke_cli("train", *SMALL, "--workdir", wd)
    assert code == 0, err
    assert list(cwd.rglob("*")) == [], "nothing may be written under the current directory"
    assert (wd / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    (run,) = prompt_runs(client)
    rid = run.info.run_id
    assert rid in out and run.info.status == "FINISHED"

    # artifacts physically under the workdir, identical to the local copy
    art_root = uri_path(run.info.artifact_uri)
    assert art_root.is_relative_to(wd.resolve()), art_root
    assert sorted(a.path for a in client.list_artifacts(rid, "prompt")) == ["prompt/prompt.json",
                                                                            "prompt/prompt.safetensors"]
    for name in ("prompt.json", "prompt.safetensors"):
        assert (art_root / "prompt" / name).read_bytes() == (wd / "prompts" / rid / name).read_bytes()

    # params are the resolved request
    p = run.data.params
    assert (p["task"], p["backbone"], p["prompt_length"], p["settings.steps"], p["settings.lr"], p["train_limit"]) == \
        ("tweet_sentiment", "tiny-llama", "4", "4", "0.05", "32")
    # lineage tags
    t = run.data.tags
    assert (t["ptx.kind"], t["ptx.task"], t["ptx.backbone"], t["ptx.seed"]) == ("prompt", "tweet_sentiment", "tiny-llama", "0")
    assert t["ptx.config_hash"] == small_request().hash()
    assert "ptx.source_run" not in t  # not a transfer init
    # the learning curve: one point per evaluation, step 0 (the init) included
    dev = client.get_metric_history(rid, "dev_accuracy")
    assert sorted(m.step for m in dev) == [0, 2, 4]
    assert sorted(m.step for m in client.get_metric_history(rid, "train_loss")) == [2, 4]
    best = sorted(client.get_metric_history(rid, "best_dev_metric"), key=lambda m: m.step)
    assert [m.step for m in best] == [0, 2, 4]
    assert best[-1].value == max(m.value for m in dev) == run.data.metrics["best_dev_metric"]
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
    (a,) = prompt_runs(MlflowClient(f"sqlite:///{opt_db}"))
    (b,) = prompt_runs(MlflowClient(f"sqlite:///{env_db}"))
    assert (a.data.tags["ptx.seed"], b.data.tags["ptx.seed"]) == ("0", "1")
    for run in (a, b):  # artifacts still go under the workdir
        assert uri_path(run.info.artifact_uri).is_relative_to(wd.resolve())
        assert (uri_path(run.info.artifact_uri) / "prompt" / "prompt.safetensors").is_file()


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
    tracker = track.Tracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    src = run_prompt(small_request(), wd, tracker=tracker)
    # drop the local copy: the init prompt can then only come from the MLflow store
    for f in src.artifact.iterdir():
        f.unlink()
    src.artifact.rmdir()
    code, out, err = invoke_cli("train", *SMALL, "--init-from", src.run_id, "--workdir", wd)
    assert code == 0, err
    runs = {r.info.run_id: r for r in prompt_runs(tracker.client)}
    (new_id,) = set(runs) - {src.run_id}
    assert runs[new_id].data.tags["ptx.source_run"] == src.run_id
    assert runs[new_id].data.tags["ptx.init"] == "artifact"
    fetched = wd / "downloads" / src.run_id / "prompt.safetensors"
    stored = uri_path(runs[src.run_id].info.artifact_uri) / "prompt" / "prompt.safetensors"
    assert fetched.read_bytes() == stored.read_bytes()
    # the new run started from the source's best prompt: its step-0 dev score is the source's best
    step0 = [m.value for m in tracker.client.get_metric_history(new_id, "dev_accuracy") if m.step == 0]
    assert step0 == [pytest.approx(src.best_metric)]
    from ptx.prompt import load_prompt

    assert load_prompt(wd / "prompts" / new_id).meta["init"] == {"mode": "artifact", "source": src.run_id}


def test_metric_logging_is_batched(wd, tmp_path):
    tracker = track.Tracker(track.resolve_tracking_uri(None, wd), workdir=wd)
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
            tracker = track.Tracker(uri, workdir=wd)
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
    tracker = track.Tracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    (first,) = prompt_runs(tracker.client)
    assert "reused finished run " + first.info.run_id in out2 and "trained " + first.info.run_id in out1

    # the library call reuses it too, and fetches the prompt through MLflow when this workdir lost its copy
    local = wd / "prompts" / first.info.run_id
    for f in local.iterdir():
        f.unlink()
    again = run_prompt(small_request(), wd, tracker=tracker)
    assert again.reused and again.run_id == first.info.run_id
    assert (local / "prompt.safetensors").is_file()
    assert len(prompt_runs(tracker.client)) == 1

    code, out3, err = invoke_cli("train", *SMALL, "--workdir", wd, "--force")
    assert code == 0, err
    runs = prompt_runs(tracker.client)
    assert len(runs) == 2 and len({r.data.tags["ptx.config_hash"] for r in runs}) == 1
    assert "trained " in out3 and first.info.run_id not in out3


def test_unknown_run_and_tracker_errors_are_user_errors(wd, tmp_path):
    tracker = track.Tracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    with pytest.raises(PtxError, match="does not exist"):
        tracker.get_run("0123456789abcdef0123456789abcdef")
    with pytest.raises(PtxError, match="quotes"):
        tracker.prompt_runs(task="x' or '1'='1")


def test_tag_best_ranks_vanilla_runs_only(wd):
    """A TPT run scoring higher than the vanilla prompt it started from never takes the ptx.best tag."""
    from ptx.sweep import tag_best

    tracker = track.Tracker(f"sqlite:///{wd}/mlflow.db", "tags", workdir=wd)
    base = {"ptx.kind": track.KIND_PROMPT, "ptx.task": "sst2", "ptx.backbone": "tiny-bert"}
    ids = {}
    for name, score, extra in (("vanilla_a", 0.6, {"ptx.init": "random"}), ("vanilla_b", 0.7, {"ptx.init": "vocab"}),
                               ("tpt", 0.9, {"ptx.init": "artifact", "ptx.source_run": "x"}),
                               ("projected", 0.95, {"ptx.init": "artifact", "ptx.tpt": "projector"})):
        ids[name] = tracker.start_run(name, {**base, **extra})
        tracker.log(ids[name], {"best_dev_metric": score})
        tracker.finish(ids[name])
    tag_best(tracker, {("sst2", "tiny-bert")})
    tags = {name: tracker.get_run(rid).data.tags.get("ptx.best") for name, rid in ids.items()}
    assert tags == {"vanilla_a": "false", "vanilla_b": "true", "tpt": "false", "projected": "false"}
    # `ptx prompts best` reads the same rule: the TPT and projected runs score higher, the vanilla one is best
    assert tracker.best_prompt_run("sst2", "tiny-bert").info.run_id == ids["vanilla_b"]




def test_experiment_kind_datasets_links_and_system_metrics(wd):
    """What the MLflow UI shows: the runs table (experiment kind), each run's data (dataset inputs), a run's links,
    system metrics (forced on here; ptx switches them on for runs on a GPU)."""
    from ptx.data import describe_split

    tracker = track.Tracker(f"sqlite:///{wd / 'mlflow.db'}", "kinds", workdir=wd)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags[track.EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracker.client.delete_experiment_tag(tracker.experiment_id, track.EXPERIMENT_KIND_TAG)  # an older experiment
    track.Tracker(tracker.uri, "kinds", workdir=wd)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[track.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run = run_prompt(small_request(), wd, tracker=tracker)
    got = tracker.get_run(run.run_id)
    assert got.info.run_name == "tweet_sentiment · tiny-llama · s0"
    ds = {d.dataset.name: d.dataset for d in got.inputs.dataset_inputs}
    assert set(ds) == {"tweet_sentiment/train", "tweet_sentiment/dev"}
    assert ds["tweet_sentiment/train"].source_type == "package" and "num_rows\": 32" in ds["tweet_sentiment/train"].profile
    assert [r.info.run_id for r in tracker.runs_on_dataset("tweet_sentiment/train", context="train")] == [run.run_id]
    assert tracker.runs_on_dataset("tweet_sentiment/train", context="dev") == []  # trained on it, not selected on it
    assert tracker.runs_on_dataset("tweet_sentiment/dev", ds["tweet_sentiment/dev"].digest, "dev")[0].info.run_id == run.run_id
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
    tracker.link_runs(other, {got.info.run_name: run.run_id})
    tags = tracker.get_run(other).data.tags
    assert tags["ptx.link.tweet_sentiment/tiny-llama/s0"] == run.run_id
    assert f"(#/experiments/{tracker.experiment_id}/runs/{run.run_id})" in tags["mlflow.note.content"]
    with tracker.system_metrics(other, enabled=True, interval=0.2):
        import time

        time.sleep(1.5)
    assert "system/cpu_utilization_percentage" in tracker.get_run(other).data.metrics
    with tracker.system_metrics(run.run_id, enabled=False):
        pass
    assert not any(k.startswith("system/") for k in tracker.get_run(run.run_id).data.metrics)


def test_outage_wait_tries_from_the_environment(monkeypatch):
    monkeypatch.delenv("PTX_MLFLOW_WAIT_TRIES", raising=False)
    assert track.outage_wait_tries() == 8
    monkeypatch.setenv("PTX_MLFLOW_WAIT_TRIES", "1")
    assert track.outage_wait_tries() == 1
    monkeypatch.setenv("PTX_MLFLOW_WAIT_TRIES", "0")
    with pytest.raises(PtxError, match=r"PTX_MLFLOW_WAIT_TRIES: expected a whole number >= 1, found '0'"):
        track.outage_wait_tries()
