"""LLaVA-OneVision (SigLIP tower without CLS, Qwen2 decoder, AnyRes with anyres_max resizing,
base-only images in prompts of several) through the same engine: identity equals Hugging Face."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_inputs, make_images

import tokencomp as tc
from tokencomp.families import ImageSize
from tokencomp.strategy import VISUAL
from tokencomp.tiny import tiny_llava

# (height, width): wide, tall, square, and one whose 3x4 crop grid is resized by anyres_max_9
SIZES = [(60, 100), (100, 70), (300, 400)]


@pytest.fixture(scope="module")
def model():
    hf, proc = tiny_llava("llava-onevision", image_size=42, patch_size=7, seed=1, decoder="qwen2")
    return tc.Model(hf, proc)


@pytest.fixture(scope="module")
def images():
    return make_images(SIZES)


def _inputs(batch: tc.Batch) -> dict:
    return {**hf_inputs(batch), "batch_num_images": batch.batch_num_images}


def test_the_resize_path_is_taken(model):
    _, _, _, height, _, width = model.crop_region(ImageSize(300, 400))
    assert model.layout.resized(height, width) != (height, width)
    _, _, _, height, _, width = model.crop_region(ImageSize(60, 100))
    assert model.layout.resized(height, width) == (height, width)


def test_identity_forward_generate_and_batch(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    assert bool((batch.attention_mask == 0).any())
    pre = tc.Engine(model).prefill(batch, all_logits=True)
    with torch.no_grad():
        ref = model.hf(**_inputs(batch)).logits
    torch.testing.assert_close(pre.logits[pre.state.valid], ref[batch.attention_mask.bool()], rtol=1e-4, atol=1e-4)
    tokens, _ = tc.Engine(model).generate(batch, max_new_tokens=12, eos_token_id=None)
    with torch.no_grad():
        g = model.hf.generate(
            **_inputs(batch), max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None
        )
    assert tokens == g[:, batch.input_ids.shape[1] :].tolist()
    for i in range(3):
        one, p1 = tc.Engine(model).generate(tc.prepare(model, [images[i]], [PROMPTS[i]]), 12, eos_token_id=None)
        assert one[0] == tokens[i]
        torch.testing.assert_close(p1.logits[0], pre.logits[i, -1], rtol=1e-4, atol=1e-4)  # left padded


def test_several_images_in_a_prompt_are_base_views(model, images):
    prompts = ["USER : <image> <image> what color ? ASSISTANT :", "USER : <image> how many ? ASSISTANT :"]
    batch = tc.prepare(model, [[images[0], images[2]], [images[1]]], prompts)
    assert batch.batch_num_images.tolist() == [2, 1]
    pre = tc.Engine(model).prefill(batch, all_logits=True)
    with torch.no_grad():
        ref = model.hf(**_inputs(batch)).logits
    torch.testing.assert_close(pre.logits[pre.state.valid], ref[batch.attention_mask.bool()], rtol=1e-4, atol=1e-4)
    n = model.patches_per_view
    assert pre.record.visual_tokens_in[0] == 2 * (n + 1)  # each image: its base view and one newline


def test_token_record_after_resizing(model, images):
    """A resized crop token has no single source patch; its view is the crop under its centre and
    its offset its place in the resized grid (each row closed by a newline)."""
    pre = tc.Engine(model).prefill(tc.prepare(model, [images[2]], [PROMPTS[0]]))
    lay = pre.state.layout(0)
    n = model.patches_per_view
    img = lay["image"] == 0
    crops = img & (lay["orig_index"] >= 0) & (lay["view"] > 0)
    assert (lay["patch"][crops] == -1).all()
    rows, cols = model.crop_grid(ImageSize(300, 400))
    assert set(lay["view"][crops].tolist()) == set(range(1, rows * cols + 1))
    _, _, _, height, _, width = model.crop_region(ImageSize(300, 400))
    h2, w2 = model.layout.resized(height, width)
    assert int(img.sum()) == n + h2 * (w2 + 1) == model.image_token_count(ImageSize(300, 400))


def test_in_llm_methods_serve_and_cls_methods_are_refused_before_work(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    for method in (tc.method("fastv", k=2, ratio=0.5), tc.method("freeze", layers=(1, 2))):
        engine = tc.Engine(model, method)
        tokens, pre = engine.generate(batch, max_new_tokens=4, eos_token_id=None)
        for i in range(3):
            one, _ = engine.generate(tc.prepare(model, [images[i]], [PROMPTS[i]]), 4, eos_token_id=None)
            assert one[0] == tokens[i]
    calls = []
    handle = model.vision_model.embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for name in ("prumerge", "prumerge+"):  # PruMerge ranks by the CLS query: SigLIP has none
            with pytest.raises(tc.UnsupportedModelError, match="no CLS token"):
                tc.Engine(model, tc.method(name)).prefill(batch)
    finally:
        handle.remove()
    assert calls == []


def test_a_saved_checkpoint_loads_and_generates(model, images, tmp_path, capsys):
    from tokencomp.cli import main

    model.hf.save_pretrained(tmp_path)
    model.processor.image_processor.save_pretrained(tmp_path)
    model.processor.tokenizer.save_pretrained(tmp_path)
    loaded = tc.load_model(tmp_path)
    assert loaded.family == "llava-onevision"
    a = tc.generate(loaded, [images[2]], PROMPTS[:1], max_new_tokens=4)
    b = tc.generate(model, [images[2]], PROMPTS[:1], max_new_tokens=4)
    assert a.tokens == b.tokens
    image = tmp_path / "image.png"
    images[2].save(image)
    assert main(["generate", "--model", str(tmp_path), "--image", str(image), "--prompt", "what ?"]) == 0
    # the prompt's 351 image tokens are 336 visual + 15 newline tokens: the identity keeps them all
    assert (
        "image tokens 351 in the prompt (newlines included) -> 336 visual + 15 newline tokens"
        in capsys.readouterr().err
    )
    # the same counts enter the LLM under DivPrune, which prunes them at its input (tokens per layer)
    argv = ["generate", "--model", str(tmp_path), "--image", str(image), "--prompt", "what ?", "--method", "divprune"]
    assert main([*argv, "--budget", "20"]) == 0
    err = capsys.readouterr().err
    assert "-> 336 visual + 15 newline tokens into the LLM" in err


def test_fastv_and_a_frozen_layer_match_references(model, images):
    """FastV equals the conformance matrix's reference (ranked from eager maps, the kept tokens run
    by a fresh Hugging Face decoder), and a frozen layer equals HF with that layer's image tokens
    passed through, on OneVision prompts (one resized)."""
    from test_conformance import _eager, _frozen_reference, check_fastv

    eager = _eager(model)
    for i in (0, 2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        check_fastv(model, eager, batch, _inputs(batch))
        frozen = tc.Engine(model, tc.method("freeze", layers=(1,))).prefill(batch)
        ref = _frozen_reference(model, _inputs(batch), 1)
        torch.testing.assert_close(frozen.logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "method",
    [None, "fastv", "freeze", "visionzip", "globalcom2", "pool", "divprune", "vispruner", "tome", "downsample"],
)
def test_analytic_flops_match_flop_counter(method, images):
    """The profiler counts OneVision exactly (SigLIP tower without CLS, the projector on every view,
    the decoder over the resized prompt): equal to torch's FlopCounterMode under eager attention.
    The bilinear resize is element-wise work, which the FLOPs convention leaves out."""
    from test_profiler import rope_table_flops
    from torch.utils.flop_counter import FlopCounterMode

    from tokencomp.profiler import run_flops

    hf, proc = tiny_llava("llava-onevision", image_size=42, patch_size=7, seed=1, decoder="qwen2")
    hf.set_attn_implementation("eager")
    eager = tc.Model(hf, proc)
    strat = {
        None: None,
        "fastv": tc.method("fastv", k=2, ratio=0.5),
        "freeze": tc.method("freeze", layers=(1, 2)),
        "visionzip": tc.method("visionzip", dominant=12, contextual=4),
        "globalcom2": tc.method("globalcom2", ratio=0.3),
        "pool": tc.method("pool", budget=9),
        "divprune": tc.method("divprune", budget=20),
        "vispruner": tc.method("vispruner", budget=20, important_ratio=0.5),
        "tome": tc.method("tome", budget=10),
        "downsample": tc.method("downsample", budget=16),
    }
    engine = tc.Engine(eager, strat[method])
    for i in (0, 2):
        batch = tc.prepare(eager, [images[i]], [PROMPTS[i]])
        with FlopCounterMode(display=False) as counter:
            _, pre = engine.generate(batch, max_new_tokens=4, eos_token_id=None)
        report = run_flops(eager, pre.record, engine.strategies)[0]
        assert report.total == pytest.approx(counter.get_total_flops() - rope_table_flops(counter), rel=1e-9)


# ------------------------------------------------------------------------------------------------
# vision-stage methods: budgets per view scaled by the anyres_max resize, against references


def _crop_grids(model, size):
    """``(rows, cols)``, the unpadded ``(height, width)`` token grid and its anyres_max resize, from
    transformers' own functions and the resize rule of ``LlavaOnevisionModel.pack_image_features``."""
    import math

    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    g = model.grid[0]
    h, w = select_best_resolution(list(size), model.pinpoints)
    rows, cols = h // model.view_size, w // model.view_size
    height, width = unpad_image(torch.empty(1, rows * g, cols * g), torch.tensor(size)).shape[1:]
    ratio = math.sqrt(height * width / (9 * g * g))  # anyres_max_9
    resized = (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)
    return (rows, cols), (height, width), resized


