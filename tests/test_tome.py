"""ToMe inside the vision tower against a reference written from the released code's steps on the
unmodified Hugging Face tower modules, the merged tokens run by a fresh HF decoder."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS, batch_and_alone, make_images
from reference import greedy_from_embeds, image_span_replaced
from vision_reference import tower_views

import tokencomp as tc
from tokencomp.strategy import NEWLINE, VISUAL


def _attention(attn, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """An encoder layer's attention from its projections, eagerly, with log(size) on every key."""
    v, n, d = x.shape
    heads = attn.num_heads
    q = (attn.q_proj(x) * attn.scale).view(v, n, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(v, n, heads, -1).transpose(1, 2)
    val = attn.v_proj(x).view(v, n, heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ val).transpose(1, 2).reshape(v, n, d)
    return attn.out_proj(out)


def _merge_view(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, cls: bool):
    """One view, the released matching and weighted average, with lists: ``x`` (n, d), ``size`` (n,)."""
    unit = keys / keys.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    scores = unit[a_idx] @ unit[b_idx].T
    if cls:
        scores[0, :] = -math.inf
    best, match = scores.max(dim=-1)
    edges = sorted(range(len(a_idx)), key=lambda i: (-float(best[i]), i))
    merged, kept = edges[:r], edges[r:]
    if cls:
        kept = sorted(kept)
    total = x[b_idx] * size[b_idx, None]
    weight = size[b_idx].clone()
    for i in merged:
        total[match[i]] += x[a_idx[i]] * size[a_idx[i]]
        weight[match[i]] += size[a_idx[i]]
    rows = [x[a_idx[i]] for i in kept] + list(total / weight[:, None])
    return torch.stack(rows), torch.cat([size[[a_idx[i] for i in kept]], weight])


def tome_features(model, pix: torch.Tensor, budget: int) -> torch.Tensor:
    """(V, n, d_v) the patch tokens reaching the projector, view by view."""
    tower = model.hf.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    run = model.hf.config.vision_feature_layer % (len(vm.encoder.layers) + 1)
    cls = model.has_cls
    out = []
    with torch.no_grad():
        for view in pix:
            h = vm.embeddings(view[None])
            h = vm.pre_layrnorm(h) if hasattr(vm, "pre_layrnorm") else h
            h, size = h[0], None
            for i in range(run):
                lay = vm.encoder.layers[i]
                x = lay.layer_norm1(h)
                h = h + _attention(lay.self_attn, x[None], None if size is None else size[None])[0]
                keys = lay.self_attn.k_proj(x).view(len(h), lay.self_attn.num_heads, -1).mean(1)
                size = torch.ones(len(h)) if size is None else size
                r = min(math.ceil(max(0, len(h) - int(cls) - budget) / (run - i)), (len(h) - int(cls)) // 2)
                if r > 0:
                    h, size = _merge_view(h, size, keys, r, cls)
                h = h + lay.mlp(lay.layer_norm2(h))
            out.append(h[int(cls) :])
    return torch.stack(out)


@pytest.mark.parametrize("budget", [9, 16, 30])
def test_tome_matches_reference(model, images, budget):
    """The merged tokens (projected, each view's in order, NeXT's crops after the thumbnail without
    newlines), and the first logits and greedy tokens of a fresh HF decoder on them."""
    for i, text in enumerate(PROMPTS):
        batch = tc.prepare(model, [images[i]], [text])
        tokens, pre = tc.Engine(model, tc.method("tome", budget=budget)).generate(batch, 3, eos_token_id=None)
        feats = tome_features(model, tower_views(model, batch), budget)
        with torch.no_grad():
            ref = model.projector(feats.flatten(0, 1))
        lay = pre.input_state.layout(0)
        got = pre.input_state.hidden[0][pre.input_state.valid[0]][lay["kind"] == VISUAL]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert int((lay["kind"] == NEWLINE).sum()) == 0 and bool((lay["patch"][lay["kind"] == VISUAL] == -1).all())
        # the decoder on the text with the image span replaced by the merged tokens, positions 0..n-1
        x = image_span_replaced(model.hf, batch.input_ids[0], model.image_token_id, ref)
        first, steps = greedy_from_embeds(model.hf, x, 3)
        torch.testing.assert_close(pre.logits[0], first[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == steps


def test_tome_without_merges_equals_the_unmodified_model(model, images):
    """r=0 runs every layer through the engine's split forward, and the unmerged tokens form the
    view's grid, laid out as the model lays it out: the unmodified model's logits and token record."""
    batch = tc.prepare(model, images, PROMPTS)
    split = tc.Engine(model, tc.method("tome", r=0)).prefill(batch)
    plain = tc.Engine(model).prefill(batch)
    torch.testing.assert_close(split.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.input_state.kind, plain.input_state.kind)
    assert split.record.vision_layer_tokens == [[model.patches_per_view + 1] * 2] * split.record.vision_layers_run


def test_tome_is_batch_independent_and_composes_with_fastv(model, images):
    engine = tc.Engine(model, [tc.method("tome", budget=12), tc.method("fastv", k=2, ratio=0.5)])
    pre, alone = batch_and_alone(engine, model, images, PROMPTS)
    for b, one in enumerate(alone):
        assert pre.record.visual_per_layer[b] == one.record.visual_per_layer[0]


def test_tome_refuses_a_vision_strategy_beside_it_and_bad_budgets(models):
    model = models["llava"]
    with pytest.raises(tc.TokencompError, match="compose a tower strategy with layer and freeze strategies only"):
        tc.Engine(model, [tc.method("tome"), tc.method("visionzip", budget=9)])
    batch = tc.prepare(model, make_images([(60, 100)]), PROMPTS[:1])
    with pytest.raises(tc.BudgetError, match=r"budget \(tokens per view\)=40 is outside the allowed range \[1, 36\]"):
        tc.Engine(model, tc.method("tome", budget=40)).prefill(batch)
    with pytest.raises(tc.BudgetError, match=r"r \(tokens merged per layer\)=-1"):
        tc.method("tome", r=-1)


def test_tower_strategies_on_a_tower_whose_image_is_not_a_whole_number_of_patches():
    """SigLIP-style 384 px / 14 px towers leave a remainder the patch embedding drops: ToMe runs,
    and a downsampling budget of the whole grid leaves the image as it is."""
    from tokencomp.tiny import tiny_llava

    model = tc.Model(*tiny_llava("llava-onevision", image_size=45, patch_size=7, seed=1, decoder="qwen2"))
    batch = tc.prepare(model, make_images([(60, 100)]), PROMPTS[:1])
    merged = tc.Engine(model, tc.method("tome", budget=10)).prefill(batch)
    assert merged.record.vision_layer_tokens[-1][1] < model.patches_per_view
    same = tc.Engine(model, tc.method("downsample", budget=model.patches_per_view)).prefill(batch)
    torch.testing.assert_close(same.logits, tc.Engine(model).prefill(batch).logits, rtol=1e-5, atol=1e-5)


def test_tower_strategies_in_bfloat16_and_flash_attention_refused(models, monkeypatch):
    """The image is resampled in float32 before the cast (CPU has no half-precision antialiased
    resize); merging under FlashAttention, which cannot add the size bias, is refused."""
    import copy

    hf = copy.deepcopy(models["llava"].hf).to(torch.bfloat16)
    model = tc.Model(hf, models["llava"].processor)
    batch = tc.prepare(model, make_images([(60, 100)]), PROMPTS[:1])
    for method in (tc.method("downsample", budget=16), tc.method("tome", budget=12)):
        assert tc.Engine(model, method).prefill(batch).logits.isfinite().all()
    monkeypatch.setattr(models["llava"], "attn_implementation", "flash_attention_2")
    with pytest.raises(tc.UnsupportedModelError, match="FlashAttention cannot add"):
        tc.Engine(models["llava"], tc.method("tome", budget=12))


def test_a_tower_strategy_declaring_vision_captures_is_refused(models):
    class Greedy(tc.TowerStrategy):
        def needs(self):
            return [tc.Need("vision_cls_attention", -2)]

        def reduce_layers(self, layers_run):
            return [0]

        def reduce(self, ctx):
            return ctx.hidden, ctx.size

    with pytest.raises(tc.TokencompError, match="declares vision captures, which a tower strategy does not get"):
        tc.Engine(models["llava"], Greedy())
