"""Verdicts for the paper's questions from intervals, never from point estimates.

Each question is a comparison (same-category vs cross-category transfer, ON vs an embedding similarity, TPT vs
vanilla, a tuned prompt vs a random one). Each gets a test of the right kind, a 95% interval of the effect and
a verdict read off that interval against the null value:

- ``yes``: the whole interval lies on the side the paper claims;
- ``no``: the whole interval lies on the other side (the data contradict the claim);
- ``inconclusive``: the interval contains the null value (or the effect is undefined).

A point estimate that favours the claim while its interval straddles the null is "inconclusive", which is what
a reader should be told about a handful of pairs.
"""

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ptx.indicators import MIN_SOURCES, _row_corr

CI = 0.95


class Verdict(str, Enum):
    YES = "yes"
    NO = "no"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Finding:
    """One answered question: the effect, its interval, the test behind it and the verdict."""

    estimate: float  # the effect (a difference, or a ratio for speed-ups)
    ci_low: float
    ci_high: float
    null: float  # the value of "no effect" (0 for a difference, 1 for a speed-up)
    verdict: Verdict
    test: str  # how the interval was obtained, in words a report can print
    n: int  # the units the interval is over (pairs, targets, runs, examples)
    p_value: float = math.nan  # two-sided, where the test gives one


def verdict_from_interval(low: float, high: float, null: float = 0.0) -> Verdict:
    """yes when the interval lies above `null`, no when below it, inconclusive when it contains it or is NaN (an
    infinite end is an answer: [2, inf) lies above 1)."""
    if math.isnan(low) or math.isnan(high):
        return Verdict.INCONCLUSIVE
    if low > null:
        return Verdict.YES
    if high < null:
        return Verdict.NO
    return Verdict.INCONCLUSIVE


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(samples, [(1 - CI) / 2 * 100, (1 + CI) / 2 * 100])
    return float(lo), float(hi)


