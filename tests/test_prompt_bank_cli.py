"""`ptx prompts ...`: list, get, best, export-peft, import against a real sqlite MLflow store, and bad input.

Every user error must exit 2 with a one-line message. The store is a real MLflow sqlite db (a copy of one
migrated once per session, because a fresh db spends ~10 s in MLflow's migrations).
"""

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from cli_runner import invoke_cli, user_error
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file
from support import free_port

from ptx import track
from ptx.errors import PtxError
from ptx.prompt import load_prompt
from ptx.prompt_runs import PromptRequest, run_prompt
from ptx.train import TrainSettings

pytestmark = pytest.mark.usefixtures("no_env_uri")  # each test names its store (conftest.py)

@pytest.fixture(scope="module")
def bank(tmp_path_factory, new_workdir, tiny):
    """A workdir with three prompt runs (two seeds on tiny-llama, one on tiny-bert) and one non-prompt run."""
    wd = new_workdir(tmp_path_factory.mktemp("bank") / "wd")
    tracker = track.MlflowTracker(track.resolve_tracking_uri(None, wd), workdir=wd)
    runs = {}
    for key, backbone, seed in [("llama0", "tiny-llama", 0), ("llama1", "tiny-llama", 1), ("bert0", "tiny-bert", 0)]:
        req = PromptRequest(task="tweet_sentiment", backbone=backbone, prompt_length=4, train_limit=32, dev_limit=16,
                            settings=TrainSettings(steps=4, batch_size=8, lr=0.05, eval_every=2, seed=seed))
        runs[key] = run_prompt(req, wd, tracker=tracker, backbone=tiny(backbone))
    other = tracker.start_run("transfer", {"ptx.kind": track.KIND_TRANSFER})
    tracker.finish(other)
    return {"wd": wd, "tracker": tracker, "runs": runs, "other": other}


def test_list_table_json_and_filters(bank):
    wd, runs = bank["wd"], bank["runs"]
    code, out, err = invoke_cli("prompts", "list", "--workdir", wd)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["run_id", "task", "backbone", "insertion", "seed", "origin", "best", "dev"]
    assert len(lines) == 4 and all(r.run_id in out for r in runs.values()) and bank["other"] not in out

    code, out, _ = invoke_cli("prompts", "list", "--backbone", "tiny-bert", "--format", "json",
                       "--workdir", wd)
    rows = json.loads(out)
    assert [r["run_id"] for r in rows] == [runs["bert0"].run_id]
    assert rows[0]["dev"] == f"{runs['bert0'].best_metric:.4f}" and rows[0]["origin"] == "trained"
    code, out, _ = invoke_cli("prompts", "list", "--task", "tweet_sentiment", "--backbone",
                       "tiny-llama", "--format", "json", "--workdir", wd)
    assert {r["run_id"] for r in json.loads(out)} == {runs["llama0"].run_id, runs["llama1"].run_id}
    code, out, _ = invoke_cli("prompts", "list", "--task", "drug_condition", "--workdir", wd)
    assert code == 0 and out.strip() == "(none)"


def test_get_downloads_the_stored_artifact(bank, tmp_path):
    run = bank["runs"]["llama1"]
    out_dir = tmp_path / "fetched"
    code, out, err = invoke_cli("prompts", "get", run.run_id, "-o", out_dir, "--workdir", bank["wd"])
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["prompt.json", "prompt.safetensors"]
    stored = Path(unquote(urlparse(bank["tracker"].get_run(run.run_id).artifact_uri).path)) / "prompt"
    for name in ("prompt.json", "prompt.safetensors"):
        assert (out_dir / name).read_bytes() == (stored / name).read_bytes() == (run.artifact / name).read_bytes()
    assert load_prompt(out_dir).meta["mlflow_run_id"] == run.run_id
    # an existing empty directory is a fine target too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke_cli("prompts", "get", run.run_id, "-o", empty, "--workdir", bank["wd"])[0] == 0
    assert (empty / "prompt.safetensors").is_file()


def test_best_picks_the_highest_dev_metric(bank, tmp_path):
    runs = bank["runs"]
    code, out, err = invoke_cli("prompts", "best", "--task", "tweet_sentiment", "--backbone",
                         "tiny-llama", "-o", tmp_path / "best", "--workdir", bank["wd"])
    assert code == 0, err
    best = max(runs["llama0"].best_metric, runs["llama1"].best_metric)
    winners = {r.run_id for k, r in runs.items() if k.startswith("llama") and r.best_metric == best}
    chosen = out.split()[0]
    assert chosen in winners and f"dev {best:.4f}" in out
    assert load_prompt(tmp_path / "best").meta["mlflow_run_id"] == chosen
    err = user_error(invoke_cli("prompts", "best", "--task", "bbc_topic", "--backbone", "tiny-llama",
                         "--workdir", bank["wd"]))
    assert "no finished prompt run" in err and "bbc_topic" in err


