"""The cluster's tracking store, for real: PostgreSQL + the Kubernetes MLflow server configuration (the args and
env of cluster/k8s/mlflow.yaml: `ptx mlflow-server --auth=basic`, 4 workers, its allowed hosts, accounts in the
same database) on 127.0.0.1, and a Ray Tune sweep whose 8 trials log to it at once as the writer account; then
the same with the server SIGKILLed mid-sweep and restarted. Every run, every metric step and every artifact file
must be in the store exactly once.

PostgreSQL is Debian's `postgresql` package (`make postgres` installs it); the test runs its own server from
initdb in a temp dir (as the `postgres` user when run as root: PostgreSQL refuses to run as root), on a free port
on 127.0.0.1, with trust authentication for that loopback socket only, and removes it afterwards.
What differs from the cluster: --host (127.0.0.1, never every interface here), --port, --workdir, the artifact
destination (a local directory: no object store in this test) and the database address in the store URI.
"""

import base64
import glob
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import support
import yaml
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
        # the database and user of cluster/k8s/postgres.yaml (trust auth here: the password is not checked)
        self._run("createuser", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ptx", "mlflow")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ptx", "-O", "mlflow", "mlflow")
        self.address = f"127.0.0.1:{self.port}"
        # a store URI for servers started outside the manifest's configuration (benchmarks/bench_scale.py); the
        # driver named: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, the image carries psycopg2
        self.uri = f"postgresql+psycopg2://ptx@{self.address}/mlflow"

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, f"{tool} failed: {out.stderr[-2000:]}"

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


K8S_MLFLOW = Path(__file__).resolve().parents[1] / "cluster" / "k8s" / "mlflow.yaml"


def k8s_server_config() -> tuple[list[str], list[dict]]:
    """The MLflow container of cluster/k8s/mlflow.yaml: its command + args and its env list."""
    docs = [d for d in yaml.safe_load_all(K8S_MLFLOW.read_text()) if d]
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container["command"] + container["args"], container["env"]


