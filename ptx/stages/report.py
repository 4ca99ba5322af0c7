"""The report stage: build the study's report (ptx.report) and log it as a ptx.kind=report run.
"""

import json
from pathlib import Path

from ptx import track
from ptx.report import build_report

NAME, KIND, UNITS, SECTION = "report", "report", None, None


def stage_runs(tracker, study: str) -> dict:
    """{run name: run id}: the latest finished run of each stage (per backbone) of a study, for the report run's links."""
    from ptx import stages  # the stage list: each stage declares the kind of its study-level run

    out = {}
    for kind in stages.run_kinds(exclude=NAME):
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
    with tracker.run(track.run_name("report", spec.name), {"ptx.kind": KIND, "ptx.study": spec.name},
                     reuse=False) as run:
        summary = json.loads((path.parent / "summary.json").read_text())
        tracker.log(run.run_id, {"cited_runs": len(summary["runs"])},
                    tags={f"ptx.report.{k}": v for k, v in summary["sections"].items()})
        tracker.link_runs(run.run_id, stage_runs(tracker, spec.name))
        tracker.log_artifacts(run.run_id, path.parent, "report")
    return {"path": str(path), "run_id": run.run_id}


def run(spec, tracker, workdir, *, force: bool = False, max_concurrent: int | None = None,
        address: str | None = None) -> dict:
    """The stage's entry: run_report_stage (a report is cheap and always built afresh; it starts nothing)."""
    return run_report_stage(spec, tracker, workdir)
