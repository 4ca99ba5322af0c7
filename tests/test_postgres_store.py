"""The cluster's tracking store, for real: PostgreSQL + `ptx mlflow-server` (proxied artifacts) on 127.0.0.1, and
a Ray Tune sweep whose 8 trials log to it at once; then the same with the server SIGKILLed mid-sweep and
restarted. Every run, every metric step and every artifact file must be in the store exactly once.

PostgreSQL is Debian's `postgresql` package (`make postgres` installs it); the test runs its own server from
initdb in a temp dir (as the `postgres` user when run as root: PostgreSQL refuses to run as root), on a free port
on 127.0.0.1, with trust authentication for that loopback socket only, and removes it afterwards.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import support
from mlflow.tracking import MlflowClient
from support import free_port, wait_healthy

from ptx import sweep
from ptx.config import load_study

# slow: 8 trial processes at once cost ~1-2 min of CPU on 2 cores; cluster: a server-crash fault test
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]
START_TIMEOUT = 180  # s: the first server start creates MLflow's schema in PostgreSQL (slow on a loaded box)
TRIALS = 8


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


class Postgres:
    """A throwaway PostgreSQL cluster: initdb, pg_ctl start on 127.0.0.1:PORT, one database `mlflow`."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            pytest.skip("PostgreSQL is not installed: run `make postgres` (Debian package postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="ptx-pg-"))  # not under pytest's 0700 tmp: `postgres` reads it
        self.data, self.port = self.root / "data", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "ptx", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ptx", "mlflow")
        # the driver named: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, the image carries psycopg2
        self.uri = f"postgresql+psycopg2://ptx@127.0.0.1:{self.port}/mlflow"

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, f"{tool} failed: {out.stderr[-2000:]}"

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`ptx mlflow-server` on the PostgreSQL store, artifacts proxied to a directory; its own session."""

    def __init__(self, store: str, workdir: Path):
        self.store, self.workdir, self.port = store, workdir, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ptx", "mlflow-server", "--port", str(self.port), "--workdir",
                 str(self.workdir), "--backend-store-uri", self.store, "--workers", "2"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_healthy(self.uri, self.proc, self.workdir / "server.log", START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL to the server's whole process group: a crash, no clean shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    pg = Postgres()
    server = MlflowServer(pg.uri, tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
        sweep.connect(num_cpus=TRIALS)  # logical CPUs: all 8 trials run (and log) at once
        yield server
    finally:
        sweep.shutdown()
        server.kill()
        pg.stop()


def write_spec(path: Path, steps: int) -> Path:
    """The small study of tests/support.py as 2 tasks x 4 seeds: TRIALS trials, all at once."""
    return support.write_spec(path, seeds=[0, 1, 2, 3], max_concurrent=TRIALS, max_failures=4,
                              train={"steps": steps, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 16},
                              data={"train_limit": 32, "dev_limit": 8, "test_limit": 8})


def check_exactly_once(uri: str, experiment: str, summary: dict, steps: list[int]) -> dict:
    """One FINISHED run per trial, each evaluation step once per metric, both prompt files once; the figures."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ptx.kind` = 'prompt'", max_results=1000)
    trial_ids = [r.data.tags.get("ptx.trial_id") for r in runs]
    assert len(runs) == TRIALS and len(set(trial_ids)) == TRIALS, trial_ids
    assert {row["run_id"] for row in summary["rows"]} == {r.info.run_id for r in runs}
    points = 0
    for run in runs:
        rid = run.info.run_id
        assert run.info.status == "FINISHED", (rid, run.info.status)
        for key, expected in (("dev_accuracy", steps), ("best_dev_metric", steps), ("train_loss", steps[1:])):
            got = sorted(m.step for m in client.get_metric_history(rid, key))
            assert got == expected, f"run {rid} {key}: steps {got}, expected each of {expected} once"
            points += len(got)
        files = sorted(a.path for a in client.list_artifacts(rid, "prompt"))
        assert files == ["prompt/prompt.json", "prompt/prompt.safetensors"], files
    return {"runs": len(runs), "metric_points": points}


def test_eight_trials_log_at_once_to_mlflow_on_postgres(store, tmp_path):
    spec = load_study(write_spec(tmp_path / "pg_sweep.yaml", steps=6))
    summary = sweep.run_sweep(spec, tmp_path, store.uri)
    assert summary["trials"] == TRIALS and summary["errored"] == 0
    figures = check_exactly_once(store.uri, "pg_sweep", summary, [0, 3, 6])
    assert figures == {"runs": TRIALS, "metric_points": TRIALS * (3 + 3 + 2)}
    # the store really is PostgreSQL, and the artifacts went through the server to its destination
    assert not (tmp_path / "mlflow.db").exists()
    assert len(list((store.workdir / "artifacts").rglob("prompt.safetensors"))) >= TRIALS


def test_mlflow_server_sigkilled_mid_sweep_loses_and_duplicates_nothing(store, tmp_path):
    steps = list(range(0, 31, 3))
    spec = load_study(write_spec(tmp_path / "pg_crash.yaml", steps=30))
    client = MlflowClient(store.uri)
    crash = {}

    def crash_when_logging():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                exp = client.get_experiment_by_name("pg_crash")
                runs = client.search_runs([exp.experiment_id], "tags.`ptx.kind` = 'prompt'") if exp else []
                if any(m.step >= 3 for r in runs for m in client.get_metric_history(r.info.run_id, "dev_accuracy")):
                    break
            except Exception:  # the store is still coming up for this experiment
                pass
            time.sleep(0.5)
        crash["at"] = time.monotonic()
        store.kill()
        time.sleep(3)
        store.start()  # same port, same PostgreSQL: nothing of the store is lost with the process
        crash["outage"] = time.monotonic() - crash["at"]

    killer = threading.Thread(target=crash_when_logging, daemon=True)
    killer.start()
    summary = sweep.run_sweep(spec, tmp_path, store.uri)
    killer.join(timeout=START_TIMEOUT)
    assert "outage" in crash, "the server was never killed: nothing was tested"
    assert summary["trials"] == TRIALS and summary["errored"] == 0, summary["rows"]
    check_exactly_once(store.uri, "pg_crash", summary, steps)
    print(f"FIGURES pg_crash: outage {crash['outage']:.1f} s, wall {summary['wall_seconds']:.1f} s")
