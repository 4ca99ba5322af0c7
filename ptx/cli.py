"""The `ptx` command line: parse, call one library function, print where the results are."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from ptx.errors import PtxError

DEFAULT_WORKDIR = "ptx-work"


def _workdir(value: str | None) -> Path:
    return Path(value or os.environ.get("PTX_WORKDIR") or DEFAULT_WORKDIR).expanduser().resolve()


def _tracker(tracking_uri: str | None, workdir: Path, experiment: str | None = None):
    from ptx import track

    uri = track.resolve_tracking_uri(tracking_uri, workdir)
    return track.Tracker(uri, experiment or track.DEFAULT_EXPERIMENT, workdir=workdir)


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


# ---- train / eval -----------------------------------------------------------------------------------
@cli.command()
@click.option("--task", required=True, help="Task name (ptx tasks list).")
@click.option("--backbone", required=True, help="Alias, local path or Hugging Face id.")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--prompt-length", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--eval-every", type=int, default=100, show_default=True)
@click.option("--patience", type=int, default=None, help="Early stop after N evaluations without improvement.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--init", type=click.Choice(["random", "vocab", "text", "artifact"]), default="random", show_default=True)
@click.option("--init-text", default=None, help="Text whose embeddings start the prompt (--init text).")
@click.option("--init-from", default=None, help="Prompt artifact dir or MLflow run id to start from (transfer).")
@click.option("--insertion", type=click.Choice(["prepend", "paper"]), default="prepend", show_default=True)
@click.option("--train-limit", type=int, default=None, help="Use at most N training examples.")
@click.option("--dev-limit", type=int, default=None, help="Use at most N dev examples.")
@click.option("--out", default=None, help="Also copy the prompt artifact here.")
@click.option("--force", is_flag=True, help="Train even if this config already has a finished run.")
@click.option("--no-track", is_flag=True, help="Do not log to MLflow.")
@workdir_option
@uri_option
def train(task, backbone, steps, prompt_length, lr, batch_size, eval_every, patience, seed, init, init_text,
          init_from, insertion, train_limit, dev_limit, out, force, no_track, workdir, tracking_uri):
    """Tune a soft prompt on one task and log it to MLflow."""
    from ptx.stages import PromptRequest, run_prompt
    from ptx.train import TrainSettings

    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, patience=patience,
                             seed=seed)
    req = PromptRequest(task=task, backbone=backbone, insertion=insertion, prompt_length=prompt_length,
                        init="artifact" if init_from else init, init_text=init_text, init_from=init_from,
                        train_limit=train_limit, dev_limit=dev_limit, settings=settings)
    wd = _workdir(workdir)
    tracker = None if no_track else _tracker(tracking_uri, wd)
    run = run_prompt(req, wd, tracker=tracker, force=force, progress=True)
    if out:
        shutil.copytree(run.artifact, out, dirs_exist_ok=True)
    verb = "reused finished run" if run.reused else "trained"
    click.echo(f"{verb} {run.run_id or '(untracked)'}: best dev {run.best_metric:.4f} at step {run.best_step}")
    if not run.reused and run.seconds:
        click.echo(f"{steps} steps in {run.seconds:.1f} s ({run.seconds / max(1, run.curve[-1]['step']):.3f} s/step)")
    click.echo(f"prompt: {out or run.artifact}")
    if tracker:
        click.echo(f"MLflow: {tracker.uri}  (browse: mlflow ui --backend-store-uri {tracker.uri})")


@cli.command("eval")
@click.option("--prompt", "prompt_dir", required=True, help="Prompt artifact directory.")
@click.option("--task", required=True)
@click.option("--split", type=click.Choice(["dev", "test"]), default="dev", show_default=True)
@click.option("--backbone", default=None, help="Defaults to the prompt's own backbone.")
@click.option("--limit", type=int, default=None, help="Evaluate at most N examples.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@workdir_option
@uri_option
@click.option("--no-track", is_flag=True)
def eval_cmd(prompt_dir, task, split, backbone, limit, batch_size, workdir, tracking_uri, no_track):
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
    spec = load_task(task)
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
    rows = [{"run_id": r.info.run_id, "task": r.data.tags.get("ptx.task"), "backbone": r.data.tags.get("ptx.backbone"),
             "seed": r.data.tags.get("ptx.seed", ""), "origin": r.data.tags.get("ptx.origin", ""),
             "best": r.data.tags.get("ptx.best", ""),
             "dev": _fmt(r.data.metrics.get("best_dev_metric"))} for r in tracker.prompt_runs(task, backbone)]
    _print_rows(rows, fmt)


@prompts.command("get")
@click.argument("run_id")
@click.option("-o", "--out", required=True, help="Target directory (must not exist or be empty).")
@workdir_option
@uri_option
def prompts_get(run_id, out, workdir, tracking_uri):
    """Download a prompt run's artifact through MLflow."""
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
    tracker = _tracker(tracking_uri, _workdir(workdir))
    run = tracker.best_prompt_run(task, backbone)
    click.echo(f"{run.info.run_id}\tdev {run.data.metrics['best_dev_metric']:.4f}")
    if out:
        click.echo(f"downloaded to {tracker.download_prompt(run.info.run_id, out)}")


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

    tracker = _tracker(tracking_uri, _workdir(workdir))
    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.download_prompt(run_id, Path(tmp) / "p")
        export_peft(load_prompt(local), out, base_model)
    click.echo(f"PEFT adapter: {Path(out).resolve()}  (PeftModel.from_pretrained(model, '{out}'))")


@prompts.command("import")
@click.argument("file", type=click.Path())
@click.option("--backbone", required=True, help="The backbone the prompt was trained on (e.g. roberta-base).")
@click.option("--task", required=True)
@click.option("--insertion", type=click.Choice(["prepend", "paper"]), default="prepend", show_default=True)
@click.option("--d-model", type=int, default=None, help="Backbone width when it is not known offline.")
@workdir_option
@uri_option
def prompts_import(file, backbone, task, insertion, d_model, workdir, tracking_uri):
    """Import a released raw torch prompt (read with weights_only=True) into the bank."""
    from ptx.stages import import_prompt

    wd = _workdir(workdir)
    run = import_prompt(file, backbone, task, insertion, wd, _tracker(tracking_uri, wd), d_model)
    click.echo(f"imported {file} as run {run.run_id}: {run.artifact}")


# ---- MLflow server ----------------------------------------------------------------------------------
@cli.command("mlflow-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (keep loopback unless firewalled).")
@click.option("--port", type=int, default=5000, show_default=True)
@workdir_option
def mlflow_server(host, port, workdir):
    """Run an MLflow tracking server (sqlite backend, artifacts proxied) in the foreground."""
    wd = _workdir(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{wd / 'mlflow.db'}", "--artifacts-destination", str(wd / "artifacts"),
           "--workers", "1"]
    click.echo(f"MLflow server on http://{host}:{port} (store {wd}); set MLFLOW_TRACKING_URI=http://{host}:{port}")
    sys.exit(subprocess.call(cmd))


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


def main():
    """Entry point: one-line errors and exit code 2 for user errors."""
    try:
        cli.main(standalone_mode=False)
    except PtxError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
