"""Scale, simulated on one machine: N short trials on Ray's fake autoscaling cluster against an MLflow server on
PostgreSQL, with the same trials run in one process without Ray as the named baseline.

What runs:
  store     PostgreSQL from Debian's package (`make postgres`; tests/test_postgres_store.py's throwaway server on
            127.0.0.1) under `ptx mlflow-server --workers 2`; without PostgreSQL, a sqlite file (the output says so).
            Between the clients and the server sits a counting HTTP relay in this process: every request's method,
            path and upstream latency is recorded (writes = POST/PUT/PATCH/DELETE).
  cluster   a Ray head started with `--autoscaling-config` and RAY_FAKE_CLUSTER=1 (what
            ray.cluster_utils.AutoscalingCluster does, but on its own port and temp dir: AutoscalingCluster.start
            runs `ray stop --force`, which would stop every other Ray on the machine). Its worker node types are
            the GPU node types of a launcher YAML of cluster/ (default aws.yaml, gpu_1x: CPU 4, GPU 1), fake GPUs,
            at most --max-nodes of them. The autoscaler adds them as the trials' demand appears.
  sweep     ptx.sweep.run_sweep on tiny-llama (1 task x N seeds, --steps steps, an evaluation every step), each
            trial asking {cpu: 1, gpu: 0.25} like the paper specs, driver in this process; one prompt run per
            trial (--group-size 1; a GPU sweep's default groups 4 prompts per trial, --group-size 4).
  baseline  the first --baseline-trials of the same requests through ptx.stages.run_prompt, one after another in
            this process, logging through the same relay to the same server (no Ray, no Tune).

Reported: driver CPU per trial (this process's user+system CPU during fit and finalise, divided by N), time to the
first trial (fit start -> the first prompt run's start), MLflow writes/s and their latency p50/p95/p99, the Tune
experiment directory (state file, total) per trial, and the wall time lost to scheduling: slot-seconds the
cluster offered (its trial slots x wall, slots counted as the nodes came) minus the slot-seconds trials used
(sum of the prompt runs' durations). Ratios are against the baseline of the same run.

  python benchmarks/bench_scale.py --trials 100 --json /tmp/scale.json
"""

import argparse
import http.client
import http.server
import json
import os
import resource
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

import yaml
from common import ROOT, command_line, machine, table, write_json

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
BIN = Path(sys.executable).parent
TASK = "tweet_sentiment"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


# ---- a counting relay in front of the MLflow server -------------------------------------------------
class Relay:
    """HTTP relay 127.0.0.1:port -> upstream; records (start, method, path, status, upstream seconds)."""

    def __init__(self, upstream_port: int):
        self.port, self.records, self.lock = free_port(), [], threading.Lock()
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                t0 = time.perf_counter()
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, out_headers = resp.status, resp.getheaders()
                except OSError as exc:
                    status, out_headers, data = 502, [], str(exc).encode()
                finally:
                    conn.close()
                took = time.perf_counter() - t0
                with relay.lock:
                    relay.records.append((time.time(), self.command, self.path.split("?")[0], status, took))
                self.send_response(status)
                for k, v in out_headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.uri = f"http://127.0.0.1:{self.port}"

    def take(self) -> list:
        with self.lock:
            out, self.records = self.records, []
        return out

    def close(self) -> None:
        self.server.shutdown()


def write_stats(records: list) -> dict:
    writes = [r for r in records if r[1] in ("POST", "PUT", "PATCH", "DELETE")]
    if not writes:
        return {"requests": len(records), "writes": 0}
    by_path: dict[str, int] = {}
    for r in writes:
        key = f"{r[1]} {r[2].split('/mlflow-artifacts/')[0]}{' (artifact)' if '/mlflow-artifacts/' in r[2] else ''}"
        by_path[key] = by_path.get(key, 0) + 1
    span = max(r[0] for r in writes) - min(r[0] for r in writes)
    lat = [r[4] * 1000 for r in writes]
    return {"requests": len(records), "writes": len(writes), "write_errors": sum(r[3] >= 500 for r in writes),
            "writes_per_s": len(writes) / span if span > 0 else float("nan"),
            "write_ms_p50": percentile(lat, 50), "write_ms_p95": percentile(lat, 95),
            "write_ms_p99": percentile(lat, 99), "write_ms_max": max(lat), "writes_by_endpoint": by_path}