def difference_of_means(a, b, n_boot: int = 4000, n_perm: int = 4000, seed: int = 0) -> Finding:
    """mean(a) - mean(b) for two independent groups (e.g. same- vs cross-category relative transfer).

    Interval: a percentile bootstrap resampling each group on its own; p-value: a two-sided permutation test
    of the group labels. Fewer than two values in a group leaves the question inconclusive.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    n = len(a) + len(b)
    if len(a) < 2 or len(b) < 2:
        est = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
        return Finding(est, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE,
                       f"too few values for an interval ({len(a)} vs {len(b)})", n)
    rng = np.random.default_rng(seed)
    est = float(a.mean() - b.mean())
    boot = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1) - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1)
    lo, hi = _interval(boot)
    both = np.concatenate([a, b])
    perm = np.argsort(rng.random((n_perm, n)), axis=1)
    diffs = both[perm[:, :len(a)]].mean(1) - both[perm[:, len(a):]].mean(1)
    p = float((np.count_nonzero(np.abs(diffs) >= abs(est) - 1e-12) + 1) / (n_perm + 1))
    return Finding(est, lo, hi, 0.0, verdict_from_interval(lo, hi), "bootstrap of the difference of means "
                   "(each group resampled on its own) and a permutation test", n, p)


def paired_correlation_difference(x1, x2, y, groups, method: str = "spearman", n_boot: int = 4000,
                                  seed: int = 0) -> Finding:
    """Mean over groups of corr(x1, y) - corr(x2, y): does indicator x1 track transfer y better than x2?

    Paired: every bootstrap resample (rows resampled within each group, i.e. each target task's source
    prompts) is scored with both indicators, so their shared noise cancels in the difference. Groups with fewer
    than MIN_SOURCES rows, or a constant column, are left out, as in `indicators.correlate_indicators`.
    """
    x1, x2, y, groups = (np.asarray(v) for v in (x1, x2, y, groups))
    rng = np.random.default_rng(seed)
    est, boots = [], []
    for g in sorted(set(groups.tolist())):
        m = groups == g
        if m.sum() < MIN_SOURCES:
            continue
        a, b, t = x1[m].astype(float), x2[m].astype(float), y[m].astype(float)
        d = _row_corr(a[None], t[None], method)[0] - _row_corr(b[None], t[None], method)[0]
        if not math.isfinite(d):
            continue
        idx = rng.integers(0, len(t), (n_boot, len(t)))
        est.append(d)
        boots.append(_row_corr(a[idx], t[idx], method) - _row_corr(b[idx], t[idx], method))
    if not est:
        return Finding(math.nan, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE,
                       "no target with enough source prompts", 0)
    with np.errstate(invalid="ignore"):
        stacked = np.stack(boots)
        ok = np.isfinite(stacked).all(0)  # a resample with a constant column has no correlation: left out
        lo, hi = _interval(stacked[:, ok].mean(0))
    return Finding(float(np.mean(est)), lo, hi, 0.0, verdict_from_interval(lo, hi),
                   f"paired bootstrap of the {method} difference within each target, mean over targets", len(est))


def speedup_interval(speedups, n_boot: int = 4000, seed: int = 0) -> Finding:
    """Median speed-up of TPT over vanilla PT with a bootstrap interval, against 1 (no speed-up).

    `speedups` holds one value per (target, seed) run; a run that never reached vanilla's best enters with its
    censoring bound (vanilla's steps / TPT's budget, which is at most 1), one that starts there with +inf (or any
    stand-in above every finite speed-up). The median only needs to know on which side of 1 such a run lies, so
    the bound keeps the verdict honest where a mean would not.

    The median is the lower median (the ceil(n/2)-th smallest), as in `transfer.censored_speedups` and the
    report's TPT table: it never averages two runs, so it is defined when a middle run starts at vanilla's best
    (an averaged median of 2.0 and +inf is +inf, of 2.0 and a finite stand-in a meaningless midpoint), and the
    report's table and its finding agree. The interval's ends are bootstrap medians themselves (no interpolation).
    """
    s = np.asarray(speedups, float)
    s = s[~np.isnan(s)]
    if len(s) < 2:
        est = float(s[0]) if len(s) else math.nan
        return Finding(est, math.nan, math.nan, 1.0, Verdict.INCONCLUSIVE, "too few runs for an interval", len(s))
    k = (len(s) - 1) // 2
    rng = np.random.default_rng(seed)
    boot = np.sort(s[rng.integers(0, len(s), (n_boot, len(s)))], axis=1)[:, k]
    lo = float(np.percentile(boot, (1 - CI) / 2 * 100, method="lower"))
    hi = float(np.percentile(boot, (1 + CI) / 2 * 100, method="higher"))
    return Finding(float(np.sort(s)[k]), lo, hi, 1.0, verdict_from_interval(lo, hi, 1.0),
                   "bootstrap of the lower median speed-up over runs (non-reaching runs at their bound)", len(s))


def proportion_difference(p1: float, n1: int, p2: float, n2: int) -> Finding:
    """p1 - p2 for two accuracies on n1 and n2 examples (e.g. a task's own prompt vs a random prompt).

    Newcombe's hybrid score interval (Wilson intervals of each proportion combined), which stays inside
    [-1, 1] and behaves near 0 and 1 where the Wald interval does not.
    """
    if min(n1, n2) <= 0 or not (math.isfinite(p1) and math.isfinite(p2)):
        return Finding(math.nan, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE, "no examples", 0)
    z = 1.959963984540054
    (l1, u1), (l2, u2) = _wilson(p1, n1, z), _wilson(p2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Finding(d, lo, hi, 0.0, verdict_from_interval(lo, hi), "Newcombe interval of a difference of "
                   "proportions", n1 + n2)


def _wilson(p: float, n: int, z: float) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def examples_for_standard_error(se: float, p: float = 0.5) -> int:
    """Test examples a target needs so an accuracy near p has standard error at most `se` (binomial)."""
    return math.ceil(p * (1 - p) / (se * se))
