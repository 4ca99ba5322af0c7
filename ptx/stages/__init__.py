"""A study runs in stages; each reads what earlier stages logged to MLflow and skips work already done.

A stage is one module of this package that declares itself (see docs/design.md, "How to add a stage"):

    NAME = "transfer"          # its name in a spec's `stages:` (config.STAGES gives the order)
    KIND = "transfer"          # ptx.kind of the run the stage logs per study (what the report stage links)
    UNITS = "pairs"            # what its progress line counts; None: the stage counts itself, 0/1 then 1/1
    SECTION = "transfer"       # its key in ptx.report.SECTIONS; None: the report shows nothing of it
    def run(spec, tracker, workdir, *, force=False, max_concurrent=None, address=None, **own) -> dict
                               # own: the stage's own keyword options (run_study's stage_options)

The modules are found by scanning this package, so adding a stage touches its module and the spec only; every
registry below (and the report stage's list of run kinds) is built from that one list, `STAGE_LIST`.
"""

import importlib
import logging
import pkgutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ptx import config, progress, track
from ptx.errors import PtxError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """What a stage module declares: NAME, KIND, UNITS, SECTION and its `run` entry."""

    name: str
    kind: str
    units: str | None
    section: str | None
    run: object  # run(spec, tracker, workdir, *, force, max_concurrent, address) -> dict
    module: str


def declared(module: ModuleType) -> Stage:
    """The `Stage` a module declares; PtxError naming the module and the missing names."""
    missing = [k for k in ("NAME", "KIND", "UNITS", "SECTION", "run") if not hasattr(module, k)]
    if missing:
        raise PtxError(f"stage module {module.__name__}: expected NAME, KIND, UNITS, SECTION and run; missing {missing}")
    return Stage(module.NAME, module.KIND, module.UNITS, module.SECTION, module.run, module.__name__)


def _discover() -> list[Stage]:
    """Every stage module of this package (a module that declares NAME), in config.STAGES order."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            stage = declared(module)
            found[stage.name] = stage
    order = {name: i for i, name in enumerate(config.STAGES)}
    return sorted(found.values(), key=lambda s: (order.get(s.name, len(order)), s.name))


STAGE_LIST: list[Stage] = []
STAGES: dict = {}  # stage name -> its run entry
STAGE_UNITS: dict = {}  # stage name -> what its progress line counts (stages that count units of their own)


def register(stage: Stage | ModuleType) -> Stage:
    """Add a stage (a `Stage`, or a module that declares one) after the others and rebuild every registry; a stage
    of the same name is replaced. The scan registers this package's own modules; tests register a toy stage."""
    stage = declared(stage) if isinstance(stage, ModuleType) else stage
    STAGE_LIST[:] = [s for s in STAGE_LIST if s.name != stage.name] + [stage]
    _rebuild()
    return stage


def unregister(name: str) -> None:
    STAGE_LIST[:] = [s for s in STAGE_LIST if s.name != name]
    _rebuild()


def _rebuild() -> None:
    STAGES.clear()
    STAGES.update({s.name: s.run for s in STAGE_LIST})
    STAGE_UNITS.clear()
    STAGE_UNITS.update({s.name: s.units for s in STAGE_LIST if s.units})


def run_kinds(exclude: str | None = None) -> tuple:
    """The ptx.kind of each stage's study-level run, in stage order (the report stage links the latest of each)."""
    return tuple(dict.fromkeys(s.kind for s in STAGE_LIST if s.name != exclude))


for _stage in _discover():
    register(_stage)


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
    tracker = track.open(tracking_uri or spec.tracking_uri, spec.name, workdir)
    return StudySetup(workdir, tracker.uri, tracker, sweep.connect(address))


def run_study(spec, workdir: str | Path | None = None, tracking_uri: str | None = None, address: str | None = None,
              stages: list[str] | None = None, force: bool = False, max_concurrent: int | None = None,
              on_ready=None, offline_ok: bool = False, display: progress.Display | None = None,
              stage_options: dict[str, dict] | None = None) -> dict:
    """Run the spec's stages in order (or `stages`); returns a summary per stage. Every stage gets the same options
    (force, max_concurrent, address); `stage_options` adds a stage's own ({"projector": {"evaluate": False}}), so
    the CLI's single-stage commands run through here too.

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
    extra = dict(stage_options or {})
    for stage in extra:
        if stage not in todo:
            raise PtxError(f"stage_options: stage '{stage}' is not run here; expected one of {todo}")
    setup = open_study(spec, workdir, tracking_uri, address)
    workdir, uri, tracker, dashboard = setup.workdir, setup.tracking_uri, setup.tracker, setup.dashboard
    if on_ready:
        on_ready({"workdir": str(workdir), "tracking_uri": uri, "dashboard": dashboard})
    summary = {"workdir": str(workdir), "tracking_uri": uri, "dashboard": dashboard, "stages": {}}
    if display is not None and display.log_file is None:
        display.log_file = workdir / "study.log"
    options = {"force": force, "max_concurrent": max_concurrent, "address": address}
    with progress.watching(display):
        for stage in todo:
            t0 = time.perf_counter()
            log.info("stage %s", stage)
            units = STAGE_UNITS.get(stage)
            with progress.stage(stage, 0 if units else 1, units or "stage") as bar:
                result = STAGES[stage](spec, tracker, workdir, **options, **extra.get(stage, {})) or {}
                if not units:
                    bar.advance(1)
            result["seconds"] = time.perf_counter() - t0
            summary["stages"][stage] = result
    return summary
