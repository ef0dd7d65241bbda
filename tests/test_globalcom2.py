"""GlobalCom² against a loop reference written from the specification (eager projections)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, eager_copy, make_images
from vision_reference import cls_logits_head_mean, globalcom2_image, tower_views

import tokencomp as tc
from tokencomp.strategy import NEWLINE, VISUAL


@pytest.mark.parametrize("ratio", [0.25, 0.1, 0.6, 1.0])
@pytest.mark.parametrize("newline_rows", ["model", "code"])
def test_globalcom2_matches_reference(models, ratio, newline_rows):
    model = models["llava-next"]
    images = make_images([(60, 100), (100, 70), (90, 90), (83, 61)], seed=2)  # 1x2, 2x1, 2x2 grids, odd sizes
    prompts = PROMPTS + [PROMPTS[0]]
    batch = tc.prepare(model, images, prompts)
    pre = tc.Engine(model, tc.method("globalcom2", ratio=ratio, newline_rows=newline_rows)).prefill(batch)
    hf = eager_copy(model)
    pix = tower_views(model, batch)
    scores, feats = cls_logits_head_mean(hf, pix)
    v = 0
    grids = set()
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        nv = model.views_per_image(size)
        crops = model.crop_grid(size)
        grids.add(crops)
        ref = globalcom2_image(scores[v : v + nv], model.grid, crops, model.crop_valid(size), ratio)
        lay = pre.input_state.layout(b)
        vis = lay["kind"] == VISUAL
        # thumbnail: descending score; crops: raster order on the combined grid, per view
        assert lay["patch"][vis & (lay["view"] == 0)].tolist() == ref[0]
        for c in range(1, nv):
            assert sorted(lay["patch"][vis & (lay["view"] == c)].tolist()) == ref[c]
        # tokens equal the projected features of the reference selection (thumbnail part)
        st = pre.input_state
        got = st.hidden[b][st.valid[b]][vis & (lay["view"] == 0)]
        with torch.no_grad():
            torch.testing.assert_close(got, model.projector(feats[v][ref[0]]), rtol=1e-4, atol=1e-5)
        # promised token count and newlines
        assert pre.record.visual_tokens_llm[b] == sum(len(r) for r in ref)
        assert pre.record.tokens_per_view[b] == [[len(r) for r in ref]]  # thumbnail, then each crop
        rows, cols, r0, height, c0, width = model.crop_region(size)
        n_newline = int((lay["kind"] == NEWLINE).sum())
        assert n_newline == (height if newline_rows == "model" else rows * model.grid[0])
        v += nv
    assert {(1, 2), (2, 1), (2, 2)} <= grids


def test_globalcom2_needs_crops_and_valid_ratio(models, images):
    with pytest.raises(tc.UnsupportedModelError, match="GlobalCom² allocates tokens over LLaVA-NeXT crops.*'llava'"):
        tc.generate(models["llava"], images[:1], PROMPTS[:1], method=tc.method("globalcom2"))
    for bad in (0, 1.5, -0.1):
        with pytest.raises(tc.BudgetError, match="ratio"):
            tc.method("globalcom2", ratio=bad)


def test_crop_retention_formula():
    from tokencomp.methods.globalcom2 import crop_retention

    s = torch.tensor([10.0, 0.0, -30.0, 5.0])
    r = crop_retention(s, 0.25, 10.0)
    sigma = torch.softmax(s / 10.0, 0)
    torch.testing.assert_close(r, (0.25 * (1 + sigma - 0.25)).clamp(max=1), rtol=1e-6, atol=1e-6)
    assert float(crop_retention(torch.tensor([100.0, 0.0]), 0.9, 1.0)[0]) == 1.0  # upper clip


def test_globalcom2_images_whose_crops_unpad_to_nothing(models):
    """Images so narrow that unpadding keeps no crop column (or row): the thumbnail keeps its top
    int(N R), the crops nothing, and the newlines are those of the unmodified model."""
    model = models["llava-next"]
    images = make_images([(290, 17), (17, 290), (60, 100)], seed=9)
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("globalcom2", ratio=0.25)).prefill(batch)
    scores, _ = cls_logits_head_mean(eager_copy(model), tower_views(model, batch))
    v, n = 0, model.patches_per_view
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        rows, cols, _, height, _, width = model.crop_region(size)
        lay = pre.input_state.layout(b)
        thumb = lay["patch"][(lay["kind"] == VISUAL) & (lay["view"] == 0)]
        assert thumb.tolist() == scores[v].topk(int(n * 0.25)).indices.tolist()
        assert int((lay["kind"] == NEWLINE).sum()) == height
        if b < 2:
            assert height * width == 0
            assert pre.record.tokens_per_view[b] == [[int(n * 0.25)] + [0] * (rows * cols)]
        v += model.views_per_image(size)


def test_globalcom2_refuses_views_its_crop_grids_do_not_account_for():
    n = 16
    view = tc.VisionView(
        features=torch.randn(3, n, 4),
        cls=torch.randn(3, 4),  # a CLS tower: its CLS logits are read
        grid=(4, 4),
        valid=torch.ones(3, n, dtype=torch.bool),
        role=torch.tensor([0, 1, 0]),
        image=torch.tensor([0, 0, 1]),
        key=torch.zeros(3, dtype=torch.long),
        crop_grid=[(1, 1)],  # one image of two views: the third view belongs to none
        crop_window=[(0, 4, 0, 4)],
        captures={tc.Need("vision_cls_logits", -1): torch.randn(3, 2, 1 + n)},
    )
    with pytest.raises(tc.TokencompError, match="do not account for the 3 views"):
        tc.method("globalcom2").compress(view)
    view.crop_grid.append((0, 0))
    view.crop_window.append((0, 0, 0, 0))
    out = tc.method("globalcom2", ratio=0.25).compress(view)
    assert out.count.tolist() == [4, 4, 4]  # the thumbnails int(N R); the crop int(N r_1) with r_1 = R
