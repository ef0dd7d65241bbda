"""DivPrune equals an independent reference built from the unmodified HF model (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, batch_and_alone, hf_inputs
from reference import divprune_reference

import tokencomp as tc
from tokencomp.methods.divprune import max_min_diverse


@pytest.mark.parametrize("params", [{"budget": 9}, {"budget": 20}, {"ratio": 0.098}, {"ratio": 0.25}])
def test_divprune_matches_reference_prefill_and_decode(model, images, params):
    method = tc.method("divprune", **params)
    for i, text in enumerate(PROMPTS):
        batch = tc.prepare(model, [images[i]], [text])
        kept, ref_logits, ref_tokens = divprune_reference(
            model.hf, hf_inputs(batch), model.image_token_id, steps=4, **params
        )
        tokens, pre = tc.Engine(model, method).generate(batch, max_new_tokens=4, eos_token_id=None)
        assert pre.state.orig_index[0].tolist() == kept.tolist()
        assert pre.state.positions[0].tolist() == list(range(len(kept)))  # the shortened prompt renumbered
        torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == ref_tokens


def test_divprune_is_batch_independent_and_keeps_its_counts(model, images):
    """A padded batch of three images (NeXT: three crop grids, newlines in each span) keeps per
    sample what each keeps alone; ``ratio`` keeps int(round(ratio * n)) of each image's n."""
    method = tc.method("divprune", ratio=0.3)
    pre, alone = batch_and_alone(tc.Engine(model, method), model, images, PROMPTS, new_tokens=2)
    for b, one in enumerate(alone):
        lay = pre.state.layout(b)
        assert lay["orig_index"].tolist() == one.state.orig_index[0].tolist()
        (n,) = one.record.span_tokens[0]
        assert one.record.visual_per_layer[0][0] == int(round(0.3 * n))


def test_greedy_selection_against_a_loop_and_on_ties():
    """The batched greedy equals the released per-image loop on random distances of several
    sizes; with all distances equal the first token is picked first, then (no masking, as
    released) the first token again, so fewer tokens are kept than asked."""
    gen = torch.Generator().manual_seed(0)
    sizes, counts = [7, 12, 3], [4, 12, 2]
    width = max(sizes)
    dist = torch.rand(3, width, width, generator=gen)
    valid = torch.arange(width) < torch.tensor(sizes)[:, None]
    chosen = max_min_diverse(dist, valid, torch.tensor(counts))
    for g, (n, k) in enumerate(zip(sizes, counts)):
        d, picks = dist[g, :n, :n], []
        for i in range(k):
            scores = d.topk(2, dim=0, largest=False).values[1] if i == 0 else d[picks].min(0).values
            picks.append(int(scores.argmax()))
        assert chosen[g].nonzero().flatten().tolist() == sorted(set(picks))
    flat = max_min_diverse(torch.zeros(1, 5, 5), torch.ones(1, 5, dtype=torch.bool), torch.tensor([3]))
    assert flat[0].tolist() == [True, False, False, False, False]


def test_divprune_prunes_the_llm_input_after_a_vision_method(models, images):
    """Composed after VisionZip, DivPrune chooses among the tokens VisionZip sends."""
    model = models["llava"]
    engine = tc.Engine(model, [tc.method("visionzip", dominant=12, contextual=4), tc.method("divprune", budget=7)])
    _, pre = engine.generate(tc.prepare(model, images[:1], PROMPTS[:1]), max_new_tokens=1, eos_token_id=None)
    assert pre.record.span_tokens == [[16]] and pre.record.visual_per_layer[0][0] == 7


@pytest.mark.parametrize(
    "kwargs,match",
    [({"ratio": 1.5}, r"ratio=1.5 is outside"), ({"budget": 0}, r"budget \(image tokens kept\)=0 is outside")],
)
def test_divprune_rejects_bad_parameters(models, images, kwargs, match):
    model = models["llava"]
    with pytest.raises(tc.BudgetError, match=match):
        engine = tc.Engine(model, tc.method("divprune", **kwargs))
        engine.generate(tc.prepare(model, images[:1], PROMPTS[:1]), max_new_tokens=1, eos_token_id=None)
