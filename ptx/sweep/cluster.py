"""Connecting to Ray: join a cluster or start a local Ray, its dashboard and login, the alive nodes and what they
offer, and the check that a trial's resource request fits a node.
"""

import logging
import os

from ptx import track
from ptx.errors import PtxError
from ptx.sweep import faults

log = logging.getLogger(__name__)
_joined_cluster = False  # connected with --address (an autoscaler may add nodes) rather than a local Ray


def joined_cluster() -> bool:
    """Whether this process joined a cluster with --address (an autoscaler may add nodes) rather than start a Ray."""
    return _joined_cluster


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> str | None:
    """Join a cluster (`auto`, HOST:PORT, ray://HOST:10001) or start a local Ray; returns the dashboard URL."""
    import ray

    global _joined_cluster
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or None
    _joined_cluster = bool(address)
    env = {"env_vars": {k: os.environ[k] for k in ("PTX_CACHE_DIR", "MLFLOW_TRACKING_URI", *faults.WORKER_ENV,
                                                    "HF_HUB_OFFLINE") if k in os.environ}}
    env["env_vars"].update(track.disable_telemetry())  # every worker starts with MLflow's telemetry off
    env["worker_process_setup_hook"] = "ptx.progress.quiet_worker_exit"  # no shutdown traceback on the terminal
    if address and address != "auto":
        _check_reachable(address)
    # Ray's note that token authentication is on is replaced by ptx's own line on how to log in (dashboard_login)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        if address:
            ctx = ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
        else:
            # "local": a Ray of our own. Without an address, ray.init joins the cluster that `ray start` last
            # recorded on this machine (/tmp/ray/ray_current_cluster): someone else's, or a dead one
            ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                           dashboard_host="127.0.0.1", runtime_env=env, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PtxError(f"cannot reach a Ray cluster at --address {address!r}: {str(exc).splitlines()[0]}") from None
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect to HOST:PORT first: Ray itself waits minutes on an unreachable GCS."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PtxError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PtxError(f"cannot reach a Ray cluster at --address {address!r}: {exc}") from None


def dashboard_login() -> str | None:
    """How a person gets into this cluster's dashboard (token authentication), or None when it is off."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        if not is_token_auth_enabled():
            return None
    except ImportError:  # a Ray without token authentication
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "the token in $RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"the token in {os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = "the token from `ray get-auth-token` (file ~/.ray/auth_token)"
    return f"paste {where} into its login box"


def dashboard_token() -> str | None:
    """The token this process authenticates to Ray with (for a browser session), or None when there is none."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None
    except ImportError:
        return None


def running_dashboard(address: str | None = None) -> tuple[str | None, str | None]:
    """(dashboard URL, how to log in) of the Ray cluster at `address`, else of one running on this machine; never
    starts one. (None, None) when there is none."""
    import ray
    from ray._private.services import find_gcs_addresses

    if ray.is_initialized():
        return _dashboard_url(ray.get_runtime_context()), dashboard_login()
    if address is None and not find_gcs_addresses():
        return None, None
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ctx = ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError):
        return None, None
    try:
        return _dashboard_url(ctx), dashboard_login()
    finally:
        ray.shutdown()


def _dashboard_url(ctx) -> str | None:
    url = getattr(ctx, "dashboard_url", None)
    if url is None:  # a runtime context: ask the worker
        import ray

        url = ray._private.worker.get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url


def check_resources(cpu: float, gpu: float, custom: dict | None = None, autoscaling: bool = False) -> None:
    """Refuse a per-trial request that no node in the cluster can satisfy (before any trial starts).

    On a cluster joined with --address the autoscaler may still add a node type that fits, so there the
    mismatch is only a warning.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": cpu, "GPU": gpu, **(custom or {})}
    for node in nodes:
        if all(node.get(k, 0) >= v for k, v in need.items() if v):
            return
    best = {k: max((n.get(k, 0) for n in nodes), default=0) for k in need}
    if autoscaling:
        log.warning("no running node fits %s per trial (largest offers %s); waiting for the autoscaler", need, best)
        return
    raise PtxError(f"resources per trial {need} exceed every node of the cluster (largest node offers {best})")


def live_nodes() -> list[dict]:
    """The alive nodes of the connected cluster: {"ip", "id", "resources"} with Ray's per-node bookkeeping keys dropped."""
    import ray

    skip = ("node:", "accelerator_type:", "memory", "object_store_memory")
    return [{"ip": n.get("NodeManagerAddress"), "id": n.get("NodeID", "")[:8],
             "resources": {k: v for k, v in n["Resources"].items() if not k.startswith(skip)}}
            for n in ray.nodes() if n.get("Alive")]


def shutdown() -> None:
    """Disconnect from Ray (a local Ray of ours stops with it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
