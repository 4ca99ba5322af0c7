"""Task metrics as a plain dict of functions `fn(preds, refs) -> float` in [0, 1].

Classification metrics take integer class indices. Generation metrics take strings; a reference may also be a
list of acceptable answers (SQuAD, NQ-Open), and the best-matching one counts. F1 and exact match follow the
official SQuAD script (normalisation: lowercase, no punctuation, no articles, single spaces); ROUGE-L is the
`rouge-score` package's (Google's reimplementation of ROUGE-1.5.5), stemming on, as summarisation papers report it.
"""

import functools
import re
import string
from collections import Counter
from collections.abc import Callable

from ptx.errors import PtxError, suggest

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def _check(preds: list, refs: list, metric: str) -> None:
    """Reject empty or misaligned inputs: an empty score would be a silent 0 or a division by zero."""
    if len(preds) == 0:
        raise PtxError(f"metric '{metric}': no predictions to score (empty input)")
    if len(preds) != len(refs):
        raise PtxError(f"metric '{metric}': {len(preds)} predictions but {len(refs)} references")


def _options(ref) -> list[str]:
    """A reference as a list of acceptable answers."""
    if isinstance(ref, str):
        return [ref]
    options = [str(r) for r in ref]
    return options or [""]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def accuracy(preds: list, refs: list) -> float:
    """Fraction of predictions equal to the reference class."""
    _check(preds, refs, "accuracy")
    return sum(int(p) == int(r) for p, r in zip(preds, refs, strict=True)) / len(preds)


def macro_f1(preds: list, refs: list) -> float:
    """Unweighted mean of per-class F1 over the classes seen in refs or preds (an unpredicted class scores 0)."""
    _check(preds, refs, "macro_f1")
    preds, refs = [int(p) for p in preds], [int(r) for r in refs]
    scores = []
    for c in sorted(set(refs) | set(preds)):
        tp = sum(p == c and r == c for p, r in zip(preds, refs, strict=True))
        fp = sum(p == c and r != c for p, r in zip(preds, refs, strict=True))
        fn = sum(p != c and r == c for p, r in zip(preds, refs, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def _token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:  # SQuAD's rule: both empty is a match, one empty is not
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(preds: list, refs: list) -> float:
    """Fraction of predictions equal to some reference after SQuAD normalisation."""
    _check(preds, refs, "exact_match")
    hits = [max(float(normalize_answer(p) == normalize_answer(o)) for o in _options(r))
            for p, r in zip(preds, refs, strict=True)]
    return sum(hits) / len(hits)


def f1(preds: list, refs: list) -> float:
    """Mean SQuAD token F1, each prediction scored against its best reference."""
    _check(preds, refs, "f1")
    scores = [max(_token_f1(p, o) for o in _options(r)) for p, r in zip(preds, refs, strict=True)]
    return sum(scores) / len(scores)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(preds: list, refs: list) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming), each prediction against its best reference."""
    _check(preds, refs, "rouge_l")
    scorer = _rouge_scorer()
    scores = [max(scorer.score(o, str(p))["rougeL"].fmeasure for o in _options(r)) for p, r in zip(preds, refs, strict=True)]
    return sum(scores) / len(scores)


METRICS: dict[str, Callable[[list, list], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "exact_match": exact_match,
    "f1": f1,
    "rouge_l": rouge_l,
}

# Which task kind a metric scores: a classification task cannot be scored with ROUGE-L, and vice versa.
METRIC_KIND: dict[str, str] = {
    "accuracy": "classification",
    "macro_f1": "classification",
    "exact_match": "generation",
    "f1": "generation",
    "rouge_l": "generation",
}


def get_metric(name: str) -> Callable[[list, list], float]:
    """Look a metric up by name; PtxError with a suggestion when unknown."""
    if name not in METRICS:
        raise PtxError(f"unknown metric '{name}'{suggest(name, METRICS)}; choose from {sorted(METRICS)}")
    return METRICS[name]
