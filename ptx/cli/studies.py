"""The commands on a study spec: `ptx run` and `ptx sweep` (one code path), `ptx demo`, one command per stage
(`ptx transfer`, `ptx indicators`, `ptx project`), the reference check, recommendations, the report, and
`ptx resume`/`ptx status` of a sweep."""

import json
import os
import sys
from pathlib import Path

import click

from ptx.cli.group import cli
from ptx.cli.options import (
    address_option,
    check_out_dir,
    default_option,
    offline_ok_option,
    open_tracker,
    set_option,
    uri_option,
    workdir_option,
    workdir_path,
)
from ptx.cli.output import metric_text, print_rows
from ptx.cli.plans import print_packing, print_plan
from ptx.errors import PtxError


def _study_run_options(dry_run_help: str, max_concurrent_help: str | None = None, stage_option=None):
    """The options of `ptx run` and `ptx sweep` (one path: _plan_or_run); `stage_option` goes after --address."""
    options = [click.argument("spec_path", metavar="SPEC", type=click.Path()), address_option,
               *([stage_option] if stage_option is not None else []),
               click.option("--dry-run", is_flag=True, help=dry_run_help),
               click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help=max_concurrent_help),
               click.option("--force", is_flag=True, help="Redo work that already has a finished run (prompts, "
                            "transfer units, indicators, projectors)."),
               offline_ok_option, set_option, workdir_option, uri_option]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _plan_or_run(spec_path, stages, address, dry_run, max_concurrent, force, offline_ok, overrides, workdir,
                 tracking_uri):
    """`ptx run` and `ptx sweep`: load the spec, then print its plan (--dry-run) or run its stages."""
    from ptx.config import load_study

    spec = load_study(spec_path, overrides)
    if dry_run:
        print_plan(spec, max_concurrent)
        if address:
            print_packing(spec, address)
        return
    _run(spec, stages, workdir, tracking_uri, address, force, max_concurrent, offline_ok)


@cli.command()
@_study_run_options("Print the plan (trials, resources, concurrency) and exit.", "Cap on trials running at once.")
def sweep(spec_path, address, dry_run, max_concurrent, force, offline_ok, overrides, workdir, tracking_uri):
    """Run a study's training stage as a Ray Tune experiment."""
    _plan_or_run(spec_path, ["train"], address, dry_run, max_concurrent, force, offline_ok, overrides, workdir,
                 tracking_uri)


@cli.command()
@_study_run_options("Print the plan and exit.", stage_option=click.option(
    "--stage", "stages", multiple=True, help="Run only these stages (repeatable; default: the spec's)."))
def run(spec_path, address, stages, dry_run, max_concurrent, force, offline_ok, overrides, workdir, tracking_uri):
    """Run every stage of a study in order, skipping work already logged."""
    _plan_or_run(spec_path, list(stages) or None, address, dry_run, max_concurrent, force, offline_ok, overrides,
                 workdir, tracking_uri)


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
    return workdir or (str(workdir_path(None) / spec.name) if not spec.workdir else None)


def _experiments_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "experiments"  # ptx/cli/studies.py -> the checkout
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
    """How to log in to the Ray dashboard, or None when it needs no login."""
    from ptx.sweep import dashboard_login

    return dashboard_login()


def _stage_line(result: dict) -> str:
    """A stage's summary as key=value pairs (its scalar results)."""
    keys = ("trials", "errored", "units_computed", "units_skipped", "rows", "skipped", "reason", "path", "seconds")
    parts = []
    for k in keys:
        if k in result and not isinstance(result[k], list | dict):
            v = result[k]
            parts.append(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts) or "done"



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

    table = pd.read_parquet(transfer_table) if transfer_table.endswith(".parquet") else pd.read_csv(transfer_table)
    result, _ = _one_stage(spec, "indicators", workdir, tracking_uri, address, transfer_table=table)
    click.echo(f"indicators: {_stage_line(result)}")


def _one_stage(spec, stage: str, workdir, tracking_uri, address, **options) -> tuple[dict, str]:
    """One stage through run_study with that stage's own options (no study header: the caller prints its lines);
    (its result, the store's URI)."""
    from ptx.stages import run_study

    summary = run_study(spec, _study_workdir(spec, workdir), tracking_uri, address, [stage],
                        stage_options={stage: options})
    return summary["stages"][stage], summary["tracking_uri"]


@cli.command("reference-check")
@click.argument("reference_dir", type=click.Path(exists=True, file_okay=False))
@default_option("--bootstrap", "ptx.stages.indicators:reference_check", "bootstrap", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Every column of every row as JSON (NaN as null).")
@workdir_option
@uri_option
def reference_check_cmd(reference_dir, bootstrap, as_json, workdir, tracking_uri):
    """Import the paper authors' released prompts and correlate embedding indicators with their results."""
    from ptx.stages.indicators import reference_check

    wd = workdir_path(workdir) / "reference-check"
    table = reference_check(reference_dir, open_tracker(tracking_uri, wd, "reference-check"), wd, bootstrap=bootstrap)
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

    wd = workdir_path(workdir)
    rows = rank(task, backbone, open_tracker(tracking_uri, wd, experiment), wd, top_k=top_k, probe_steps=probe_steps)
    print_rows(rows, "table")


@cli.command()
@click.argument("experiment")
@click.option("-o", "--out", required=True, help="Output directory for index.html and its figures.")
@workdir_option
@uri_option
def report(experiment, out, workdir, tracking_uri):
    """Write the static HTML report of a study (EXPERIMENT = the study name) and log it to MLflow."""
    from ptx.report import build_report

    check_out_dir(out)
    wd = workdir_path(workdir)
    if not (wd / "mlflow.db").exists() and (wd / experiment / "mlflow.db").exists():
        wd = wd / experiment  # the default layout: ptx-work/<study>/mlflow.db
    path = build_report(open_tracker(tracking_uri, wd, experiment), experiment, out)
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

    spec = load_study(spec_path, overrides)
    out, uri = _one_stage(spec, "projector", workdir, tracking_uri, address, objectives=objectives or None,
                     evaluate=evaluate, tpt=tpt)
    if out["skipped"]:
        click.echo(f"projector stage skipped: {out['reason']}")
        return
    for name, info in out["projectors"].items():
        verb = "reused" if info["reused"] else "trained"
        click.echo(f"{name}: {verb} run {info['run_id']}, loss {metric_text(info.get('initial_loss'))} -> "
                   f"{metric_text(info.get('final_loss'))}: {info['artifact']}")
    for key, value in sorted(out.get("summary", {}).items()):
        click.echo(f"  {key}: {metric_text(value)}")
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

    check_out_dir(out)
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
        r["best"] = metric_text(r["best"]) if isinstance(r["best"], float) else r["best"]
    print_rows(rows, fmt)


