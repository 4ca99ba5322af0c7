"""A study runs in stages; each reads what earlier stages logged to MLflow and skips work already done.

Each stage is one module of this package with one entry, `run(spec, tracker, workdir, **opts) -> dict`;
STAGES maps a stage name (config.STAGES) to it and run_study runs them in order.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ptx import progress, track
from ptx.errors import PtxError
from ptx.stages import indicators, projector, prompts, report, tpt, transfer

log = logging.getLogger(__name__)

# what each stage's progress line counts (a stage without units of its own counts itself: 0/1, then 1/1)
STAGE_UNITS = {"train": "trials", "transfer": "pairs", "tpt": "trials", "indicators": "batches",
               "projector": "steps"}
# stage name -> its entry; every entry is run(spec, tracker, workdir, **opts) -> dict
STAGES = {
    "train": prompts.run,
    "transfer": transfer.run,
    "tpt": tpt.run,
    "indicators": indicators.run,
    "projector": projector.run,
    "report": report.run,
}


def workdir_for(spec, workdir: str | Path | None) -> Path:
    """--workdir, else the spec's workdir, else ./ptx-work/<study> (absolute: Ray trials change directory)."""
    return Path(workdir or spec.workdir or Path("ptx-work") / spec.name).expanduser().resolve()


@dataclass(frozen=True)
class StudySetup:
    """What every stage runs against: the study's workdir, its MLflow store and the Ray cluster."""

    workdir: Path
    tracking_uri: str
    tracker: track.Tracker
    dashboard: str | None


def open_study(spec, workdir: str | Path | None = None, tracking_uri: str | None = None,
               address: str | None = None) -> StudySetup:
    """The study's workdir (created), its tracker (--tracking-uri, else the spec's, else WORKDIR/mlflow.db) and
    a connection to Ray (`address`, else a local cluster): the setup run_study and the CLI's single stages share."""
    from ptx import sweep

    workdir = workdir_for(spec, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = track.resolve_tracking_uri(tracking_uri or spec.tracking_uri, workdir)
    tracker = track.MlflowTracker(uri, spec.name, workdir=workdir)
    return StudySetup(workdir, uri, tracker, sweep.connect(address))


def run_study(spec, workdir: str | Path | None = None, tracking_uri: str | None = None, address: str | None = None,
              stages: list[str] | None = None, force: bool = False, max_concurrent: int | None = None,
              on_ready=None, offline_ok: bool = False, display: progress.Display | None = None) -> dict:
    """Run the spec's stages in order (or `stages`); returns a summary per stage.

    Before the train stage starts anything, every task's data is checked on this driver (ptx.tasks.check): a
    broken source stops the study here, in seconds; one not reachable from here does too, unless `offline_ok`.
    `display` (made by the CLI) shows one progress line per stage; its log file defaults to WORKDIR/study.log.
    """
    if "train" in (stages or spec.stages):  # before MLflow and Ray start: a broken source fails in seconds
        from ptx.tasks.check import check_study

        check_study(spec, offline_ok=offline_ok)
    todo = list(stages or spec.stages)
    for stage in todo:
        if stage not in STAGES:
            raise PtxError(f"unknown stage '{stage}'; expected one of {list(STAGES)}")
    setup = open_study(spec, workdir, tracking_uri, address)
    workdir, uri, tracker, dashboard = setup.workdir, setup.tracking_uri, setup.tracker, setup.dashboard
    if on_ready:
        on_ready({"workdir": str(workdir), "tracking_uri": uri, "dashboard": dashboard})
    summary = {"workdir": str(workdir), "tracking_uri": uri, "dashboard": dashboard, "stages": {}}
    if display is not None and display.log_file is None:
        display.log_file = workdir / "study.log"
    with progress.watching(display):
        for stage in todo:
            t0 = time.perf_counter()
            log.info("stage %s", stage)
            func = STAGES[stage]
            kwargs = {"force": force, "max_concurrent": max_concurrent} if stage == "train" else {}
            with progress.stage(stage, 0 if stage in STAGE_UNITS else 1, STAGE_UNITS.get(stage, "stage")) as bar:
                result = func(spec, tracker, workdir, **kwargs) or {}
                if stage not in STAGE_UNITS:
                    bar.advance(1)
            result["seconds"] = time.perf_counter() - t0
            summary["stages"][stage] = result
    return summary
