"""The engine in float16 / bfloat16, as it runs on a GPU: identity equals the Hugging Face model in
the same dtype, and every method runs with finite logits and the token counts it keeps in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROMPTS, hf_inputs

import tokencomp as tc

# one configuration per method, small enough for the tiny models (4 text layers)
METHODS = {
    "random": {"budget": 24},
    "pool": {"budget": 16},
    "bilinear": {"budget": 16},
    "visionzip": {"budget": 24},
    "prumerge": {},
    "prumerge+": {},
    "globalcom2": {"ratio": 0.25},
    "fastv": {"k": 2, "ratio": 0.5},
    "pdrop": {},
    "sparsevlm": {"counts": (20, 8), "layers": (1, 2)},
    "dart": {"budget": 24},
    "freeze": {},
    "shortv": {"layers": [1, 2]},
}
# methods whose kept count depends on the scores themselves (a threshold, an outlier rule), which
# half-precision rounding may move by a token
SCORE_DEPENDENT_COUNT = {"prumerge", "prumerge+", "globalcom2"}
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_model(request, model):
    return tc.Model(copy.deepcopy(model.hf).to(request.param), model.processor)


def test_identity_prefill_matches_hf_in_half_precision(half_model, images):
    dt = half_model.dtype
    batch = tc.prepare(half_model, images, PROMPTS)
    pre = tc.Engine(half_model, tc.method("identity")).prefill(batch, all_logits=True)
    inputs = hf_inputs(batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(dt)
    with torch.no_grad():
        ref = half_model.hf(**inputs).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(pre.logits[pre.state.valid], ref[valid].float(), rtol=TOL[dt], atol=TOL[dt])


def test_every_method_runs_in_half_precision(half_model, model, images):
    batch = tc.prepare(half_model, images, PROMPTS)
    for name, params in METHODS.items():
        if name == "globalcom2" and model.family != "llava-next":
            continue
        tokens, pre = tc.Engine(half_model, tc.method(name, **params)).generate(batch, 2, eos_token_id=None)
        assert torch.isfinite(pre.logits).all(), name
        assert all(len(t) == 2 for t in tokens), name
        if name not in SCORE_DEPENDENT_COUNT:
            _, full = tc.Engine(model, tc.method(name, **params)).generate(
                tc.prepare(model, images, PROMPTS), 1, eos_token_id=None
            )
            assert pre.record.visual_tokens_llm == full.record.visual_tokens_llm, name
            assert pre.record.tokens_per_layer == full.record.tokens_per_layer, name


def test_random_keeps_the_same_tokens_in_every_dtype(half_model, model, images):
    """``random`` seeds each image's draw from its pixels as the processor made them, not as cast
    to the model's dtype: half precision keeps the float32 run's tokens."""
    batch = tc.prepare(model, images, PROMPTS)
    kept = [tc.Engine(m, tc.method("random", budget=9)).prefill(batch).input_state for m in (model, half_model)]
    assert torch.equal(kept[0].patch, kept[1].patch) and torch.equal(kept[0].view, kept[1].view)
    assert bool((kept[0].patch >= 0).any())
