"""LLaVA-OneVision (SigLIP tower without CLS, Qwen2 decoder, AnyRes with anyres_max resizing,
base-only images in prompts of several) through the same engine: identity equals Hugging Face."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_inputs, make_images

import tokencomp as tc
from tokencomp.families import ImageSize
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


def test_in_llm_methods_serve_and_vision_methods_are_refused_before_work(model, images):
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
        with pytest.raises(tc.UnsupportedModelError, match="does not serve LLaVA-OneVision yet"):
            tc.Engine(model, tc.method("visionzip", budget=16)).prefill(batch)
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
    assert "visual tokens 351 -> 336 into the LLM" in capsys.readouterr().err


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


@pytest.mark.parametrize("method", [None, "fastv", "freeze"])
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
    strat = {None: None, "fastv": tc.method("fastv", k=2, ratio=0.5), "freeze": tc.method("freeze", layers=(1, 2))}
    engine = tc.Engine(eager, strat[method])
    for i in (0, 2):
        batch = tc.prepare(eager, [images[i]], [PROMPTS[i]])
        with FlopCounterMode(display=False) as counter:
            _, pre = engine.generate(batch, max_new_tokens=4, eos_token_id=None)
        report = run_flops(eager, pre.record, engine.strategies)[0]
        assert report.total == pytest.approx(counter.get_total_flops() - rope_table_flops(counter), rel=1e-9)
