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
