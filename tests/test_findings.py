"""Verdicts from intervals: each test pins a value computed by hand or from a published example."""

import math

import numpy as np
import pytest

from ptx.findings import (
    Verdict,
    difference_of_means,
    examples_for_standard_error,
    paired_correlation_difference,
    proportion_difference,
    speedup_interval,
    verdict_from_interval,
)
from ptx.transfer import censored_speedups


@pytest.mark.parametrize("low, high, null, expected", [
    (0.01, 0.2, 0.0, Verdict.YES), (-0.3, -0.01, 0.0, Verdict.NO), (-0.1, 0.1, 0.0, Verdict.INCONCLUSIVE),
    (1.2, 3.0, 1.0, Verdict.YES), (0.5, 1.5, 1.0, Verdict.INCONCLUSIVE), (math.nan, 1.0, 0.0, Verdict.INCONCLUSIVE)])
def test_verdict_reads_the_interval_against_the_null(low, high, null, expected):
    assert verdict_from_interval(low, high, null) is expected


def test_a_point_estimate_that_favours_the_claim_is_not_a_yes():
    # the demo's relative transfer (README, 2026-11-27): 2 same-category pairs vs 10 cross-category pairs;
    # the old report answered "Yes" because 0.783 > 0.765
    same = [0.67, 0.90]
    cross = [0.76, 0.98, 0.64, 0.81, 0.57, 0.74, 0.63, 0.69, 0.83, 1.00]
    f = difference_of_means(same, cross)
    assert f.estimate == pytest.approx(0.785 - 0.765)
    assert f.ci_low < 0 < f.ci_high
    assert f.verdict is Verdict.INCONCLUSIVE
    assert f.n == 12


def test_separated_groups_get_yes_and_the_exact_permutation_p():
    a, b = [1.0, 1.1, 1.2, 1.05], [0.0, 0.1, 0.05, 0.2]
    f = difference_of_means(a, b, n_perm=20000)
    assert f.estimate == pytest.approx(1.0875 - 0.0875)
    assert f.verdict is Verdict.YES
    # only the observed split and its mirror are as extreme: 2 of C(8, 4) = 70 label permutations
    assert f.p_value == pytest.approx(2 / 70, abs=0.006)
    assert difference_of_means(b, a).verdict is Verdict.NO


def test_one_value_in_a_group_is_inconclusive_not_an_error():
    f = difference_of_means([0.9], [0.1, 0.2, 0.3])
    assert f.verdict is Verdict.INCONCLUSIVE and f.estimate == pytest.approx(0.7) and math.isnan(f.ci_low)


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 vs 48/80, method 10: 0.0524 to 0.3339
    f = proportion_difference(56 / 70, 70, 48 / 80, 80)
    assert f.estimate == pytest.approx(0.2)
    assert f.ci_low == pytest.approx(0.0524, abs=5e-5)
    assert f.ci_high == pytest.approx(0.3339, abs=5e-5)
    assert f.verdict is Verdict.YES


def test_an_own_prompt_80_examples_from_random_is_inconclusive_at_this_size():
    # the demo's drug_sentiment: own 0.625 vs random 0.575 on 80 test examples each
    f = proportion_difference(0.625, 80, 0.575, 80)
    assert f.verdict is Verdict.INCONCLUSIVE and f.estimate == pytest.approx(0.05)


def test_speedup_median_against_one():
    assert speedup_interval([3.0, 3.0, 3.0, 3.0]).verdict is Verdict.YES
    f = speedup_interval([3.0, 0.5] + [0.4] * 8)  # eight runs never reached vanilla's best: censored at 0.4
    assert f.estimate == pytest.approx(0.4) and f.verdict is Verdict.NO and f.null == 1.0
    assert speedup_interval([3.0, 0.67]).verdict is Verdict.INCONCLUSIVE  # the demo's two targets


def test_speedup_median_is_the_lower_median_the_report_table_uses():
    # the findings study's same-category TPT runs had this shape: the finding said 2.5x (the two middle runs
    # averaged), the report's table 1.0x (transfer.censored_speedups, the lower median) for the same four runs
    runs = [{"flag": "ok", "speedup": v} for v in (0.75, 1.0, 4.0, 4.0)]
    f = speedup_interval([r["speedup"] for r in runs])
    assert f.estimate == 1.0 == censored_speedups(runs)["median_speedup"]
    # a middle run that starts at vanilla's best: averaging gave (2 + 1e9) / 2, a speed-up no run had
    assert speedup_interval([1.0, 2.0, 1e9, 1e9]).estimate == 2.0
    assert speedup_interval([1.0, 2.0, math.inf, math.inf]).estimate == 2.0
    # the interval's ends are medians of resamples: values the runs had, never a midpoint between two
    g = speedup_interval([2.0, 3.0, 5.0, math.inf, math.inf])
    assert g.estimate == 5.0 and g.ci_low in (2.0, 3.0, 5.0) and g.ci_high == math.inf and g.verdict is Verdict.YES


def test_paired_correlation_difference_cancels_shared_noise():
    rng = np.random.default_rng(1)
    y = rng.random(18)
    groups = np.repeat(["a", "b", "c"], 6)
    perfect, reversed_ = y.copy(), -y
    f = paired_correlation_difference(perfect, reversed_, y, groups)
    assert f.estimate == pytest.approx(2.0) and f.ci_low == pytest.approx(2.0) and f.verdict is Verdict.YES
    assert f.n == 3
    same = paired_correlation_difference(perfect, perfect, y, groups)
    assert same.estimate == 0.0 and same.verdict is Verdict.INCONCLUSIVE


def test_groups_too_small_are_left_out():
    y = np.arange(8.0)
    groups = np.array(["a"] * 6 + ["b"] * 2)
    f = paired_correlation_difference(y, -y, y, groups)
    assert f.n == 1 and f.estimate == pytest.approx(2.0)


def test_examples_for_a_standard_error():
    assert examples_for_standard_error(0.03) == 278  # 0.25 / 0.0009 = 277.8
    assert examples_for_standard_error(0.05, 0.6) == 96