def _share(model, size) -> float:
    _, (height, width), (h2, w2) = _crop_grids(model, size)
    return h2 * w2 / (height * width)


def _half_up(x: float) -> int:
    return int(x + 0.5)


def test_shares_follow_the_resize(model, images):
    """The crops of the resized image give the LLM h2*w2 of their h*w tokens; the others all."""
    pre = tc.Engine(model).prefill(tc.prepare(model, images, PROMPTS))
    shares = pre.record.view_shares
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        (rows, cols), _, _ = _crop_grids(model, size)
        share = _share(model, size)
        assert shares[b] == ([[1.0] + [pytest.approx(share)] * (rows * cols)] if share < 1 else [])
    assert _share(model, (300, 400)) < 1 and _share(model, (60, 100)) == 1


@pytest.mark.parametrize("dominant,contextual", [(12, 4), (20, 0), (5, 7)])
def test_visionzip_matches_a_reference_with_scaled_crop_budgets(model, images, dominant, contextual):
    """VisionZip without CLS (mean received attention, eager), its released LLaVA-NeXT assembly
    (``next_layout="code"``: crops' dominant tokens in raster order of the combined grid, then their
    contextual tokens), crops of a resized image keeping round(budget s) tokens, round(contextual s)
    of them contextual."""
    from conftest import eager_copy
    from vision_reference import eager_tower, tower_views, visionzip_view

    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("visionzip", dominant=dominant, contextual=contextual)).prefill(batch)
    pix = tower_views(model, batch)
    hidden, attn, keys = eager_tower(eager_copy(model), pix, -2)
    gh, gw = model.grid
    v = 0
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        (rows, cols), _, _ = _crop_grids(model, size)
        s = _share(model, size)
        total = _half_up((dominant + contextual) * s)  # a crop keeps round(budget * s), contextual scaled alike
        crop = (total - min(_half_up(contextual * s), total), min(_half_up(contextual * s), total))
        split = [(dominant, contextual)] + [crop] * (rows * cols)
        with torch.no_grad():
            views = [
                visionzip_view(hidden[v + j], attn[v + j], keys[v + j], *split[j], cls=False) for j in range(len(split))
            ]
        base, kept = views[0]
        seq, patches = [base], kept + [-1] * contextual
        placed, ctx = [], []
        for j, (toks, kp) in enumerate(views[1:]):
            d = split[j + 1][0]
            for p, tok in zip(kp, toks[:d]):
                r, c = (j // cols) * gh + p // gw, (j % cols) * gw + p % gw
                placed.append((r * cols * gw + c, tok, p))
            ctx += list(toks[d:])
        placed.sort(key=lambda e: e[0])
        seq += [torch.stack([e[1] for e in placed])] + ([torch.stack(ctx)] if ctx else [])
        patches += [e[2] for e in placed] + [-1] * len(ctx)
        with torch.no_grad():
            ref = model.projector(torch.cat(seq))
        lay = pre.input_state.layout(b)
        vis = lay["kind"] == VISUAL
        assert lay["patch"][vis].tolist() == patches
        got = pre.input_state.hidden[b][pre.input_state.valid[b]][vis]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert pre.record.tokens_per_view[b] == [[sum(sp) for sp in split]]
        v += len(split)
    assert v == pix.shape[0]


@pytest.mark.parametrize("ratio", [0.25, 0.6])
def test_globalcom2_matches_a_reference_with_mean_query_scores(model, ratio):
    """GlobalCom² on OneVision: scores are the logits each token receives averaged over every
    query (eager, from the full logits), crops keep int(N_j s r_j)."""
    from conftest import eager_copy
    from vision_reference import globalcom2_image, mean_logits_head_mean, tower_views

    imgs = make_images([(300, 400), (60, 100), (100, 70)], seed=4)
    batch = tc.prepare(model, imgs, PROMPTS)
    pre = tc.Engine(model, tc.method("globalcom2", ratio=ratio)).prefill(batch)
    pix = tower_views(model, batch)
    scores, feats = mean_logits_head_mean(eager_copy(model), pix)
    v = 0
    for b, im in enumerate(imgs):
        size = (im.size[1], im.size[0])
        crops, _, _ = _crop_grids(model, size)
        nv = 1 + crops[0] * crops[1]
        valid = model.layout.crop_valid(size)
        ref = globalcom2_image(scores[v : v + nv], model.grid, crops, valid, ratio, share=_share(model, size))
        lay = pre.input_state.layout(b)
        vis = lay["kind"] == VISUAL
        assert lay["patch"][vis & (lay["view"] == 0)].tolist() == ref[0]
        for c in range(1, nv):
            assert sorted(lay["patch"][vis & (lay["view"] == c)].tolist()) == ref[c]
        got = pre.input_state.hidden[b][pre.input_state.valid[b]][vis & (lay["view"] == 0)]
        with torch.no_grad():
            torch.testing.assert_close(got, model.projector(feats[v][ref[0]]), rtol=1e-4, atol=1e-5)
        assert pre.record.tokens_per_view[b] == [[len(r) for r in ref]]
        v += nv


@pytest.mark.parametrize("mode", ["pool", "bilinear"])
def test_pooling_resizes_the_pooled_grid_by_the_models_ratio(model, images, mode):
    """Average pooling (or bilinear downsampling): each view pooled, the crops' pooled grid unpadded (transformers'
    unpad_image), then bilinearly resized by the ratio anyres_max applies to the full grid, each
    row closed by the newline: the whole image span equals this reference."""
    import math

    import torch.nn.functional as F
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method(mode, budget=9)).prefill(batch)
    gh, gw = model.grid
    with torch.no_grad():
        for b, im in enumerate(images):
            size = (im.size[1], im.size[0])
            (rows, cols), (height, width), _ = _crop_grids(model, size)
            pix = batch.pixel_values[b, : 1 + rows * cols]
            tower = model.hf.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1]
            views = tower.view(-1, gh, gw, tower.shape[-1]).permute(0, 3, 1, 2)
            if mode == "pool":
                pooled = F.adaptive_avg_pool2d(views, (3, 3))
            else:
                pooled = F.interpolate(views, (3, 3), mode="bilinear", align_corners=False)
            proj = model.projector(pooled.flatten(2).transpose(1, 2))  # (views, 9, d)
            d = proj.shape[-1]
            grid = proj[1:].view(rows, cols, 3, 3, d).permute(4, 0, 2, 1, 3).reshape(d, rows * 3, cols * 3)
            grid = unpad_image(grid, torch.tensor(size))
            ratio = math.sqrt(height * width / (9 * gh * gw))
            if ratio > 1.1:
                grid = F.interpolate(
                    grid[None], [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)], mode="bilinear"
                )[0]
            newline = model.hf.model.image_newline[:, None, None].expand(-1, grid.shape[1], 1)
            crops = torch.cat([grid, newline], dim=2).flatten(1).T
            ref = torch.cat([proj[0], crops])
            lay = pre.input_state.layout(b)
            got = pre.input_state.hidden[b][pre.input_state.valid[b]][lay["image"] >= 0]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [10, 36])
