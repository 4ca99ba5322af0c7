"""Calibrated verdicts for the paper's questions, each tested at the level its claim is about.

Every method here has its false-verdict rate under the null measured by simulation at the findings study's
design and at the paper's (tests/test_calibration.py, docs/findings.md). The statistics come from scipy.stats and
statsmodels; what is written here is the study-design logic: which values are the units, what is averaged first,
what is permuted or resampled.

- TPT speed-up: one speed-up per (target, seed) run; the median's distribution-free order-statistic interval
  (the sign test's), non-reaching runs at their bound; fewer than `TPT_MIN_RUNS` runs cannot give one.
- Same- vs cross-category transfer: seeds averaged within each (source task, target) cell, then the category
  labels permuted among tasks (exact when the design allows few relabelings); a design whose smallest reachable p
  is above the level says so instead of answering.
- Indicator vs indicator: seeds averaged within each cell, a hierarchical bootstrap (targets, then source tasks
  within each target) of the mean over targets of the difference of Spearman correlations; Holm across the
  spec's primary comparisons, the rest exploratory.
- Own prompt vs random prompts: paired on the same test examples against each of several seeded random prompts
  (exact McNemar for accuracy, a paired bootstrap over examples for other metrics); "yes" only when the own
  prompt beats every random prompt (an intersection-union test, which needs no multiplicity correction).
"""

import math
import warnings
from dataclasses import replace
from functools import partial
from math import factorial

import numpy as np
import pandas as pd
from scipy import stats

from ptx.findings import Finding, Verdict, verdict_from_interval

ALPHA = 0.05  # two-sided level of every verdict: a yes or a no each at most ALPHA / 2 under the null


# ---- TPT: the median speed-up ---------------------------------------------------------------------------
def order_statistic_rank(n: int, alpha: float = ALPHA) -> int:
    """The largest k with P(Binomial(n, 1/2) < k) <= alpha / 2: [x_(k), x_(n+1-k)] covers the median with
    probability >= 1 - alpha for any continuous distribution; 0 when n is too small for any such interval."""
    k = 0
    while k < n // 2 and stats.binom.cdf(k, n, 0.5) <= alpha / 2:
        k += 1
    return k


TPT_MIN_RUNS = next(n for n in range(1, 64) if order_statistic_rank(n) >= 1)  # 6 at 95%


