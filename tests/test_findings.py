"""Verdict methods (ptx.verdicts): each test pins a value worked out by hand, from a binomial table, or by an
independent brute-force computation in the test itself. Their calibration is tests/test_calibration.py."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ptx import verdicts
from ptx.findings import Finding, Verdict, examples_for_standard_error, verdict_from_interval
from ptx.metrics import macro_f1


@pytest.mark.parametrize("low, high, null, expected", [
    (0.01, 0.2, 0.0, Verdict.YES), (-0.3, -0.01, 0.0, Verdict.NO), (-0.1, 0.1, 0.0, Verdict.INCONCLUSIVE),
    (1.2, 3.0, 1.0, Verdict.YES), (0.5, 1.5, 1.0, Verdict.INCONCLUSIVE), (math.nan, 1.0, 0.0, Verdict.INCONCLUSIVE)])
def test_verdict_reads_the_interval_against_the_null(low, high, null, expected):
    assert verdict_from_interval(low, high, null) is expected


def test_examples_for_a_standard_error():
    assert examples_for_standard_error(0.03) == 278  # 0.25 / 0.0009 = 277.8
    assert examples_for_standard_error(0.05, 0.6) == 96


# ---- TPT: the sign test's order-statistic interval ----------------------------------------------------
@pytest.mark.parametrize("n, k", [(5, 0), (6, 1), (8, 1), (9, 2), (10, 2), (13, 3)])
def test_order_statistic_rank_from_the_binomial_table(n, k):
    # P(B(n, 1/2) <= k - 1) <= 0.025 < P(B <= k): n=6: 1/64; n=8: P(B<=1) = 9/256 = 0.035; n=9: 10/512 = 0.0195,
    # P(B<=2) = 46/512 = 0.09; n=10: P(B<=1) = 11/1024, P(B<=2) = 56/1024 = 0.055; n=13: P(B<=2) = 92/8192 = 0.011,
    # P(B<=3) = 378/8192 = 0.046
    assert verdicts.order_statistic_rank(n) == k


def test_four_runs_at_3x_are_inconclusive_not_yes():
    """The old percentile bootstrap answered 'yes' from four runs; no distribution-free 95% interval of a median
    exists below six runs (2 * (1/2)^5 = 0.0625 > 0.05)."""
    f = verdicts.tpt_median_speedup([3.0, 3.0, 3.0, 3.0])
    assert f.verdict is Verdict.INCONCLUSIVE and math.isnan(f.ci_low)
    assert "needs >= 6 runs" in f.test and verdicts.TPT_MIN_RUNS == 6
    assert f.p_value == pytest.approx(2 / 16)  # the sign test: 4 of 4 above 1


def test_six_runs_above_one_are_yes_with_the_extreme_runs_as_interval():
    f = verdicts.tpt_median_speedup([2.0, 1.5, 4.0, 3.0, 1e9, 2.5])
    assert f.verdict is Verdict.YES and (f.ci_low, f.ci_high) == (1.5, 1e9)
    assert (f.estimate, f.estimate_high) == (2.5, 3.0)  # the median of an even count is the range of its middle two
    assert f.p_value == pytest.approx(2 / 64) and f.n == 6


def test_an_even_count_prints_its_median_as_a_range():
    # the findings study's same-category runs: the lower median said 1.0x for (0.75, 1, 4, 4)
    f = verdicts.tpt_median_speedup([0.75, 1.0, 4.0, 4.0])
    assert (f.estimate, f.estimate_high) == (1.0, 4.0)
    assert verdicts.median_range([2.0, 5.0, 3.0]) == (3.0, 3.0)


def test_censored_runs_below_one_give_no():
    # eight runs never reached vanilla's best (bounds 0.4 to 0.95) and one did: n = 9, k = 2, [x_(2), x_(8)]
    f = verdicts.tpt_median_speedup([0.4, 0.5, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 3.0])
    assert f.verdict is Verdict.NO and (f.ci_low, f.ci_high) == (0.5, 0.95)
    # seven below and one above of eight: k = 1 reaches the one above, so no verdict (sign test p = 18/256)
    g = verdicts.tpt_median_speedup([0.4, 0.5, 0.5, 0.6, 0.7, 0.8, 0.9, 3.0])
    assert g.verdict is Verdict.INCONCLUSIVE and g.p_value == pytest.approx(18 / 256)


def test_seeds_of_a_target_are_one_unit():
    # target a: seeds 1x and 4x -> geometric midpoint 2x; b: 3x (one seed); c: 0.5, 0.6, 5 -> 0.6
    m = verdicts.target_medians([1.0, 4.0, 3.0, 0.5, 0.6, 5.0], ["a", "a", "b", "c", "c", "c"])
    assert m.tolist() == pytest.approx([2.0, 3.0, 0.6])
    f = verdicts.tpt_median_speedup([3.0] * 12, ["a", "b", "c", "d"] * 3)  # 12 runs, 4 targets
    assert f.n == 4 and f.verdict is Verdict.INCONCLUSIVE and "needs >= 6 targets" in f.test


# ---- same- vs cross-category: permutation of category labels among tasks -------------------------------
def test_smallest_reachable_p_of_a_design():
    assert verdicts.smallest_category_p([2, 2]) == pytest.approx(1 / 3)  # 3 distinct splits of 4 tasks
    assert verdicts.smallest_category_p([2, 1, 1]) == pytest.approx(2 / 12)
    assert verdicts.smallest_category_p([6, 3, 2, 2]) == pytest.approx(2 / 360360)  # 13! / (6! 3! 2! 2!)
    assert verdicts.smallest_category_p([4, 4]) == pytest.approx(2 / 70)  # 8 tasks in two halves: > 0.025


def _cells(cats: dict, same_effect: float, rng) -> pd.DataFrame:
    tasks = list(cats)
    return pd.DataFrame([{"source_task": s, "target_task": t, "relative_value":
                          0.5 + same_effect * (cats[s] == cats[t]) + rng.normal(0, 0.02)}
                         for s in tasks for t in tasks if s != t])


def test_four_tasks_in_two_categories_cannot_answer():
    cats = {"a": "x", "b": "x", "c": "y", "d": "y"}
    f = verdicts.category_difference(_cells(cats, 0.5, np.random.default_rng(0)), cats)
    assert f.verdict is Verdict.INCONCLUSIVE and f.estimate > 0.4
    assert "inconclusive: 4 tasks in 2 categories allow p >= 0.333" in f.test


def test_permutation_p_matches_a_brute_force_enumeration():
    cats = dict(zip("abcdefgh", ["x"] * 3 + ["y"] * 3 + ["z"] * 2, strict=True))
    cells = _cells(cats, 0.05, np.random.default_rng(3))
    f = verdicts.category_difference(cells, cats)
    tasks, value = list(cats), {(r.source_task, r.target_task): r.relative_value for r in cells.itertuples()}

    def stat(labels):  # plain loops, independent of the vectorised code
        same = [v for (s, t), v in value.items() if labels[s] == labels[t]]
        cross = [v for (s, t), v in value.items() if labels[s] != labels[t]]
        return sum(same) / len(same) - sum(cross) / len(cross)

    observed = stat(cats)
    null = []
    for perm in itertools.permutations(range(8)):  # every assignment of the 3+3+2 labels (with repeats)
        labels = {tasks[i]: cats[tasks[j]] for i, j in enumerate(perm)}
        null.append(stat(labels))
    greater = sum(v >= observed - 1e-12 for v in null) / len(null)
    assert f.estimate == pytest.approx(observed)
    assert f.p_value == pytest.approx(min(1.0, 2 * greater))
    assert f.verdict is (Verdict.YES if greater <= 0.025 else Verdict.INCONCLUSIVE)
    assert "exact permutation" in f.test


def test_seeds_are_averaged_within_a_cell_before_the_test():
    pairs = pd.DataFrame({"source_task": ["a", "a", "a", "b"], "target_task": ["b", "b", "a", "a"],
                          "relative_value": [0.2, 0.4, 1.0, 0.5]})
    cells = verdicts.task_cells(pairs)
    assert cells.set_index(["source_task", "target_task"]).relative_value.to_dict() == pytest.approx(
        {("a", "b"): 0.3, ("b", "a"): 0.5})  # the diagonal (a's own prompt) is out


# ---- indicators: hierarchical bootstrap over seed-averaged cells; Holm ----------------------------------
def test_correlation_difference_estimate_is_over_seed_averaged_cells():
    rng = np.random.default_rng(5)
    tasks = [f"t{i}" for i in range(6)]
    rows = [{"target_task": t, "source_task": s, "seed": k, "y": rng.random(), "x1": rng.random(), "x2": rng.random()}
            for t in tasks for s in tasks for k in range(3) if s != t]
    pairs = pd.DataFrame(rows)
    f = verdicts.correlation_difference(pairs, "x1", "x2", n_boot=400)
    cells = pairs.groupby(["target_task", "source_task"])[["x1", "x2", "y"]].mean()
    expect = np.mean([stats.spearmanr(g.x1, g.y).statistic - stats.spearmanr(g.x2, g.y).statistic
                      for _, g in cells.groupby(level=0)])
    assert f.estimate == pytest.approx(expect) and f.n == 6  # targets, not 90 rows
    assert f.ci_low < f.estimate < f.ci_high


def test_a_clearly_better_indicator_gets_yes_and_its_mirror_no():
    rng = np.random.default_rng(2)
    tasks = [f"t{i}" for i in range(10)]
    rows = []
    for t in tasks:
        for s in tasks:
            if s != t:
                y = rng.random()
                rows.append({"target_task": t, "source_task": s, "y": y, "good": y + rng.normal(0, 0.05),
                             "bad": rng.random()})
    pairs = pd.DataFrame(rows)
    assert verdicts.correlation_difference(pairs, "good", "bad", n_boot=400).verdict is Verdict.YES
    assert verdicts.correlation_difference(pairs, "bad", "good", n_boot=400).verdict is Verdict.NO


def test_holm_adjusts_the_primary_family():
    def f(p):
        return Finding(0.1, 0.0, 0.2, 0.0, Verdict.YES, "t", 5, p)
    out = verdicts.holm({"a": f(0.01), "b": f(0.04)})  # Holm: 2 * 0.01 = 0.02; max(0.02, 1 * 0.04) = 0.04
    assert out["a"].p_value == pytest.approx(0.02) and out["b"].p_value == pytest.approx(0.04)
    assert {k: g.verdict for k, g in out.items()} == {"a": Verdict.YES, "b": Verdict.YES}
    out = verdicts.holm({"a": f(0.03), "b": f(0.04)})  # 0.06, 0.06: neither survives
    assert out["a"].p_value == pytest.approx(0.06) and out["a"].verdict is Verdict.INCONCLUSIVE
    assert "Holm over 2 primary comparisons" in out["b"].test


# ---- own prompt vs seeded random prompts, paired on examples ------------------------------------------
def _answers(labels, wrong_at):
    out = labels.copy()
    out[list(wrong_at)] = 1 - out[list(wrong_at)]
    return out


def test_own_vs_random_is_an_exact_mcnemar_against_each_random_prompt():
    labels = np.array([0, 1] * 40)
    own = _answers(labels, range(0, 10))  # wrong on examples 0-9
    r1 = _answers(labels, [*range(0, 5), *range(20, 40)])  # discordant: own right on 20, r1 right on 5
    r2 = _answers(labels, [*range(0, 2), *range(40, 48)])  # own right on 8, r2 right on 8
    f = verdicts.own_vs_random(own, np.stack([r1, r2]), labels, n_boot=200)
    assert f.estimate == pytest.approx(70 / 80 - (55 / 80 + 70 / 80) / 2)
    assert f.verdict is Verdict.INCONCLUSIVE  # it beats r1 but not r2: "yes" needs every random prompt beaten
    p1 = 2 * sum(math.comb(25, i) for i in range(6)) / 2 ** 25  # exact two-sided binomial on 5 of 25 discordant
    one = verdicts.own_vs_random(own, r1[None], labels, n_boot=200)
    assert one.verdict is Verdict.YES and one.p_value == pytest.approx(p1)
    assert "exact McNemar against each of 1 seeded random prompt" in one.test


def test_macro_f1_rows_match_the_metric():
    rng = np.random.default_rng(4)
    pred, ref = rng.integers(0, 3, (5, 40)), rng.integers(0, 3, (5, 40))
    pred[0] = np.where(pred[0] == 2, 0, pred[0])  # a row that never predicts class 2
    got = verdicts._macro_f1_rows(pred, ref, classes=[0, 1, 2])
    assert got.tolist() == pytest.approx([macro_f1(p.tolist(), r.tolist()) for p, r in zip(pred, ref, strict=True)])


# ---- the spec's findings block ------------------------------------------------------------------------
def test_findings_block_declares_primary_comparisons_without_moving_the_hash(tmp_path):
    from ptx.config import load_study
    from ptx.errors import PtxError

    spec = load_study("experiments/findings_cpu.yaml")
    assert spec.findings.primary == ("on vs e_concat_cos", "on vs e_avg_cos")
    # the issue-32 design moved the hash; what the report tests (the findings block) does not move it
    assert spec.hash() == "88753d11c765cce4"  # the issue-32 design (a962a26b3e24a96e before it)
    other = load_study("experiments/findings_cpu.yaml", ['findings.primary=["on_jaccard vs mean_cos"]'])
    assert other.hash() == spec.hash() and other.findings.primary == ("on_jaccard vs mean_cos",)
    with pytest.raises(PtxError, match=r"findings.primary: unknown indicator 'e_concat_cosine' in 'on vs "
                                       r"e_concat_cosine'; did you mean 'e_concat_cos'"):
        load_study("experiments/findings_cpu.yaml", ['findings.primary=["on vs e_concat_cosine"]'])
    with pytest.raises(PtxError, match="expected 'INDICATOR vs INDICATOR'"):
        load_study("experiments/findings_cpu.yaml", ['findings.primary=["on"]'])