def test_random_keeps_the_scaled_budget_per_view(model, budget):
    """Crops of resized grids keep round(budget s), and no more than floor(valid s): at the full
    budget no image sends more visual tokens than the uncompressed model (one of these images has
    a resized grid with padded crops)."""
    imgs = make_images([(89, 73), (103, 128), (300, 400)], seed=5)
    batch = tc.prepare(model, imgs, PROMPTS)
    pre = tc.Engine(model, tc.method("random", budget=budget)).prefill(batch)
    identity = tc.Engine(model).prefill(batch)
    padded_and_resized = 0
    for b, im in enumerate(imgs):
        size = (im.size[1], im.size[0])
        valid = model.layout.crop_valid(size).sum(1).tolist()
        s = _share(model, size)  # at most round(budget * s), and floor(valid * s): no more than the model feeds
        want = [budget] + [min(v, _half_up(budget * s), int(v * s + 1e-9) if s < 1 else v) for v in valid]
        assert pre.record.tokens_per_view[b] == [want]
        padded_and_resized += s < 1 and min(valid) < model.patches_per_view
        lay = pre.input_state.layout(b)
        assert (lay["patch"][lay["kind"] == VISUAL] >= 0).all()
        if budget == model.patches_per_view:
            assert pre.record.visual_tokens_llm[b] <= identity.record.visual_tokens_llm[b]
    assert padded_and_resized >= 1


