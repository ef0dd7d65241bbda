"""Answer metrics: normalised exact match, VQA soft accuracy, yes/no accuracy and F1, and
bootstrap confidence intervals of accuracies and of paired differences."""

from __future__ import annotations

import re
import string
from itertools import combinations

import numpy as np

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words to digits, collapse spaces. A text of
    articles only keeps them (the answer "a", a letter, stays "a" and matches neither "" nor "the")."""
    text = text.lower().strip()
    text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join([w for w in words if w not in _ARTICLES] or words)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer."""
    p = normalize(prediction)
    return float(any(p == normalize(a) for a in answers))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA soft accuracy: ``min(1, matches / 3)`` averaged over every leave-one-out subset of the
    reference answers (the official VQA evaluation; with one reference it is exact match)."""
    p = normalize(prediction)
    refs = [normalize(a) for a in answers]
    if len(refs) < 2:
        return float(bool(refs) and p == refs[0])
    scores = [min(1.0, sum(r == p for r in subset) / 3) for subset in combinations(refs, len(refs) - 1)]
    return sum(scores) / len(scores)


VQA_ANSWERS = 10  # VQAv2, TextVQA and VizWiz give ten human answers per question


def answer_score(prediction: str, answers: list[str]) -> float:
    """The harness's score of one answer: VQA soft accuracy for a list of ten human answers (the
    VQA-style datasets), normalised exact match against any reference otherwise (one answer or a
    few accepted synonyms, which soft accuracy would cap below 1)."""
    if len(answers) >= VQA_ANSWERS:
        return vqa_accuracy(prediction, answers)
    return exact_match(prediction, answers)


def scores_by_type(rows: list[dict]) -> dict[str, float]:
    """Mean ``score`` per ``type`` over per-sample rows (types sorted)."""
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["score"])
    return {k: sum(v) / len(v) for k, v in sorted(by_type.items())}


def yes_no(prediction: str) -> str | None:
    """``"yes"``/``"no"`` if the prediction starts with one (POPE-style parsing), else None."""
    m = re.match(r"\s*(yes|no)\b", prediction.lower())
    return m.group(1) if m else None


def yes_no_scores(predictions: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with "yes" as the positive class (POPE)."""
    tp = fp = fn = correct = 0
    for pred, ans in zip(predictions, answers):
        p, a = yes_no(pred), normalize(ans)
        correct += int(p == a)
        tp += int(p == "yes" and a == "yes")
        fp += int(p == "yes" and a == "no")
        fn += int(p != "yes" and a == "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(predictions), 1)
    return {"accuracy": correct / n, "precision": precision, "recall": recall, "f1": f1}


def mean_ci(scores, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of per-sample scores (0-1; VQA soft
    scores allowed), seeded so a report is reproducible. Constant scores or one sample: the mean twice.

    Args:
        scores: one score per sample (sequence of floats).
    Returns: ``(low, high)``.
    """
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        raise ValueError("no scores")
    if x.size < 2 or bool((x == x[0]).all()):
        return float(x.mean()), float(x.mean())
    from scipy.stats import bootstrap  # (here: scipy.stats takes most of a second to import)

    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference_ci(
    a, b, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same samples (two methods on the same questions) with its
    percentile-bootstrap interval, resampling the pairs: tighter than two separate intervals,
    because question difficulty cancels. Returns ``(difference, low, high)``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need two equal, non-empty lengths, got {a.size} and {b.size}")
    low, high = mean_ci(a - b, confidence, resamples, seed)
    return float((a - b).mean()), low, high
