"""Answer metrics: answer normalisation (lmms-eval's VQA processing, or a plainer one), exact
match, VQA soft accuracy, yes/no accuracy and F1, and bootstrap confidence intervals of accuracies
and of paired differences."""

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


# English contractions, which the VQA answer processing restores when one apostrophe is missing
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am might've mightn't mightn't've
must've mustn't needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've
""".split()
_RESTORE = {
    form[:i] + form[i + 1 :]: form
    for form in _CONTRACTED
    for i, c in enumerate(form)
    if c == "'" and form[:i] + form[i + 1 :] not in ("lets", "shes")  # words in their own right
}
_VQA_NUMBERS = {"none": "0", **_NUMBERS}
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period that is not a decimal point


def vqa_normalize(text: str) -> str:
    """An answer as lmms-eval compares it on TextVQA, VizWiz and OK-VQA (the EvalAI / VQA answer
    processing):

    1. lower-case; drop ``,`` and ``?``; split ``'s`` off its word (``man's`` -> ``man 's``);
       newlines and tabs to spaces;
    2. each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: deleted where it touches a space
       (or the text has digits joined by a comma), a space otherwise (``t-shirt`` -> ``t shirt``,
       ``red - blue`` -> ``red blue``); then periods not followed by a digit are deleted (the
       first 32: EvalAI's quirk), so ``3.5`` keeps its point;
    3. per word: ``none``/``zero``..``ten`` to digits, articles ``a``/``an``/``the`` dropped (an
       answer ``a`` becomes empty), a contraction missing one apostrophe restored (``dont`` ->
       ``don't``; apostrophes are kept, unlike `normalize`).

    Sentence answers are normalised, not shortened: ``"Yes, it is."`` becomes ``"yes it is"``,
    which does not match ``"yes"`` (as in lmms-eval; the answer-format prompt
    ``"Answer the question using a single word or phrase."`` asks a real checkpoint for short
    answers). lmms-eval's VQAv2 task skips step 1's deletions (it differs on ``,``, ``?`` and
    ``'s``). One difference from EvalAI: its table turns ``somebody'd`` into ``somebodyd``; here
    it stays."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued) else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_VQA_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_RESTORE.get(w, w) for w in words if w not in _ARTICLES)


SCORINGS = ("vqa", "exact")  # how answers are normalised before they are compared


def _normalizer(scoring: str):
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} must be one of {list(SCORINGS)}")
    return vqa_normalize if scoring == "vqa" else normalize


def _matches(prediction: str, answers: list[str], scoring: str) -> list[bool]:
    """Whether the prediction matches each answer, both normalised by ``scoring``. Under ``"vqa"``
    an answer the processing empties (articles only: the letter ``a`` of tc-scenes' tags, a
    multiple-choice ``A``) is compared by `normalize` instead, where EvalAI would match it to any
    empty or article-only prediction."""
    if _normalizer(scoring) is normalize:
        p = normalize(prediction)
        return [p == normalize(a) for a in answers]
    p = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in answers]
    return [p == r if r else normalize(prediction) == normalize(a) for r, a in zip(refs, answers)]


def exact_match(prediction: str, answers: list[str], scoring: str = "exact") -> float:
    """1.0 if the normalised prediction equals any normalised reference answer (``scoring``:
    ``"exact"`` by `normalize`, ``"vqa"`` by `vqa_normalize`)."""
    return float(any(_matches(prediction, answers, scoring)))


def vqa_accuracy(prediction: str, answers: list[str], scoring: str = "exact") -> float:
    """VQA soft accuracy: ``min(1, matches / 3)`` averaged over every leave-one-out subset of the
    reference answers (the official VQA evaluation; with one reference it is exact match).
    ``scoring`` as in `exact_match`."""
    hits = _matches(prediction, answers, scoring)
    if len(hits) < 2:
        return float(bool(hits) and hits[0])
    scores = [min(1.0, sum(subset) / 3) for subset in combinations(hits, len(hits) - 1)]
    return sum(scores) / len(scores)


VQA_ANSWERS = 10  # VQAv2, TextVQA and VizWiz give ten human answers per question


def answer_score(prediction: str, answers: list[str], scoring: str = "vqa") -> float:
    """The harness's score of one answer: VQA soft accuracy for a list of ten human answers (the
    VQA-style datasets), normalised exact match against any reference otherwise (one answer or a
    few accepted synonyms, which soft accuracy would cap below 1; lmms-eval's soft accuracy would
    give a single reference 0). ``scoring``: ``"vqa"`` (default) normalises both sides as lmms-eval
    does (`vqa_normalize`), ``"exact"`` by the plainer `normalize` (all punctuation to spaces)."""
    if len(answers) >= VQA_ANSWERS:
        return vqa_accuracy(prediction, answers, scoring)
    return exact_match(prediction, answers, scoring)


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