def test_a_vision_method_on_several_images_per_prompt_and_in_a_batch(model, images):
    """Base-only images (a prompt of two) and a single image in one padded batch: each sample as alone."""
    prompts = ["USER : <image> <image> what color ? ASSISTANT :", "USER : <image> how many ? ASSISTANT :"]
    groups = [[images[0], images[2]], [images[2]]]
    method = tc.method("visionzip", dominant=8, contextual=2)
    tokens, pre = tc.Engine(model, method).generate(tc.prepare(model, groups, prompts), 4, eos_token_id=None)
    assert pre.record.tokens_per_view[0] == [[10], [10]]
    assert pre.record.visual_tokens_llm[0] == 20
    for b in range(2):
        one, alone = tc.Engine(model, method).generate(
            tc.prepare(model, [groups[b]], [prompts[b]]), 4, eos_token_id=None
        )
        assert one[0] == tokens[b]
        assert alone.record.tokens_per_view[0] == pre.record.tokens_per_view[b]


@pytest.mark.parametrize("method", ["pdrop", "dart", "sparsevlm", "divprune"])
def test_in_llm_methods_match_their_references(model, images, method):
    """PyramidDrop, DART, SparseVLM and DivPrune on OneVision prompts (one resized) against the references the
    other families use (tests/reference.py: the unmodified Hugging Face modules, loops)."""
    import copy

    from reference import dart_reference, divprune_reference, pdrop_reference, sparsevlm_reference

    hf = copy.deepcopy(model.hf)  # DART compares final-normed states: a non-uniform norm weight
    with torch.no_grad():
        hf.model.language_model.norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    normed = tc.Model(hf, model.processor)
    for i in (0, 2):
        batch = tc.prepare(normed, [images[i]], [PROMPTS[i]])
        inputs, token = _inputs(batch), normed.image_token_id
        if method == "pdrop":
            strat = tc.method("pdrop")
            kept, ref_logits, ref_tokens = pdrop_reference(
                hf, inputs, token, strat.boundaries(normed.num_layers), 0.5, steps=4
            )
        elif method == "dart":
            strat = tc.method("dart", k=1, budget=20, pivot_image=3, pivot_text=2, count="exact")
            kept, ref_logits, ref_tokens = dart_reference(hf, inputs, token, 1, 20, (3, 2), steps=4, exact=True)
        elif method == "divprune":
            strat = tc.method("divprune", ratio=0.3)
            kept, ref_logits, ref_tokens = divprune_reference(hf, inputs, token, steps=4, ratio=0.3)
        else:
            strat = tc.method("sparsevlm", counts=(30, 8), layers=(0, 1))
            ref_logits, ref_tokens, per_stage = sparsevlm_reference(hf, inputs, token, (0, 1), (30, 8), steps=4)
        tokens, pre = tc.Engine(normed, strat).generate(batch, max_new_tokens=4, eos_token_id=None)
        if method == "sparsevlm":
            assert [pre.record.visual_per_layer[0][lay + 1] for lay in (0, 1)] == per_stage
        else:
            assert pre.state.orig_index[0].tolist() == kept.tolist()
        torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == ref_tokens