def median_range(values) -> tuple[float, float]:
    """The median of `values` as the range it is: (x_(n/2), x_(n/2+1)) for an even count, (m, m) for an odd one."""
    s = np.sort(np.asarray(values, float))
    if len(s) == 0:
        return math.nan, math.nan
    return float(s[(len(s) - 1) // 2]), float(s[len(s) // 2])


def target_medians(speedups, targets) -> np.ndarray:
    """One speed-up per target: the median over its seeds' runs (an even count: the geometric midpoint of the two
    middle runs, +inf when one of them starts at vanilla's best). Seeds of a target share its effect, so the
    target, not the run, is the unit the sign test counts."""
    s, t = np.asarray(speedups, float), np.asarray(targets)
    out = []
    for name in dict.fromkeys(t.tolist()):
        v = np.sort(s[(t == name) & ~np.isnan(s)])
        if len(v):
            lo, hi = v[(len(v) - 1) // 2], v[len(v) // 2]
            out.append(math.inf if math.inf in (lo, hi) else math.sqrt(lo * hi) if lo > 0 else lo)
    return np.array(out, float)


def tpt_median_speedup(speedups, targets=None, alpha: float = ALPHA) -> Finding:
    """Median speed-up of TPT over vanilla, its order-statistic (sign-test) interval and a verdict against 1.

    `speedups`: one value per (target, seed) run; a run that never reached vanilla's best at its censoring bound
    (<= 1: its true speed-up lies below it), one that starts there at +inf or any stand-in above every finite
    speed-up. Only each value's side of 1 and the order of the values enter, so censoring at the bound is exact
    for the verdict. `targets` (one name per run): the runs of a target are first reduced to their median
    (`target_medians`), and the interval is over targets. An even count's median is a range (estimate,
    estimate_high).
    """
    s = np.asarray(speedups, float)
    unit = "runs"
    if targets is not None:
        s, unit = target_medians(s, targets), "targets (median over each target's seeds)"
    s = np.sort(s[~np.isnan(s)])
    n = len(s)
    lo_med, hi_med = median_range(s)
    above, below = int((s > 1).sum()), int((s < 1).sum())
    p = float(stats.binomtest(above, above + below, 0.5).pvalue) if above + below else 1.0
    k = order_statistic_rank(n, alpha)
    if k == 0:
        return Finding(lo_med, math.nan, math.nan, 1.0, Verdict.INCONCLUSIVE,
                       f"inconclusive (needs >= {TPT_MIN_RUNS} {unit.split()[0]} for a distribution-free interval of "
                       f"the median; has {n})", n, p, hi_med)
    lo, hi = float(s[k - 1]), float(s[n - k])
    cover = 1 - 2 * stats.binom.cdf(k - 1, n, 0.5)
    return Finding(lo_med, lo, hi, 1.0, verdict_from_interval(lo, hi, 1.0),
                   f"order-statistic interval of the median over {unit} (sign test; coverage {cover:.3f}; "
                   "non-reaching runs at their bound)", n, p, hi_med)


# ---- same- vs cross-category transfer -------------------------------------------------------------------
def task_cells(pairs: pd.DataFrame, value: str = "relative_value") -> pd.DataFrame:
    """Seeds averaged within each (source task, target task) cell; the diagonal (a task's own prompts) left out."""
    d = pairs[(pairs.source_task != pairs.target_task) & np.isfinite(pairs[value])]
    return d.groupby(["source_task", "target_task"], as_index=False)[value].mean()


def smallest_category_p(sizes) -> float:
    """The smallest one-sided p an exact permutation of category labels among tasks can reach: the relabelings
    that give the observed grouping back (swaps of equal-size categories) over all relabelings."""
    sizes = [int(x) for x in sizes]
    total = factorial(sum(sizes))
    for x in sizes:
        total //= factorial(x)
    same = 1
    for x in set(sizes):
        same *= factorial(sizes.count(x))
    return same / total


def category_difference(cells: pd.DataFrame, categories: dict, value: str = "relative_value",
                        n_resamples: int = 9999, seed: int = 0, alpha: float = ALPHA) -> Finding:
    """Mean same-category cell minus mean cross-category cell, tested by permuting category labels among tasks.

    `cells`: one row per (source task, target task) with `value` (seeds already averaged: `task_cells`);
    `categories`: task -> category. Category is a property of a task, so tasks are the units: the labels are
    permuted among tasks (scipy.stats.permutation_test, exact when there are at most `n_resamples` relabelings),
    one-sided each way at alpha / 2. When even the most extreme relabeling cannot reach alpha / 2 the verdict says
    so in words and gives no p.
    """
    tasks = sorted(set(cells.source_task) | set(cells.target_task))
    pos = {t: i for i, t in enumerate(tasks)}
    grid = np.full((len(tasks), len(tasks)), np.nan)
    grid[cells.source_task.map(pos).to_numpy(), cells.target_task.map(pos).to_numpy()] = cells[value].to_numpy(float)
    cats = sorted({categories[t] for t in tasks})
    code = np.array([cats.index(categories[t]) for t in tasks])
    ok = np.isfinite(grid)
    values = np.where(ok, grid, 0.0)

    def statistic(labels):  # labels [..., T] -> mean same-category cell - mean cross-category cell [...]
        same = labels[..., :, None] == labels[..., None, :]
        n_same, n_cross = (same & ok).sum((-2, -1)), (~same & ok).sum((-2, -1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (values * same).sum((-2, -1)) / n_same - (values * ~same).sum((-2, -1)) / n_cross

    est = float(statistic(code))
    sizes = [int((code == c).sum()) for c in range(len(cats))]
    n = len(tasks)
    floor = smallest_category_p(sizes)
    what = f"{n} tasks in {len(cats)} categories"
    if len(cats) < 2 or not math.isfinite(est):
        return Finding(est, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE,
                       f"inconclusive: {what} have no same- and cross-category cells to compare", n)
    if floor > alpha / 2:
        return Finding(est, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE,
                       f"inconclusive: {what} allow p >= {floor:.3g} (one-sided; a verdict needs p < {alpha / 2:g}); "
                       "permutation of category labels among tasks", n)

    def by_group(*groups, axis=-1):  # scipy hands each category its (permuted) task indices
        batch = np.broadcast_shapes(*(g.shape[:-1] for g in groups))
        labels = np.empty((*batch, n), int)
        for c, g in enumerate(groups):
            np.put_along_axis(labels, np.broadcast_to(g, (*batch, g.shape[-1])), c, axis=-1)
        return statistic(labels)

    groups = tuple(np.flatnonzero(code == c) for c in range(len(cats)))
    res = stats.permutation_test(groups, by_group, permutation_type="independent", vectorized=True,
                                 n_resamples=n_resamples, alternative="greater", rng=np.random.default_rng(seed))
    null = np.asarray(res.null_distribution)
    greater = float(res.pvalue)
    relabelings = factorial(n)
    for x in sizes:
        relabelings //= factorial(x)
    exact = relabelings <= n_resamples  # scipy enumerates every relabeling then
    less = float((np.count_nonzero(null <= est + 1e-12) + (0 if exact else 1)) / (len(null) + (0 if exact else 1)))
    p = min(1.0, 2 * min(greater, less))
    verdict = Verdict.YES if greater <= alpha / 2 else Verdict.NO if less <= alpha / 2 else Verdict.INCONCLUSIVE
    return Finding(est, math.nan, math.nan, 0.0, verdict,
                   f"{'exact' if exact else 'Monte Carlo'} permutation of category labels among {what} (cells: seeds "
                   "averaged per source task and target)", n, p)


# ---- indicator vs indicator ---------------------------------------------------------------------------
def indicator_cells(pairs: pd.DataFrame, columns) -> dict:
    """target -> [n_sources, len(columns)] of seed-averaged cells (source tasks sorted), the diagonal left out."""
    d = pairs[pairs.source_task != pairs.target_task].dropna(subset=list(columns))
    cells = d.groupby(["target_task", "source_task"], sort=True)[list(columns)].mean()
    names, starts = np.unique(cells.index.get_level_values(0), return_index=True)
    return dict(zip(names.tolist(), np.split(cells.to_numpy(float), starts[1:]), strict=True))


def _corr_differences(a: np.ndarray, method: str) -> np.ndarray:
    """corr(x1, y) - corr(x2, y) of each resample, a [B, n, 3] (columns x1, x2, y) -> [B] (NaN: a constant column)."""
    if method == "spearman":
        a = stats.rankdata(a, axis=1)
    c = a - a.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (c[..., :2] * c[..., 2:]).sum(1) / np.sqrt((c[..., :2] ** 2).sum(1) * (c[..., 2:] ** 2).sum(1))
    return r[:, 0] - r[:, 1]


def correlation_difference(pairs: pd.DataFrame, x1: str, x2: str, y: str = "y", n_boot: int = 2000, seed: int = 0,
                           method: str = "spearman", min_sources: int = 3, alpha: float = ALPHA) -> Finding:
    """Mean over targets of corr(x1, y) - corr(x2, y), over seed-averaged (source task, target) cells.

    Interval: a hierarchical bootstrap, targets resampled and then, within each drawn target, its source tasks;
    the p-value is the bootstrap's (twice the smaller tail at 0), which Holm adjusts across a family.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"correlation_difference: method '{method}' is not spearman or pearson")
    per = {t: a for t, a in indicator_cells(pairs, [x1, x2, y]).items() if len(a) >= min_sources}
    diffs = {t: float(_corr_differences(a[None], method)[0]) for t, a in per.items()}
    per = {t: a for t, a in per.items() if math.isfinite(diffs[t])}
    if len(per) < 2:
        return Finding(math.nan, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE,
                       f"inconclusive: {len(per)} target(s) with >= {min_sources} source tasks", len(per))
    rng = np.random.default_rng(seed)
    targets = list(per)
    est = float(np.mean([diffs[t] for t in targets]))
    # every target's source-task resamples [T, n_boot] (a constant resample: NaN, left out of the mean below)
    boot_t = np.empty((len(targets), n_boot))
    for n_src in sorted({len(a) for a in per.values()}):  # targets with as many sources: one ranking call
        rows = [i for i, t in enumerate(targets) if len(per[t]) == n_src]
        draws = np.stack([per[targets[i]][rng.integers(0, n_src, (n_boot, n_src))] for i in rows])
        boot_t[rows] = _corr_differences(draws.reshape(-1, n_src, 3), method).reshape(len(rows), n_boot)
    pick = rng.integers(0, len(targets), (n_boot, len(targets)))  # the targets each replicate draws
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate whose every draw is constant: NaN
        boot = np.nanmean(boot_t[pick, np.arange(n_boot)[:, None]], axis=1)
    boot = boot[np.isfinite(boot)]
    lo, hi = (float(v) for v in np.percentile(boot, [alpha / 2 * 100, (1 - alpha / 2) * 100]))
    p = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    return Finding(est, lo, hi, 0.0, verdict_from_interval(lo, hi), f"hierarchical bootstrap (targets, then "
                   f"source tasks) of the mean {method} difference over seed-averaged cells", len(targets), p)


def holm(findings: dict, alpha: float = ALPHA) -> dict:
    """The primary family's findings with Holm-adjusted p-values (statsmodels) and verdicts read from them."""
    from statsmodels.stats.multitest import multipletests

    named = {k: f for k, f in findings.items() if math.isfinite(f.p_value)}
    if not named:
        return dict(findings)
    adj = multipletests([f.p_value for f in named.values()], alpha=alpha, method="holm")[1]
    out = dict(findings)
    for (k, f), p in zip(named.items(), adj, strict=True):
        v = (Verdict.YES if f.estimate > 0 else Verdict.NO) if p < alpha else Verdict.INCONCLUSIVE
        out[k] = replace(f, p_value=float(p), verdict=v, test=f"{f.test}; Holm over {len(named)} primary comparisons")
    return out


# ---- own prompt vs random prompts ---------------------------------------------------------------------
def own_vs_random(own_pred, random_preds, labels, metric: str = "accuracy", n_boot: int = 2000, seed: int = 0,
                  alpha: float = ALPHA, baseline: str = "seeded random prompt(s)") -> Finding:
    """A task's own prompt against several seeded random prompts, paired on the same test examples.

    own_pred [n], random_preds [R, n], labels [n]: predicted and gold label ids. Accuracy: the exact McNemar test
    (statsmodels) against each random prompt; other metrics (macro-F1): a paired bootstrap over examples. "yes"
    when the own prompt beats every random prompt at alpha / 2 one-sided, "no" when every random prompt beats it;
    the estimate is the own score minus the mean random score, the interval (paired bootstrap) the same.
    `baseline` names what the rows of `random_preds` are in the test's description (the same test serves the
    own prompt against its untrained start: `own_vs_baselines`).
    """
    from statsmodels.stats.contingency_tables import mcnemar

    from ptx.metrics import get_metric

    own, labels = np.asarray(own_pred, int), np.asarray(labels, int)
    rand = np.atleast_2d(np.asarray(random_preds, int))
    n, r = len(labels), len(rand)
    if n == 0 or r == 0:
        return Finding(math.nan, math.nan, math.nan, 0.0, Verdict.INCONCLUSIVE, "no examples or no random prompt", n)
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"own_vs_random: metric '{metric}' is not a classification metric (accuracy, macro_f1)")
    score = get_metric(metric)
    est = score(own.tolist(), labels.tolist()) - float(np.mean([score(x.tolist(), labels.tolist()) for x in rand]))
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    classes = np.union1d(np.union1d(own, rand), labels)
    rows = _accuracy_rows if metric == "accuracy" else partial(_macro_f1_rows, classes=classes)
    own_rows = rows(own[idx], labels[idx])
    boot = np.stack([own_rows - rows(x[idx], labels[idx]) for x in rand])  # [R, n_boot]
    hit_own, hit_rand = own == labels, rand == labels
    sides = []
    for k in range(r):
        if metric == "accuracy":
            a, b = int((hit_own & ~hit_rand[k]).sum()), int((~hit_own & hit_rand[k]).sum())
            p2 = float(mcnemar([[0, a], [b, 0]], exact=True).pvalue) if a + b else 1.0
            sides.append((p2 / 2 if a > b else 1.0, p2 / 2 if b > a else 1.0))
        else:
            sides.append(((boot[k] <= 0).mean(), (boot[k] >= 0).mean()))
    worst_yes, worst_no = max(s[0] for s in sides), max(s[1] for s in sides)
    verdict = Verdict.YES if worst_yes <= alpha / 2 else Verdict.NO if worst_no <= alpha / 2 else Verdict.INCONCLUSIVE
    lo, hi = np.percentile(boot.mean(0), [alpha / 2 * 100, (1 - alpha / 2) * 100])
    test = ("exact McNemar" if metric == "accuracy" else "paired bootstrap over examples") + \
        f" against each of {r} {baseline}; yes only when the own prompt beats every one"
    return Finding(est, float(lo), float(hi), 0.0, verdict, test, n, float(min(1.0, 2 * min(worst_yes, worst_no))))


def own_vs_baselines(findings: list[Finding]) -> Verdict:
    """One own prompt against several baseline families (the seeded random prompts, its untrained start), each
    already tested by `own_vs_random`: yes only when it beats every family (an intersection-union test, so the
    level of each test is the level of the whole), no only when every family beats it, else inconclusive.
    No families at all: inconclusive."""
    if findings and all(f.verdict == Verdict.YES for f in findings):
        return Verdict.YES
    if findings and all(f.verdict == Verdict.NO for f in findings):
        return Verdict.NO
    return Verdict.INCONCLUSIVE


def _accuracy_rows(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Accuracy of each row, pred/ref [B, n] -> [B]."""
    return (pred == ref).mean(1)


def _macro_f1_rows(pred: np.ndarray, ref: np.ndarray, classes) -> np.ndarray:
    """ptx.metrics.macro_f1 of each row, pred/ref [B, n] -> [B]: the mean per-class F1 over the classes a row's
    refs or preds contain (an unpredicted class scores 0)."""
    scores, present = [], []
    for c in classes:  # a class absent from a row is left out of its mean
        p, r = pred == c, ref == c
        tp, fp, fn = (p & r).sum(1), (p & ~r).sum(1), (~p & r).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores.append(np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0))
        present.append(tp + fp + fn > 0)
    scores, present = np.stack(scores), np.stack(present)
    return (scores * present).sum(0) / present.sum(0)
