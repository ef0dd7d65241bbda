"""VisPruner against a reference written from the released code's steps on eager attentions."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch_and_alone, eager_copy, make_images
from vision_reference import eager_tower, tower_views

import tokencomp as tc
from tokencomp.strategy import NEWLINE, VISUAL


def vispruner_view(attn_row: torch.Tensor, feats: torch.Tensor, budget: int, ratio: float) -> list[int]:
    """One view's kept patches (sorted): the released procedure as lists. ``attn_row`` (N,) the CLS
    row's head-mean attention over the patches, ``feats`` (N, C) the patches' features."""
    important_n = int(budget * ratio)
    diverse_n = budget - important_n
    order = sorted(range(len(attn_row)), key=lambda i: (-float(attn_row[i]), i))
    important, residual = order[:important_n], order[important_n:]
    unit = feats / feats.norm(dim=-1, keepdim=True)
    while diverse_n > 0:
        r = min(8, len(residual) - diverse_n)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        scores = (unit[a] @ unit[b].T).max(dim=1).values.tolist()
        left = sorted(range(len(a)), key=lambda i: (-scores[i], i))[r:]
        residual = [a[i] for i in left] + b
    return sorted(important + (residual if diverse_n > 0 else []))


def _kept_per_view(pre, b: int) -> dict[int, list[int]]:
    lay = pre.input_state.layout(b)
    vis = lay["kind"] == VISUAL
    out: dict[int, list[int]] = {}
    for v, p in zip(lay["view"][vis].tolist(), lay["patch"][vis].tolist()):
        out.setdefault(v, []).append(p)
    return {v: sorted(p) for v, p in out.items()}


@pytest.mark.parametrize("budget,ratio", [(12, 0.5), (20, 0.75), (9, 0.0), (8, 1.0), (30, 0.4)])
def test_vispruner_matches_reference(model, images, budget, ratio):
    """Each view keeps the reference's patches (NeXT crops: those inside the unpadded window, every
    unpadded row with its newline); the tokens are the projector's on the layer -2 features."""
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("vispruner", budget=budget, important_ratio=ratio)).prefill(batch)
    hf = eager_copy(model)
    pix = tower_views(model, batch)
    hidden, attn, _ = eager_tower(hf, pix, -2)
    v = 0
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        nv = model.views_per_image(size)
        got = _kept_per_view(pre, b)
        valid = model.crop_valid(size) if nv > 1 else None
        for j in range(nv):
            want = vispruner_view(attn[v + j, :, 0, 1:].mean(0), hidden[v + j, 1:], budget, ratio)
            if j:  # a crop: what unpadding leaves
                want = [p for p in want if bool(valid[j - 1, p])]
            assert got.get(j, []) == want, (b, j)
        lay = pre.input_state.layout(b)
        if nv == 1:
            tokens = pre.input_state.hidden[b][pre.input_state.valid[b]][lay["kind"] == VISUAL]
            with torch.no_grad():
                ref = model.projector(hidden[v, 1:][torch.tensor(got[0])])
            torch.testing.assert_close(tokens, ref, rtol=1e-4, atol=1e-5)
        else:
            assert int((lay["kind"] == NEWLINE).sum()) == model.crop_region(size)[3]  # a newline per row
        v += nv


def test_vispruner_is_batch_independent(model, images):
    engine = tc.Engine(model, tc.method("vispruner", budget=10, important_ratio=0.5))
    pre, alone = batch_and_alone(engine, model, images, PROMPTS)
    for b, one in enumerate(alone):
        assert _kept_per_view(pre, b) == _kept_per_view(one, 0)


def test_an_odd_important_count_runs(models):
    """The released code fails when the remaining list has odd length; here A takes the extra one."""
    model = models["llava"]
    pre = tc.Engine(model, tc.method("vispruner", budget=9, important_ratio=0.34)).prefill(
        tc.prepare(model, make_images([(60, 100)]), PROMPTS[:1])
    )
    assert pre.record.tokens_per_view == [[[9]]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0}, r"budget \(tokens per view\)=0 is outside the allowed range \[1, 36\]"),
        ({"budget": 37}, r"budget \(tokens per view\)=37 is outside"),
        ({"important_ratio": 1.2}, r"important_ratio=1.2 is outside"),
    ],
)
def test_vispruner_rejects_bad_parameters(models, images, kwargs, match):
    model = models["llava"]
    with pytest.raises(tc.BudgetError, match=match):
        tc.Engine(model, tc.method("vispruner", **kwargs)).prefill(tc.prepare(model, images[:1], PROMPTS[:1]))
