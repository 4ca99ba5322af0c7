"""A real `ptx mlflow-server` on 127.0.0.1: train against it over HTTP, fetch the prompt with ptx and with plain
`mlflow artifacts download`, then kill the server in the middle of a run and check the prompt is kept locally.

The server is a subprocess in its own session (process group), stopped with SIGTERM, then SIGKILL after a
timeout; the tests check no process of that group is left behind.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_runner import invoke_cli
from mlflow.tracking import MlflowClient
from support import free_port, wait_healthy

from ptx import track
from ptx.errors import PtxError
from ptx.prompt import load_prompt
from ptx.prompt_runs import PromptRequest, run_prompt
from ptx.train import TrainSettings

pytestmark = pytest.mark.usefixtures("no_env_uri")  # each test names its store (conftest.py)
BIN = Path(sys.executable).parent
START_TIMEOUT = 180  # s: a first start migrates a fresh sqlite db (slow on a loaded 2-core box)


def group_alive(pgid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


class Server:
    """`ptx mlflow-server` as a subprocess in its own process group."""

    def __init__(self, workdir: Path):
        self.port, self.workdir = free_port(), workdir
        self.log = workdir.parent / "server.log"
        self.uri = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(BIN / "ptx"), "mlflow-server", "--port", str(self.port), "--workdir",
                                          str(workdir)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_healthy(self) -> None:
        wait_healthy(self.uri, self.proc, self.log, START_TIMEOUT)  # the fixture stops the server on failure

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, SIGKILL after `timeout`; then no process of the group may remain."""
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + timeout
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = group_alive(pgid)
        if left:
            os.killpg(pgid, signal.SIGKILL)
            raise AssertionError(f"orphan server processes after stop: {[p.cmdline() for p in left]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_workdir, tiny):
    workdir = new_workdir(tmp_path_factory.mktemp("server") / "srv")
    srv = Server(workdir)
    try:
        # while the server starts, build the tiny backbone and encode the data the tests train on
        from ptx.data import encode_split
        from ptx.tasks import load_task

        bb, spec = tiny("tiny-llama"), load_task("tweet_sentiment")
        encode_split(spec, bb, "train", limit=32)
        encode_split(spec, bb, "dev", limit=16)
        srv.wait_healthy()
    except BaseException:
        srv.stop()
        raise
    yield srv
    srv.stop()


def test_server_binds_loopback_only(server):
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_train_and_fetch_over_http(server, tmp_path):
    client_wd = tmp_path / "client"
    code, out, err = invoke_cli("train", "--task", "tweet_sentiment", "--backbone", "tiny-llama",
                         "--steps", "4", "--eval-every", "2", "--train-limit", "32", "--dev-limit", "16",
                         "--batch-size", "8", "--prompt-length", "4", "--lr", "0.05", "--workdir", client_wd,
                         "--tracking-uri", server.uri)
    assert code == 0, err
    run_id = re.search(r"trained ([0-9a-f]{32})", out).group(1)
    # the store and the artifacts live with the server, the client keeps only its local copy of the prompt
    assert not (client_wd / "mlflow.db").exists() and not (client_wd / "artifacts").exists()
    stored = list((server.workdir / "artifacts").rglob(f"{run_id}/artifacts/prompt/prompt.safetensors"))
    assert len(stored) == 1
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ptx.task"] == "tweet_sentiment"
    assert sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "dev_accuracy")) == [0, 2, 4]

    got = tmp_path / "got"
    code, _, err = invoke_cli("prompts", "get", run_id, "-o", got, "--tracking-uri", server.uri,
                       "--workdir", client_wd)
    assert code == 0, err
    plain = tmp_path / "plain"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    done = subprocess.run([str(BIN / "mlflow"), "artifacts", "download", "-r", run_id, "-a", "prompt", "-d",
                           str(plain)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("prompt.json", "prompt.safetensors"):
        data = (got / name).read_bytes()
        assert data == (plain / "prompt" / name).read_bytes() == stored[0].with_name(name).read_bytes()
        assert data == (client_wd / "prompts" / run_id / name).read_bytes()
    assert load_prompt(got).meta["mlflow_run_id"] == run_id


def test_server_dies_mid_run_prompt_is_kept(server, tmp_path):
    """Runs last: it stops the module's server in the middle of a training run."""
    wd = tmp_path / "client"
    tracker = track.MlflowTracker(server.uri, workdir=wd)
    req = PromptRequest(task="tweet_sentiment", backbone="tiny-llama", prompt_length=4, train_limit=32, dev_limit=16,
                        settings=TrainSettings(steps=6, batch_size=8, lr=0.05, eval_every=2, seed=3))
    seen = []

    def report(metrics, step, state=None):  # the sweep's seam: called after each evaluation is logged
        seen.append(step)
        if step == 2:
            server.stop()  # also asserts no orphan processes are left

    t0 = time.perf_counter()
    with pytest.raises(PtxError) as info:
        run_prompt(req, wd, tracker=tracker, report=report)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert seen == [0, 2, 4, 6]  # training went on after the store died
    assert "\n" not in msg and server.uri in msg and "kept on local disk at" in msg
    kept = Path(msg.rsplit(" at ", 1)[1])
    assert kept.is_relative_to(wd.resolve())
    art = load_prompt(kept)
    assert art.prompt.shape == (4, 64) and art.meta["best_step"] in (0, 2, 4, 6)
    assert elapsed < 120, f"a dead server cost {elapsed:.0f} s"
    print(f"dead server: run_prompt gave up logging and finished in {elapsed:.1f} s")


def _invoke_server(tmp_path, *args):
    from click.testing import CliRunner

    from ptx.cli import cli

    return CliRunner().invoke(cli, ["mlflow-server", "--workdir", str(tmp_path), *args])


def test_off_loopback_the_server_requires_auth(tmp_path, monkeypatch):
    """A server other machines reach runs MLflow's basic-auth app by default and refuses `--auth none`; the
    refusals come before anything starts (no server process, nothing written)."""
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    result = _invoke_server(tmp_path, "--host", "10.0.0.5")
    assert isinstance(result.exception, PtxError) and "MLFLOW_AUTH_ADMIN_PASSWORD" in str(result.exception)
    result = _invoke_server(tmp_path, "--host", "10.0.0.5", "--auth", "none")
    assert isinstance(result.exception, PtxError) and "must authenticate" in str(result.exception)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "x" * 16)
    monkeypatch.setenv("PTX_MLFLOW_WRITER_PASSWORD", "y" * 16)
    result = _invoke_server(tmp_path, "--host", "10.0.0.5", "--writer-user", "admin")
    assert isinstance(result.exception, PtxError) and "non-admin" in str(result.exception)
    assert not (tmp_path / "basic_auth.db").exists() and not (tmp_path / "basic_auth.ini").exists()


def test_basic_auth_settings_and_writer_account(tmp_path):
    """prepare_basic_auth writes MLflow's settings (mode 0600: the URI may hold a password; '%' escaped for
    configparser) and creates a non-admin writer whose password it can later reset."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    db = f"sqlite:///{tmp_path / 'accounts.db'}"
    ini = track.prepare_basic_auth(tmp_path, db, "admin", ("ptx-writer", "first-password-1"))
    assert ini.stat().st_mode & 0o777 == 0o600
    text = ini.read_text()
    assert f"database_uri = {db}\n" in text and "admin_username = admin\n" in text
    assert f"auth_cache_ttl_seconds = {track.AUTH_CACHE_TTL_S}\n" in text
    store = SqlAlchemyStore()
    store.init_db(db)
    assert store.authenticate_user("ptx-writer", "first-password-1")
    assert store.get_user("ptx-writer").is_admin is False
    track.prepare_basic_auth(tmp_path, db, "admin", ("ptx-writer", "second-password-2"))
    assert store.authenticate_user("ptx-writer", "second-password-2")
    assert not store.authenticate_user("ptx-writer", "first-password-1")
    import configparser

    pct = track.prepare_basic_auth(tmp_path, "postgresql+psycopg2://u:p%40ss@h/db", "admin", None)
    parsed = configparser.ConfigParser()
    parsed.read(pct)
    assert parsed["mlflow"]["database_uri"] == "postgresql+psycopg2://u:p%40ss@h/db"
