"""A real two-node Ray cluster and a real MLflow server on this one machine: a sweep spreads its trials over
both nodes, survives the loss of a worker node, and survives an MLflow server restart, with nothing lost.

Every node is one `ray start --block` in its own session, so the session is the whole node (raylet, agents,
and the trial workers the raylet forks, each in its own process group but in that session): SIGKILL to every
process of the session is a node loss, and teardown kills every session this module started (never `ray stop`,
which would also stop other tests' Ray). The cluster uses its own temp dir, ports and authentication token. The
MLflow server (`ptx mlflow-server`) and the sweep driver (`python -m ptx sweep ... --address`) run in sessions
of their own too.

Figures (trials started/finished, retries, MLflow runs per trial, artifacts missing) are printed as `FIGURES`
lines: `pytest -m cluster -s tests/test_multinode.py` shows them (docs/fault_tolerance.md quotes them).
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import support
from mlflow.tracking import MlflowClient
from support import free_port, prompt_runs, tail, wait_healthy

from ptx.sweep import HOLD_ENV

pytestmark = [pytest.mark.cluster, pytest.mark.ray]
BIN = Path(sys.executable).parent
START_TIMEOUT = 180  # s: a node or the MLflow server starting on a loaded 2-core box
SWEEP_TIMEOUT = 480  # s: one small sweep, faults included
TRAIN_LIMIT, DEV_LIMIT = (support.SMALL_STUDY["data"][k] for k in ("train_limit", "dev_limit"))  # pre-encoded


def write_spec(path: Path, **changes) -> Path:
    """The small study of tests/support.py; every node of this test runs on one machine, so the workdir's
    ray_results is one shared disk."""
    return support.write_spec(path, **{"storage_shared": True, **changes})


def session_alive(sid: int) -> list[psutil.Process]:
    """The live processes of a session: a node started with start_new_session is one session, Ray workers
    included (the raylet puts each worker in its own process group, but not in a new session)."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def signal_session(sid: int, sig: int) -> None:
    for proc in session_alive(sid):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def sigkill_session_now(sid: int) -> None:
    """SIGKILL every process of a session in one pass over /proc (no psutil): with a few hundred processes on a
    loaded box, `signal_session`'s psutil scan took long enough for a node's trials to run on for seconds."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except OSError:
                pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Signal every process of a session this module started; wait until none is left (SIGKILL after `timeout`)."""
    sid = proc.pid
    signal_session(sid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_session(sid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + timeout
    while session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if session_alive(sid):
        signal_session(sid, signal.SIGKILL)
        time.sleep(1)
    left = session_alive(sid)
    assert not left, f"processes left in session {sid}: {[p.pid for p in left]}"


# ---- the Ray cluster --------------------------------------------------------------------------------
class RayNode:
    """One `ray start --block` in its own session; `node_id` read from its raylet's command line."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log, self.node_id, self.is_head = log, None, "--head" in args
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start exited {self.proc.returncode}:\n{tail(self.log)}")
            if b"block forever" in self.log.read_bytes():
                for p in session_alive(self.proc.pid):
                    try:
                        ids = [a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_id=")]
                    except psutil.Error:
                        continue
                    if ids and p.name() == "raylet":
                        self.node_id = ids[0]
                        return self.node_id
            time.sleep(0.5)
        raise AssertionError(f"node not started after {START_TIMEOUT} s:\n{tail(self.log)}")

    def kill(self) -> None:
        sigkill_session_now(self.proc.pid)  # at once: raylet, agents, trial workers
        kill_session(self.proc)  # then make sure (even when `ray start` itself has exited: its raylet may not have)


class RayCluster:
    """A head (1 CPU, resource head_node) and worker nodes (2 CPUs, worker_node) on 127.0.0.1, token-authenticated;
    every node has one `trial_slot` (a spec that asks for it runs one trial per node at a time)."""

    def __init__(self, logs: Path):
        self.logs = logs
        # short: Ray's unix sockets live under it (a path limit of 107 bytes)
        self.temp = Path(tempfile.mkdtemp(prefix="ptxray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        # the cluster's own token: Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists,
        # and clients send a token only in token mode; one explicit token makes every process agree
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.nodes: list[RayNode] = []

    def _common(self) -> list[str]:
        return ["--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp), "--object-store-memory", "100000000",
                "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port())]

    def start_head(self) -> RayNode:
        node = RayNode(["--head", "--port", str(self.port), "--num-cpus", "1",
                        "--resources", '{"head_node": 1, "trial_slot": 1}', "--include-dashboard", "false",
                        "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                        *self._common()], self.env, self.logs / "head.log")
        self.nodes.append(node)
        return node

    def start_worker(self) -> RayNode:
        node = RayNode(["--address", self.address, "--num-cpus", "2",
                        "--resources", '{"worker_node": 1, "trial_slot": 1}', *self._common()], self.env,
                       self.logs / f"worker{len(self.nodes)}.log")
        self.nodes.append(node)
        return node

    def add_worker(self) -> RayNode:
        return self.started(self.start_worker)

    def started(self, start, first: RayNode | None = None) -> RayNode:
        """start() -> a node; wait until it runs, starting it again (twice at most) if `ray start` gave up."""
        for attempt in range(3):
            node = first if attempt == 0 and first is not None else start()
            try:
                node.wait_started()
                return node
            except AssertionError:  # `ray start` gave up: on a loaded box its raylet can miss the 30 s it is
                # given to register, or the dashboard agent's ports (seen at load average 20-30)
                if node.proc.poll() is None or attempt == 2:
                    raise
                node.kill()
                self.nodes.remove(node)
                node.log.rename(node.log.with_suffix(f".failed{attempt}.log"))

    def restart(self) -> None:
        """The head lost and brought back: every node of the cluster killed (without GCS fault tolerance a
        worker does not survive its head), a fresh head on the same address, then a fresh worker."""
        for node in reversed(self.alive()):
            node.kill()
        self.started(self.start_head)
        self.add_worker()

    def alive(self) -> list[RayNode]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def ensure_whole(self) -> None:
        """One head and at least one worker alive: bring back what an earlier test killed (the head restart test
        leaves a fresh cluster, the node-loss tests one worker fewer)."""
        alive = self.alive()
        if not alive or alive[0] is not self.nodes[self._head_index()]:
            self.restart()
        elif len(alive) < 2:
            self.add_worker()

    def _head_index(self) -> int:
        """The newest head in self.nodes (restart appends a fresh one)."""
        return max(i for i, n in enumerate(self.nodes) if n.is_head)

    def stop(self) -> None:
        errors = []
        for node in reversed(self.nodes):  # workers first, the head (GCS) last
            try:
                node.kill()
            except AssertionError as exc:
                errors.append(str(exc))
        shutil.rmtree(self.temp, ignore_errors=True)
        assert not errors, errors


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ptx_cache_dir, own_ray):  # own_ray: the shared Ray stops, its CPU freed
    logs = tmp_path_factory.mktemp("ray-logs")
    ray_cluster = RayCluster(logs)
    try:
        head = ray_cluster.start_head()
        # while the head starts: build the tiny backbone and encode the splits the trials read (once, not racing)
        from ptx.backbones import load_backbone
        from ptx.data import encode_split
        from ptx.tasks import load_task

        bb = load_backbone("tiny-llama")
        for task in ("tweet_sentiment", "drug_sentiment"):
            encode_split(load_task(task), bb, "train", limit=TRAIN_LIMIT)
            encode_split(load_task(task), bb, "dev", limit=DEV_LIMIT)
        ray_cluster.started(ray_cluster.start_head, first=head)
        ray_cluster.add_worker()
        yield ray_cluster
    finally:
        ray_cluster.stop()


# ---- the MLflow server ------------------------------------------------------------------------------
class Server:
    """`ptx mlflow-server` as a subprocess in its own session; `start` again reuses the port and the store."""

    def __init__(self, workdir: Path):
        self.port, self.workdir = free_port(), workdir
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc, self.starts = None, 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.log = self.workdir.parent / f"server{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(BIN / "ptx"), "mlflow-server", "--port", str(self.port), "--workdir",
                                          str(self.workdir)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_healthy(self) -> None:
        wait_healthy(self.uri, self.proc, self.log, START_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 20 s); no process of its session may remain."""
        if self.proc is not None:
            kill_session(self.proc, signal.SIGTERM, timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_workdir):
    workdir = new_workdir(tmp_path_factory.mktemp("mlflow") / "srv")  # a migrated empty store, copied
    srv = Server(workdir)
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def same_start(cluster, server):
    """Order independence, explicitly: every test starts from the same state whatever ran before it (tests kill
    workers, the head, the server): a head and a worker alive, the MLflow server healthy. So any one test may run
    alone (-k) or in any order."""
    cluster.ensure_whole()
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    server.wait_healthy()
    yield


# ---- the sweep driver -------------------------------------------------------------------------------
class Sweep:
    """`python -m ptx sweep SPEC --address ... --tracking-uri ...` in its own session."""

    def __init__(self, spec: Path, cluster: RayCluster, server: Server, workdir: Path, env: dict | None = None):
        self.spec, self.workdir, self.uri = spec, workdir, server.uri
        self.log = workdir.parent / f"driver-{spec.stem}.log"
        self.experiment = spec.stem
        self.t0 = time.perf_counter()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ptx", "sweep", str(spec), "--address", cluster.address, "--tracking-uri",
                 server.uri, "--workdir", str(workdir)], env={**cluster.env, **(env or {})}, stdout=f,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = SWEEP_TIMEOUT, rc: int = 0) -> float:
        try:
            got = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"sweep still running after {timeout} s:\n{tail(self.log)}") from None
        assert got == rc, f"sweep exited {got}, expected {rc}:\n{tail(self.log)}"
        return time.perf_counter() - self.t0

    def resume(self, cluster: RayCluster) -> float:
        """`ptx resume EXPERIMENT --address ...` (a subprocess, its own session); its wall time."""
        t0 = time.perf_counter()
        log = self.workdir.parent / f"resume-{self.experiment}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "ptx", "resume", str(self.experiment_path()), "--address",
                                     cluster.address], env=cluster.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            rc = proc.wait(timeout=SWEEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            raise AssertionError(f"resume still running after {SWEEP_TIMEOUT} s:\n{tail(log)}") from None
        assert rc == 0, f"resume exited {rc}:\n{tail(log)}"
        return time.perf_counter() - t0

    def stop(self) -> None:
        kill_session(self.proc)

    def experiment_path(self) -> Path:
        found = [p for p in (self.workdir / "ray_results").glob(f"{self.experiment}-train-*") if p.is_dir()]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def launch(cluster, server, tmp_path):
    """launch(spec) -> a running Sweep; every driver still running at teardown is killed."""
    started: list[Sweep] = []

    def go(spec: Path, env: dict | None = None) -> Sweep:
        started.append(Sweep(spec, cluster, server, tmp_path / "work", env))
        return started[-1]

    try:
        yield go
    finally:
        for s in started:
            s.stop()


# ---- what the store and Tune recorded ---------------------------------------------------------------
def tune_trials(path: Path) -> list[dict]:
    """Each trial's id, final state and number of failures, as the Tune experiment state records them."""
    from ray.tune import ExperimentAnalysis

    return [{"trial": t.trial_id, "state": t.status, "failures": t.num_failures}
            for t in ExperimentAnalysis(str(path)).trials]


def check_store(uri: str, experiment: str, trials: list[dict], steps: list[int], metric: str = "dev_accuracy") -> dict:
    """Assert one FINISHED run per trial, each evaluation step logged exactly once, the prompt artifact complete;
    return the figures."""
    client = MlflowClient(uri)
    runs = prompt_runs(uri, experiment)
    per_trial = {t["trial"]: [r for r in runs if r.tags.get("ptx.trial_id") == t["trial"]] for t in trials}
    assert all(len(v) == 1 for v in per_trial.values()), {k: len(v) for k, v in per_trial.items()}
    assert len(runs) == len(trials), "runs that belong to no trial"
    missing, duplicated = 0, 0
    for run in runs:
        rid = run.run_id
        assert run.status == "FINISHED", (rid, run.status)
        for key, expected in ((metric, steps), ("best_dev_metric", steps), ("train_loss", steps[1:])):
            got = sorted(m.step for m in client.get_metric_history(rid, key))
            duplicated += len(got) - len(set(got))
            assert got == expected, f"run {rid} {key}: steps {got}, expected each of {expected} once"
        names = {a.path for a in client.list_artifacts(rid, "prompt")}
        missing += len({"prompt/prompt.json", "prompt/prompt.safetensors"} - names)
        if "prompt/prompt.json" in names:
            meta = json.loads(Path(client.download_artifacts(rid, "prompt/prompt.json")).read_text())
            best = max(m.value for m in client.get_metric_history(rid, metric))
            assert meta["mlflow_run_id"] == rid and meta["dev_metric"]["value"] == pytest.approx(best)
    assert missing == 0, f"{missing} prompt artifact files missing"
    return {"trials_started": len({r.tags["ptx.trial_id"] for r in runs}),
            "trials_finished": sum(t["state"] == "TERMINATED" for t in trials),
            "retries": sum(t["failures"] for t in trials),
            "runs_per_trial": sorted({len(v) for v in per_trial.values()}),
            "artifacts_missing": missing, "metric_points_duplicated": duplicated}


def figures(name: str, fig: dict) -> None:
    print(f"FIGURES {name}: {json.dumps(fig, sort_keys=True)}")


def wait_for(predicate, timeout: float, what: str, sweep: Sweep, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if sweep.proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {sweep.proc.returncode}) before {what}:\n{tail(sweep.log)}")
        time.sleep(every)
    raise AssertionError(f"no {what} after {timeout} s:\n{tail(sweep.log)}")


# ---- the tests --------------------------------------------------------------------------------------
def test_sweep_runs_trials_on_both_nodes_and_logs_to_the_server(cluster, server, launch, tmp_path):
    # one trial per node at a time (trial_slot): the two trials Tune starts at once must land on different nodes
    spec = write_spec(tmp_path / "multinode.yaml", seeds=[0, 1], resources={"cpu": 1, "custom": {"trial_slot": 1}})
    sweep = launch(spec)
    wall = sweep.wait()
    trials = tune_trials(sweep.experiment_path())
    assert len(trials) == 4 and all(t["state"] == "TERMINATED" for t in trials), trials
    fig = check_store(server.uri, "multinode", trials, [0, 3, 6, 9, 12])
    runs = prompt_runs(server.uri, "multinode")
    nodes = {r.tags.get("ptx.node") for r in runs}
    cluster_ids = {n.node_id for n in cluster.alive()}
    assert nodes <= cluster_ids, (nodes, cluster_ids)
    assert len(nodes) >= 2, f"every trial ran on one node: {nodes}"
    # the artifacts went to the server's store, not to the driver's workdir
    for r in runs:
        assert list((server.workdir / "artifacts").rglob(f"{r.run_id}/artifacts/prompt/prompt.safetensors"))
    assert not (tmp_path / "work" / "mlflow.db").exists()
    figures("multinode", {**fig, "nodes_used": len(nodes), "wall_seconds": round(wall, 1)})


def sweep_trial_errors(sweep) -> list[Path]:
    """The error files Tune writes into a trial's directory when an attempt of it fails."""
    found = [p for p in (sweep.workdir / "ray_results").glob(f"{sweep.experiment}-train-*") if p.is_dir()]
    return [e for exp in found for e in exp.glob("*/error.txt")]


def logged_an_evaluation(client, experiment: str) -> bool:
    """Whether a prompt run of `experiment` has logged a dev evaluation after its first step."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ptx.kind` = 'prompt'") if exp else []
    return any(m.step >= 3 for r in runs for m in client.get_metric_history(r.info.run_id, "dev_accuracy"))


def test_mlflow_server_restart_mid_sweep_loses_nothing(cluster, server, launch, tmp_path):
    # 60 steps: on a warm machine 18 tiny steps finished in 6 s, before the server went down (nothing tested)
    steps = list(range(0, 61, 3))
    spec = write_spec(tmp_path / "outage.yaml", tasks=["tweet_sentiment"], seeds=[0, 1], max_failures=3,
                      train={"steps": 60, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32})
    sweep = launch(spec)
    client = MlflowClient(server.uri)

    wait_for(lambda: logged_an_evaluation(client, "outage"), SWEEP_TIMEOUT, "logged evaluation", sweep)
    t_down = time.perf_counter()
    server.stop()
    # down until a trial has failed for good (past one MLflow call's own retries) and Tune recorded the failure:
    # the event itself, not a fixed pause that a quick or a loaded box may over- or undershoot
    wait_for(lambda: any(sweep_trial_errors(sweep)), SWEEP_TIMEOUT, "a trial failed by the outage", sweep)
    server.start()
    server.wait_healthy()
    outage = time.perf_counter() - t_down
    wall = sweep.wait()
    trials = tune_trials(sweep.experiment_path())
    assert len(trials) == 2 and all(t["state"] == "TERMINATED" for t in trials), trials
    fig = check_store(server.uri, "outage", trials, steps)
    assert fig["retries"] >= 1, "the outage failed no trial: nothing was tested"
    figures("mlflow_outage", {**fig, "outage_seconds": round(outage, 1), "wall_seconds": round(wall, 1)})


def test_mlflow_outage_outlasting_the_retries_then_resume_finishes_exactly_once(cluster, server, launch, tmp_path):
    """The server goes down mid-sweep and stays down past every retry: each MLflow call's own retries, the
    trials' (max_failures 0 here: a trial's retry would only wait longer for the server), and the driver's wait
    before finalising (one probe here, PTX_MLFLOW_WAIT_TRIES=1). The sweep fails; once the server is back,
    `ptx resume` finishes it: one run per trial, every evaluation step and artifact exactly once."""
    steps = list(range(0, 61, 3))
    spec = write_spec(tmp_path / "longoutage.yaml", tasks=["tweet_sentiment"], seeds=[0, 1], max_failures=0,
                      train={"steps": 60, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32})
    sweep = launch(spec, env={"PTX_MLFLOW_WAIT_TRIES": "1"})
    client = MlflowClient(server.uri)

    wait_for(lambda: logged_an_evaluation(client, "longoutage"), SWEEP_TIMEOUT, "logged evaluation", sweep)
    t_down = time.perf_counter()
    server.stop()
    sweep.wait(rc=2)  # the driver gives up: the store it must finalise into is gone
    assert "MLflow tracking server" in tail(sweep.log) and "unreachable" in tail(sweep.log), tail(sweep.log)
    before = tune_trials(sweep.experiment_path())
    assert [t["state"] for t in before] == ["ERROR", "ERROR"], before  # the outage outlasted every retry
    server.start()
    server.wait_healthy()
    outage = time.perf_counter() - t_down
    wall = sweep.resume(cluster)
    trials = tune_trials(sweep.experiment_path())
    assert len(trials) == 2 and all(t["state"] == "TERMINATED" for t in trials), trials
    fig = check_store(server.uri, "longoutage", trials, steps)
    (parent,) = client.search_runs([client.get_experiment_by_name("longoutage").experiment_id],
                                   "tags.`ptx.kind` = 'sweep'")
    assert parent.info.status == "FINISHED", parent.info.status
    figures("mlflow_outage_then_resume", {**fig, "errored_before_resume": len(before),
                                          "outage_seconds": round(outage, 1), "resume_wall_seconds": round(wall, 1)})


HELD_STEPS = 18  # the held fault tests' trials: nothing can finish before the fault, so two evaluations after it do
HOLD_STEP = 9  # the fault tests hold every trial after its report of this step (sweep.HOLD_ENV) until the fault


def hold_at(tmp_path: Path) -> tuple[dict, Path]:
    """The driver's environment that makes its trials hold after reporting HOLD_STEP, and the folder they write
    their `held-<trial id>` files to; `release(folder)` lets them (and every retry) go on."""
    folder = tmp_path / "hold"
    folder.mkdir()
    return {HOLD_ENV: f"{HOLD_STEP}:{folder}"}, folder


def held(folder: Path, n: int) -> dict[str, int]:
    """trial id -> the step it holds at, once `n` trials hold; {} before."""
    got = {f.name[len("held-"):]: int(f.read_text()) for f in folder.glob("held-*")}
    return got if len(got) >= n else {}


def release(folder: Path) -> None:
    (folder / "release").write_text("1")


def steps_after_a_held_fault(sweep, ids: dict[str, int]) -> dict[str, list[int]]:
    """trial id -> every step it reported to Tune over all its attempts."""
    return {t: reported_steps(sweep.experiment_path(), t) for t in ids}


def test_worker_node_lost_mid_sweep_trials_finish_elsewhere(cluster, server, launch, tmp_path):
    """Kills the module's worker node mid-training and adds a fresh one.

    Deterministic: every trial holds after reporting step HOLD_STEP (the test hook sweep.HOLD_ENV), when Tune's
    driver has processed that result and registered its checkpoint; the node is killed while they hold, and only
    then are they released. (Without the hold, trials on a loaded box reported their last steps in the seconds
    between the trigger and the kill, and a trial that had finished on the node was rightly not retried.) Each
    trial then goes on from its step-9 checkpoint on the fresh node: every step reported exactly once."""
    steps = list(range(0, HELD_STEPS + 1, 3))
    # trials may run only on worker nodes (two per node): once the worker is gone, nothing fits until a fresh node
    spec = write_spec(tmp_path / "nodeloss.yaml", tasks=["tweet_sentiment"], seeds=[0, 1], max_failures=3,
                      resources={"cpu": 1, "custom": {"worker_node": 0.5}},
                      train={"steps": HELD_STEPS, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32})
    workers = [n for n in cluster.alive() if n is not cluster.nodes[0]]
    assert len(workers) == 1
    victim = workers[0]
    env, folder = hold_at(tmp_path)
    sweep = launch(spec, env=env)
    client = MlflowClient(server.uri)
    at_kill = wait_for(lambda: held(folder, 2), SWEEP_TIMEOUT, "two held trials", sweep)
    assert at_kill == dict.fromkeys(at_kill, HOLD_STEP), at_kill
    # the driver processed each trial's step-9 result (result.json reaches storage_path with its next sync)
    wait_for(lambda: last_reported_steps(sweep) == at_kill, 120, "the step-9 results in storage", sweep)
    victim.kill()  # SIGKILL to the whole node: raylet, agents, the trial workers on it
    release(folder)
    exp = client.get_experiment_by_name("nodeloss")
    before = {r.data.tags["ptx.trial_id"]: r.data.tags.get("ptx.node")
              for r in client.search_runs([exp.experiment_id], "tags.`ptx.kind` = 'prompt'")}
    assert set(before) == set(at_kill) and set(before.values()) == {victim.node_id}, (before, victim.node_id)
    fresh = cluster.add_worker()
    wall = sweep.wait()
    trials = tune_trials(sweep.experiment_path())
    assert len(trials) == 2 and all(t["state"] == "TERMINATED" for t in trials), trials
    fig = check_store(server.uri, "nodeloss", trials, steps)
    after = {r.tags["ptx.trial_id"]: r.tags.get("ptx.node") for r in prompt_runs(server.uri, "nodeloss")}
    assert {t["trial"]: t["failures"] for t in trials} == dict.fromkeys(at_kill, 1), trials
    assert after == dict.fromkeys(at_kill, fresh.node_id), (after, fresh.node_id)
    # each went on from its step-9 checkpoint: a restart from scratch would report steps 3-9 again
    assert steps_after_a_held_fault(sweep, at_kill) == dict.fromkeys(at_kill, steps[1:])
    figures("node_loss", {**fig, "trials_failed_by_the_loss": len(before), "checkpoint_step_at_kill": at_kill,
                          "wall_seconds": round(wall, 1)})


def test_worker_node_lost_mid_sweep_a_group_resumes_every_member_elsewhere(cluster, server, launch, tmp_path):
    """The node-loss test for a grouped trial (train.group_size 2): both prompts train in one trial on the
    worker; the node dies while the group holds after its step-9 checkpoint. The group is retried on a fresh node
    from that checkpoint, and each member finishes in its own MLflow run, every step logged once."""
    steps = list(range(0, HELD_STEPS + 1, 3))
    spec = write_spec(tmp_path / "groupnodeloss.yaml", tasks=["tweet_sentiment"], seeds=[0, 1], max_failures=3,
                      resources={"cpu": 1, "custom": {"worker_node": 0.5}},
                      train={"steps": HELD_STEPS, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32,
                             "group_size": 2})
    workers = [n for n in cluster.alive() if n is not cluster.nodes[0]]
    if not workers:  # the node-loss test did not run (or could not add its fresh node)
        workers = [cluster.add_worker()]
    victim = workers[-1]
    env, folder = hold_at(tmp_path)
    sweep = launch(spec, env=env)
    (group, step), = wait_for(lambda: held(folder, 1), SWEEP_TIMEOUT, "a held group", sweep).items()
    assert step == HOLD_STEP
    wait_for(lambda: last_reported_steps(sweep) == {group: HOLD_STEP}, 120, "the step-9 result in storage", sweep)
    victim.kill()
    release(folder)
    members = {f"{group}/m{i}" for i in range(2)}
    before = {r.tags["ptx.trial_id"]: r.tags.get("ptx.node") for r in prompt_runs(server.uri, "groupnodeloss")}
    assert before == dict.fromkeys(members, victim.node_id), (before, victim.node_id)
    fresh = cluster.add_worker()
    wall = sweep.wait()
    (trial,) = tune_trials(sweep.experiment_path())
    assert trial == {"trial": group, "state": "TERMINATED", "failures": 1}, trial
    fig = check_store(server.uri, "groupnodeloss", [{**trial, "trial": m} for m in sorted(members)], steps)
    runs = prompt_runs(server.uri, "groupnodeloss")
    assert {r.tags["ptx.trial_id"]: r.tags.get("ptx.node") for r in runs} == dict.fromkeys(members, fresh.node_id)
    assert {r.tags["ptx.group_trial"] for r in runs} == {group}
    assert reported_steps(sweep.experiment_path(), group) == steps[1:]  # from the step-9 checkpoint, not scratch
    figures("group_node_loss", {**fig, "retries": trial["failures"], "members": len(members), "checkpoint_step_at_kill": step,
                                "wall_seconds": round(wall, 1)})


def last_reported_steps(sweep) -> dict[str, int]:
    """trial id -> the step of its latest result the driver has processed (the last line of result.json)."""
    out = {}
    for trial_dir in (sweep.workdir / "ray_results").glob(f"{sweep.experiment}-train-*/*"):
        try:
            lines = [ln for ln in (trial_dir / "result.json").read_text().splitlines() if ln.strip()]
            out[trial_dir.name.rsplit("-", 1)[1]] = json.loads(lines[-1])["step"] if lines else None
        except (OSError, ValueError, KeyError):  # not there yet, or a line half-written
            continue
    return {k: v for k, v in out.items() if v is not None}


def reported_steps(experiment: Path, trial_id: str) -> list[int]:
    """The steps a trial reported to Tune over all its attempts (each attempt appends to result.json)."""
    (trial_dir,) = [p for p in experiment.iterdir() if p.is_dir() and p.name.endswith(trial_id)]
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_head_restart_then_resume_finishes_the_sweep_exactly_once(cluster, server, launch, tmp_path):
    """It kills the whole cluster (the next test's `same_start` brings a head and a worker back). The head (GCS) dies mid-sweep, and with it the driver that ran on
    it; without GCS fault tolerance (a `ray start` / `ray up` cluster) the workers do not survive it either. A head
    brought back on the same address and a fresh worker, `ptx resume` finishes the sweep: each trial goes on from
    its registered checkpoint in its own run, every evaluation step and artifact exactly once.

    Deterministic as the node-loss test is: the trials hold after their step-9 checkpoints, and the cluster dies
    once Tune's experiment state (what `ptx resume` reads) has been saved with those checkpoints in it."""
    steps = list(range(0, HELD_STEPS + 1, 3))
    spec = write_spec(tmp_path / "headloss.yaml", tasks=["tweet_sentiment"], seeds=[0, 1], max_failures=1,
                      resources={"cpu": 1, "custom": {"worker_node": 0.5}},
                      train={"steps": HELD_STEPS, "batch_size": 8, "lr": 0.05, "eval_every": 3, "eval_batch_size": 32})
    for node in cluster.alive()[1:-1]:  # one worker: extra ones left by an earlier test would take trials too
        node.kill()
    if len(cluster.alive()) < 2:  # an earlier test lost its worker and could not add one
        cluster.add_worker()
    env, folder = hold_at(tmp_path)
    sweep = launch(spec, env=env)
    at_loss = wait_for(lambda: held(folder, 2), SWEEP_TIMEOUT, "two held trials", sweep)
    assert at_loss == dict.fromkeys(at_loss, HOLD_STEP), at_loss
    held_at = max(f.stat().st_mtime for f in folder.glob("held-*"))
    # Tune's experiment state (what `ptx resume` reads) saved with the step-9 checkpoints in it
    wait_for(lambda: last_reported_steps(sweep) == at_loss and state_saved_after(sweep.experiment_path(), held_at),
             120, "the experiment state saved", sweep)
    for node in reversed(cluster.alive()):  # SIGKILL: the worker, then the head
        node.kill()
    sweep.stop()  # the driver ran on the head: it goes with it
    release(folder)
    cluster.restart()
    wall = sweep.resume(cluster)
    trials = tune_trials(sweep.experiment_path())
    assert len(trials) == 2 and all(t["state"] == "TERMINATED" for t in trials), trials
    fig = check_store(server.uri, "headloss", trials, steps)
    nodes = {r.tags.get("ptx.node") for r in prompt_runs(server.uri, "headloss")}
    assert nodes == {cluster.nodes[-1].node_id}, (nodes, cluster.nodes[-1].node_id)  # all finished after it
    # each went on from its step-9 checkpoint in the saved state: a restart would report steps 3-9 again
    assert steps_after_a_held_fault(sweep, at_loss) == dict.fromkeys(at_loss, steps[1:])
    figures("head_restart", {**fig, "checkpoint_step_at_loss": at_loss, "resume_wall_seconds": round(wall, 1)})


def state_saved_after(experiment: Path, t: float) -> bool:
    """Whether Tune's driver has written its experiment state (experiment_state-*.json) since time `t`."""
    return any(p.stat().st_mtime > t + 0.5 for p in experiment.glob("experiment_state-*.json"))
