"""Frozen layers: image tokens pass unchanged, text tokens match an independent computation."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, eager_copy, hf_inputs
from reference import logits_last, run_layers

import tokencomp as tc
from tokencomp.strategy import VISUAL


def test_frozen_layer_bit_identical_visual_and_reference_text(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    eng = tc.Engine(model, tc.method("freeze", layers=(1,)))
    spans = eng.validate(batch)
    imgs, _ = eng.encode_images(batch, spans)
    state, _, _ = eng.build_sequence(batch, spans, imgs)
    cos_sin = model.rotary_emb(state.hidden, state.positions)
    layer = model.layers[1]
    with torch.no_grad():
        cache = tc.engine.LayerKVCache(model.num_layers)
        out = eng._frozen_layer(layer, 1, state, cos_sin, cache, eng._frozen_plan(state, "visual"))
    img = state.valid & (state.kind >= VISUAL)
    assert torch.equal(out[img], state.hidden[img])  # bit-identical
    # text tokens: an ordinary layer's output at text positions (text outputs depend on all keys/values)
    hf = eager_copy(model)
    for b in range(len(PROMPTS)):
        v = state.valid[b]
        h = state.hidden[b : b + 1, v]
        pos = state.positions[b : b + 1, v]
        with torch.no_grad():
            ref = run_layers(hf, h, pos, [1])
        text = ~img[b, v]
        torch.testing.assert_close(out[b, v][text], ref[0, text], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", [(0,), (1, 3), (0, 1, 2, 3)])
def test_freeze_whole_model_matches_reference(model, images, layers):
    hf = eager_copy(model)
    for i in range(2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        pre = tc.Engine(model, tc.method("freeze", layers=layers)).prefill(batch)
        with torch.no_grad():
            x = hf(**hf_inputs(batch), output_hidden_states=True).hidden_states[0]
            visual = batch.input_ids[0] == model.image_token_id
            n = x.shape[1]
            frozen = {lay: visual for lay in layers}
            h = run_layers(hf, x, torch.arange(n)[None], range(model.num_layers), frozen)
            ref = logits_last(hf, h)
        torch.testing.assert_close(pre.logits, ref, rtol=1e-4, atol=1e-4)
        assert pre.record.frozen_layers == sorted(layers)
