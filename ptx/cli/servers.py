"""The commands that become a server: `ptx mlflow-server` (a tracking server for a cluster) and `ptx ui` (the MLflow
UI on a study's store, with the Ray dashboard of a running cluster)."""

import os
import re
import subprocess
import sys

import click

from ptx.cli.group import cli
from ptx.cli.options import workdir_option, workdir_path
from ptx.errors import PtxError


def _server_env(**extra: str) -> dict:
    """The environment an MLflow server or UI runs with: this one, `extra`, and MLflow's job execution off unless
    set (ptx needs no MLflow jobs, GenAI judges or trace rollups: without them the server starts faster, runs
    fewer processes)."""
    return {**os.environ, **extra,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}


def _become_mlflow(args: list[str], env: dict) -> None:
    """Become `python -m mlflow ARGS` (exec, not a child): a SIGTERM to this pid reaches MLflow, which stops its
    uvicorn worker. Never returns."""
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "mlflow", *args]
    if os.name == "posix":  # (Windows' exec spawns a new process and returns: use a child there)
        os.execve(sys.executable, cmd, env)
    sys.exit(subprocess.call(cmd, env=env))


@cli.command("mlflow-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (keep loopback unless firewalled).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--backend-store-uri", envvar="PTX_MLFLOW_BACKEND_STORE_URI", default=None,
              help="Run/metric store, e.g. postgresql://USER@HOST:5432/mlflow (password from PGPASSWORD) "
                   "[default: sqlite in --workdir; env PTX_MLFLOW_BACKEND_STORE_URI].")
@click.option("--artifacts-destination", envvar="PTX_MLFLOW_ARTIFACTS_DESTINATION", default=None,
              help="Where the proxied artifacts go: s3://, gs:// or a directory [default: --workdir/artifacts; "
                   "env PTX_MLFLOW_ARTIFACTS_DESTINATION].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Server worker processes [default: 1 on sqlite (one writer), 4 on a database server].")
@click.option("--auth", type=click.Choice(["basic", "none"]), default=None,
              help="basic: every request needs a login (admin password from MLFLOW_AUTH_ADMIN_PASSWORD, user "
                   "MLFLOW_AUTH_ADMIN_USERNAME or admin); none is refused off loopback "
                   "[default: basic; none on a loopback --host].")
@click.option("--writer-user", envvar="PTX_MLFLOW_WRITER_USERNAME", default="ptx-writer", show_default=True,
              help="With --auth basic: the non-admin account trials log in with, created or updated at start "
                   "when PTX_MLFLOW_WRITER_PASSWORD is set [env PTX_MLFLOW_WRITER_USERNAME].")
@click.option("--auth-db-uri", envvar="PTX_MLFLOW_AUTH_DB_URI", default=None,
              help="Where the accounts live [default: the backend store when it is a database server, else sqlite "
                   "in --workdir; env PTX_MLFLOW_AUTH_DB_URI].")
@workdir_option
def mlflow_server(host, port, backend_store_uri, artifacts_destination, workers, auth, writer_user, auth_db_uri,
                  workdir):
    """Run an MLflow tracking server (sqlite or PostgreSQL store, artifacts proxied) in the foreground."""
    from ptx.guards import check_not_placeholder

    wd = workdir_path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    store = backend_store_uri or f"sqlite:///{wd / 'mlflow.db'}"
    check_not_placeholder(store, "--backend-store-uri")
    check_not_placeholder(artifacts_destination, "--artifacts-destination")
    loopback = host in {"127.0.0.1", "localhost", "::1"}
    auth = auth or ("none" if loopback else "basic")
    if auth == "none" and not loopback:
        raise PtxError(f"--auth none with --host {host}: a server other machines reach must authenticate; use "
                       f"--auth basic (admin password in MLFLOW_AUTH_ADMIN_PASSWORD) or --host 127.0.0.1")
    workers = workers or (1 if store.startswith("sqlite") else 4)
    # the store URI (it may hold the database password) goes in the environment: a command line is readable by
    # every process of the machine (/proc/PID/cmdline)
    args = ["server", "--host", host, "--port", str(port),
            "--artifacts-destination", artifacts_destination or str(wd / "artifacts"), "--workers", str(workers)]
    env = _server_env(MLFLOW_BACKEND_STORE_URI=store)
    if auth == "basic":
        import secrets

        from ptx import track

        if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            raise PtxError("--auth basic: MLFLOW_AUTH_ADMIN_PASSWORD is not set (the admin account's password; "
                           "MLflow ships none)")
        admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
        writer_password = os.environ.get("PTX_MLFLOW_WRITER_PASSWORD")
        accounts = auth_db_uri or (f"sqlite:///{wd / 'basic_auth.db'}" if store.startswith("sqlite") else store)
        config = track.prepare_basic_auth(wd, accounts, admin, (writer_user, writer_password) if writer_password
                                          else None)
        # every server worker must sign sessions with the same key: one per start unless the environment gives it
        env.update(MLFLOW_AUTH_ADMIN_USERNAME=admin, MLFLOW_AUTH_CONFIG_PATH=str(config),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
                   or secrets.token_hex(32))
        args += ["--app-name", "basic-auth"]
        click.echo(f"basic auth: admin {admin!r}" + (f", writer {writer_user!r}" if writer_password else
                                                     " (no PTX_MLFLOW_WRITER_PASSWORD: no writer account)"))
    shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", store)  # never echo a password in the URI
    click.echo(f"MLflow server on http://{host}:{port} (store {shown}); set MLFLOW_TRACKING_URI=http://{host}:{port}")
    _become_mlflow(args, env)


@cli.command()
@click.argument("workdir", required=False)
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--address", default=None, help="Ray cluster whose dashboard to show (default: one running here).")
def ui(workdir, port, address):
    """Open the MLflow UI on a study's store (WORKDIR/mlflow.db), bound to 127.0.0.1; also shows a running Ray dashboard."""
    from ptx.sweep import running_dashboard

    wd = workdir_path(workdir)
    if not (wd / "mlflow.db").is_file():
        studies = sorted(p.parent for p in wd.glob("*/mlflow.db"))
        if len(studies) != 1:
            found = ", ".join(p.name for p in studies) or "none"
            raise PtxError(f"ptx ui {wd}: expected a study workdir holding mlflow.db (or a folder with exactly one); "
                           f"found studies: {found}")
        wd = studies[0]
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    click.echo(f"MLflow UI: http://127.0.0.1:{port}  (store {uri}; Ctrl-C stops it)")
    from ptx import track

    for name in track.experiment_names(uri):
        click.echo(f"  {name}: {track.open(uri, name).experiment_url(f'http://127.0.0.1:{port}')}")
    dashboard, login = running_dashboard(address)
    if dashboard:
        click.echo(f"Ray dashboard: {dashboard}" + (f"  (log in: {login})" if login else ""))
    _become_mlflow(["ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                   _server_env())

