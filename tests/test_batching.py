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


def test_contiguous_renumbering_does_not_depend_on_batchmates(models, images):
    """Original vision positions (gaps after VisionZip) and contiguous LLM positions: a sample
    that drops nothing at FastV's layer is renumbered there all the same, so it gets the positions
    and logits it gets alone while its batchmates drop tokens. Decoding continues after each
    layer's highest position."""
    model = models["llava-next"]
    opts = tc.EngineOptions(vision_positions="original", llm_positions="contiguous")
    batch = tc.prepare(model, images, PROMPTS)

    def methods(budget=None):
        first = tc.method("visionzip", dominant=10, contextual=4)
        return [first] if budget is None else [first, tc.method("fastv", k=2, budget=budget)]

    entering = tc.Engine(model, methods(), opts).prefill(batch).record.visual_per_layer
    budget = min(v[0] for v in entering)
    assert budget < max(v[0] for v in entering)  # one sample keeps all, another drops some
    tokens, pre = tc.Engine(model, methods(budget), opts).generate(batch, max_new_tokens=4, eos_token_id=None)
    for b in range(3):
        t1, alone = tc.Engine(model, methods(budget), opts).generate(
            tc.prepare(model, [images[b]], [PROMPTS[b]]), max_new_tokens=4, eos_token_id=None
        )
        st = pre.state
        assert st.positions[b][st.valid[b]].tolist() == alone.state.positions[0].tolist()
        assert [int(p[b]) for p in pre.cache.next_pos] == [int(p[0]) for p in alone.cache.next_pos]
        torch.testing.assert_close(pre.logits[b], alone.logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[b] == t1[0]


def test_decoding_starts_after_the_highest_position(models, images):
    """A prompt that ends on its image, with VisionZip's merged tokens (no source) spread over the
    image span in original positions: the first decoded token comes after every prompt position."""
    model = models["llava"]
    opts = tc.EngineOptions(vision_positions="original")
    batch = tc.prepare(model, images[:1], ["USER : what color ? <image>"])
    pre = tc.Engine(model, tc.method("visionzip", dominant=10, contextual=4), opts).prefill(batch)
    top = int(pre.state.positions[0][pre.state.valid[0]].max())
    assert top > int(pre.state.positions[0, -1])  # the last column is not the highest position
    assert all(int(p[0]) == top + 1 for p in pre.cache.next_pos)
