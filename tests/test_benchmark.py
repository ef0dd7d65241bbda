"""The synthetic benchmark: determinism, disjoint splits, balanced answers, consistent labels."""

from __future__ import annotations

import collections
import json

import pytest

import tokencomp as tc
from tokencomp.benchmark import NUMBERS, PRESETS, QUESTION_TYPES, SPLIT_SEED, generate_split, make_scene, vocabulary
from tokencomp.data import JsonlDataset


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, {s: generate_split(out, s, 25) for s in ("train", "val", "test")}


def test_deterministic(splits, tmp_path):
    out, paths = splits
    again = generate_split(tmp_path, "test", 25)
    assert again.read_text() == paths["test"].read_text()
    first = json.loads(again.read_text().splitlines()[0])
    assert (tmp_path / first["image"]).read_bytes() == (out / first["image"]).read_bytes()

    # the defaults are the embedded model's benchmark: the files a run of "tc-scenes" writes
    preset = generate_split(tmp_path / "preset", "test", 3, **PRESETS["tc-scenes"])
    assert preset.read_text().splitlines() == again.read_text().splitlines()[:3]
    assert (preset.parent / first["image"]).read_bytes() == (tmp_path / first["image"]).read_bytes()


def test_splits_disjoint_and_types_balanced(splits):
    _, paths = splits
    ids = {s: {json.loads(x)["id"] for x in p.read_text().splitlines()} for s, p in paths.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    rows = [json.loads(x) for x in paths["test"].read_text().splitlines()]
    counts = collections.Counter(r["type"] for r in rows)
    assert set(counts) == set(QUESTION_TYPES) and max(counts.values()) - min(counts.values()) <= 1
    vocab = set(vocabulary())
    for r in rows:
        assert set(r["question"].split()) <= vocab, r["question"]
        assert r["answers"][0] in vocab
    ds = JsonlDataset(paths["test"])
    assert len(ds) == 25 and ds.samples[0].load_image().size == (336, 336)


def test_labels_agree_with_the_scene(tmp_path):
    path = generate_split(tmp_path, "val", 60)
    yes = no = 0
    for r in (json.loads(x) for x in path.read_text().splitlines()):
        seed = int(r["id"].split("-")[1])
        _, objs, char, _ = make_scene(seed)
        q, a = r["question"], r["answers"][0]
        if r["type"] == "count":
            shape = next(s for s in ("circle", "square", "triangle", "star") if s + "s" in q.split())
            assert a == NUMBERS[sum(o.shape == shape for o in objs)]
        elif r["type"] == "read":
            assert a == char.lower()
        elif r["type"] == "exist":
            color = next(w for w in q.split() if w in ("red", "green", "blue", "yellow", "purple", "white"))
            shape = next(w for w in q.split() if w in ("circle", "square", "triangle", "star"))
            present = any(o.color == color and o.shape == shape for o in objs)
            assert a == ("yes" if present else "no")
            yes, no = yes + present, no + (not present)
    assert yes >= 3 and no >= 3  # both answers occur (balanced by construction)


def test_bad_split(tmp_path):
    with pytest.raises(tc.TokencompError, match="split must be one of"):
        generate_split(tmp_path, "dev", 3)
    assert SPLIT_SEED["val"] - SPLIT_SEED["train"] >= 1_000_000


def test_grid_tag_is_one_patch_and_labelled():
    from tokencomp.benchmark import PRESETS, label_map

    for seed in range(5):
        scene = make_scene(seed, (336, 336), **{k: v for k, v in PRESETS["tc-scenes"].items() if k != "size"})
        x0, y0, x1, y1 = scene.tag_box
        assert x0 % 14 == 0 and y0 % 14 == 0 and (x1 + 1 - x0, y1 + 1 - y0) == (14, 14)
        labels = label_map(scene)
        assert (labels[y0 : y1 + 1, x0 : x1 + 1] == len(scene.objects) + 1).all()  # the plate's pixels
        assert (labels == len(scene.objects) + 1).sum() == 14 * 14


def test_question_evidence_supports_the_answer():
    """Each question's evidence (the objects it names) determines its answer, independently
    recomputed from the scene's objects."""
    import numpy as np

    from tokencomp.benchmark import make_question

    seen = collections.Counter()
    for seed in range(40):
        scene = make_scene(seed)
        objs = scene.objects
        for qt in QUESTION_TYPES:
            qa = make_question(np.random.default_rng(seed), objs, scene.char, qt)
            if qa is None:
                continue
            seen[qt] += 1
            ev = qa.evidence
            if qt == "attribute":
                (j,) = ev[0]
                assert qa.answer in (objs[j].color, objs[j].shape) and qa.answer not in qa.question.split()
            elif qt == "count":
                shape = next(s for s in ("circle", "square", "triangle", "star") if s + "s" in qa.question.split())
                assert all(objs[j].shape == shape for j in ev[0]) and qa.answer == NUMBERS[len(ev[0])]
            elif qt == "exist":
                assert (qa.answer == "yes") == bool(ev[0])
                assert all(f"{objs[j].color} {objs[j].shape}" in qa.question for j in ev[0])
            elif qt == "position":
                (a,), (b,) = ev
                (ax, ay), (bx, by) = objs[a].center, objs[b].center
                expect = (
                    ("left" if ax < bx else "right")
                    if abs(ax - bx) >= abs(ay - by)
                    else ("above" if ay < by else "below")
                )
                assert qa.answer == expect
            else:
                assert ev == ((len(objs),),) and qa.answer == scene.char.lower()
    assert all(seen[t] >= 10 for t in QUESTION_TYPES), seen
