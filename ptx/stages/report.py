"""The report stage: build the study's report (ptx.report) and log it as a ptx.kind=report run.
"""

from pathlib import Path

from ptx import track
from ptx.report import build_report
from ptx.transfer import KIND_TPT


def stage_runs(tracker, study: str) -> dict:
    """{run name: run id}: the latest finished run of each stage (per backbone) of a study, for the report run's links."""
    out = {}
    for kind in ("sweep", track.KIND_TRANSFER, KIND_TPT, track.KIND_INDICATORS, "stage"):
        seen = set()
        for run in tracker.find_runs({"ptx.kind": kind, "ptx.study": study}, order_by=["attributes.start_time DESC"]):
            key = (run.tags.get("ptx.stage"), run.tags.get("ptx.backbone"))
            if key not in seen:
                seen.add(key)
                out[run.name or run.run_id] = run.run_id
    return out


def run_report_stage(spec, tracker, workdir) -> dict:
    """The study's report stage: WORKDIR/report/index.html, logged as the artifact dir of a ptx.kind=report run."""
    workdir = Path(workdir).resolve()
    tracker = tracker.for_experiment(spec.name, workdir)  # stages read and write the study's own experiment
    path = build_report(tracker, spec.name, workdir / "report", primary=spec.findings.primary)
    run_id = tracker.start_run(track.run_name("report", spec.name),
                               {"ptx.kind": track.KIND_REPORT, "ptx.study": spec.name})
    try:
        import json

        summary = json.loads((path.parent / "summary.json").read_text())
        tracker.log(run_id, {"cited_runs": len(summary["runs"])},
                    tags={f"ptx.report.{k}": v for k, v in summary["sections"].items()})
        tracker.link_runs(run_id, stage_runs(tracker, spec.name))
        tracker.log_artifacts(run_id, path.parent, "report")
        tracker.finish(run_id)
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    return {"path": str(path), "run_id": run_id}


def run(spec, tracker, workdir, **opts) -> dict:
    """The stage's entry (ptx.stages.STAGES): run_report_stage."""
    return run_report_stage(spec, tracker, workdir, **opts)