class MlflowServer:
    """The Kubernetes MLflow configuration run here, in its own session: the manifest's command, args and env,
    Secrets filled with fresh values, `$(VAR)` expanded as the kubelet does; only the local-only parts differ."""

    def __init__(self, pg: "Postgres", workdir: Path):
        self.workdir, self.port = workdir, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.secrets = {("ptx-mlflow-auth", "username"): "admin",
                        ("ptx-mlflow-auth", "password"): secrets.token_urlsafe(16),
                        ("ptx-mlflow-auth", "writer-username"): "ptx-writer",
                        ("ptx-mlflow-auth", "writer-password"): secrets.token_urlsafe(16),
                        ("ptx-mlflow-auth", "flask-secret-key"): secrets.token_hex(32),
                        ("ptx-mlflow-db", "password"): secrets.token_hex(12)}
        argv, env_list = k8s_server_config()
        local = {"--host": "127.0.0.1", "--port": str(self.port), "--workdir": str(workdir),
                 "--artifacts-destination": str(workdir / "artifacts")}
        self.argv = [a if a.split("=")[0] not in local else f"{a.split('=')[0]}={local[a.split('=')[0]]}"
                     for a in argv]
        assert self.argv[:2] == ["ptx", "mlflow-server"] and set(local) <= {a.split("=")[0] for a in self.argv}
        env = {}
        for item in env_list:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[(ref["name"], ref["key"])]
            else:  # the kubelet expands $(NAME) from the variables defined above it
                env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        store = env["PTX_MLFLOW_BACKEND_STORE_URI"]
        assert "@mlflow-db:5432/mlflow" in store
        env["PTX_MLFLOW_BACKEND_STORE_URI"] = store.replace("@mlflow-db:5432/", f"@{pg.address}/")
        self.env, self.proc = env, None
        self.workers = int(next(a.split("=")[1] for a in self.argv if a.startswith("--workers=")))
        self.writer = (env["PTX_MLFLOW_WRITER_USERNAME"], env["PTX_MLFLOW_WRITER_PASSWORD"])
        self.admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(self.env)
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ptx", *self.argv[1:]], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_healthy(self.uri, self.proc, self.workdir / "server.log", START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL to the server's whole process group: a crash, no clean shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Relay:
    """A TCP relay on 127.0.0.1 between the sweep and the server. It counts the connections it could not hand on
    because the server was down: requests of the sweep that failed, and that its clients had to repeat."""

    def __init__(self, target_port: int):
        self.target_port, self.failed, self.forwarded = target_port, 0, 0
        self.failure = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            with self.lock:
                self.failed += 1
            self.failure.set()
            client.close()
            return
        with self.lock:
            self.forwarded += 1
        upstream.settimeout(None)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)

    def close(self) -> None:
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for end in (src, dst):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _request(server: MlflowServer, method: str, path: str, login=None, host=None, body=None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Host": host or f"127.0.0.1:{server.port}", "Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.fixture(scope="module")
def store(tmp_path_factory, own_ray):
    pg = Postgres()
    server = MlflowServer(pg, tmp_path_factory.mktemp("mlflow"))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        server.start()
        # the Ray pods' login (raycluster.yaml/rayjob.yaml: the writer keys), inherited by every trial process
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = server.writer
        sweep.connect(num_cpus=TRIALS)  # logical CPUs: all 8 trials run (and log) at once
        yield server
    finally:
        sweep.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.kill()
        pg.stop()


def test_k8s_mlflow_configuration_authenticates_and_checks_hosts(store):
    """The manifest's server: no login, no access; the writer logs runs but is no admin; a Host header outside
    MLFLOW_SERVER_ALLOWED_HOSTS is refused, the Service name is accepted; the manifest's worker count runs."""
    search = "/api/2.0/mlflow/experiments/search"
    assert _request(store, "POST", search, body={"max_results": 1}) == 401
    assert _request(store, "POST", search, login=(store.writer[0], "wrong"), body={"max_results": 1}) == 401
    assert _request(store, "POST", search, login=store.writer, body={"max_results": 1}) == 200
    assert _request(store, "POST", search, login=store.writer, host="mlflow:5000", body={"max_results": 1}) == 200
    assert _request(store, "POST", search, login=store.writer, host="attacker.example",
                    body={"max_results": 1}) in (400, 403)
    # only an admin may create accounts
    new_user = {"username": "someone", "password": secrets.token_urlsafe(16)}
    assert _request(store, "POST", "/api/2.0/mlflow/users/create", login=store.writer, body=new_user) == 403
    assert _request(store, "POST", "/api/2.0/mlflow/users/create", login=store.admin, body=new_user) == 200
    # the server runs the manifest's worker count (uvicorn workers are children of the server process)
    import psutil

    assert store.workers == 4
    children = psutil.Process(store.proc.pid).children(recursive=True)
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == store.workers, [p.cmdline() for p in children]
    # the database password is on no command line (any process can read those)
    db_password = store.secrets[("ptx-mlflow-db", "password")]
    assert not [p.pid for p in [psutil.Process(store.proc.pid), *psutil.Process(store.proc.pid).children(True)]
                if db_password in " ".join(p.cmdline())]


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
    """The sweep logs through a counting relay; the server is SIGKILLed once a trial has logged step 3 and is
    restarted only after the relay has refused at least one of the sweep's requests (the outage was seen, not
    slept through). Everything must still be in the store exactly once: the failed requests were retried."""
    steps = list(range(0, 31, 3))
    spec = load_study(write_spec(tmp_path / "pg_crash.yaml", steps=30))
    client = MlflowClient(store.uri)
    relay = Relay(store.port)
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
        # down until a request of the sweep has hit the dead server (trials log every few seconds)
        crash["seen"] = relay.failure.wait(timeout=120)
        store.start()  # same port, same PostgreSQL: nothing of the store is lost with the process
        crash["back"] = time.monotonic()

    killer = threading.Thread(target=crash_when_logging, daemon=True)
    killer.start()
    try:
        summary = sweep.run_sweep(spec, tmp_path, relay.uri)
        ended = time.monotonic()
    finally:
        killer.join(timeout=START_TIMEOUT)
        relay.close()
    assert "at" in crash, "the server was never killed: nothing was tested"
    assert crash["seen"] and relay.failed >= 1, f"no request of the sweep failed during the outage ({relay.failed})"
    assert crash["at"] < crash["back"] < ended, "the crash and restart must fall inside the sweep"
    assert relay.forwarded > relay.failed
    assert summary["trials"] == TRIALS and summary["errored"] == 0, summary["rows"]
    check_exactly_once(store.uri, "pg_crash", summary, steps)
    print(f"FIGURES pg_crash: outage {crash['back'] - crash['at']:.1f} s, {relay.failed} requests refused while "
          f"down, {relay.forwarded} forwarded, wall {summary['wall_seconds']:.1f} s")
