"""In-LLM pruning (FastV) equals an independent reference on the explicitly shortened sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, eager_copy, hf_inputs
from reference import fastv_reference

import tokencomp as tc


@pytest.mark.parametrize(
    "k,ratio,query,rounding",
    [
        (2, 0.5, "last", "round"),
        (1, 0.75, "last", "round"),
        (3, 0.25, "last", "round"),
        (2, 0.5, "all", "round"),
        (1, 0.75, "text", "round"),
        # 36 x 0.1 = 3.6 image tokens kept (LLaVA-1.5): 4 by the authors' round, 3 by floor
        (2, 0.9, "last", "round"),
        (2, 0.9, "last", "floor"),
    ],
)
def test_fastv_matches_reference_prefill_and_decode(model, images, k, ratio, query, rounding):
    hf = eager_copy(model)
    for i in range(2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        kept, ref_logits, ref_tokens = fastv_reference(
            hf, hf_inputs(batch), model.image_token_id, k, ratio, steps=6, query=query, rounding=rounding
        )
        method = tc.method("fastv", k=k, ratio=ratio, query=query, rounding=rounding)
        tokens, pre = tc.Engine(model, method).generate(batch, max_new_tokens=6, eos_token_id=None)
        assert pre.state.orig_index[0].tolist() == kept.tolist()
        torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == ref_tokens
        # KV cache: full prompt before layer k, the kept tokens from layer k on, plus 5 decoded steps
        n, n_kept = batch.input_ids.shape[1], len(kept)
        L = model.num_layers
        assert pre.record.kv_cache_lengths[0] == [n + 5] * k + [n_kept + 5] * (L - k)
        assert pre.cache.lengths() == [n + 5] * k + [n_kept + 5] * (L - k)


def test_fastv_budget_and_token_counts(model, images):
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("fastv", k=2, budget=5)).prefill(batch)
    rec = pre.record
    for b in range(3):
        assert rec.visual_per_layer[b][:2] == [rec.visual_tokens_in[b]] * 2
        assert rec.visual_per_layer[b][2:] == [5] * (model.num_layers - 2)
    # tokens kept keep their original positions (FastV's policy), in order
    st = pre.state
    for b in range(3):
        pos = st.positions[b][st.valid[b]]
        assert torch.equal(pos, st.orig_index[b][st.valid[b]])
        assert bool((pos[1:] > pos[:-1]).all())


def test_llm_contiguous_positions_option(model, images):
    batch = tc.prepare(model, images[:1], PROMPTS[:1])
    opts = tc.EngineOptions(llm_positions="contiguous")
    pre = tc.Engine(model, tc.method("fastv", k=2), opts).prefill(batch)
    n = int(pre.state.valid[0].sum())
    assert pre.state.positions[0].tolist() == list(range(n))
    # and the decoded token continues each layer's own numbering
    assert pre.cache.next_pos[0].item() == batch.input_ids.shape[1]
    assert pre.cache.next_pos[-1].item() == n


def test_last_token_is_never_pruned(models, images):
    """A prompt that ends on its image: the last (image) token stays, so logits come from it."""
    model = models["llava"]
    batch = tc.prepare(model, images[:1], ["USER : what color ? <image>"])
    pre = tc.Engine(model, tc.method("fastv", k=1, budget=1)).prefill(batch)
    n = batch.input_ids.shape[1]
    assert int(pre.state.orig_index[0, -1]) == n - 1
    assert int(pre.state.positions[0, -1]) == n - 1


def test_kv_lengths_stop_at_each_samples_eos(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images, PROMPTS)
    engine = tc.Engine(model, tc.method("fastv", k=2))
    free, _ = engine.generate(batch, max_new_tokens=6, eos_token_id=None)
    eos = free[0][1]  # sample 0 stops after two tokens
    tokens, pre = engine.generate(batch, max_new_tokens=6, eos_token_id=eos)
    assert len(tokens[0]) == free[0].index(eos) + 1 <= 2 and any(len(t) > 2 for t in tokens)
    for b in range(3):
        prefill = [int(n) for n in pre.record.tokens_per_layer[b]]
        assert pre.record.kv_cache_lengths[b] == [n + len(tokens[b]) - 1 for n in prefill]


def test_mean_attention_rows_do_not_depend_on_the_chunk_size(models, images, monkeypatch):
    """Scores averaged over many query rows are computed a chunk of rows at a time; a chunk of 7
    rows (many chunks, a ragged last one) gives the scores of one chunk holding every row."""
    import tokencomp.stages.captures as captures

    model = models["llava-next"]
    batch = tc.prepare(model, images, PROMPTS)
    need = tc.Need("decoder_attention_all", 1)
    got = {}
    for chunk in (10_000, 7):
        monkeypatch.setattr(captures, "ROW_CHUNK", chunk)
        pre = tc.Engine(model, tc.method("fastv", k=2, ratio=0.5, query="all")).prefill(batch)
        assert batch.input_ids.shape[1] > 7 * 3
        got[chunk] = pre.captures[need]
    torch.testing.assert_close(got[7], got[10_000], rtol=1e-5, atol=1e-7)
