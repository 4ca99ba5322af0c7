"""The stage list (every registry built from the stage modules' declarations) and the run skeleton, shown with a toy
stage registered beside the real ones and run through run_study on a real MLflow sqlite store (and a real local
Ray, which run_study connects to before any stage runs)."""

import inspect
import types

import pytest
import yaml

from ptx import config, report, stages, track
from ptx.config import load_study
from ptx.errors import PtxError
from ptx.io import config_hash


def test_the_stage_list_is_the_spec_stage_names_and_builds_every_registry():
    """The scanned stage modules are exactly the spec's stage names, in its order; the registries that used to be
    written by hand come out of their declarations with the values they had."""
    assert [s.name for s in stages.STAGE_LIST] == list(config.STAGES)
    assert list(stages.STAGES) == list(config.STAGES)
    assert stages.STAGE_UNITS == {"train": "trials", "transfer": "pairs", "tpt": "trials", "indicators": "batches",
                                  "projector": "steps"}  # the report stage counts itself
    # the runs the report stage links: each stage's study-level run (train: its sweep; projector: its stage run)
    assert stages.run_kinds(exclude="report") == ("sweep", track.KIND_TRANSFER, "tpt", track.KIND_INDICATORS, "stage")
    sections = {sid for sid, _, _ in report.SECTIONS}
    assert [s.section for s in stages.STAGE_LIST if s.section] == [sid for sid, _, _ in report.SECTIONS]
    assert all(s.section in sections for s in stages.STAGE_LIST if s.section)
    for s in stages.STAGE_LIST:  # run_study passes the same options to every stage
        params = inspect.signature(s.run).parameters
        assert [p for p in ("force", "max_concurrent", "address")
                if params.get(p) is None or params[p].kind is not inspect.Parameter.KEYWORD_ONLY] == [], s.name


def test_a_module_missing_a_declaration_is_refused_by_name():
    bad = types.ModuleType("ptx.stages.half")
    bad.NAME, bad.KIND = "half", "half"
    with pytest.raises(Exception, match=r"stage module ptx.stages.half: .*missing \['UNITS', 'SECTION', 'run'\]"):
        stages.register(bad)
    assert "half" not in stages.STAGES


# ---- the toy stage of docs/design.md ("How to add a stage"): its module, as a test builds it ---------------------
def toy_stage(fail_after: int | None = None) -> types.ModuleType:
    """A stage that logs the length of each task name of the study, one progress unit per task; `fail_after`
    raises after that many tasks (to see the skeleton mark the run FAILED)."""
    toy = types.ModuleType("ptx.stages.toy")
    toy.NAME, toy.KIND, toy.UNITS, toy.SECTION = "toy", "toy", "tasks", None

    def run(spec, tracker, workdir, *, force=False, max_concurrent=None, address=None, scale=1) -> dict:
        from ptx import progress

        tracker = tracker.for_experiment(spec.name, workdir)
        tags = {"ptx.kind": toy.KIND, "ptx.study": spec.name,
                "ptx.config_hash": config_hash({"stage": toy.NAME, "tasks": sorted(spec.tasks)})}
        with tracker.run(track.run_name(toy.NAME, spec.name), tags, reuse=not force) as run:
            if run.reused:
                return {"run_id": run.run_id, "reused": True}
            bar = progress.current()
            bar.update(total=len(spec.tasks))
            for i, task in enumerate(spec.tasks):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("toy stage failed on purpose")
                tracker.log(run.run_id, {f"letters.{task}": len(task) * scale})
                bar.advance(1)
        return {"run_id": run.run_id, "reused": False}

    toy.run = run
    return toy


@pytest.fixture
def toy_study(tmp_path, monkeypatch, new_workdir):
    """A two-task spec whose only stage is `toy` (config.STAGES extended: the spec's side of adding a stage), a
    workdir with a migrated sqlite store, and the toy stage unregistered and Ray shut down afterwards."""
    from ptx import sweep

    monkeypatch.setattr(config, "STAGES", (*config.STAGES, "toy"))
    workdir = new_workdir(tmp_path / "work")
    path = tmp_path / "toy-study.yaml"
    path.write_text(yaml.safe_dump({"name": "toy-study", "backbones": ["tiny-bert"],
                                    "tasks": ["tweet_sentiment", "bbc_topic"], "stages": ["toy"]}))
    yield load_study(path), workdir
    stages.unregister("toy")
    sweep.shutdown()


@pytest.mark.ray
def test_a_registered_toy_stage_runs_through_run_study_and_reuses_its_run(toy_study):
    from ptx import progress

    spec, workdir = toy_study
    stages.register(toy_stage())
    assert stages.STAGE_UNITS["toy"] == "tasks" and stages.run_kinds(exclude="report")[-1] == "toy"
    log = workdir / "study.log"
    first = stages.run_study(spec, workdir=workdir, display=progress.Display(None, log_file=log))
    tracker = track.open(None, spec.name, workdir)  # the default store: sqlite:///WORKDIR/mlflow.db
    assert first["tracking_uri"] == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    out = first["stages"]["toy"]
    assert out["reused"] is False
    runs = tracker.find_runs({"ptx.kind": "toy"})
    assert [r.run_id for r in runs] == [out["run_id"]]
    assert runs[0].metrics == {"letters.tweet_sentiment": 15.0, "letters.bbc_topic": 9.0}
    assert runs[0].tags["ptx.study"] == "toy-study" and runs[0].name == "toy · toy-study"
    assert "[toy] 2/2 tasks" in log.read_text()  # its progress line counted its own units

    again = stages.run_study(spec, workdir=workdir)["stages"]["toy"]
    assert again == {"run_id": out["run_id"], "reused": True, "seconds": again["seconds"]}
    forced = stages.run_study(spec, workdir=workdir, force=True)["stages"]["toy"]
    assert forced["reused"] is False and forced["run_id"] != out["run_id"]
    assert len(tracker.find_runs({"ptx.kind": "toy"})) == 2
    # a stage's own option (as the CLI's single-stage commands pass theirs), and one for a stage not run here
    scaled = stages.run_study(spec, workdir=workdir, force=True, stage_options={"toy": {"scale": 2}})["stages"]["toy"]
    assert tracker.get_run(scaled["run_id"]).metrics == {"letters.tweet_sentiment": 30.0, "letters.bbc_topic": 18.0}
    with pytest.raises(PtxError, match=r"stage_options: stage 'projector' is not run here; expected one of \['toy'\]"):
        stages.run_study(spec, workdir=workdir, stage_options={"projector": {}})

    stages.register(toy_stage(fail_after=1))  # the same name: replaces the first toy
    with pytest.raises(RuntimeError, match="on purpose"):
        stages.run_study(spec, workdir=workdir, force=True)
    failed = tracker.find_runs({"ptx.kind": "toy"}, status="FAILED")
    assert len(failed) == 1 and failed[0].metrics == {"letters.tweet_sentiment": 15.0}
    assert len(tracker.find_runs({"ptx.kind": "toy"}, status="RUNNING")) == 0
