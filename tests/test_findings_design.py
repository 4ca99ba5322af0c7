"""The findings study's design (issue 32): a projector question the study declares not testable is logged with its
reason and gets no verdict; the spec's baselines and inits are what the design says."""

from types import SimpleNamespace

import pytest

from ptx import track
from ptx.config import ProjectorStage, StudySpec, load_study
from ptx.projector import NOT_TESTABLE

REASON = "no offline target with a trained head fits the budget"


def test_declared_not_testable_projector_logs_its_reason_and_runs_nothing(tmp_path, new_workdir):
    new_workdir(tmp_path)
    from ptx.stages.projector import run_projector_stage

    # backbones that do not exist: a stage that tried to load one would fail, not skip
    spec = StudySpec(name="untestable", backbones=("tiny-bert",), tasks=("tweet_sentiment",),
                     projector=ProjectorStage(source_backbone="no-such-source", target_backbone="no-such-target",
                                              not_testable=REASON))
    tracker = track.MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "untestable", workdir=tmp_path)
    out = run_projector_stage(spec, tracker, tmp_path)
    assert out == {"skipped": True, "reason": f"not testable offline: {REASON}", "stage_run": out["stage_run"]}
    tags = tracker.get_run(out["stage_run"]).tags
    assert tags["ptx.skipped"] == "true" and tags["ptx.skip_reason"] == f"not testable offline: {REASON}"
    # without the declaration the same spec is skipped for the missing backbone instead
    plain = run_projector_stage(StudySpec(name="untestable", backbones=("tiny-bert",), tasks=("tweet_sentiment",),
                                          projector=ProjectorStage(source_backbone="no-such-source",
                                                                   target_backbone="no-such-target")),
                                tracker, tmp_path)
    assert plain["reason"].startswith("projector.source_backbone 'no-such-source' is not available")


def _projector_sentence(skipped: str) -> str:
    from ptx.report import findings

    ctx = SimpleNamespace(facts={"projector": {"skipped": skipped, "run_id": "r1"}})
    lines = [x for x in findings(ctx) if "Do projected prompts transfer across models?" in x]
    assert len(lines) == 1
    return lines[0]


def test_report_says_not_testable_with_no_verdict():
    said = _projector_sentence(f"{NOT_TESTABLE}: {REASON}")
    assert f"not testable offline: {REASON} (no verdict)" in said
    assert "skipped:" not in said and not any(w in said for w in ("Yes", "No<", "Inconclusive"))
    assert "skipped: projector.source_backbone is not set" in _projector_sentence("projector.source_backbone is not set")


def test_findings_spec_declares_its_baselines_inits_and_untestable_projector():
    spec = load_study("experiments/findings_cpu.yaml")
    assert spec.init == "text_noise" and spec.transfer.init_baseline and spec.transfer.random_baseline
    assert "qwen2.5-0.5b" in spec.projector.not_testable and "untrained masked-LM head" in spec.projector.not_testable
    # the declaration enters the hash only when made (every other spec keeps its hash: test_init_baseline.py)
    assert load_study("experiments/demo.yaml", ["projector.not_testable=x"]).hash() != \
        load_study("experiments/demo.yaml").hash() == "4192067e4ec169a8"


def test_power_planner_sizes_the_init_baseline():
    """The dry run's line for the own prompt against its one untrained start: the same paired test as against
    the random prompts, with one baseline prompt; printed only when the spec scores the starts."""
    from ptx import power

    spec = load_study("experiments/findings_cpu.yaml")
    lines = power.plan_lines(spec, n_studies=20)
    assert [line.split(" (")[0] for line in lines][-1] == "own_vs_init"
    off = load_study("experiments/findings_cpu.yaml", ["transfer.init_baseline=false"])
    assert "own_vs_init" not in " ".join(power.plan_lines(off, n_studies=20))


@pytest.mark.ray
def test_project_train_runs_the_stage_through_run_study_and_prints_the_reason(tmp_path, new_workdir):
    """`ptx project train` goes through run_study with the projector stage's own options: on the findings spec
    (projector declared not testable) it logs the skipped stage run in the study's store and says why."""
    from cli_runner import invoke_cli

    workdir = new_workdir(tmp_path / "work")
    code, out, err = invoke_cli("project", "train", "experiments/findings_cpu.yaml", "--workdir", workdir)
    assert code == 0, err
    spec = load_study("experiments/findings_cpu.yaml")
    assert out.splitlines() == [f"projector stage skipped: {NOT_TESTABLE}: {spec.projector.not_testable}"]
    runs = track.open(None, spec.name, workdir).find_runs({"ptx.kind": "stage", "ptx.stage": "projector"})
    assert [r.tags["ptx.skipped"] for r in runs] == ["true"]
