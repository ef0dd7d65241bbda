"""experiments/state_snapshot.py: the refactoring check finds what changed and only that."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import PROMPTS

import tokencomp as tc

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
from state_snapshot import differences, snapshot  # noqa: E402


def test_snapshot_diff_finds_a_changed_cell_and_nothing_else(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    run = {
        "identity": lambda: tc.Engine(model, []),
        "random": lambda: tc.Engine(model, tc.method("random", budget=9, seed=1)),
    }
    old = {name: snapshot(make(), batch, new_tokens=2) for name, make in run.items()}
    again = {name: snapshot(make(), batch, new_tokens=2) for name, make in run.items()}
    assert differences(old, again) == []

    changed = {name: dict(fields) for name, fields in again.items()}
    changed["random"] = snapshot(tc.Engine(model, tc.method("random", budget=9, seed=2)), batch, new_tokens=2)
    found = differences(old, changed)
    assert found and all(line.startswith("random: ") for line in found)
    assert any(line.startswith("random: in.orig_index differs") for line in found)  # another draw

    nudged = {name: dict(fields) for name, fields in again.items()}
    nudged["identity"]["logits"] = again["identity"]["logits"] + 1e-3
    assert differences(old, nudged) == ["identity: logits max |diff| 0.001"]
    # NaN where the old snapshot had NaN is no difference; an infinity elsewhere, or a dtype, is
    nan = again["identity"]["logits"].clone()
    nan[0, 0] = float("nan")
    assert differences({"identity": {"logits": nan.clone()}}, {"identity": {"logits": nan}}) == []
    inf = nan.clone()
    inf[0, 1] = float("inf")
    assert differences({"identity": {"logits": nan}}, {"identity": {"logits": inf}}) == [
        "identity: logits differs in its infinities or NaNs"
    ]
    top = inf.clone()
    top[0, 1] = torch.finfo(top.dtype).max  # an overflow saturated instead of going to inf
    assert differences({"identity": {"logits": inf}}, {"identity": {"logits": top}}) == [
        "identity: logits differs in its infinities or NaNs"
    ]
    assert differences({"identity": {"logits": nan}}, {"identity": {"logits": nan.half()}}) == [
        "identity: logits differs in dtype (torch.float32 -> torch.float16)"
    ]
    del nudged["identity"]
    assert differences(old, nudged) == ["identity: only in the old snapshot"]