# ---- the store ----------------------------------------------------------------------------------------
class Store:
    """PostgreSQL (when installed) or sqlite under `ptx mlflow-server --workers 2`, in its own session."""

    def __init__(self, root: Path):
        self.pg, self.kind = None, "sqlite"
        backend = f"sqlite:///{root / 'mlflow.db'}"
        try:
            import pytest
            from test_postgres_store import Postgres

            try:
                self.pg = Postgres()
                backend, self.kind = self.pg.uri, "postgresql"
            except pytest.skip.Exception as exc:
                print(f"PostgreSQL unavailable ({exc}); FALLING BACK TO SQLITE: the figures are sqlite's")
        except ImportError as exc:
            print(f"PostgreSQL helper unavailable ({exc}); FALLING BACK TO SQLITE: the figures are sqlite's")
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.log = root / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ptx", "mlflow-server", "--port", str(self.port), "--workdir", str(root),
                 "--backend-store-uri", backend, "--workers", "2"], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"MLflow server exited:\n{self.log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("MLflow server not healthy after 300 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.pg is not None:
            self.pg.stop()


# ---- the fake autoscaling cluster ---------------------------------------------------------------------
def node_types_from(launcher: Path, node_type: str | None, max_nodes: int) -> dict:
    """The GPU worker node types of a launcher YAML as fake node types (resources only, max_workers capped)."""
    conf = yaml.safe_load(launcher.read_text())
    out = {}
    for name, nt in conf["available_node_types"].items():
        res = dict(nt.get("resources") or {})
        if name == conf.get("head_node_type") or not res.get("GPU") or (node_type and name != node_type):
            continue
        res["object_store_memory"] = 100_000_000
        out[name] = {"resources": res, "node_config": {}, "min_workers": 0,
                     "max_workers": min(int(nt.get("max_workers", 1)), max_nodes)}
    if not out:
        raise SystemExit(f"{launcher}: no GPU worker node type {node_type or ''} in available_node_types")
    return out


