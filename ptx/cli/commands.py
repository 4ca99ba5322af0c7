"""The commands on tasks, single prompts and the prompt bank: `ptx tasks`, `ptx train`, `ptx eval`, `ptx prompts`."""

import json
import shutil
from pathlib import Path

import click

from ptx import bank
from ptx.cli.group import cli
from ptx.cli.options import (
    check_out_dir,
    default_option,
    field_option,
    open_tracker,
    uri_option,
    workdir_option,
    workdir_path,
    writable_workdir,
)
from ptx.cli.output import metric_text, print_rows
from ptx.errors import PtxError


def copy_out(artifact: Path, out: str) -> None:
    """Copy a prompt artifact to --out (it stays where it is when that fails)."""
    try:
        shutil.copytree(artifact, out, dirs_exist_ok=True)
    except OSError as exc:
        raise PtxError(f"--out {Path(out).expanduser().resolve()}: cannot copy the prompt there "
                       f"({exc.strerror or type(exc).__name__}); it is kept at {artifact}") from None



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
    print_rows(rows, fmt)


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
    print_rows([{"task": c.task, "status": c.status, "pin": c.pin or "-", "source": c.source, "detail": c.detail}
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
    check_out_dir(out)
    wd = writable_workdir(workdir)
    from ptx import track

    tracker = track.NullTracker(workdir=wd) if no_track else open_tracker(tracking_uri, wd)
    run = run_prompt(req, wd, tracker=tracker, force=force, progress=True)
    if out:
        copy_out(run.artifact, out)
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
        open_tracker(tracking_uri, workdir_path(workdir)).log(run_id, {f"eval.{task}.{split}.{spec.metric}": score})
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
    tracker = open_tracker(tracking_uri, workdir_path(workdir))
    rows = [{"run_id": r.run_id, "task": r.tags.get("ptx.task") or f"({r.tags.get('ptx.name', '')})",
             "backbone": r.tags.get("ptx.backbone"), "insertion": r.tags.get("ptx.insertion", ""),
             "seed": r.tags.get("ptx.seed", ""), "origin": r.tags.get("ptx.origin", ""),
             "best": r.tags.get("ptx.best", ""),
             "dev": metric_text(r.metrics.get("best_dev_metric"))} for r in bank.prompt_runs(tracker, task, backbone)]
    print_rows(rows, fmt)


@prompts.command("get")
@click.argument("run_id")
@click.option("-o", "--out", required=True, help="Target directory (must not exist or be empty).")
@workdir_option
@uri_option
def prompts_get(run_id, out, workdir, tracking_uri):
    """Download a prompt run's artifact through MLflow."""
    check_out_dir(out)
    path = bank.download_prompt(open_tracker(tracking_uri, workdir_path(workdir)), run_id, out)
    click.echo(f"prompt of run {run_id}: {path}")


@prompts.command("best")
@click.option("--task", required=True)
@click.option("--backbone", required=True)
@click.option("-o", "--out", default=None, help="Also download it here.")
@workdir_option
@uri_option
def prompts_best(task, backbone, out, workdir, tracking_uri):
    """The prompt run with the best dev metric for a task and backbone."""
    check_out_dir(out)
    tracker = open_tracker(tracking_uri, workdir_path(workdir))
    run = bank.best_prompt_run(tracker, task, backbone)
    click.echo(f"{run.run_id}\tdev {run.metrics['best_dev_metric']:.4f}")
    if out:
        click.echo(f"downloaded to {bank.download_prompt(tracker, run.run_id, out)}")


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

    check_out_dir(out)
    tracker = open_tracker(tracking_uri, workdir_path(workdir))
    with tempfile.TemporaryDirectory() as tmp:
        local = bank.download_prompt(tracker, run_id, Path(tmp) / "p")
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

    wd = workdir_path(workdir)
    run = import_prompt(file, backbone, task, insertion, wd, open_tracker(tracking_uri, wd), d_model, name=name)
    verb = "already imported as run" if run.reused else "imported as run"
    click.echo(f"{file}: {verb} {run.run_id}: {run.artifact}")


