"""The identity strategy reproduces the unmodified Hugging Face model."""

from __future__ import annotations

import torch
from conftest import PROMPTS, hf_inputs

import tokencomp as tc


def test_prefill_logits_match_hf_forward_batched(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    assert bool((batch.attention_mask == 0).any()), "the batch should need padding"
    pre = tc.Engine(model, tc.method("identity")).prefill(batch, all_logits=True)
    with torch.no_grad():
        ref = model.hf(**hf_inputs(batch)).logits
    valid = batch.attention_mask.bool()
    assert pre.logits.shape == ref.shape
    torch.testing.assert_close(pre.logits[pre.state.valid], ref[valid].float(), rtol=1e-4, atol=1e-4)


def test_no_method_equals_identity_method(model, images):
    batch = tc.prepare(model, images[:2], PROMPTS[:2])
    a = tc.Engine(model).prefill(batch).logits
    b = tc.Engine(model, tc.method("identity")).prefill(batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_greedy_generation_matches_hf_generate(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    tokens, pre = tc.Engine(model, tc.method("identity")).generate(batch, max_new_tokens=10, eos_token_id=None)
    with torch.no_grad():
        ref = model.hf.generate(
            **hf_inputs(batch), max_new_tokens=10, do_sample=False, eos_token_id=None, min_new_tokens=10
        )
    ref_new = ref[:, batch.input_ids.shape[1] :].tolist()
    assert all(len(t) == 10 for t in tokens)
    assert tokens == ref_new


def test_batch_equals_each_sample_alone(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    eng = tc.Engine(model)
    tokens, pre = eng.generate(batch, max_new_tokens=8, eos_token_id=None)
    for i in range(3):
        one = tc.prepare(model, [images[i]], [PROMPTS[i]])
        t1, p1 = eng.generate(one, max_new_tokens=8, eos_token_id=None)
        assert t1[0] == tokens[i]
        torch.testing.assert_close(p1.logits[0], pre.logits[i], rtol=1e-4, atol=1e-4)


def test_generate_api_and_record(model, images):
    out = tc.generate(model, images[:2], PROMPTS[:2], max_new_tokens=3)
    assert len(out.text) == 2 and all(1 <= len(t) <= 3 for t in out.tokens)
    rec = out.record
    n_vis = [model.image_token_count(tuple(reversed(im.size))) for im in images[:2]]
    assert rec.visual_tokens_in == n_vis
    # identity: every layer processes the whole prompt
    for b in range(2):
        assert len(set(rec.tokens_per_layer[b])) == 1
        assert rec.visual_per_layer[b][0] == n_vis[b]
        # newline-free per-layer counts agree with the headline count; NeXT's span adds its newlines
        assert rec.image_per_layer[b] == [rec.visual_tokens_llm[b]] * model.num_layers
        newlines = n_vis[b] - rec.visual_tokens_llm[b]
        assert newlines > 0 if model.family == "llava-next" else newlines == 0


def test_eager_attention_model_and_eos(family, images):
    """The engine drives an eager-attention model too (explicit causal masks), and stops at EOS
    exactly where Hugging Face generate does."""
    from tokencomp.tiny import tiny_llava

    hf, proc = tiny_llava(family, seed=3, attn_implementation="eager")
    model = tc.Model(hf, proc)
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model).prefill(batch, all_logits=True)
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits
    torch.testing.assert_close(pre.logits[pre.state.valid], ref[batch.attention_mask.bool()], rtol=1e-4, atol=1e-4)
    # make EOS the most likely token after a few steps by choosing it from a free run
    free, _ = tc.Engine(model).generate(batch, max_new_tokens=6, eos_token_id=None)
    eos = free[0][3]
    tokens, _ = tc.Engine(model).generate(batch, max_new_tokens=6, eos_token_id=eos)
    with torch.no_grad():
        g = hf.generate(**hf_inputs(batch), max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    for b, row in enumerate(g[:, batch.input_ids.shape[1] :].tolist()):
        if eos in row:
            row = row[: row.index(eos) + 1]
        assert tokens[b] == row
    assert len(tokens[0]) <= 4 and tokens[0][-1] == eos


def test_decode_computes_rope_once_per_step(model, images):
    """A decode step computes the rotary embeddings of every layer's position in one call (layers
    may number positions differently), not once per layer; the generation still equals HF's
    (`test_greedy_generation_matches_hf_generate`)."""
    batch = tc.prepare(model, images, PROMPTS)
    engine = tc.Engine(model, tc.method("fastv", k=1, ratio=0.5), tc.EngineOptions(llm_positions="contiguous"))
    calls = []
    handle = model.rotary_emb.register_forward_hook(lambda _m, args, _out: calls.append(args[1].shape[0]))
    try:
        engine.prefill(batch)
        prefill = len(calls)
        calls.clear()
        engine.generate(batch, max_new_tokens=4, eos_token_id=None)
    finally:
        handle.remove()
    assert calls[prefill:] == [model.num_layers * len(images)] * 3  # 3 steps after the prefill: one call each


def test_decode_builds_one_key_mask_per_group_of_layers(model, images):
    """A padded batch needs a key mask at every decode step; layers with no pruning between them
    share one (FastV at layer 2: two groups), built once per step, not once per layer."""
    batch = tc.prepare(model, images, PROMPTS)  # prompts of different lengths: padded
    for method, groups in ((None, 1), (tc.method("fastv", k=2, ratio=0.5), 2)):
        engine = tc.Engine(model, method)
        built = []
        mask = engine._mask
        engine._mask = lambda *a, built=built, mask=mask, **k: built.append(1) or mask(*a, **k)  # this engine only
        engine.prefill(batch)
        prefill = len(built)
        built.clear()
        engine.generate(batch, max_new_tokens=4, eos_token_id=None)
        assert len(built) - prefill == 3 * groups