def test_schedules_and_shortv_calibration_against_references(model, images):
    """A one-step schedule is FastV's reference; ShortV's visual layer contribution is the KL
    between Hugging Face's output and Hugging Face's with that layer's image tokens passed through."""
    from test_conformance import _eager, _frozen_reference, check_fastv

    from tokencomp.methods.shortv import kl_divergence, layer_contribution

    batch = tc.prepare(model, [images[2]], [PROMPTS[2]])
    sched = tc.Engine(model, tc.method("schedule", rates=(1.0, 1.0, 0.5, 0.5))).prefill(batch)
    fastv = tc.Engine(model, tc.method("fastv", k=2, ratio=0.5)).prefill(batch)
    torch.testing.assert_close(sched.logits, fastv.logits)
    assert sched.state.orig_index.tolist() == fastv.state.orig_index.tolist()
    check_fastv(model, _eager(model), batch, _inputs(batch))  # that FastV equals its reference
    lc = layer_contribution(model, [batch])
    with torch.no_grad():
        base = model.hf(**_inputs(batch)).logits[:, -1].float()
    for layer in range(model.num_layers):
        ref = kl_divergence(base, _frozen_reference(model, _inputs(batch), layer))
        assert lc["visual"][layer] == pytest.approx(float(ref), rel=1e-3, abs=1e-7)


