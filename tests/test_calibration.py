"""Every verdict method's false-verdict rate under the null, by simulation at the findings study's design
(experiments/findings_cpu.yaml: 4 tasks in 2 categories, 3 seeds, one TPT run a target) and at the paper's
(13 tasks in 4 categories, 3 seeds, 3 TPT runs a target).

The simulated data share effects the way a study does (ptx.power): a source task's effect on every target and
across its seeds, a target's on every source, a (source task, target) effect across seeds, an example's
difficulty across prompts. A calibrated method says "yes" or "no" in at most 5% of null studies; over 400 studies
with a fixed seed the bound checked is 7% (5% plus about two Monte Carlo standard errors). The bootstraps run with
fewer resamples here than in the report (noisier interval ends, so a stricter check), to stay under a minute.
docs/findings.md gives the measured rates and the power at a stated alternative, from `python -m ptx.power`.
"""

import pytest

from ptx import power
from ptx.power import FINDINGS_DESIGN, PAPER_DESIGN

N_STUDIES = 400
BOUND = 0.07
FAST = {"tpt": {}, "category": {"n_resamples": 499}, "indicators": {"n_boot": 200},
        "own_vs_random": {"n_boot": 100}}  # accuracy's verdict is McNemar's; the bootstrap only draws its interval


@pytest.mark.parametrize("design", [FINDINGS_DESIGN, PAPER_DESIGN], ids=["findings", "paper"])
@pytest.mark.parametrize("question", list(power.QUESTIONS))
def test_false_verdict_rate_under_the_null(question, design):
    rates = power.verdict_rates(question, design, N_STUDIES, effect=0.0, seed=11, **FAST[question])
    assert rates["yes"] + rates["no"] <= BOUND, rates


def test_macro_f1_paired_bootstrap_is_calibrated():
    """drug_condition's metric: the paired bootstrap over examples decides, so it is checked on its own."""
    rates = power.verdict_rates("own_vs_random", FINDINGS_DESIGN, N_STUDIES, 0.0, seed=12, metric="macro_f1",
                                n_boot=200)
    assert rates["yes"] + rates["no"] <= BOUND, rates


def test_power_planner_says_which_questions_the_findings_design_cannot_answer():
    """findings_cpu.yaml: one TPT run for each of 4 targets (below the 6 a median's interval needs) and 4 tasks in
    2 categories (p >= 1/3): no effect on the grid gets a verdict, whatever its size; own prompt vs random prompts,
    paired on 300 examples, can be answered."""
    from ptx.config import load_study

    lines = power.plan_lines(load_study("experiments/findings_cpu.yaml"), n_studies=20)
    by_q = {line.split(" (")[0]: line for line in lines}
    assert set(by_q) == {"tpt", "category", "indicators", "own_vs_random", "own_vs_init"}  # + its starts
    assert "cannot answer it" in by_q["tpt"] and "cannot answer it" in by_q["category"]
    assert "80% power from" in by_q["own_vs_random"]


def test_power_grows_with_the_effect_at_the_paper_design():
    """A stated alternative (docs/findings.md): a median speed-up of 2x, a same-category gain of 0.1, an
    indicator with 40% less noise, a 0.5 log-odds gain of the own prompt; each must be detected more often than
    the null is falsely answered, and the strongest grid effect in most studies."""
    for q, effect in power.ALTERNATIVES.items():
        alt = power.verdict_rates(q, PAPER_DESIGN, 60, effect, seed=3, **FAST[q])
        big = power.verdict_rates(q, PAPER_DESIGN, 30, power.GRIDS[q][-1], seed=4, **FAST[q])
        assert alt["yes"] > BOUND and big["yes"] >= 0.8, (q, alt, big)