def test_export_peft_writes_an_adapter(bank, tmp_path):
    run = bank["runs"]["llama0"]
    code, out, err = invoke_cli("prompts", "export-peft", run.run_id, "-o", tmp_path / "peft",
                         "--workdir", bank["wd"])
    assert code == 0, err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"]) == ("PROMPT_TUNING", "CAUSAL_LM", 4)
    weights = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(weights["prompt_embeddings"], load_prompt(run.artifact).prompt)
    # a non-empty target is never replaced
    err = user_error(invoke_cli("prompts", "export-peft", run.run_id, "-o", tmp_path / "peft",
                         "--workdir", bank["wd"]))
    assert "not an empty directory" in err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_import_a_raw_torch_prompt(bank, tmp_path):
    wd = bank["wd"]
    file = tmp_path / "mine.pt"
    tensor = torch.randn(3, 32)
    torch.save(tensor, file)
    code, out, err = invoke_cli("prompts", "import", file, "--backbone", "tiny-bert", "--task",
                         "tweet_sentiment", "--workdir", wd)
    assert code == 0, err
    code, out2, _ = invoke_cli("prompts", "import", file, "--backbone", "tiny-bert", "--task",
                        "tweet_sentiment", "--workdir", wd)
    assert "already imported" in out2
    code, out, _ = invoke_cli("prompts", "list", "--backbone", "tiny-bert", "--format", "json",
                       "--workdir", wd)
    imported = [r for r in json.loads(out) if r["origin"] == "imported"]
    assert len(imported) == 1
    fetched = tmp_path / "got"
    assert invoke_cli("prompts", "get", imported[0]["run_id"], "-o", fetched, "--workdir", wd)[0] == 0
    assert torch.equal(load_prompt(fetched).prompt, tensor)
    err = user_error(invoke_cli("prompts", "import", file, "--backbone", "tiny-llama", "--task",
                         "tweet_sentiment", "--workdir", wd))
    assert "[3, 32]" in err and "64" in err  # names both widths
    err = user_error(invoke_cli("prompts", "import", file, "--backbone", "tiny-bert", "--workdir", wd))
    assert "--name" in err


def test_bad_run_ids_and_targets(bank, tmp_path):
    wd, run = bank["wd"], bank["runs"]["llama0"]
    err = user_error(invoke_cli("prompts", "get", "0" * 32, "-o", tmp_path / "a", "--workdir", wd))
    assert "does not exist" in err and "0" * 32 in err
    err = user_error(invoke_cli("prompts", "get", "not-a-run", "-o", tmp_path / "a", "--workdir", wd))
    assert "does not exist" in err
    err = user_error(invoke_cli("prompts", "get", bank["other"], "-o", tmp_path / "a", "--workdir", wd))
    assert "not a prompt run" in err and "transfer" in err
    err = user_error(invoke_cli("prompts", "export-peft", bank["other"], "-o", tmp_path / "a",
                         "--workdir", wd))
    assert "not a prompt run" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    err = user_error(invoke_cli("prompts", "get", run.run_id, "-o", busy, "--workdir", wd))
    assert "not an empty directory" in err and str(busy) in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    user_error(invoke_cli("prompts", "get", run.run_id, "-o", tmp_path / "file", "--workdir", wd))
    assert not (tmp_path / "a").exists()


def test_artifact_paths_cannot_escape_the_target(bank, tmp_path):
    # MLflow itself refuses '..' in artifact paths when logging, so no run in a store we write can hold one:
    client, run_id = bank["tracker"].client, bank["other"]
    (tmp_path / "f.txt").write_text("x")
    for bad in ("prompt/../../evil", "../evil"):
        with pytest.raises(MlflowException, match="Invalid artifact path"):
            client.log_artifact(run_id, str(tmp_path / "f.txt"), bad)
    # ...so the guard that protects against a store or server we do not control is tested directly
    out = tmp_path / "target"
    out.mkdir()
    assert track.artifact_target(out, "prompt", "prompt/prompt.json") == out.resolve() / "prompt.json"
    assert track.artifact_target(out, "prompt", "prompt/sub/x.bin") == out.resolve() / "sub" / "x.bin"
    for bad in ("prompt/../../etc/passwd", "prompt/../x", "/etc/passwd", "other/x", "prompt\\..\\..\\x",
                "prompt/a/../../.."):
        with pytest.raises(PtxError, match="would escape"):
            track.artifact_target(out, "prompt", bad, run_id="r1")
    (out / "link").symlink_to(tmp_path)  # a symlink already inside the target points outside it
    with pytest.raises(PtxError, match="would escape"):
        track.artifact_target(out, "prompt", "prompt/link/x")


class _DownServer:
    """A tracking server that is up as a socket but never healthy: it answers 503 to everything and counts what
    it was asked, so the test sees the client's bounded retries themselves rather than timing them."""

    def __init__(self):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                seen.append((self.command, self.path))
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_unreachable_server_fails_fast_with_the_uri(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    err = user_error(invoke_cli("prompts", "list", "--tracking-uri", uri, "--workdir", tmp_path))
    assert uri in err and "unreachable" in err
    down = _DownServer()  # listening but unhealthy: every probe is answered, so each one is counted
    try:
        err = user_error(invoke_cli("prompts", "list", "--tracking-uri", down.uri, "--workdir", tmp_path))
        assert down.uri in err and "unreachable after 3 tries" in err
        assert down.seen == [("GET", "/health")] * 3, down.seen  # three probes, then the error: no MLflow call
        monkeypatch.setenv("MLFLOW_TRACKING_URI", down.uri)
        err = user_error(invoke_cli("train", "--task", "tweet_sentiment", "--backbone", "tiny-llama",
                                    "--steps", "1", "--workdir", tmp_path / "wd"))
        assert down.uri in err and down.seen == [("GET", "/health")] * 6, down.seen
    finally:
        down.close()
    assert not (tmp_path / "wd" / "prompts").exists()  # refused before any training
