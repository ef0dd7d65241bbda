"""Vision-stage strategies: custom policies, selection/pooling bookkeeping, NeXT re-assembly."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_inputs, make_images

import tokencomp as tc
from tokencomp.strategy import NEWLINE, VISUAL


@tc.register("_test-keep-brightest")
class KeepBrightest(tc.VisionStrategy):
    budget: int = 64

    def select(self, view: tc.VisionView) -> torch.Tensor:
        return view.features.norm(dim=-1).topk(self.budget, dim=-1).indices


def test_custom_policy_keeps_exactly_its_tokens(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("_test-keep-brightest", budget=5)).prefill(batch)
    # independent: the vision tower's second-to-last hidden state, computed by the HF model
    pix = batch.pixel_values
    with torch.no_grad():
        feats = model.hf.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        ref_idx = feats.norm(dim=-1).topk(5, dim=-1).indices.sort(dim=-1).values
        ref_tokens = model.projector(torch.gather(feats, 1, ref_idx[..., None].expand(-1, -1, feats.shape[-1])))
    st = pre.input_state
    for b in range(3):
        vis = st.valid[b] & (st.kind[b] == VISUAL)
        assert st.patch[b][vis].tolist() == ref_idx[b].tolist()
        torch.testing.assert_close(st.hidden[b][vis], ref_tokens[b], rtol=1e-5, atol=1e-5)
    assert pre.record.visual_tokens_llm == [5, 5, 5]
    assert tc.available_methods().count("_test-keep-brightest") == 1


def test_next_selection_of_every_token_equals_identity(models, images):
    """Random selection of all N tokens per view goes through the index path (placing tokens back
    on the crop grid, unpadding, newlines); pooling to N goes through the grid path. Both must
    equal the unmodified model."""
    model = models["llava-next"]
    n = model.patches_per_view
    batch = tc.prepare(model, images, PROMPTS)
    with torch.no_grad():
        ref = model.hf(**hf_inputs(batch)).logits[:, -1].float()
    for strat in (tc.method("random", budget=n), tc.method("pool", budget=n)):
        pre = tc.Engine(model, strat).prefill(batch)
        torch.testing.assert_close(pre.logits, ref, rtol=1e-4, atol=1e-4)


def test_next_token_accounting_and_newlines(models, images):
    model = models["llava-next"]
    batch = tc.prepare(model, images, PROMPTS)
    budget = 7
    pre = tc.Engine(model, tc.method("random", budget=budget)).prefill(batch)
    st = pre.input_state
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        valid_per_crop = model.crop_valid(size).sum(1)
        expected = budget + int(valid_per_crop.clamp(max=budget).sum())
        assert pre.record.visual_tokens_llm[b] == expected
        rows, cols, r0, height, c0, width = model.crop_region(size)
        assert int((st.kind[b] == NEWLINE).sum()) == height  # policy "keep": one per unpadded row
        # crop tokens come in raster order of the combined grid, each row closed by a newline
        off = st.orig_index[b][st.valid[b] & (st.kind[b] >= VISUAL)]
        assert bool((off[budget:][1:] > off[budget:][:-1]).all())


def test_vision_original_positions_option(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images[:1], PROMPTS[:1])
    strat = tc.method("random", budget=6, seed=1)
    pre = tc.Engine(model, strat, tc.EngineOptions(vision_positions="original")).prefill(batch)
    st = pre.input_state
    assert torch.equal(st.positions[0], st.orig_index[0])
    gap = int(st.positions[0, -1]) - (st.positions.shape[1] - 1)
    assert gap == model.patches_per_view - 6
    pre2 = tc.Engine(model, strat).prefill(batch)
    assert pre2.input_state.positions[0].tolist() == list(range(pre2.input_state.positions.shape[1]))
    # merged tokens (no single source) are spread over the image's span; kept patches keep their place
    opts = tc.EngineOptions(vision_positions="original")
    st = tc.Engine(model, tc.method("visionzip", dominant=4, contextual=3), opts).prefill(batch).input_state
    img = st.kind[0] == VISUAL
    src, pos = st.orig_index[0][img], st.positions[0][img]
    start = int(st.orig_index[0][img & (st.orig_index[0] >= 0)].min()) - int(
        st.patch[0][img & (st.patch[0] >= 0)].min()
    )
    assert (src >= 0).sum() == 3 and (src < 0).sum() == 4  # CLS and contextual tokens have no single source
    assert torch.equal(pos[src >= 0], src[src >= 0])
    n = model.patches_per_view
    assert pos[src < 0].tolist() == [start + j * n // 4 for j in range(4)]


def test_multi_image_prompt_llava(models):
    model = models["llava"]
    ims = make_images([(50, 50), (70, 40), (30, 90)], seed=5)
    prompts = ["USER : <image> and <image> which is red ? ASSISTANT :", "USER : <image> what ? ASSISTANT :"]
    images = [[ims[0], ims[1]], ims[2]]
    batch = tc.prepare(model, images, prompts)
    with torch.no_grad():
        ref = model.hf(**hf_inputs(batch)).logits[:, -1].float()
    pre = tc.Engine(model).prefill(batch)
    torch.testing.assert_close(pre.logits, ref, rtol=1e-4, atol=1e-4)
    out = tc.generate(model, images, prompts, method=tc.method("random", budget=4), max_new_tokens=2)
    assert out.record.visual_tokens_in == [72, 36]
    assert out.record.visual_tokens_llm == [8, 4]
    # a sample alone gives the same tokens as in the batch (different keep counts per sample)
    alone = tc.generate(model, [images[0]], prompts[:1], method=tc.method("random", budget=4), max_new_tokens=2)
    assert alone.tokens[0] == out.tokens[0]


def test_token_layout_records_views(models, images):
    model = models["llava-next"]
    batch = tc.prepare(model, images, PROMPTS)
    for strat in (None, tc.method("random", budget=5), tc.method("pool", budget=4)):
        pre = tc.Engine(model, strat).prefill(batch)
        for b, im in enumerate(images):
            lay = pre.input_state.layout(b)
            rows, cols = model.crop_grid((im.size[1], im.size[0]))
            vis = lay["kind"] == VISUAL
            views = lay["view"][vis]
            assert views.min() == 0 and views.max() == rows * cols
            assert bool((lay["view"][lay["kind"] == NEWLINE] == -1).all())
            assert bool((lay["image"][vis] == 0).all()) and bool(
                (lay["image"][~vis & (lay["kind"] != NEWLINE)] == -1).all()
            )
            if strat is None or strat.name == "random":
                # selected tokens carry their patch index; the thumbnail comes first, in raster order
                thumb = lay["patch"][vis][views == 0]
                assert bool((thumb[1:] > thumb[:-1]).all())


def test_multi_image_prompt_llava_next(models):
    model = models["llava-next"]
    ims = make_images([(50, 90), (80, 40)], seed=6)
    prompts = ["USER : <image> and <image> which is red ? ASSISTANT :"]
    batch = tc.prepare(model, [ims], prompts)
    with torch.no_grad():
        ref = model.hf(**hf_inputs(batch)).logits[:, -1].float()
    torch.testing.assert_close(tc.Engine(model).prefill(batch).logits, ref, rtol=1e-4, atol=1e-4)


def test_tokens_per_view_counts_empty_views(models, images):
    """A view that keeps nothing still appears (as 0) in the per-view accounting."""
    model = models["llava-next"]

    @tc.register("_test-thumbnail-only")
    class ThumbOnly(tc.VisionStrategy):
        def select(self, view):
            return [torch.arange(3) if int(r) == 0 else torch.arange(0) for r in view.role]

    pre = tc.Engine(model, ThumbOnly()).prefill(tc.prepare(model, images, PROMPTS))
    for b, im in enumerate(images):
        nv = model.views_per_image((im.size[1], im.size[0]))
        assert pre.record.tokens_per_view[b] == [[3] + [0] * (nv - 1)]


def test_next_pooled_grid_unpads_the_image_content(models):
    """The unpadded window of any crop token grid is the image content: the image, resized to fit
    the canvas of square crops, fills a fraction ``min(1, aspect ratio / canvas aspect ratio)`` of
    each axis, centred. transformers' ``unpad_image`` assumes square tokens, so on a non-square
    pooled grid (8 x 16) it would trim by the wrong aspect ratio."""
    model = models["llava-next"]
    gh, gw = model.grid
    sizes = [(100, 60), (60, 100), (50, 90), (80, 40), (40, 40), (30, 200), (200, 30)]
    for h, w in sizes:
        rows, cols = model.crop_grid((h, w))
        content = (min(1.0, (h / w) * (cols / rows)), min(1.0, (w / h) * (rows / cols)))
        for grid in [(gh, gw), (gh // 2, gw), (gh, gw // 2), (gh // 2, gw // 2), (gh // 3, gw // 2)]:
            _, _, r0, height, c0, width = model.crop_region((h, w), grid)
            for axis, (start, kept, n) in enumerate([(r0, height, rows * grid[0]), (c0, width, cols * grid[1])]):
                assert abs(kept - content[axis] * n) <= 1.5, ((h, w), grid, axis)  # rounding, then halving the pad
                assert abs(start - (n - kept) / 2) <= 0.5, ((h, w), grid, axis)  # centred
    # end to end: the LLM receives the thumbnail's pooled grid, then the crops' window, a newline per row
    images = make_images(sizes[:3], seed=3)
    grid = (gh // 2, gw)
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("pool", budget=grid[0] * grid[1], grid=grid)).prefill(batch)
    for b, im in enumerate(images):
        _, _, _, height, _, width = model.crop_region((im.size[1], im.size[0]), grid)
        assert pre.record.visual_tokens_llm[b] == grid[0] * grid[1] + height * width
        assert int((pre.input_state.kind[b] == NEWLINE).sum()) == height


def test_random_draws_per_image_and_is_stable_in_a_batch(models):
    """``random`` draws a different token set for each image, the same for an image alone, twice in
    a batch or padded among NeXT images with more crops; ``draw="fixed"`` keeps one mask for all."""
    for family in ("llava", "llava-next"):
        model = models[family]
        ims = make_images([(60, 100), (100, 70), (90, 90)], seed=8)
        images = [ims[0], ims[1], ims[2], ims[0]]
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[1]]

        def kept(strat, imgs, prm, model=model):
            st = tc.Engine(model, strat).prefill(tc.prepare(model, imgs, prm)).input_state
            return [st.layout(b)["patch"][st.layout(b)["view"] == 0].tolist() for b in range(len(imgs))]

        got = kept(tc.method("random", budget=6), images, prompts)
        assert got[0] == got[3]  # the same image, twice in one batch
        assert len({tuple(g) for g in got[:3]}) == 3  # three images, three draws
        assert kept(tc.method("random", budget=6), [ims[1]], [PROMPTS[2]])[0] == got[1]  # alone
        assert kept(tc.method("random", budget=6, seed=1), images[:1], prompts[:1])[0] != got[0]
        fixed = kept(tc.method("random", budget=6, draw="fixed"), images, prompts)
        assert all(f == fixed[0] for f in fixed)
    with pytest.raises(tc.TokencompError, match="draw must be"):
        tc.method("random", draw="each")


def test_next_text_only_prompts_and_extreme_aspect_ratios(models):
    """LLaVA-NeXT serves prompts without images, and images so narrow that unpadding keeps no crop
    column (only newline tokens), as the unmodified model does."""
    model = models["llava-next"]
    out = tc.generate(model, [None, None], ["USER : how many ? ASSISTANT :", "USER : what ? ASSISTANT :"])
    ref = tc.generate(models["llava-next"], [None], ["USER : how many ? ASSISTANT :"])
    assert out.tokens[0] == ref.tokens[0] and out.record.visual_tokens_llm == [0, 0]
    ims = make_images([(290, 17), (17, 290)], seed=9)
    for im in ims:
        size = (im.size[1], im.size[0])
        _, _, _, height, _, width = model.crop_region(size)
        assert height * width == 0 and model.image_token_count(size) == model.patches_per_view + height * (width + 1)
    batch = tc.prepare(model, ims, PROMPTS[:2])
    with torch.no_grad():
        hf_logits = model.hf(**hf_inputs(batch)).logits[:, -1].float()
    torch.testing.assert_close(tc.Engine(model).prefill(batch).logits, hf_logits, rtol=1e-4, atol=1e-4)


def test_select_may_pad_rows_with_minus_one(models, images):
    """A batched selection with a different count per view pads its rows with -1: the same tokens
    as the list of index tensors; a -1 before an index, an index outside [0, N), one given twice
    in a view, or indices that are not integers are refused."""
    model = models["llava-next"]
    batch = tc.prepare(model, images, PROMPTS)

    def top(view):  # per view a different count, valid tokens only
        score = view.features.norm(dim=-1).masked_fill(~view.valid, -1)
        k = [min(2 + v % 5, int(view.valid[v].sum())) for v in range(view.num_views)]
        return score, k

    class AsList(tc.VisionStrategy):
        def select(self, view):
            score, k = top(view)
            return [score[v].topk(k[v]).indices for v in range(view.num_views)]

    class Padded(tc.VisionStrategy):
        shift = 0  # rolls each row: its -1 padding comes first
        offset = 0  # added to every index

        def select(self, view):
            score, k = top(view)
            idx = score.topk(max(k), dim=-1).indices + self.offset
            pad = torch.arange(max(k))[None] >= torch.tensor(k)[:, None]
            return idx.masked_fill(pad, -1).roll(self.shift, dims=1)

    want = tc.Engine(model, AsList()).prefill(batch)
    got = tc.Engine(model, Padded()).prefill(batch)
    assert got.record.tokens_per_view == want.record.tokens_per_view
    assert len({v for views in want.record.tokens_per_view for im in views for v in im}) > 2
    for f in ("hidden", "valid", "kind", "patch", "orig_index"):
        assert torch.equal(getattr(got.input_state, f), getattr(want.input_state, f)), f
    with pytest.raises(ValueError, match="before its last index"):
        tc.Engine(model, type("Rolled", (Padded,), {"shift": 1})()).prefill(batch)
    with pytest.raises(ValueError, match=rf"outside \[0, {model.patches_per_view}\)"):
        tc.Engine(model, type("Beyond", (Padded,), {"offset": model.patches_per_view})()).prefill(batch)

    for negative in (-1, -2):  # in a list, no negative index is padding: outside [0, N)

        class ListWithNegative(AsList):
            value = negative

            def select(self, view):
                return [torch.cat([i, i.new_full((1,), self.value)]) for i in super().select(view)]

        with pytest.raises(ValueError, match="outside"):
            tc.Engine(model, ListWithNegative()).prefill(batch)

    class Repeated(AsList):  # the first index twice in every view: a policy bug, not a selection
        def select(self, view):
            return [torch.cat([i, i[:1]]) for i in super().select(view)]

    class Floats(Padded):
        def select(self, view):
            return super().select(view).float()

    with pytest.raises(ValueError, match="an index twice in one view"):
        tc.Engine(model, Repeated()).prefill(batch)
    with pytest.raises(ValueError, match="must return integer indices, got torch.float32"):
        tc.Engine(model, Floats()).prefill(batch)
