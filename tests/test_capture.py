"""Captured scores (under SDPA) equal what eager attention with output_attentions=True returns."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, eager_copy, hf_inputs

import tokencomp as tc


@tc.register("_test-capture-vision")
class _CaptureVision(tc.VisionStrategy):
    layer: int = -2

    def needs(self):
        return [
            tc.Need("vision_cls_attention", self.layer),
            tc.Need("vision_cls_logits", self.layer),
            tc.Need("vision_keys", self.layer),
        ]

    def compress(self, view):
        self.seen = view
        return tc.method("identity").compress(view)


@pytest.mark.parametrize("layer", [-2, -1, 0])
def test_vision_cls_row_matches_eager(model, images, layer):
    assert model.hf.config.vision_config._attn_implementation == "sdpa"
    strat = _CaptureVision(layer=layer)
    batch = tc.prepare(model, images, PROMPTS)
    tc.Engine(model, strat).prefill(batch)
    view = strat.seen
    hf = eager_copy(model)
    pix = batch.pixel_values
    if pix.dim() == 5:  # LLaVA-NeXT: the real views of each image, in order
        pix = torch.cat([pix[i, : model.views_per_image(tuple(s))] for i, s in enumerate(batch.image_sizes.tolist())])
    with torch.no_grad():
        out = hf.model.vision_tower(pix, output_attentions=True)
    ref = out.attentions[layer][:, :, 0, :]  # (V, H, 1+N)
    torch.testing.assert_close(view.cls_attention(layer), ref, rtol=1e-4, atol=1e-5)
    # logits: their softmax is the reference row and they differ from it by a per-row constant
    torch.testing.assert_close(view.cls_logits(layer).softmax(-1), ref, rtol=1e-4, atol=1e-5)
    # head-mean keys, recomputed from the eager layer's own projections
    lay = hf.model.vision_tower.vision_model.encoder.layers if hasattr(hf.model.vision_tower, "vision_model") else None
    lay = lay or hf.model.vision_tower.encoder.layers
    with torch.no_grad():
        hs = hf.model.vision_tower(pix, output_hidden_states=True).hidden_states
        k = lay[layer].self_attn.k_proj(lay[layer].layer_norm1(hs[layer % len(lay)]))
    heads = lay[layer].self_attn.num_heads
    ref_keys = k.view(k.shape[0], k.shape[1], heads, -1).mean(2)
    torch.testing.assert_close(view.keys(layer), ref_keys, rtol=1e-4, atol=1e-5)
    # the tower really ran under SDPA and the engine left the config alone
    assert model.hf.config.vision_config._attn_implementation == "sdpa"


@tc.register("_test-capture-decoder")
class _CaptureDecoder(tc.LayerStrategy):
    layer: int = 1
    query: str = "last"

    def needs(self):
        return [tc.Need(f"decoder_attention_{self.query}", self.layer)]

    def prune_layers(self, num_layers):
        return [self.layer + 1]

    def keep(self, ctx):
        self.scores = ctx.attention(self.layer, self.query)
        return ctx.valid  # keep everything


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("query", ["last", "text"])
def test_decoder_rows_match_eager(model, images, layer, query):
    batch = tc.prepare(model, images, PROMPTS)
    strat = _CaptureDecoder(layer=layer, query=query)
    pre = tc.Engine(model, strat).prefill(batch)
    hf = eager_copy(model)
    with torch.no_grad():
        att = hf(**hf_inputs(batch), output_attentions=True).attentions[layer]  # (B, H, T, T)
    valid = batch.attention_mask.bool()
    got = pre.captures[tc.Need(f"decoder_attention_{query}", layer)]  # (B, H, 1, n)
    for b in range(len(PROMPTS)):
        if query == "last":
            ref = att[b, :, -1, valid[b]]
        else:
            text = valid[b] & (batch.input_ids[b] != model.image_token_id)
            ref = att[b][:, text][:, :, valid[b]].mean(1)
        torch.testing.assert_close(got[b, :, 0, pre.input_state.valid[b]], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(strat.scores[b, pre.input_state.valid[b]], ref.mean(0), rtol=1e-4, atol=1e-5)
