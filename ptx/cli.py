"""The `ptx` command line: parse, call one library function, print where the results are."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click

from ptx.errors import PtxError, SweepInterrupted

DEFAULT_WORKDIR = "ptx-work"


def _workdir(value: str | None) -> Path:
    return Path(value or os.environ.get("PTX_WORKDIR") or DEFAULT_WORKDIR).expanduser().resolve()


def _writable_workdir(value: str | None) -> Path:
    """The workdir, created now: a path that cannot be a directory fails here, before any work starts."""
    from ptx.io import ensure_dir

    return ensure_dir(_workdir(value), "--workdir")


def _check_out_dir(out: str | None, flag: str = "--out") -> None:
    """An output directory must not be an existing file (checked before the work that would fill it)."""
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise PtxError(f"{flag} {Path(out).expanduser().resolve()}: expected a directory, found an existing file")


def _dataclass(ref: str):
    """'module:Class' -> the class, imported on first use (the CLI starts without importing torch)."""
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


class FieldType(click.ParamType):
    """A click type checked by the config dataclass field it fills (ptx.fields): one declaration, one message."""

    name = "value"

    def __init__(self, ref: str, field: str):
        self.ref, self.field = ref, field

    def _annotation(self):
        from ptx.fields import field_annotation

        return field_annotation(_dataclass(self.ref), self.field)

    def get_metavar(self, param, ctx):
        from enum import Enum

        from ptx.fields import split_annotation

        base, rules, _ = split_annotation(self._annotation())
        enum = next((r for r in rules if isinstance(r, type) and issubclass(r, Enum)), None)
        if enum is not None:
            return "[" + "|".join(m.value for m in enum) + "]"
        return {int: "INTEGER", float: "FLOAT"}.get(base, "TEXT")

    def convert(self, value, param, ctx):
        from ptx.fields import check_value, expected, split_annotation

        annotation = self._annotation()
        flag = param.opts[0] if param is not None else self.field
        if isinstance(value, str):
            base = split_annotation(annotation)[0]
            try:
                value = base(value.strip()) if base in (int, float) else value
            except ValueError:
                self.fail(f"expected {expected(annotation, None)}, found {value!r}", param, ctx)
        try:
            return check_value(value, annotation, flag, null=None)
        except PtxError as exc:
            self.fail(str(exc).removeprefix(f"{flag}: "), param, ctx)


class _FieldDefault:
    """The declared default of a dataclass field (or of a function's parameter), looked up when click needs it."""

    def __init__(self, ref: str, field: str):
        self.ref, self.field = ref, field

    def __call__(self):
        import dataclasses
        import inspect

        from ptx.fields import field_default

        obj = _dataclass(self.ref)
        if dataclasses.is_dataclass(obj):
            return field_default(obj, self.field)
        return inspect.signature(obj).parameters[self.field].default


class FieldOption(click.Option):
    """An option whose help shows the dataclass default itself, not '(dynamic)'."""

    def get_default(self, ctx, call=True):
        value = super().get_default(ctx, call=call)
        return value() if isinstance(value, _FieldDefault) else value


def _copy_out(artifact: Path, out: str) -> None:
    try:
        shutil.copytree(artifact, out, dirs_exist_ok=True)
    except OSError as exc:
        raise PtxError(f"--out {Path(out).expanduser().resolve()}: cannot copy the prompt there "
                       f"({exc.strerror or type(exc).__name__}); it is kept at {artifact}") from None


def field_option(flag: str, ref: str, field: str, **kwargs):
    """A click option typed, ranged and defaulted by the dataclass field `field` of `ref` ('module:Class')."""
    return click.option(flag, cls=FieldOption, type=FieldType(ref, field), default=_FieldDefault(ref, field),
                        show_default=True, **kwargs)


def default_option(flag: str, ref: str, param: str, **kwargs):
    """A click option whose default is the one the function `ref` ('module:function') declares for `param`."""
    return click.option(flag, param, cls=FieldOption, default=_FieldDefault(ref, param), show_default=True, **kwargs)


def _tracker(tracking_uri: str | None, workdir: Path, experiment: str | None = None):
    from ptx import track

    uri = track.resolve_tracking_uri(tracking_uri, workdir)
    return track.MlflowTracker(uri, experiment or track.DEFAULT_EXPERIMENT, workdir=workdir)


workdir_option = click.option("--workdir", default=None, help="Results directory [env PTX_WORKDIR; default ./ptx-work].")
uri_option = click.option("--tracking-uri", default=None,
                          help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///WORKDIR/mlflow.db].")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose):
    """ptx: soft prompt tuning and prompt transferability on frozen PLMs."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


# ---- tasks ------------------------------------------------------------------------------------------
@cli.group()
def tasks():
    """The task registry (one YAML per task in ptx/tasks/)."""


@tasks.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def tasks_list(fmt):
    """List every registered task."""
    from ptx.tasks import list_tasks

    rows = [{"name": t.name, "category": t.category, "kind": t.kind, "metric": t.metric,
             "labels": len(t.verbalizer) if t.verbalizer else 0, "source": _source_label(t)} for t in list_tasks()]
    _print_rows(rows, fmt)


def _source_label(spec) -> str:
    src = spec.source
    for attr in ("package", "path"):
        if getattr(src, attr, None):
            return str(getattr(src, attr))
    return "files"


@tasks.command("show")
@click.argument("name")
def tasks_show(name):
    """Show one task's spec."""
    from dataclasses import asdict

    from ptx.tasks import load_task

    click.echo(json.dumps(asdict(load_task(name)), indent=2, default=str))


@tasks.command("check")
@click.argument("names", nargs=-1, metavar="[TASK]...")
@click.option("--spec", "spec_path", type=click.Path(), default=None, help="Check a study's tasks and backbones.")
@click.option("--backbone", "backbones", multiple=True, help="Check label words against this tokenizer (repeatable).")
@click.option("--rows", type=click.IntRange(min=1), default=8, show_default=True, help="Rows read per split.")
@click.option("--offline-ok", is_flag=True, help="Exit 0 when tasks are only unreachable from here (not broken).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def tasks_check(names, spec_path, backbones, rows, offline_ok, fmt):
    """Load a few rows of every split each task uses; check columns, labels and label words."""
    from ptx.tasks import list_tasks
    from ptx.tasks.check import check_tasks, require_ready, unpinned_lines

    max_length = None
    if spec_path:
        from ptx.config import load_study

        study = load_study(spec_path)
        names, backbones, max_length = (*names, *study.tasks), (*backbones, *study.backbones), study.data.max_length
    checks = check_tasks(names or [t.name for t in list_tasks()], backbones, rows=rows, max_length=max_length)
    _print_rows([{"task": c.task, "status": c.status, "pin": c.pin or "-", "source": c.source, "detail": c.detail}
                 for c in checks], fmt)
    if fmt == "table":
        for line in unpinned_lines(checks):  # a note, not an error: an unpinned task still runs
            click.echo(line)
    require_ready(checks, offline_ok, warn=False)  # the table above already says it


# ---- train / eval -----------------------------------------------------------------------------------
SETTINGS, REQUEST = "ptx.train:TrainSettings", "ptx.prompt_runs:PromptRequest"  # where `ptx train`'s options are declared


@cli.command()
@click.option("--task", required=True, help="Task name (ptx tasks list).")
@click.option("--backbone", required=True, help="Alias, local path or Hugging Face id.")
@field_option("--steps", SETTINGS, "steps")
@field_option("--prompt-length", REQUEST, "prompt_length")
@field_option("--lr", SETTINGS, "lr")
@field_option("--batch-size", SETTINGS, "batch_size")
@field_option("--eval-every", SETTINGS, "eval_every")
@field_option("--patience", SETTINGS, "patience", help="Early stop after N evaluations without improvement.")
@field_option("--seed", SETTINGS, "seed")
@field_option("--init", REQUEST, "init")
@click.option("--init-text", default=None, help="Text whose embeddings start the prompt (--init text); {labels} becomes the task's label words.")
@click.option("--init-from", default=None, help="Prompt artifact dir or MLflow run id to start from (transfer).")
@field_option("--insertion", REQUEST, "insertion")
@field_option("--train-limit", REQUEST, "train_limit", help="Use at most N training examples.")
@field_option("--dev-limit", REQUEST, "dev_limit", help="Use at most N dev examples.")
@field_option("--max-length", REQUEST, "max_length",
              help="Cut inputs to N tokens (template included) when the task allows more.")
@click.option("--out", default=None, help="Also copy the prompt artifact here.")
@click.option("--force", is_flag=True, help="Train even if this config already has a finished run.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the training step (pays on a GPU; minutes of compilation on CPU).")
@click.option("--no-track", is_flag=True, help="Do not log to MLflow.")
@workdir_option
@uri_option
def train(task, backbone, steps, prompt_length, lr, batch_size, eval_every, patience, seed, init, init_text,
          init_from, insertion, train_limit, dev_limit, max_length, out, force, compile_, no_track, workdir,
          tracking_uri):
    """Tune a soft prompt on one task and log it to MLflow."""
    from ptx.prompt_runs import PromptRequest, run_prompt
    from ptx.train import TrainSettings

    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, patience=patience,
                             seed=seed, compile=compile_)
    req = PromptRequest(task=task, backbone=backbone, insertion=insertion, prompt_length=prompt_length,
                        init="artifact" if init_from else init, init_text=init_text, init_from=init_from,
                        train_limit=train_limit, dev_limit=dev_limit, max_length=max_length, settings=settings)
    _check_out_dir(out)
    wd = _writable_workdir(workdir)
    from ptx import track

    tracker = track.NullTracker(workdir=wd) if no_track else _tracker(tracking_uri, wd)
    run = run_prompt(req, wd, tracker=tracker, force=force, progress=True)
    if out:
        _copy_out(run.artifact, out)
    verb = "reused finished run" if run.reused else "trained"
    click.echo(f"{verb} {run.run_id or '(untracked)'}: best dev {run.best_metric:.4f} at step {run.best_step}")
    if not run.reused and run.seconds:
        click.echo(f"{steps} steps in {run.seconds:.1f} s ({run.seconds / max(1, run.curve[-1]['step']):.3f} s/step)")
    click.echo(f"prompt: {out or run.artifact}")
    if tracker.enabled:
        click.echo(f"MLflow: {tracker.uri}  (browse: mlflow ui --backend-store-uri {tracker.uri})")


@cli.command("eval")
@click.option("--prompt", "prompt_dir", required=True, help="Prompt artifact directory.")
@click.option("--task", required=True)
@click.option("--split", type=click.Choice(["dev", "test"]), default="dev", show_default=True)
@click.option("--backbone", default=None, help="Defaults to the prompt's own backbone.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate at most N examples.")
@click.option("--max-length", type=click.IntRange(min=8), default=None,
              help="Cut inputs to N tokens (template included) when the task allows more.")
@default_option("--batch-size", "ptx.evaluate:score_prompts", "batch_size", type=click.IntRange(min=1))
@workdir_option
@uri_option
@click.option("--no-track", is_flag=True)
def eval_cmd(prompt_dir, task, split, backbone, limit, max_length, batch_size, workdir, tracking_uri, no_track):
    """Score a prompt on a task's dev or test split."""
    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.evaluate import score_prompts
    from ptx.prompt import load_prompt
    from ptx.tasks import load_task

    art = load_prompt(prompt_dir)
    name = backbone or art.meta["backbone"]["name"]
    bb = load_backbone(name, insertion=art.meta.get("insertion", "prepend"))
    load_prompt(prompt_dir, backbone=bb)  # strict: width and backbone must match
    spec = load_task(task, max_length=max_length)
    data = encode_split(spec, bb, split, limit=limit)
    score = score_prompts(bb, art.prompt, spec, data, batch_size, progress=True)[0]
    click.echo(f"{task}/{split} {spec.metric}: {score:.4f} ({len(data)} examples)")
    run_id = art.meta.get("mlflow_run_id")
    if run_id and not no_track:
        _tracker(tracking_uri, _workdir(workdir)).log(run_id, {f"eval.{task}.{split}.{spec.metric}": score})
        click.echo(f"logged to run {run_id}")


# ---- prompt bank ------------------------------------------------------------------------------------
@cli.group()
def prompts():
    """The prompt bank in MLflow: list, fetch, pick the best, export, import."""


@prompts.command("list")
@click.option("--task", default=None)
@click.option("--backbone", default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@workdir_option
@uri_option
def prompts_list(task, backbone, fmt, workdir, tracking_uri):
    """List finished prompt runs."""
    tracker = _tracker(tracking_uri, _workdir(workdir))
    rows = [{"run_id": r.run_id, "task": r.tags.get("ptx.task") or f"({r.tags.get('ptx.name', '')})",
             "backbone": r.tags.get("ptx.backbone"), "insertion": r.tags.get("ptx.insertion", ""),
             "seed": r.tags.get("ptx.seed", ""), "origin": r.tags.get("ptx.origin", ""),
             "best": r.tags.get("ptx.best", ""),
             "dev": _fmt(r.metrics.get("best_dev_metric"))} for r in tracker.prompt_runs(task, backbone)]
    _print_rows(rows, fmt)


@prompts.command("get")
@click.argument("run_id")
@click.option("-o", "--out", required=True, help="Target directory (must not exist or be empty).")
@workdir_option
@uri_option
def prompts_get(run_id, out, workdir, tracking_uri):
    """Download a prompt run's artifact through MLflow."""
    _check_out_dir(out)
    path = _tracker(tracking_uri, _workdir(workdir)).download_prompt(run_id, out)
    click.echo(f"prompt of run {run_id}: {path}")


@prompts.command("best")
@click.option("--task", required=True)
@click.option("--backbone", required=True)
@click.option("-o", "--out", default=None, help="Also download it here.")
@workdir_option
@uri_option
def prompts_best(task, backbone, out, workdir, tracking_uri):
    """The prompt run with the best dev metric for a task and backbone."""
    _check_out_dir(out)
    tracker = _tracker(tracking_uri, _workdir(workdir))
    run = tracker.best_prompt_run(task, backbone)
    click.echo(f"{run.run_id}\tdev {run.metrics['best_dev_metric']:.4f}")
    if out:
        click.echo(f"downloaded to {tracker.download_prompt(run.run_id, out)}")


@prompts.command("export-peft")
@click.argument("run_id")
@click.option("-o", "--out", required=True)
@click.option("--base-model", default=None, help="base_model_name_or_path to record (default: the backbone name).")
@workdir_option
@uri_option
def prompts_export_peft(run_id, out, base_model, workdir, tracking_uri):
    """Export a prompt as a PEFT prompt-tuning adapter."""
    import tempfile

    from ptx.prompt import export_peft, load_prompt

    _check_out_dir(out)
    tracker = _tracker(tracking_uri, _workdir(workdir))
    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.download_prompt(run_id, Path(tmp) / "p")
        export_peft(load_prompt(local), out, base_model)
    click.echo(f"PEFT adapter: {Path(out).resolve()}  (PeftModel.from_pretrained(model, '{out}'))")


@prompts.command("import")
@click.argument("file", type=click.Path())
@click.option("--backbone", required=True, help="The backbone the prompt was trained on (e.g. roberta-base).")
@click.option("--task", default=None, help="The task it was trained on; omit for a task-less prompt (give --name).")
@click.option("--name", default=None, help="A name for a task-less prompt, e.g. 'random' (the paper's baseline).")
@click.option("--insertion", type=click.Choice(["prepend", "paper"]), default="prepend", show_default=True,
              help="paper: the released RoBERTa prompts' <mask>-slot layout.")
@click.option("--d-model", type=click.IntRange(min=1), default=None, help="Backbone width when it is not known offline.")
@workdir_option
@uri_option
def prompts_import(file, backbone, task, name, insertion, d_model, workdir, tracking_uri):
    """Import a released raw torch prompt (read with weights_only=True) into the bank."""
    from ptx.prompt_runs import import_prompt

    wd = _workdir(workdir)
    run = import_prompt(file, backbone, task, insertion, wd, _tracker(tracking_uri, wd), d_model, name=name)
    verb = "already imported as run" if run.reused else "imported as run"
    click.echo(f"{file}: {verb} {run.run_id}: {run.artifact}")


# ---- MLflow server ----------------------------------------------------------------------------------
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

    wd = _workdir(workdir)
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
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--artifacts-destination", artifacts_destination or str(wd / "artifacts"), "--workers", str(workers)]
    # ptx needs no MLflow jobs (GenAI judges, trace rollups): without them the server starts faster, runs fewer processes
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": store,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
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
        cmd += ["--app-name", "basic-auth"]
        click.echo(f"basic auth: admin {admin!r}" + (f", writer {writer_user!r}" if writer_password else
                                                     " (no PTX_MLFLOW_WRITER_PASSWORD: no writer account)"))
    shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", store)  # never echo a password in the URI
    click.echo(f"MLflow server on http://{host}:{port} (store {shown}); set MLFLOW_TRACKING_URI=http://{host}:{port}")
    sys.stdout.flush()
    # become the server (exec, not a child): a SIGTERM to this pid reaches MLflow, which stops its uvicorn worker
    if os.name == "posix":  # (Windows' exec spawns a new process and returns: use a child there)
        os.execve(sys.executable, cmd, env)
    sys.exit(subprocess.call(cmd, env=env))


@cli.command()
@click.argument("workdir", required=False)
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--address", default=None, help="Ray cluster whose dashboard to show (default: one running here).")
def ui(workdir, port, address):
    """Open the MLflow UI on a study's store (WORKDIR/mlflow.db), bound to 127.0.0.1; also shows a running Ray dashboard."""
    from ptx.sweep import running_dashboard

    wd = _workdir(workdir)
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
        click.echo(f"  {name}: {track.MlflowTracker(uri, name).experiment_url(f'http://127.0.0.1:{port}')}")
    dashboard, login = running_dashboard(address)
    if dashboard:
        click.echo(f"Ray dashboard: {dashboard}" + (f"  (log in: {login})" if login else ""))
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    if os.name == "posix":  # become the UI server: a SIGTERM to this pid stops it
        os.execve(sys.executable, cmd, env)
    sys.exit(subprocess.call(cmd, env=env))


# ---- studies and sweeps -----------------------------------------------------------------------------
address_option = click.option("--address", default=None,
                              help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a spec field, e.g. --set train.steps=10 (repeatable).")
offline_ok_option = click.option("--offline-ok", is_flag=True,
                                 help="Go on when a task's data cannot be reached from this driver (workers can).")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@address_option
@click.option("--dry-run", is_flag=True, help="Print the plan (trials, resources, concurrency) and exit.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="Cap on trials running at once.")
@click.option("--force", is_flag=True, help="Retrain configs that already have a finished run.")
@offline_ok_option
@set_option
@workdir_option
@uri_option
def sweep(spec_path, address, dry_run, max_concurrent, force, offline_ok, overrides, workdir, tracking_uri):
    """Run a study's training stage as a Ray Tune experiment."""
    from ptx.config import load_study

    spec = load_study(spec_path, overrides)
    if dry_run:
        _print_plan(spec, max_concurrent)
        if address:
            _print_packing(spec, address)
        return
    _run(spec, ["train"], workdir, tracking_uri, address, force, max_concurrent, offline_ok)


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@address_option
@click.option("--stage", "stages", multiple=True, help="Run only these stages (repeatable; default: the spec's).")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None)
@click.option("--force", is_flag=True, help="Retrain configs that already have a finished run.")
@offline_ok_option
@set_option
@workdir_option
@uri_option
def run(spec_path, address, stages, dry_run, max_concurrent, force, offline_ok, overrides, workdir, tracking_uri):
    """Run every stage of a study in order, skipping work already logged."""
    from ptx.config import load_study

    spec = load_study(spec_path, overrides)
    if dry_run:
        _print_plan(spec, max_concurrent)
        if address:
            _print_packing(spec, address)
        return
    _run(spec, list(stages) or None, workdir, tracking_uri, address, force, max_concurrent, offline_ok)


@cli.command()
@click.option("--smoke", is_flag=True, help="Tiny random backbones: every stage in about a minute.")
@address_option
@set_option
@workdir_option
@uri_option
def demo(smoke, address, overrides, workdir, tracking_uri):
    """The offline demo study (experiments/demo.yaml, or smoke.yaml with --smoke)."""
    from ptx.config import load_study

    spec = load_study(_experiments_dir() / ("smoke.yaml" if smoke else "demo.yaml"), overrides)
    _run(spec, None, workdir, tracking_uri, address, False, None)


def _study_workdir(spec, workdir: str | None) -> str | None:
    """--workdir, else the spec's workdir (None here: run_study reads it), else $PTX_WORKDIR/<study>."""
    return workdir or (str(_workdir(None) / spec.name) if not spec.workdir else None)


def _experiments_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "experiments"
    if not here.is_dir():
        raise PtxError(f"experiments/ not found beside the ptx package ({here}); run from a source checkout")
    return here


def _run(spec, stages, workdir, tracking_uri, address, force, max_concurrent, offline_ok=False):
    from ptx.progress import Display
    from ptx.stages import run_study

    def ready(info):
        click.echo(f"study {spec.name}: results under {info['workdir']}")
        click.echo(f"  MLflow: {info['tracking_uri']}")
        click.echo(f"  MLflow UI: {_ui_command(info)}")
        if not _ui_command(info).startswith("mlflow"):
            click.echo(f"    or: mlflow ui --backend-store-uri {info['tracking_uri']}")
        if info.get("dashboard"):
            click.echo(f"  Ray dashboard (while this runs): {info['dashboard']}")
            login = _dashboard_login()
            if login:
                click.echo(f"    log in: {login}")
        click.echo(f"  progress log: {Path(info['workdir']) / 'study.log'}")

    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    interval = float(os.environ.get("PTX_PROGRESS_INTERVAL", "30"))
    display = Display(sys.stderr, interval=interval, verbose=verbose)
    summary = run_study(spec, _study_workdir(spec, workdir),
                        tracking_uri, address, stages, force, max_concurrent, on_ready=ready, offline_ok=offline_ok,
                        display=display)
    for stage, result in summary["stages"].items():
        click.echo(f"stage {stage}: {_stage_line(result)}")
    report = summary["stages"].get("report", {}).get("path")
    if report:
        click.echo(f"report: {report}")
    click.echo(f"MLflow UI: {_ui_command(summary)}")
    if summary.get("dashboard"):
        click.echo(f"Ray dashboard: {summary['dashboard']}"
                   + (" (its local Ray stops with this command)" if not address else ""))


def _ui_command(info: dict) -> str:
    """The command that opens the MLflow UI on a study's store."""
    uri = info["tracking_uri"]
    if uri == f"sqlite:///{Path(info['workdir']) / 'mlflow.db'}":
        return f"ptx ui {info['workdir']}"
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri


def _dashboard_login() -> str | None:
    from ptx.sweep import dashboard_login

    return dashboard_login()


def _stage_line(result: dict) -> str:
    keys = ("trials", "errored", "units_computed", "units_skipped", "rows", "skipped", "reason", "path", "seconds")
    parts = []
    for k in keys:
        if k in result and not isinstance(result[k], list | dict):
            v = result[k]
            parts.append(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts) or "done"


def _print_plan(spec, max_concurrent):
    from ptx.sweep import plan

    p = plan(spec)
    cap = max_concurrent or spec.max_concurrent
    res = p["resources_per_trial"]
    click.echo(f"study {p['study']}: {p['trials']} trials = {p['base_runs']} runs (backbones x tasks x seeds) "
               f"x {p['search_points']} search points x {p['samples']} samples")
    click.echo(f"  stages: {', '.join(p['stages'])}; scheduler: {p['scheduler']}; {p['steps_per_trial']} steps per trial")
    if p.get("group_size", 1) > 1:  # a trial is a group of prompts trained together on one backbone copy
        per_gpu = f", {p['groups_per_gpu']:g} group(s) per GPU" if p.get("groups_per_gpu") else ""
        click.echo(f"  groups: {p['groups']} trial(s) of up to {p['group_size']} prompts, one backbone copy each "
                   f"(members per group {p['members_per_group']}{per_gpu})")
    _print_gpu_memory(spec)
    click.echo(f"  resources per trial: {res}; max concurrent: {cap or 'as resources allow'}")
    if res.get("gpu"):
        per_gpu = int(1 / res["gpu"]) if res["gpu"] < 1 else 1
        click.echo(f"  packing: {per_gpu} trial(s) per GPU; N GPUs run up to {per_gpu}*N trials at once")
    else:
        click.echo(f"  concurrency on this machine (CPU): up to {int((os.cpu_count() or 1) // res['cpu'])} trials")
    _print_power(spec)


def _print_power(spec):
    """Per question the spec's stages answer: the smallest effect its design detects with 80% power."""
    from ptx.power import plan_lines

    lines = plan_lines(spec)
    if lines:
        click.echo("  power (simulated with the report's verdict code; docs/findings.md):")
        for line in lines:
            click.echo(f"    {line}")


def _print_packing(spec, address):
    """What the live cluster's nodes run at once for this spec's trials (and its stages' tasks)."""
    from dataclasses import asdict

    from ptx import sweep
    from ptx.packing import packing

    sweep.connect(address)
    try:
        nodes = sweep.live_nodes()
    finally:
        sweep.shutdown()
    blocks = {"trial": asdict(spec.resources)}
    blocks.update({f"{s} task": asdict(getattr(spec, s).resources) for s in ("transfer", "indicators")
                   if s in spec.stages})
    click.echo(f"  packing on the live cluster at {address} ({len(nodes)} node(s) alive; the autoscaler may add more):")
    for label, res in blocks.items():
        total = 0
        for node in sorted(nodes, key=lambda n: (n["ip"] or "", n["id"])):
            p = packing(res, node["resources"])
            total += p["trials"]
            offer = ", ".join(f"{k} {v:g}" for k, v in sorted(node["resources"].items()))
            per_gpu = f" = {p['per_gpu']:g} per GPU" if p["per_gpu"] is not None else ""
            click.echo(f"    {label} {res['cpu']:g} CPU / {res['gpu']:g} GPU on {node['ip']} {node['id']} ({offer}): "
                       f"{p['trials']} at once{per_gpu} (bounded by {p['limit']})")
        click.echo(f"    {label}s at once on the whole cluster: {total}")


def _print_gpu_memory(spec):
    """Per backbone: a trial's predicted GPU memory against its share, trials per GPU, slots used, GPU-hours."""
    from ptx.memory import GIB
    from ptx.packing import gpu_hours

    plans = spec.gpu_plans()
    if not plans:
        return
    c = spec.cluster
    per_gpu = int(1 / spec.resources.gpu + 1e-9) if spec.resources.gpu < 1 else 1
    click.echo(f"  GPU plan: {c.gpus} GPU(s) of {c.gpu_memory_mib} MiB, {per_gpu} trial(s) per GPU "
               f"(--set cluster.gpus=N --set cluster.gpu_memory_mib=MIB)")
    for plan in plans:
        used = min(plan.trials, plan.slots)
        hours = gpu_hours(plan.backbone, plan.runs, spec.train.steps, spec.train.batch_size, plan.tokens)
        gpus_busy = max(1, min(c.gpus, -(-used // per_gpu)))
        click.echo(f"    {plan.backbone}: groups of {plan.group_size} ({plan.per_pass} per pass), {plan.trials} trials; "
                   f"memory per trial {plan.need / GIB:.1f} GiB (predicted peak {plan.estimate.total / GIB:.1f} GiB "
                   f"+ CUDA context) of a {plan.share / GIB:.1f} GiB share: {'fits' if plan.fits else 'DOES NOT FIT'}; "
                   f"GPU slots used {used} of {plan.slots}")
        click.echo(f"      about {hours:.0f} H100/H200 GPU-h for {spec.train.steps} steps per prompt (the step-time "
                   f"model: measured one-prompt MFU; early stopping ends most runs sooner), about "
                   f"{hours / gpus_busy:.1f} h on {gpus_busy} GPU(s)")


def _stage_command(group, name: str, stage: str, doc: str):
    """A command that runs one stage of a study spec (the stage reads earlier stages from MLflow)."""

    @group.command(name, help=doc)
    @click.argument("spec_path", metavar="SPEC", type=click.Path())
    @address_option
    @set_option
    @workdir_option
    @uri_option
    def command(spec_path, address, overrides, workdir, tracking_uri):
        from ptx.config import load_study

        _run(load_study(spec_path, overrides), [stage], workdir, tracking_uri, address, False, None)

    return command


@cli.group()
def transfer():
    """Cross-task transfer: the zero-shot matrix and transfer-initialised prompt tuning (TPT)."""


_stage_command(transfer, "matrix", "transfer",
               "Zero-shot transfer matrix of the study's prompts (Ray tasks per (prompt chunk, target); resumes per target).")
_stage_command(transfer, "tpt", "tpt", "Transfer-initialised prompt tuning beside vanilla PT; convergence speed-ups.")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@click.option("--transfer-table", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Correlate with this transfer table (Parquet/CSV, long format) instead of the transfer stage's.")
@address_option
@set_option
@workdir_option
@uri_option
def indicators(spec_path, transfer_table, address, overrides, workdir, tracking_uri):
    """Transferability indicators (embedding similarity, ON) and their correlation with transfer."""
    from ptx.config import load_study

    spec = load_study(spec_path, overrides)
    if transfer_table is None:
        _run(spec, ["indicators"], workdir, tracking_uri, address, False, None)
        return
    import pandas as pd

    from ptx.stages import open_study
    from ptx.stages.indicators import run_indicators_stage

    table = pd.read_parquet(transfer_table) if transfer_table.endswith(".parquet") else pd.read_csv(transfer_table)
    setup = open_study(spec, _study_workdir(spec, workdir), tracking_uri, address)
    result = run_indicators_stage(spec, setup.tracker, setup.workdir, transfer_table=table)
    click.echo(f"indicators: {_stage_line(result)}")


@cli.command("reference-check")
@click.argument("reference_dir", type=click.Path(exists=True, file_okay=False))
@default_option("--bootstrap", "ptx.stages.indicators:reference_check", "bootstrap", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Every column of every row as JSON (NaN as null).")
@workdir_option
@uri_option
def reference_check_cmd(reference_dir, bootstrap, as_json, workdir, tracking_uri):
    """Import the paper authors' released prompts and correlate embedding indicators with their results."""
    from ptx.stages.indicators import reference_check

    wd = _workdir(workdir) / "reference-check"
    table = reference_check(reference_dir, _tracker(tracking_uri, wd, "reference-check"), wd, bootstrap=bootstrap)
    if as_json:
        rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                for row in table.to_dict(orient="records")]
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    for line in _reference_lines(table):
        click.echo(line)


def _reference_lines(table) -> list[str]:
    """The reference check as a table that fits 120 columns: one row per (backbone, indicator, method)."""
    def rho(v, lo, hi):
        return "n/a" if v != v else f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    head = ("backbone", "indicator", "method", "targets", "mean over targets [95% CI]", "pooled [95% CI]", "pairs")
    rows = [(r.backbone, r.indicator, r.method, f"{r.n_targets_defined}/{r.n_targets}",
             rho(r.mean_over_targets, r.ci_low, r.ci_high), rho(r.pooled, r.pooled_ci_low, r.pooled_ci_high),
             str(r.n_pairs)) for r in table.itertuples()]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    right = {3, 6}  # counts read best right-aligned
    return ["  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths,
            strict=True))).rstrip() for row in (head, *rows)]


@cli.command()
@click.option("--task", required=True, help="A task with no prompt yet.")
@click.option("--backbone", required=True)
@default_option("--top", "ptx.stages.indicators:recommend", "top_k", type=click.IntRange(min=1))
@default_option("--probe-steps", "ptx.stages.indicators:recommend", "probe_steps", type=click.IntRange(min=1),
                help="Steps of the brief probe tuning.")
@click.option("--experiment", default=None, help="MLflow experiment holding the bank (default: all).")
@workdir_option
@uri_option
def recommend(task, backbone, top_k, probe_steps, experiment, workdir, tracking_uri):
    """Rank the bank's prompts as sources for a new task by neuron overlap (ON)."""
    from ptx.stages.indicators import recommend as rank

    wd = _workdir(workdir)
    rows = rank(task, backbone, _tracker(tracking_uri, wd, experiment), wd, top_k=top_k, probe_steps=probe_steps)
    _print_rows(rows, "table")


@cli.command()
@click.argument("experiment")
@click.option("-o", "--out", required=True, help="Output directory for index.html and its figures.")
@workdir_option
@uri_option
def report(experiment, out, workdir, tracking_uri):
    """Write the static HTML report of a study (EXPERIMENT = the study name) and log it to MLflow."""
    from ptx.report import build_report

    _check_out_dir(out)
    wd = _workdir(workdir)
    if not (wd / "mlflow.db").exists() and (wd / experiment / "mlflow.db").exists():
        wd = wd / experiment  # the default layout: ptx-work/<study>/mlflow.db
    path = build_report(_tracker(tracking_uri, wd, experiment), experiment, out)
    click.echo(f"report: {path}")


# ---- projectors -------------------------------------------------------------------------------------
@cli.group()
def project():
    """Cross-model prompt projectors: train, apply, evaluate."""


objective_option = click.option("--objective", "objectives", multiple=True,
                                type=click.Choice(["distance", "task", "mixed"]),
                                help="Objective to train (repeatable; default: the spec's projector.objective).")


@project.command("train")
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@objective_option
@address_option
@set_option
@workdir_option
@uri_option
def project_train(spec_path, objectives, address, overrides, workdir, tracking_uri):
    """Train projectors from the prompt bank in MLflow (one Ray task per objective)."""
    _project(spec_path, objectives, address, overrides, workdir, tracking_uri, evaluate=False, tpt=False)


@project.command("eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path())
@objective_option
@click.option("--no-tpt", is_flag=True, help="Skip TPT_MODEL (prompt tuning started from the projected prompt).")
@address_option
@set_option
@workdir_option
@uri_option
def project_eval(spec_path, objectives, no_tpt, address, overrides, workdir, tracking_uri):
    """Zero-shot scores of projected prompts beside random and own prompts; the TPT_MODEL speed-up."""
    _project(spec_path, objectives, address, overrides, workdir, tracking_uri, evaluate=True, tpt=not no_tpt)


def _project(spec_path, objectives, address, overrides, workdir, tracking_uri, evaluate, tpt):
    from ptx.config import load_study
    from ptx.stages import open_study
    from ptx.stages.projector import run_projector_stage

    spec = load_study(spec_path, overrides)
    setup = open_study(spec, _study_workdir(spec, workdir), tracking_uri, address)
    uri = setup.tracking_uri
    out = run_projector_stage(spec, setup.tracker, setup.workdir, objectives=objectives or None, evaluate=evaluate,
                              tpt=tpt)
    if out["skipped"]:
        click.echo(f"projector stage skipped: {out['reason']}")
        return
    for name, info in out["projectors"].items():
        verb = "reused" if info["reused"] else "trained"
        click.echo(f"{name}: {verb} run {info['run_id']}, loss {_fmt(info.get('initial_loss'))} -> "
                   f"{_fmt(info.get('final_loss'))}: {info['artifact']}")
    for key, value in sorted(out.get("summary", {}).items()):
        click.echo(f"  {key}: {_fmt(value)}")
    if "best_objective" in out:
        click.echo(f"best objective: {out['best_objective']}; table: {out['table']}")
    click.echo(f"MLflow: {uri} (stage run {out['stage_run']})")


@project.command("apply")
@click.argument("projector_dir", metavar="PROJECTOR", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt_dir", metavar="PROMPT", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, help="Output prompt artifact directory (for the target backbone).")
def project_apply(projector_dir, prompt_dir, out):
    """Project a source-backbone prompt artifact into a prompt for the projector's target backbone."""
    from ptx.projector import project_prompt_artifact
    from ptx.prompt import load_prompt

    _check_out_dir(out)
    meta = load_prompt(project_prompt_artifact(projector_dir, prompt_dir, out)).meta
    click.echo(f"projected prompt for {meta['backbone']['name']} (width {meta['backbone']['d_model']}): "
               f"{Path(out).resolve()}")


@cli.command()
@click.argument("experiment", type=click.Path())
@click.option("--restart-errored", is_flag=True, help="Restart errored trials from scratch (default: resume them).")
@address_option
def resume(experiment, restart_errored, address):
    """Restore an interrupted sweep (e.g. its driver was killed) and finish it."""
    from ptx import sweep as sw

    sw.connect(address)
    summary = sw.resume_sweep(experiment, restart_errored=restart_errored)
    click.echo(f"resumed {summary['experiment_path']}: {summary['trials']} trials, {summary['errored']} errored, "
               f"{summary['wall_seconds']:.1f} s")


@cli.command()
@click.argument("experiment", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def status(experiment, fmt):
    """Print a sweep's trial table (state, task, backbone, best metric, MLflow run id)."""
    from ptx.sweep import trial_table

    rows = trial_table(experiment)
    for r in rows:
        r["best"] = _fmt(r["best"]) if isinstance(r["best"], float) else r["best"]
    _print_rows(rows, fmt)


# ---- helpers ----------------------------------------------------------------------------------------
def _fmt(v):
    return "" if v is None else f"{v:.4f}"


def _print_rows(rows: list[dict], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("(none)")
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(width[c]) for c in cols))


def _terminate(signum, _frame):
    """SIGTERM unwinds like Ctrl-C: the open MLflow run is closed as KILLED and temp dirs are removed."""
    raise SystemExit(128 + signum)


def main():
    """Entry point: one-line errors and exit code 2 for user errors."""
    import signal

    from ptx.track import disable_telemetry

    disable_telemetry()  # before anything imports mlflow
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(standalone_mode=False)
    except PtxError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:  # click turns a KeyboardInterrupt (ours included) into Abort
        cause = exc.__cause__
        click.echo(f"interrupted: {cause}" if isinstance(cause, SweepInterrupted) else "aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line like every other bad input; the help is one -h away
        where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SweepInterrupted as exc:  # Ctrl-C or SIGTERM: trials stopped, runs KILLED, the experiment resumable
        click.echo(f"interrupted: {exc}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