def test_7b_shapes_equal_a_hand_count():
    """experiments/flops_onevision_7b.py: at LLaVA-OneVision-7B's shapes (meta device), the
    layout's token counts equal ones derived by hand from the processor's rules, and the profiler
    equals the script's term-by-term count (it exits otherwise)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    import flops_onevision_7b as script

    model = script.model_7b()
    # 768 x 1024: 2x3 crops, 54 x 81 tokens, unpadded to 54 x 73 (72 content columns, 4 padding
    # each side), under anyres_max_9 (ratio 0.78): 729 + 54 * 74.  1080 x 1920: 3x5 crops, 81 x 135,
    # unpadded to 75 x 135, ratio 1.24: resized to 60 x 108, 729 + 60 * 109.  2304 x 2304: 6x6
    # crops, 162 x 162, ratio 2: 81 x 81, 729 + 81 * 82.
    for size, views, visual in [((768, 1024), 7, 4725), ((1080, 1920), 16, 7269), ((2304, 2304), 37, 7371)]:
        record, report, hand = script.profiled(model, size, text=64)
        assert (len(record.tokens_per_view[0][0]), record.visual_tokens_in[0]) == (views, visual)
        assert report.prefill == hand["prefill"] > 0


@pytest.mark.parametrize("budget,ratio", [(12, 0.5), (20, 0.25)])
def test_vispruner_matches_a_reference_with_scaled_crop_budgets(model, images, budget, ratio):
    """VisPruner without CLS (the attention each patch receives, averaged over query rows and heads,
    eager), each crop of a resized image keeping round(budget s), split by the same ratio; crops
    keep what falls in the unpadded window."""
    from conftest import eager_copy
    from test_vispruner import _kept_per_view, vispruner_view
    from vision_reference import eager_tower, tower_views

    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("vispruner", budget=budget, important_ratio=ratio)).prefill(batch)
    hidden, attn, _ = eager_tower(eager_copy(model), tower_views(model, batch), -2)
    v = 0
    for b, im in enumerate(images):
        size = (im.size[1], im.size[0])
        (rows, cols), _, _ = _crop_grids(model, size)
        crop = max(1, _half_up(budget * _share(model, size)))
        valid = model.crop_valid(size)
        got = _kept_per_view(pre, b)
        for j, t in enumerate([budget] + [crop] * (rows * cols)):
            want = vispruner_view(attn[v + j].mean(1).mean(0), hidden[v + j], t, ratio)
            if j:
                want = [p for p in want if bool(valid[j - 1, p])]
            assert got.get(j, []) == want, (b, j)
        v += 1 + rows * cols


def test_tome_merges_every_view_as_the_reference(model, images):
    """ToMe without CLS (SigLIP): each view's merged tokens as the released steps make them on the
    unmodified tower modules, the thumbnail's then the crops', no newline (crops of a resized
    image keep as many as the others: one r per layer)."""
    from test_tome import tome_features
    from vision_reference import tower_views

    for i in (0, 2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        pre = tc.Engine(model, tc.method("tome", budget=10)).prefill(batch)
        with torch.no_grad():
            ref = model.projector(tome_features(model, tower_views(model, batch), 10).flatten(0, 1))
        lay = pre.input_state.layout(0)
        got = pre.input_state.hidden[0][pre.input_state.valid[0]][lay["kind"] == VISUAL]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
