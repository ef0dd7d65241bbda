"""Vision towers without CLS (SigLIP, ``vision_feature_select_strategy="full"``): the engine equals
the unmodified Hugging Face model, and VisionZip ranks by mean received attention (METHODS.md §1)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, eager_copy, hf_inputs, make_images
from vision_reference import eager_tower, visionzip_view

import tokencomp as tc
from tokencomp.strategy import VISUAL
from tokencomp.tiny import tiny_llava


@pytest.fixture(scope="module")
def siglip() -> tc.Model:
    hf, proc = tiny_llava("llava", seed=3, vision="siglip")
    return tc.Model(hf, proc)


def test_identity_equals_hf_without_cls(siglip):
    images = make_images()
    batch = tc.prepare(siglip, images, PROMPTS)
    assert not siglip.has_cls and siglip.patches_per_view == 36
    with torch.no_grad():
        ref = siglip.hf(**hf_inputs(batch)).logits[:, -1]
        got = tc.Engine(siglip).prefill(batch).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        hf_tokens = siglip.hf.generate(**hf_inputs(batch), max_new_tokens=5, do_sample=False)[
            :, batch.input_ids.shape[1] :
        ]
    out = tc.generate(siglip, images, PROMPTS, max_new_tokens=5)
    assert out.record.visual_tokens_llm == [36, 36, 36]  # every patch token, no CLS
    for b in range(3):
        assert out.tokens[b] == hf_tokens[b][: len(out.tokens[b])].tolist()


@pytest.mark.parametrize("dominant,contextual", [(10, 2), (8, 0), (3, 6), (0, 5)])
def test_visionzip_mean_received_attention(siglip, dominant, contextual):
    images = make_images()
    batch = tc.prepare(siglip, images, PROMPTS)
    strat = tc.method("visionzip", dominant=dominant, contextual=contextual)
    pre = tc.Engine(siglip, strat).prefill(batch)
    hidden, attn, keys = eager_tower(eager_copy(siglip), batch.pixel_values, -2)
    for b in range(3):
        with torch.no_grad():
            tokens, kept = visionzip_view(hidden[b], attn[b], keys[b], dominant, contextual, cls=False)
            tokens = siglip.projector(tokens)
        lay = pre.input_state.layout(b)
        vis = lay["kind"] == VISUAL
        assert lay["patch"][vis].tolist() == kept + [-1] * contextual
        got = pre.input_state.hidden[b][pre.input_state.valid[b]][vis]
        torch.testing.assert_close(got, tokens, rtol=1e-4, atol=1e-5)
        assert pre.record.visual_tokens_llm[b] == dominant + contextual


def test_cls_methods_refuse_a_tower_without_cls(siglip):
    batch = tc.prepare(siglip, make_images(), PROMPTS)
    with pytest.raises(tc.TokencompError, match="CLS"):
        tc.Engine(siglip, tc.method("prumerge")).validate(batch)

    @tc.register("_test-cls-reader")
    class ClsReader(tc.VisionStrategy):
        budget: int = 4

        def needs(self):
            return [tc.Need("vision_cls_attention", -2)]

    with pytest.raises(tc.UnsupportedModelError, match="no CLS token"):
        tc.Engine(siglip, tc.method("_test-cls-reader"))
    with pytest.raises(tc.BudgetError, match="dominant"):
        tc.Engine(siglip, tc.method("visionzip", dominant=40, contextual=0)).validate(batch)


@pytest.mark.parametrize("method", [None, "visionzip"])
def test_flops_match_flop_counter_without_cls(method):
    from torch.utils.flop_counter import FlopCounterMode

    from tokencomp.profiler import run_flops

    model = tc.Model(*tiny_llava("llava", seed=4, vision="siglip", attn_implementation="eager", text_layers=4))
    strat = tc.method("visionzip", dominant=8, contextual=4) if method else None
    engine = tc.Engine(model, strat)
    batch = tc.prepare(model, make_images([(60, 100)], seed=3), PROMPTS[:1])
    with FlopCounterMode(display=False) as counter:
        engine.generate(batch, max_new_tokens=4, eos_token_id=None)
    report = run_flops(model, engine.generate(batch, max_new_tokens=4, eos_token_id=None)[1].record, engine.strategies)
    assert report[0].total == pytest.approx(counter.get_total_flops(), rel=0.02), report[0].to_dict()
