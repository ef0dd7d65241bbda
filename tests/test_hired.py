"""HiRED against a reference written from the released code's steps on eager attentions."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch_and_alone, eager_copy, make_images
from test_vispruner import _kept_per_view
from vision_reference import tower_views

import tokencomp as tc
from tokencomp.strategy import NEWLINE, VISUAL


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]


def hired_image(bottom: torch.Tensor, first: torch.Tensor, ratio: float, alpha: float) -> list[list[int]]:
    """One image's kept patches per view (sorted), as the released selection: ``bottom`` (P, N) the
    views' CLS attention (heads summed) at the selecting layer, ``first`` (N,) the thumbnail's at
    the first layer."""
    views, n = bottom.shape
    if views == 1:
        return [sorted(_top(bottom[0], min(n, int(n * ratio))))]
    total = int(views * n * ratio)
    full = min(int(total * alpha), n)
    shared = min(total - full, (views - 1) * n)
    kept = [sorted(_top(bottom[0], full))]
    budgets = [0] * (views - 1)
    if shared > 0:
        marked = torch.zeros(n, dtype=torch.bool)
        marked[_top(first, int(n * (1 - alpha)))] = True
        per_crop = marked.reshape(views - 1, -1).sum(-1)
        budgets = ((per_crop / per_crop.sum()) * shared).int().clamp(max=n).tolist()
    return kept + [sorted(_top(bottom[1 + j], b)) for j, b in enumerate(budgets)]


@pytest.mark.parametrize("ratio,alpha", [(0.2, 0.5), (0.35, 0.3), (0.5, 0.8), (0.1, 0.0)])
def test_hired_matches_reference(model, images, ratio, alpha):
    """Per view the reference's patches (crops: those inside the unpadded window), crop tokens in
    raster order of the combined crop grid, no newline tokens."""
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("hired", ratio=ratio, alpha=alpha)).prefill(batch)
    hf = eager_copy(model)
    with torch.no_grad():
        attn = hf.model.vision_tower(tower_views(model, batch), output_attentions=True).attentions
    bottom, first = attn[-2][:, :, 0, 1:].sum(1), attn[0][:, :, 0, 1:].sum(1)
    gh, gw = model.grid
    v = 0
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        nv = model.views_per_image(size)
        want = hired_image(bottom[v : v + nv], first[v], ratio, alpha)
        got = _kept_per_view(pre, b)
        lay = pre.input_state.layout(b)
        assert got.get(0, []) == want[0]
        if nv > 1:
            valid = model.crop_valid(size)
            for j in range(1, nv):
                assert got.get(j, []) == [p for p in want[j] if bool(valid[j - 1, p])], (b, j)
            assert int((lay["kind"] == NEWLINE).sum()) == 0
            _, cols = model.crop_grid(size)
            crop = (lay["kind"] == VISUAL) & (lay["view"] > 0)
            j, p = lay["view"][crop] - 1, lay["patch"][crop]
            place = ((j // cols) * gh + p // gw) * cols * gw + (j % cols) * gw + p % gw
            assert place.tolist() == sorted(place.tolist())
        v += nv


def test_hired_on_llava15_keeps_the_ratio_and_is_batch_independent(models, images):
    model = models["llava"]
    engine = tc.Engine(model, tc.method("hired", ratio=0.3))
    pre, alone = batch_and_alone(engine, model, images, PROMPTS)
    assert pre.record.tokens_per_view == [[[int(36 * 0.3)]]] * 3
    for b, one in enumerate(alone):
        assert _kept_per_view(pre, b) == _kept_per_view(one, 0)


def test_hired_next_batch_independent_and_alpha_one_keeps_no_crop(models, images):
    model = models["llava-next"]
    engine = tc.Engine(model, tc.method("hired", ratio=0.3, alpha=0.6))
    pre, alone = batch_and_alone(engine, model, images, PROMPTS, new_tokens=2)
    for b, one in enumerate(alone):
        assert _kept_per_view(pre, b) == _kept_per_view(one, 0)
    one = tc.Engine(model, tc.method("hired", ratio=0.3, alpha=1.0)).prefill(tc.prepare(model, images[:1], PROMPTS[:1]))
    assert one.record.tokens_per_view[0][0][1:] == [0] * (len(one.record.tokens_per_view[0][0]) - 1)


def test_hired_refuses_a_tower_without_cls():
    from tokencomp.tiny import tiny_llava

    model = tc.Model(*tiny_llava("llava", seed=3, vision="siglip"))
    with pytest.raises(tc.UnsupportedModelError, match="no CLS token"):
        tc.Engine(model, tc.method("hired")).prefill(tc.prepare(model, make_images([(60, 100)]), PROMPTS[:1]))
