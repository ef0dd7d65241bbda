"""VisionZip against a reference written from the specification on eager attentions."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, eager_copy
from vision_reference import eager_tower, tower_views, visionzip_view

import tokencomp as tc
from tokencomp.strategy import VISUAL


def _reference_sequence(model, batch, dominant, contextual, merge="code"):
    """Per image, the visual tokens (in LM space) the released code feeds to the LLM."""
    hf = eager_copy(model)
    pix = tower_views(model, batch)
    hidden, attn, keys = eager_tower(hf, pix, -2)
    per_view = [visionzip_view(hidden[v], attn[v], keys[v], dominant, contextual, merge) for v in range(len(pix))]
    images, v = [], 0
    sizes = batch.image_sizes.tolist() if batch.image_sizes is not None else [None] * batch.pixel_values.shape[0]
    gh, gw = model.grid
    for size in sizes:
        nv = 1 if size is None else model.views_per_image(tuple(size))
        toks, kept = per_view[v]
        seq, patches = [toks], [-1, *kept] + [-1] * contextual
        if nv > 1:
            rows, cols = model.crop_grid(tuple(size))
            placed, cls, ctx = [], [], []
            for j in range(nv - 1):
                t, kp = per_view[v + 1 + j]
                for p, tok in zip(kp, t[1:dominant]):
                    r, c = (j // cols) * gh + p // gw, (j % cols) * gw + p % gw
                    placed.append((r * cols * gw + c, tok, p))
                cls.append(t[0])
                ctx += list(t[dominant:])
            placed.sort(key=lambda e: e[0])
            seq += [torch.stack([e[1] for e in placed]), torch.stack(cls)] + ([torch.stack(ctx)] if ctx else [])
            patches += [e[2] for e in placed] + [-1] * (len(cls) + len(ctx))
        images.append((model.projector(torch.cat(seq)), patches))
        v += nv
    return images


@pytest.mark.parametrize("budget,split", [(12, (10, 2)), (20, None), (37, (37, 0)), (8, (8, 0)), (9, (3, 6))])
def test_visionzip_matches_reference(model, images, budget, split):
    dominant, contextual = split or tc.method("visionzip", budget=budget).split()
    strat = (
        tc.method("visionzip", budget=budget)
        if split is None
        else tc.method("visionzip", dominant=dominant, contextual=contextual)
    )
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, strat).prefill(batch)
    with torch.no_grad():
        ref = _reference_sequence(model, batch, dominant, contextual)
    for b, (tokens, patches) in enumerate(ref):
        lay = pre.input_state.layout(b)
        vis = lay["kind"] == VISUAL
        assert lay["patch"][vis].tolist() == patches
        got = pre.input_state.hidden[b][pre.input_state.valid[b]][vis]
        torch.testing.assert_close(got, tokens, rtol=1e-4, atol=1e-5)
        views = model.views_per_image((images[b].size[1], images[b].size[0]))
        assert pre.record.visual_tokens_llm[b] == views * (dominant + contextual)
        assert pre.record.tokens_per_view[b] == [[dominant + contextual] * views]  # the promise, per view


def test_visionzip_paper_average_option(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("visionzip", dominant=6, contextual=4, merge="average")).prefill(batch)
    with torch.no_grad():
        ref = _reference_sequence(model, batch, 6, 4, merge="average")
    for b, (tokens, _) in enumerate(ref):
        st = pre.input_state
        got = st.hidden[b][st.valid[b]][st.layout(b)["kind"] == VISUAL]
        torch.testing.assert_close(got, tokens, rtol=1e-4, atol=1e-5)


def test_visionzip_next_model_layout_keeps_unpadding_and_newlines(models, images):
    model = models["llava-next"]
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("visionzip", dominant=8, contextual=3, next_layout="model")).prefill(batch)
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        lay = pre.input_state.layout(b)
        rows, cols, r0, height, c0, width = model.crop_region(size)
        assert int((lay["kind"] == 3).sum()) == height
        placed = lay["patch"][(lay["view"] > 0) & (lay["patch"] >= 0)]
        valid = model.crop_valid(size)
        view = lay["view"][(lay["view"] > 0) & (lay["patch"] >= 0)] - 1
        assert bool(valid[view, placed].all())  # nothing outside the unpadded window


def test_visionzip_budget_errors(model, images):
    n = model.patches_per_view
    with pytest.raises(tc.BudgetError, match=rf"budget.*={n + 2} is outside the allowed range \[2, {n + 1}\]"):
        tc.generate(model, images[:1], PROMPTS[:1], method=tc.method("visionzip", budget=n + 2))
    with pytest.raises(tc.BudgetError, match=r"contextual=40 is outside the allowed range \[0, 31\]"):
        tc.generate(model, images[:1], PROMPTS[:1], method=tc.method("visionzip", dominant=6, contextual=40))
    with pytest.raises(tc.BudgetError, match="give both"):
        tc.method("visionzip", dominant=5)
    assert tc.method("visionzip", budget=192).split() == (162, 30)
    assert tc.method("visionzip", budget=32).split() == (27, 5)


def test_visionzip_ties_are_deterministic(models):
    """Equal CLS attention everywhere: a valid, repeatable selection."""
    strat = tc.method("visionzip", dominant=5, contextual=2)
    n, d = 16, 4
    feats = torch.randn(2, n, d)
    view = tc.VisionView(
        features=feats,
        cls=torch.randn(2, d),
        grid=(4, 4),
        valid=torch.ones(2, n, dtype=torch.bool),
        role=torch.zeros(2, dtype=torch.long),
        image=torch.arange(2),
        key=torch.zeros(2, dtype=torch.long),
        crop_grid=[(0, 0), (0, 0)],
        captures={
            tc.Need("vision_cls_attention", -2): torch.full((2, 2, n + 1), 1.0 / (n + 1)),
            tc.Need("vision_keys", -2): torch.randn(2, n + 1, 3),
        },
    )
    a, b = strat.compress(view), strat.compress(view)
    assert torch.equal(a.index, b.index) and torch.equal(a.features, b.features)
    kept = a.index[:, 1:5]
    assert all(len(set(row.tolist())) == 4 for row in kept)
    assert bool((kept[:, 1:] > kept[:, :-1]).all())
