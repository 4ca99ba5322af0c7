"""Verdicts for the paper's questions from intervals, never from point estimates.

Each question is a comparison (same-category vs cross-category transfer, ON vs an embedding similarity, TPT vs
vanilla, a tuned prompt vs a random one). Each gets a test of the right kind, a 95% interval of the effect and
a verdict read off that interval against the null value:

- ``yes``: the whole interval lies on the side the paper claims;
- ``no``: the whole interval lies on the other side (the data contradict the claim);
- ``inconclusive``: the interval contains the null value (or the effect is undefined).

A point estimate that favours the claim while its interval straddles the null is "inconclusive", which is what
a reader should be told about a handful of pairs. The methods behind each question live in `ptx.verdicts`, each
calibrated by simulation (tests/test_calibration.py).
"""

import math
from dataclasses import dataclass
from enum import Enum


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
    estimate_high: float = math.nan  # an even count's median is a range: [estimate, estimate_high]


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


def examples_for_standard_error(se: float, p: float = 0.5) -> int:
    """Test examples a target needs so an accuracy near p has standard error at most `se` (binomial)."""
    return math.ceil(p * (1 - p) / (se * se))
