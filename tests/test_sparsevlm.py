"""SparseVLM equals an independent reference from the unmodified HF model (tests/reference.py),
and the engine's in-LLM token insertion keeps batches consistent."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_inputs
from reference import _cluster_and_merge, sparsevlm_reference

import tokencomp as tc
from tokencomp.methods.sparsevlm import dpc_knn_merge


@pytest.mark.parametrize(
    "family,layers,counts,recycling",
    [
        ("llava", (0, 1, 2), (20, 10, 4), True),
        ("llava", (1, 2), (12, 3), False),
        ("llava-next", (0, 2), (60, 12), True),
    ],
)
def test_sparsevlm_matches_reference_prefill_and_decode(models, images, family, layers, counts, recycling):
    model = models[family]
    method = tc.method("sparsevlm", counts=counts, layers=layers, recycling=recycling)
    for i in range(3):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        ref_logits, ref_tokens, per_stage = sparsevlm_reference(
            model.hf, hf_inputs(batch), model.image_token_id, layers, counts, steps=4, recycling=recycling
        )
        tokens, pre = tc.Engine(model, method).generate(batch, max_new_tokens=4, eos_token_id=None)
        visual = pre.record.visual_per_layer[0]
        assert [visual[lay + 1] for lay in layers] == per_stage
        n = int(pre.state.valid[0].sum())
        assert pre.state.positions[0][pre.state.valid[0]].tolist() == list(range(n))
        torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == ref_tokens
        if recycling:  # merged tokens have no source; they sit right after the kept image tokens
            kinds, orig = pre.state.kind[0][pre.state.valid[0]], pre.state.orig_index[0][pre.state.valid[0]]
            merged = ((kinds == tc.strategy.VISUAL) & (orig < 0)).nonzero().flatten()
            assert len(merged) >= 1 and int(kinds[merged[-1] + 1]) == tc.strategy.TEXT


def test_sparsevlm_batch_equals_single_samples(model, images):
    """A padded batch with a text-only sample and one whose prompt ends with the image gives each
    sample what it gets alone; merged tokens never take the last place (whose logits are read)."""
    method = tc.method("sparsevlm", counts=(20, 8), layers=(1, 2))
    prompts = [*PROMPTS, "USER : say hi . ASSISTANT :", "USER : describe this <image>"]
    imgs = [*images, None, images[1]]
    batch = tc.prepare(model, imgs, prompts)
    tokens, pre = tc.Engine(model, method).generate(batch, max_new_tokens=3, eos_token_id=None)
    assert pre.record.visual_per_layer[3] == [0] * model.num_layers
    last = pre.state.orig_index[4][pre.state.valid[4]][-1]
    assert int(last) == int(batch.attention_mask[4].sum()) - 1  # the prompt's last token stays last
    for b in range(5):
        t1, alone = tc.Engine(model, method).generate(
            tc.prepare(model, [imgs[b]], [prompts[b]]), max_new_tokens=3, eos_token_id=None
        )
        assert tokens[b] == t1[0]
        assert pre.record.visual_per_layer[b] == alone.record.visual_per_layer[0]
        torch.testing.assert_close(pre.logits[b], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_dpc_knn_merge_matches_the_authors_loop_and_averages_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    x = torch.cat([c + 0.1 * torch.randn(7, 16, generator=g) for c in centres])[torch.randperm(21, generator=g)]
    merged = dpc_knn_merge(x[None], torch.ones(1, 21, dtype=torch.bool), torch.tensor([3]))[0]
    torch.testing.assert_close(merged, _cluster_and_merge(x, 3))
    # well separated blobs: each merged token is one blob's mean
    got = sorted(merged.tolist())
    want = sorted((x[((x[:, None] - centres[None]).norm(dim=-1).argmin(1) == j)].mean(0)).tolist() for j in range(3))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_batched_dpc_knn_merge_equals_the_authors_loop_per_sample():
    """Samples of different sizes and cluster counts, padded into one batch (one with nothing to
    merge): each sample's clusters are the authors' loop on that sample alone; padding rows are zero."""
    g = torch.Generator().manual_seed(1)
    sizes, clusters = [21, 9, 0, 40], [3, 1, 0, 5]
    x = torch.randn(4, 40, 16, generator=g)
    valid = torch.arange(40) < torch.tensor(sizes)[:, None]
    perm = torch.stack([torch.randperm(40, generator=g) for _ in sizes])  # valid tokens scattered among padding
    x, valid = x.gather(1, perm[:, :, None].expand(-1, -1, 16)), valid.gather(1, perm)
    merged = dpc_knn_merge(x, valid, torch.tensor(clusters))
    assert merged.shape == (4, 5, 16)
    for b, c in enumerate(clusters):
        if c:
            torch.testing.assert_close(merged[b, :c], _cluster_and_merge(x[b][valid[b]], c))
        assert bool((merged[b, c:] == 0).all())


def test_sparsevlm_published_schedules_and_bad_input(models):
    assert tc.method("sparsevlm", budget=128).counts == (303, 110, 36)
    assert tc.method("sparsevlm").sparse_layers(32) == [2, 6, 15]
    assert tc.method("sparsevlm").sparse_layers(40) == [2, 6, 15]  # fixed for every depth they fit
    assert tc.method("sparsevlm").sparse_layers(8) == [1, 2, 4]  # scaled on shallow decoders
    assert tc.method("sparsevlm", counts=(5, 2)).budget is None
    with pytest.raises(tc.BudgetError, match="published schedule"):
        tc.method("sparsevlm", budget=100)
    with pytest.raises(tc.TokencompError, match="one per count"):
        tc.method("sparsevlm", counts=(10, 5), layers=(1,))
    with pytest.raises(tc.TokencompError, match="contiguous"):
        tc.method("sparsevlm", llm_positions="original")
    with pytest.raises(tc.TokencompError, match="cannot place"):
        tc.Engine(models["llava"], tc.method("sparsevlm"))  # 4 layers: no room for 3 sparse layers


def test_recycling_needs_contiguous_positions(models):
    class Merge(tc.LayerStrategy):
        llm_positions = "original"

        def prune_layers(self, num_layers):
            return [1]

        def keep(self, ctx):
            return ctx.valid

        def recycle_tokens(self, ctx, keep):
            return None

    with pytest.raises(tc.TokencompError, match="contiguous"):
        tc.Engine(models["llava"], [Merge()])


def test_sparsevlm_overhead_counts_the_tokens_it_clusters(models, images, monkeypatch):
    import tokencomp.methods.sparsevlm as sv

    clustered = []
    real = sv.dpc_knn_merge
    monkeypatch.setattr(sv, "dpc_knn_merge", lambda x, ok, k, be: clustered.append(int(ok.sum())) or real(x, ok, k, be))
    model = models["llava"]
    method = tc.method("sparsevlm", counts=(20, 10, 4), layers=(0, 1, 2))
    pre = tc.Engine(model, method).prefill(tc.prepare(model, images[:1], PROMPTS[:1]))
    d = model.hf.config.text_config.hidden_size
    v, n = pre.record.visual_per_layer[0][0], pre.record.tokens_per_layer[0][0]
    assert len(clustered) == 3
    assert method.overhead_flops(model, pre.record, 0) == 2 * v * (n - v) * d + sum(2 * t * t * d for t in clustered)


@pytest.mark.parametrize(
    "combo",
    [
        lambda: [tc.method("visionzip", budget=20), tc.method("sparsevlm", counts=(12, 5), layers=(0, 2))],
        lambda: [tc.method("fastv", k=2, ratio=0.25), tc.method("sparsevlm", counts=(20, 6), layers=(1, 2))],
        lambda: [tc.method("sparsevlm", counts=(20, 6), layers=(0, 1)), tc.method("freeze", layers=(2, 3))],
    ],
)
def test_sparsevlm_composes_in_padded_batches(model, images, combo):
    """With a vision strategy before it, FastV pruning at one of its layers, or frozen layers after
    it, each sample of a padded batch still gets what it gets alone, merged tokens included."""
    batch = tc.prepare(model, images, PROMPTS)
    tokens, pre = tc.Engine(model, combo()).generate(batch, max_new_tokens=3, eos_token_id=None)
    for b in range(3):
        t1, alone = tc.Engine(model, combo()).generate(
            tc.prepare(model, [images[b]], [PROMPTS[b]]), max_new_tokens=3, eos_token_id=None
        )
        assert tokens[b] == t1[0]
        assert pre.record.visual_per_layer[b] == alone.record.visual_per_layer[0]
        torch.testing.assert_close(pre.logits[b], alone.logits[0], rtol=1e-4, atol=1e-4)
        st = pre.state
        assert (st.orig_index[b][st.valid[b]] < 0).sum() == (alone.state.orig_index[0] < 0).sum() > 0


def test_published_schedules_at_llava15_token_counts(images):
    """At LLaVA-1.5's 576 tokens on a 32-layer decoder: SparseVLM prunes after layers 2 / 6 / 15 to
    the published counts plus its recycled clusters; DART keeps 4 pivots + 8 x 16 from layer 2."""
    from tokencomp.tiny import tiny_llava

    model = tc.Model(*tiny_llava("llava", seed=1, text_layers=32, image_size=336))
    batch = tc.prepare(model, images[:1], PROMPTS[:1])

    def expected(counts):
        v, out = 576, []
        for k in counts:
            kept = min(k, v - 1)
            take = int((v - kept) * 0.3) + 1
            v = kept + int(take / 10) + 1
            out.append(v)
        return out

    for budget in (192, 128, 64):
        visual = tc.Engine(model, tc.method("sparsevlm", budget=budget)).prefill(batch).record.visual_per_layer[0]
        assert visual[:3] == [576] * 3
        assert [visual[3], visual[7], visual[16]] == expected(tc.method("sparsevlm", budget=budget).counts)
        assert visual[3:7] == [visual[3]] * 4 and visual[16:] == [visual[16]] * 16
    assert expected((66, 30, 17)) == [82, 32, 18]
    visual = tc.Engine(model, tc.method("dart")).prefill(batch).record.visual_per_layer[0]
    assert visual == [576, 576] + [4 + 8 * 16] * 30


def test_recycling_merges_only_what_sparsevlm_itself_drops(model, images):
    """Composed with a strategy that drops other image tokens at the same layer, SparseVLM merges
    exactly the tokens it merges alone (its own deletions), and the kept set is the intersection."""
    batch = tc.prepare(model, images, PROMPTS)

    class LateHalf(tc.LayerStrategy):
        """Drops the second half of each sample's image span before layer 2."""

        def prune_layers(self, num_layers):
            return [2]

        def keep(self, ctx):
            rank = ctx.image_mask.long().cumsum(1)
            return ctx.valid & ~(ctx.image_mask & (rank > ctx.image_count[:, None] // 2))

    def run(strategies):
        sv = strategies[0]
        made, real = [], sv.recycle_tokens
        sv.recycle_tokens = lambda ctx, keep: made.append(real(ctx, keep)) or made[-1]
        pre = tc.Engine(model, strategies).prefill(batch)
        return made[0], pre.state

    (alone_tok, alone_n), alone = run([tc.method("sparsevlm", counts=(12,), layers=(1,))])
    (both_tok, both_n), both = run([tc.method("sparsevlm", counts=(12,), layers=(1,)), LateHalf()])
    assert alone_n.tolist() == both_n.tolist() and bool((alone_n > 0).all())
    torch.testing.assert_close(both_tok, alone_tok, rtol=0, atol=0)
    inp = tc.Engine(model).prefill(batch).input_state
    for b in range(3):
        span = inp.orig_index[b][inp.valid[b] & (inp.kind[b] >= tc.strategy.VISUAL)].tolist()
        dropped = set(span[len(span) // 2 :])  # LateHalf's, in original indices
        src = alone.orig_index[b][alone.valid[b] & (alone.orig_index[b] >= 0)].tolist()
        expect = [i for i in src if i not in dropped]
        got = both.orig_index[b][both.valid[b] & (both.orig_index[b] >= 0)].tolist()
        assert got == expect
        assert len(got) < len(src)  # the other strategy did drop some of SparseVLM's kept tokens
