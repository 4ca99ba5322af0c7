"""Metrics against values computed by hand."""

import pytest

from ptx.errors import PtxError
from ptx.metrics import METRIC_KIND, METRICS, get_metric, normalize_answer


def test_registry_names_and_kinds():
    assert set(METRICS) == {"accuracy", "macro_f1", "exact_match", "f1", "rouge_l"}
    assert set(METRIC_KIND) == set(METRICS)
    assert set(METRIC_KIND.values()) == {"classification", "generation"}


def test_accuracy():
    assert METRICS["accuracy"]([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(0.75)


def test_macro_f1_by_hand():
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5; class 2: tp 1 -> 1
    assert METRICS["macro_f1"]([0, 0, 1, 1, 2], [0, 1, 1, 1, 2]) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    assert METRICS["macro_f1"]([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)
    assert METRICS["macro_f1"]([1, 1, 1], [1, 1, 1]) == 1.0


def test_squad_normalisation():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("A cat, an owl and THE dog.") == "cat owl and dog"


def test_exact_match_with_several_references():
    preds = ["The Eiffel Tower!", "Paris", "london"]
    refs = [["eiffel tower", "tower"], "paris, france", ["Berlin", "London"]]
    assert METRICS["exact_match"](preds, refs) == pytest.approx(2 / 3)


def test_squad_f1_by_hand():
    # normalised: pred [cat, sat, on, mat], ref [cat, on, mat] -> P 3/4, R 1 -> F1 6/7
    assert METRICS["f1"](["the cat sat on the mat"], ["a cat on a mat"]) == pytest.approx(6 / 7)
    # the best of several references counts
    assert METRICS["f1"](["blue whale"], [["whale shark", "the blue whale"]]) == pytest.approx(1.0)
    assert METRICS["f1"](["nothing alike"], ["totally different"]) == 0.0


def test_rouge_l_by_hand():
    # rouge-score's tokens (lowercase alphanumerics, Porter stems of words over 3 letters); LCS "the cat was under the bed" = 6 tokens; P 6/7, R 6/6 -> F 12/13
    pred, ref = "The cat was found under the bed", "the cat was under the bed"
    assert METRICS["rouge_l"]([pred], [ref]) == pytest.approx(12 / 13)
    # LCS of "a b c d" and "a c b d" is 3: P = R = 3/4
    assert METRICS["rouge_l"](["a b c d", "x"], ["a c b d", "x"]) == pytest.approx((3 / 4 + 1) / 2)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_empty_and_misaligned_inputs_raise(name):
    with pytest.raises(PtxError, match="empty"):
        METRICS[name]([], [])
    with pytest.raises(PtxError, match="2 predictions but 1 references"):
        METRICS[name]([0, 1] if METRIC_KIND[name] == "classification" else ["a", "b"],
                      [0] if METRIC_KIND[name] == "classification" else ["a"])


# by hand: accuracy 2/5; macro-F1 (class 0: 2/3, class 1: 1/2, class 2: 0) / 3; F1 ("a" is an article):
# [b c] vs [c] 2/3, "" vs "" 1, [x] vs [y] 0, q 1; EM 0 1 0 1; ROUGE-L (rouge-score: an empty text scores 0):
# "a b c" vs "a c" P 2/3 R 1 -> 0.8, "" 0, 0, 1
EXPECTED = {"accuracy": 2 / 5, "macro_f1": (2 / 3 + 1 / 2 + 0) / 3, "f1": (2 / 3 + 1 + 0 + 1) / 4,
            "exact_match": 2 / 4, "rouge_l": (0.8 + 0 + 0 + 1) / 4}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_scores_by_hand(name):
    if METRIC_KIND[name] == "classification":
        preds, refs = [0, 2, 1, 1, 0], [0, 1, 1, 2, 2]
    else:
        preds, refs = ["a b c", "", "the x", "q"], ["a c", "", "y", ["q", "r"]]
    assert METRICS[name](preds, refs) == pytest.approx(EXPECTED[name])


def test_unknown_metric_suggests():
    with pytest.raises(PtxError, match="did you mean 'rouge_l'"):
        get_metric("rougel")