class FakeCluster:
    """A Ray head with Ray's fake multi-node provider (autoscaler v1), own port, temp dir, token and session."""

    def __init__(self, node_types: dict, root: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="ptxscale-", dir="/tmp"))  # short: unix socket path limit
        config = {
            "cluster_name": "ptx-scale", "max_workers": sum(t["max_workers"] for t in node_types.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "provider": {"type": "fake_multinode", "gcs_address": self.address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "docker": {},
            "available_node_types": {**node_types, "ray.head.default": {"resources": {}, "node_config": {},
                                                                        "max_workers": 0}},
            "head_node_type": "ray.head.default", "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}
        cfg = root / "fake_cluster.json"
        cfg.write_text(json.dumps(config))
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.log = root / "head.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--port", str(self.port), "--num-cpus", "0",
                 f"--autoscaling-config={cfg}", "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp),
                 "--include-dashboard", "false", "--dashboard-port", str(free_port()), "--disable-usage-stats",
                 "--object-store-memory", "100000000",
                 "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid
        if self.proc.wait(timeout=300) != 0:
            self.close()
            raise RuntimeError(f"ray start --head failed:\n{self.log.read_text()[-3000:]}")

    @classmethod
    def start(cls, node_types: dict, root: Path, tries: int = 3) -> "FakeCluster":
        """`ray start` gives a raylet 30 s to register with its GCS; on a loaded box that can be missed: retry."""
        for attempt in range(tries):
            try:
                return cls(node_types, root)
            except RuntimeError as exc:
                print(f"fake cluster head, attempt {attempt + 1}: {str(exc).splitlines()[-1]}")
        raise SystemExit(f"ray start --head failed {tries} times")

    def session(self) -> list[int]:
        out = []
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if os.getsid(pid) == self.sid:
                    out.append(pid)
            except OSError:
                pass
        return out

    def close(self) -> None:
        """SIGTERM every process of the head's session (the fake nodes are started by its autoscaler, in it)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.session():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + 15
            while self.session() and time.monotonic() < deadline:
                time.sleep(0.3)
        shutil.rmtree(self.temp, ignore_errors=True)


def slot_timeline(per_node: int, poll: list) -> float:
    """Slot-seconds offered: the integral of (alive GPU worker nodes x trial slots per node) over the polls."""
    total = 0.0
    for (t0, n0), (t1, _) in zip(poll, poll[1:], strict=False):
        total += (t1 - t0) * n0 * per_node
    return total


# ---- the runs -----------------------------------------------------------------------------------------
def write_spec(path: Path, trials: int, steps: int, gpu: float, group_size: int) -> Path:
    spec = {"name": path.stem, "backbones": ["tiny-llama"], "tasks": [TASK], "seeds": list(range(trials)),
            "prompt_length": 4, "init": "vocab",
            "train": {"steps": steps, "batch_size": 8, "lr": 0.05, "eval_every": 1, "eval_batch_size": 16,
                      "group_size": group_size},
            "data": {"train_limit": 16, "dev_limit": 8, "test_limit": 8},
            "resources": {"cpu": 1, "gpu": gpu}, "max_failures": 1, "storage_shared": True}
    path.write_text(yaml.safe_dump(spec))
    return path


def run_baseline(spec, n: int, workdir: Path, uri: str) -> dict:
    from ptx import sweep, track
    from ptx.prompt_runs import run_prompt

    tracker = track.MlflowTracker(uri, spec.name + "-baseline", workdir=workdir)
    reqs = sweep.sweep_requests(spec)[:n]
    cpu0, t0 = os.times(), time.perf_counter()
    for req in reqs:
        run_prompt(req, workdir, tracker=tracker)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    return {"trials": n, "wall_s": wall, "wall_s_per_trial": wall / n,
            "cpu_s_per_trial": (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / n}


def prompt_run_times(uri: str, experiment: str) -> list[tuple[float, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ptx.kind` = 'prompt'", max_results=50000)
    return [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs if r.info.end_time]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gpu", type=float, default=0.25, help="GPU per trial (the paper specs ask 0.25)")
    ap.add_argument("--launcher", default=str(ROOT / "cluster" / "aws.yaml"))
    ap.add_argument("--node-type", default="gpu_1x")
    ap.add_argument("--max-nodes", type=int, default=2, help="cap on fake GPU nodes (each is real processes)")
    ap.add_argument("--baseline-trials", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=1,
                    help="prompts per Tune trial (GPU sweeps default to groups of 4; 1: one trial per prompt run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up on `kill` too
    if args.trials < 1 or args.baseline_trials < 1:
        raise SystemExit("--trials and --baseline-trials must be >= 1")

    from ptx import sweep
    from ptx.config import load_study

    root = Path(tempfile.mkdtemp(prefix="ptx-bench-scale-"))
    node_types = node_types_from(Path(args.launcher), args.node_type, args.max_nodes)
    nt = next(iter(node_types.values()))
    per_node = int(min(nt["resources"]["GPU"] / args.gpu, nt["resources"]["CPU"] / 1))
    store = relay = cluster = None
    out = {"machine": machine(), "command": command_line(), "args": vars(args), "node_types": node_types}
    try:
        store = Store(root)
        relay = Relay(store.port)
        out["store"] = store.kind
        spec = load_study(write_spec(root / "scale.yaml", args.trials, args.steps, args.gpu, args.group_size))
        # the baseline first, on the warm store: the same requests, one process, no Ray
        from ptx.backbones import load_backbone
        from ptx.data import encode_split
        from ptx.tasks import load_task

        bb = load_backbone("tiny-llama")
        for split, limit in (("train", 16), ("dev", 8)):
            encode_split(load_task(TASK), bb, split, limit=limit)
        relay.take()
        out["baseline"] = base = run_baseline(spec, min(args.baseline_trials, args.trials), root / "base", relay.uri)
        base.update(write_stats(relay.take()))
        base["writes_per_trial"] = base["writes"] / base["trials"]

        cluster = FakeCluster.start(node_types, root)
        os.environ.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
        t_connect = time.perf_counter()
        sweep.connect(cluster.address)
        out["connect_s"] = time.perf_counter() - t_connect
        import ray

        poll, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
                poll.append((time.time(), len(alive)))
                stop.wait(1.0)

        watcher = threading.Thread(target=watch, daemon=True)
        relay.take()
        cpu0, t0, w0 = os.times(), time.perf_counter(), time.time()
        watcher.start()
        summary = sweep.run_sweep(spec, root / "work", relay.uri, storage_path=str(root / "ray_results"))
        wall, w1 = time.perf_counter() - t0, time.time()
        cpu1 = os.times()
        stop.set()
        watcher.join()
        poll.append((w1, poll[-1][1] if poll else 0))
        records = relay.take()
        tune = out["tune"] = {"trials": summary["trials"], "errored": summary["errored"], "wall_s": wall,
                              "driver_cpu_s_per_trial": (cpu1.user - cpu0.user + cpu1.system - cpu0.system)
                              / args.trials,
                              "driver_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        tune.update(write_stats(records))
        tune["writes_per_trial"] = tune["writes"] / args.trials
        times = prompt_run_times(f"http://127.0.0.1:{store.port}", "scale")
        tune["time_to_first_trial_s"] = min(s for s, _ in times) - w0
        busy = sum(e - s for s, e in times)
        offered = slot_timeline(per_node, poll)
        tune.update(slots_per_node=per_node, max_nodes_seen=max(n for _, n in poll), trial_busy_slot_s=busy,
                    offered_slot_s=offered, scheduling_lost_slot_s=offered - busy,
                    scheduling_lost_fraction=(offered - busy) / offered if offered else float("nan"),
                    mean_trial_s=busy / len(times), slot_s_per_trial=offered / args.trials)
        exp_dir = Path(summary["experiment_path"])
        from ray.tune import ExperimentAnalysis

        tune["trial_retries"] = sum(t.num_failures for t in ExperimentAnalysis(str(exp_dir)).trials)  # Tune failures
        states = list(exp_dir.glob("experiment_state*.json"))
        tune.update(experiment_state_bytes=sum(p.stat().st_size for p in states),
                    experiment_dir_bytes=dir_size(exp_dir),
                    experiment_dir_bytes_per_trial=dir_size(exp_dir) / args.trials)
        out["ratios_vs_baseline"] = {
            "wall_per_trial_x": tune["slot_s_per_trial"] / base["wall_s_per_trial"],
            "trial_duration_x": tune["mean_trial_s"] / base["wall_s_per_trial"],
            "writes_per_trial_x": tune["writes_per_trial"] / base["writes_per_trial"],
            "write_p50_x": tune["write_ms_p50"] / base["write_ms_p50"],
            "write_p99_x": tune["write_ms_p99"] / base["write_ms_p99"]}
    finally:
        sweep.shutdown()
        if cluster is not None:
            cluster.close()
        if relay is not None:
            relay.close()
        if store is not None:
            store.close()
        shutil.rmtree(root, ignore_errors=True)

    b, t, r = out["baseline"], out["tune"], out["ratios_vs_baseline"]
    print(f"store: {out['store']}" + ("" if out["store"] == "postgresql" else "  (SQLITE FALLBACK: not PostgreSQL)"))
    cols = ["run", "trials", "slot-s/trial", "driver CPU s/trial", "first trial s", "writes/trial", "writes/s",
            "write ms p50/p95/p99"]
    rows = [dict(zip(cols, row, strict=True)) for row in (
        ["baseline (1 process, no Ray)", b["trials"], f"{b['wall_s_per_trial']:.2f}", f"{b['cpu_s_per_trial']:.2f}",
         "-", f"{b['writes_per_trial']:.1f}", f"{b['writes_per_s']:.1f}",
         f"{b['write_ms_p50']:.1f}/{b['write_ms_p95']:.1f}/{b['write_ms_p99']:.1f}"],
        [f"Tune on fake cluster ({t['max_nodes_seen']} x {args.node_type})", t["trials"],
         f"{t['slot_s_per_trial']:.2f}", f"{t['driver_cpu_s_per_trial']:.3f}", f"{t['time_to_first_trial_s']:.1f}",
         f"{t['writes_per_trial']:.1f}", f"{t['writes_per_s']:.1f}",
         f"{t['write_ms_p50']:.1f}/{t['write_ms_p95']:.1f}/{t['write_ms_p99']:.1f}"])]
    print(table(rows, cols))
    print(f"Tune experiment dir: {t['experiment_dir_bytes'] / 1e6:.1f} MB ({t['experiment_dir_bytes_per_trial'] / 1e3:.0f}"
          f" kB/trial), state file {t['experiment_state_bytes'] / 1e3:.0f} kB; scheduling lost "
          f"{t['scheduling_lost_slot_s']:.0f} of {t['offered_slot_s']:.0f} slot-s ({100 * t['scheduling_lost_fraction']:.0f}%);"
          f" errored {t['errored']} (trial retries {t.get('trial_retries', 0)}), write errors {t.get('write_errors', 0)}")
    print(f"scale: {r['wall_per_trial_x']:.2f}x slot-seconds per trial vs the in-process baseline, trial itself "
          f"{r['trial_duration_x']:.2f}x, MLflow writes/trial {r['writes_per_trial_x']:.2f}x, write p99 "
          f"{r['write_p99_x']:.2f}x")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
