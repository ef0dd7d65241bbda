"""Batch > 1 with different keep counts per sample equals per-sample runs."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

import tokencomp as tc


@tc.register("_test-uneven")
class _Uneven(tc.LayerStrategy):
    """Keeps a different number of image tokens per sample (by prompt length), ranked by attention."""

    def needs(self):
        return [tc.Need("decoder_attention_last", 0)]

    def prune_layers(self, num_layers):
        return [1, 3]

    def keep(self, ctx):
        text = (ctx.valid & (ctx.kind == 1)).sum(1)
        return ctx.keep_top(ctx.attention(0), ctx.image_count - text)


METHODS = {
    "fastv": lambda: tc.method("fastv", k=2, ratio=0.5),
    "uneven": lambda: _Uneven(),
    "random": lambda: tc.method("random", budget=7, seed=3),
    "pool": lambda: tc.method("pool", budget=6),
    "compose": lambda: [
        tc.method("random", budget=20),
        tc.method("fastv", k=1, ratio=0.4),
        tc.method("freeze", layers=(2,)),
    ],
}


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_equals_per_sample(model, images, name):
    batch = tc.prepare(model, images, PROMPTS)
    eng = tc.Engine(model, METHODS[name]())
    tokens, pre = eng.generate(batch, max_new_tokens=5, eos_token_id=None)
    kept = [pre.record.visual_per_layer[b][-1] for b in range(3)]
    if name == "uneven" or model.family == "llava-next":
        assert len(set(kept)) > 1, f"keep counts should differ per sample, got {kept}"
    for i in range(3):
        one = tc.prepare(model, [images[i]], [PROMPTS[i]])
        t1, p1 = tc.Engine(model, METHODS[name]()).generate(one, max_new_tokens=5, eos_token_id=None)
        assert t1[0] == tokens[i]
        torch.testing.assert_close(p1.logits[0], pre.logits[i], rtol=1e-4, atol=1e-4)
        assert p1.record.visual_per_layer[0] == pre.record.visual_per_layer[i]
        assert p1.record.kv_cache_lengths[0] == pre.record.kv_cache_lengths[i]
