"""Datasets (JSONL, generator) and metrics on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tokencomp as tc
from tokencomp.data import JsonlDataset, prompt
from tokencomp.metrics import answer_score, exact_match, normalize, vqa_accuracy, yes_no, yes_no_scores


def test_normalize_and_exact_match():
    assert normalize("  The Red, circle! ") == "red circle"
    assert normalize("Two") == "2"
    assert exact_match("two", ["2"]) == 1.0
    assert exact_match("a blue square.", ["Blue square"]) == 1.0
    assert exact_match("blue", ["red", "green"]) == 0.0
    # a one-letter answer "a" (tc-scenes' read questions) is not an article to drop
    assert exact_match("A", ["a"]) == 1.0
    assert exact_match("", ["a"]) == 0.0 and exact_match("the", ["a"]) == 0.0 and exact_match("an", ["a"]) == 0.0


def test_answer_score_soft_accuracy_only_for_ten_answers():
    assert answer_score("two", ["2", "two"]) == 1.0  # synonyms: exact match against any
    assert answer_score("red", ["red", "red", "red"]) == 1.0
    assert answer_score("blue", ["red", "green"]) == 0.0
    ten = ["red"] * 2 + ["blue"] * 8
    assert answer_score("red", ten) == pytest.approx(vqa_accuracy("red", ten))
    assert answer_score("red", ten) < 1.0


def test_vqa_soft_accuracy():
    answers = ["red"] * 2 + ["blue"] * 8
    # two of ten annotators: over the 10 leave-one-out subsets, 8 contain both (2/3), 2 contain one (1/3)
    assert vqa_accuracy("red", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("blue", answers) == pytest.approx(1.0)
    assert vqa_accuracy("green", answers) == 0.0
    assert vqa_accuracy("red", ["red"]) == 1.0


def test_yes_no_scores():
    assert yes_no("Yes, there is.") == "yes" and yes_no("nope") is None
    s = yes_no_scores(["yes", "no", "yes", "maybe"], ["yes", "yes", "no", "no"])
    assert s["accuracy"] == 0.25
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5


def test_dataset_errors(tmp_path):
    with pytest.raises(tc.TokencompError, match="does not exist"):
        JsonlDataset(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "question": "q"}) + "\n")
    with pytest.raises(tc.TokencompError, match=r"line 1 \(id '0'\): lacks field 'answers'"):
        JsonlDataset(bad)
    bad.write_text(json.dumps({"image": "x.png", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(tc.TokencompError, match="image .*x.png' does not exist"):
        JsonlDataset(bad)
    with pytest.raises(tc.TokencompError, match="neither a known name"):
        prompt(type("S", (), {"question": "q"})(), "no-template")


def test_bootstrap_intervals_agree_with_the_normal_approximation():
    """At n = 300 the percentile bootstrap of a proportion is close to the normal interval
    p +- 1.96 sqrt(p (1 - p) / n); a paired difference of two correlated score lists is much
    tighter than the separate intervals suggest, and centred on the true difference."""
    from tokencomp.metrics import mean_ci, paired_difference_ci

    rng = np.random.default_rng(0)
    n, p = 300, 0.9
    x = (np.arange(n) < p * n).astype(float)
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    low, high = mean_ci(x)
    assert abs(low - (p - half)) < 0.01 and abs(high - (p + half)) < 0.01
    assert mean_ci(x) == (low, high)  # seeded: a report is reproducible
    assert mean_ci([1.0] * 5) == (1.0, 1.0) and mean_ci([0.3]) == (0.3, 0.3)
    a = (rng.random(n) < 0.8).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a == 1), 24, replace=False)] = 0.0  # b loses 24 of a's right answers
    d, dlow, dhigh = paired_difference_ci(a, b)
    assert d == 24 / n and dlow <= d <= dhigh
    sd = np.sqrt(d * (1 - d) / n)  # differences are 0/1 here: a proportion of flips
    assert abs((dhigh - dlow) - 2 * 1.96 * sd) < 0.015
    unpaired = (mean_ci(a)[1] - mean_ci(a)[0]) + (mean_ci(b)[1] - mean_ci(b)[0])
    assert dhigh - dlow < unpaired / 2
    with pytest.raises(ValueError, match="equal"):
        paired_difference_ci(a, b[:-1])


def test_vqa_normalize_by_hand():
    from tokencomp.metrics import vqa_normalize

    assert vqa_normalize("Yes, it is.") == "yes it is"  # normalised, not shortened: no match with "yes"
    assert vqa_normalize("3.5") == "3.5" and normalize("3.5") == "3 5"  # a decimal point stays
    assert vqa_normalize("1,000") == "1000"
    assert vqa_normalize("The man's hat") == "man 's hat"
    assert vqa_normalize("dont") == "don't" and vqa_normalize("don't") == "don't"
    assert vqa_normalize("lets") == "lets"  # a word in its own right, not restored
    assert vqa_normalize("t-shirt") == "t shirt" and vqa_normalize("red - blue") == "red blue"
    assert vqa_normalize("None") == "0" and vqa_normalize("Two dogs!") == "2 dogs"
    assert vqa_normalize("A") == ""  # an article: such an answer is compared by the plain rule
    assert answer_score("A", ["a"]) == 1.0 and answer_score("", ["a"]) == 0.0 and answer_score("the", ["a"]) == 0.0
    assert answer_score("an", ["A", "b"]) == 0.0 and answer_score("b", ["A", "b"]) == 1.0
    assert (
        answer_score("Don't know", ["dont know"]) == 1.0 and answer_score("Don't know", ["dont know"], "exact") == 0.0
    )
    assert answer_score("3.5", ["3 5"]) == 0.0 and answer_score("3.5", ["3 5"], "exact") == 1.0
    with pytest.raises(ValueError, match="scoring='vq' must be one of"):
        answer_score("a", ["a"], "vq")


def test_vqa_normalize_equals_lmms_eval():
    """`vqa_normalize` is lmms-eval's EvalAI answer processing (TextVQA, VizWiz, OK-VQA), on every
    contraction of its table and on random answers full of punctuation, digits, articles and
    number words."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    from tokencomp.metrics import vqa_normalize

    theirs = EvalAIAnswerProcessor()
    # keys with capitals never match after lower-casing; somebody'd -> somebodyd is a documented difference
    texts = [k for k in EvalAIAnswerProcessor.CONTRACTIONS if k == k.lower() and k != "somebody'd"]
    texts += [f"It is {k}." for k in texts[:20]] + ["." * 40 + "x", "a.b " * 20, "3,5 and 2 , 4", "Yes\tno\nmaybe"]
    rng = np.random.default_rng(0)
    pieces = list(";/[]\"{}()=+\\_-><@`,?!.'' 0123456789") + [
        "a ",
        "the ",
        "An ",
        "two",
        "None ",
        "'s",
        "dont",
        "yall",
        "Ten",
    ]
    pieces += [" ", " ", "red", "X"]
    for _ in range(3000):
        texts.append("".join(rng.choice(pieces, size=int(rng.integers(1, 12)))))
    wrong = [(t, vqa_normalize(t), theirs(t)) for t in texts if vqa_normalize(t) != theirs(t)]
    assert not wrong, wrong[:5]
