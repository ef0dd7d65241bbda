"""Datasets (JSONL, generator) and metrics on hand-made cases."""

from __future__ import annotations

import json

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
    with pytest.raises(tc.TokencompError, match=r"lacks field\(s\) \['answers'\]"):
        JsonlDataset(bad)
    bad.write_text(json.dumps({"image": "x.png", "question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(tc.TokencompError, match="image .*x.png' does not exist"):
        JsonlDataset(bad)
    with pytest.raises(tc.TokencompError, match="neither a known name"):
        prompt(type("S", (), {"question": "q"})(), "no-template")
