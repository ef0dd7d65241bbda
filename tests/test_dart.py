"""DART equals an independent reference built from the unmodified HF model (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_inputs
from reference import dart_reference

import tokencomp as tc
from tokencomp.profiler import run_flops

# one text token after the image: fewer than the text pivots asked for
SHORT_TAIL = "USER : what is in the picture ? <image> go"


@pytest.fixture(scope="module")
def normed_model(model):
    """The tiny model with a non-uniform final norm weight (random init leaves it all ones, under
    which cosine similarity cannot tell normed from raw hidden states)."""
    import copy

    hf = copy.deepcopy(model.hf)
    with torch.no_grad():
        hf.model.language_model.norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    return tc.Model(hf, model.processor)


@pytest.mark.parametrize(
    "k,budget,pivots,count",
    [
        (2, 16, (2, 2), "code"),
        (1, 11, (3, 2), "exact"),
        (3, 8, (1, 4), "exact"),
        # 5 to 7 pivots: CPython lists such small sets in an order a copy of the set can change
        (2, 18, (4, 2), "code"),
        (2, 10, (3, 2), "code"),
        (1, 12, (4, 1), "exact"),
        (2, 12, (2, 4), "code"),
    ],
)
def test_dart_matches_reference_prefill_and_decode(normed_model, images, k, budget, pivots, count):
    model = normed_model
    method = tc.method("dart", k=k, budget=budget, pivot_image=pivots[0], pivot_text=pivots[1], count=count)
    for i, text in enumerate([*PROMPTS, SHORT_TAIL]):
        batch = tc.prepare(model, [images[i % 3]], [text])
        kept, ref_logits, ref_tokens = dart_reference(
            model.hf, hf_inputs(batch), model.image_token_id, k, budget, pivots, steps=4, exact=count == "exact"
        )
        tokens, pre = tc.Engine(model, method).generate(batch, max_new_tokens=4, eos_token_id=None)
        assert pre.state.orig_index[0].tolist() == kept.tolist()
        assert pre.state.positions[0].tolist() == kept.tolist()  # original position ids
        torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == ref_tokens


def test_dart_keeps_the_documented_counts_and_is_batch_independent(model, images):
    """Counts per sample in a padded batch with a short text tail (one text pivot fewer) and a
    text-only sample, and each sample keeps what it keeps alone."""
    prompts = [*PROMPTS, SHORT_TAIL, "USER : say hi . ASSISTANT :"]
    imgs = [*images, images[0], None]
    batch = tc.prepare(model, imgs, prompts)
    n_img = [v[0] for v in tc.Engine(model).prefill(batch).record.visual_per_layer]  # image span, newlines in
    assert n_img[4] == 0
    for count in ("code", "exact"):
        method = tc.method("dart", budget=16, pivot_image=2, pivot_text=2, count=count)
        pre = tc.Engine(model, method).prefill(batch)
        # code: 2 image pivots + 16 // 4 per pivot; the short tail has 3 pivots. exact: 16
        expect = [2 + 4 * 4] * 3 + [2 + 4 * 3, 0] if count == "code" else [16] * 4 + [0]
        for b in range(5):
            assert pre.record.visual_per_layer[b][:2] == [n_img[b]] * 2
            assert pre.record.visual_per_layer[b][2:] == [expect[b]] * (model.num_layers - 2)
            alone = tc.Engine(model, method).prefill(tc.prepare(model, [imgs[b]], [prompts[b]]))
            st = pre.state
            assert st.orig_index[b][st.valid[b]].tolist() == alone.state.orig_index[0].tolist()


@pytest.mark.parametrize("before", ["pool", "visionzip"])
def test_dart_after_a_vision_method_keeps_its_count(model, images, before):
    """After pooling (every token without a prompt index) or VisionZip (merged contextual tokens),
    each pivot is still its own reference: code mode keeps pivot_image + per_pivot x pivots (of the
    image span, LLaVA-NeXT newlines in, as DART pools it)."""
    batch = tc.prepare(model, images, PROMPTS)
    first = tc.method(before, budget=36) if before == "pool" else tc.method("visionzip", dominant=20, contextual=16)
    method = tc.method("dart", k=1, budget=16, pivot_image=2, pivot_text=2)
    pre = tc.Engine(model, [first, method]).prefill(batch)
    for b in range(3):
        assert pre.record.visual_per_layer[b][1:] == [2 + 4 * 4] * (model.num_layers - 1)


def test_dart_keeps_dissimilar_tokens_not_salient_ones(normed_model, images):
    """Duplication matters: with one image pivot and no text pivot, the kept tokens are the pivot
    (largest key norm) and the 9 image tokens least similar to it, not the largest key norms."""
    model = normed_model
    batch = tc.prepare(model, images[:1], PROMPTS[:1])
    method = tc.method("dart", k=2, budget=9, pivot_image=1, pivot_text=0)
    pre = tc.Engine(model, method).prefill(batch)
    captured = {}

    class Spy(tc.LayerStrategy):
        def needs(self):
            return [tc.Need("decoder_key_norm", 1)]

        def prune_layers(self, num_layers):
            return [2]

        def keep(self, ctx):
            captured["norm"] = ctx.key_norm(1)[0].clone()
            captured["h"] = ctx.final_norm(ctx.hidden)[0].clone()
            captured["img"] = ctx.image_mask[0].clone()
            return ctx.valid

    tc.Engine(model, [Spy()]).prefill(batch)
    img = captured["img"].nonzero().flatten()
    pivot = img[captured["norm"][img].argmax()]
    h = torch.nn.functional.normalize(captured["h"].float(), dim=-1)
    sim = h[img] @ h[pivot]
    least = set(img[sim.argsort()[:9]].tolist()) | {int(pivot)}
    kept = set(pre.state.orig_index[0][pre.state.kind[0] >= tc.strategy.VISUAL].tolist())
    assert kept == least
    assert kept != set(img[captured["norm"][img].argsort(descending=True)[:10]].tolist())


def test_key_norm_and_attention_rows_on_one_layer_equal_each_alone(model, images):
    """A layer captured for both key norms and attention rows (the keys' RoPE is computed once per layer and
    shared) gives each capture exactly as when it is asked for alone."""
    batch = tc.prepare(model, images, PROMPTS)

    class Spy(tc.LayerStrategy):
        def __init__(self, *needs):
            self.wanted = list(needs)

        def needs(self):
            return self.wanted

        def prune_layers(self, num_layers):
            return []

    norm, rows = tc.Need("decoder_key_norm", 1), tc.Need("decoder_attention_text", 1)
    later = (tc.Need("decoder_key_norm", 2), tc.Need("decoder_attention_last", 2))  # no keys shared across layers
    both = tc.Engine(model, [Spy(norm, rows, *later)]).prefill(batch).captures
    for need in (norm, rows, *later):
        alone = tc.Engine(model, [Spy(need)]).prefill(batch).captures[need]
        torch.testing.assert_close(both[need], alone, rtol=0, atol=0)
    assert not torch.equal(both[norm], both[later[0]])
    keys = tc.Engine(model, [Spy(norm)]).prefill(batch).captures[norm]
    assert keys.shape == batch.input_ids.shape[:1] + keys.shape[1:] and bool((keys > 0).any())


def test_dart_overhead_counts_its_similarity_matmul(models, images):
    """The analytic overhead covers the pivot-to-token similarities that torch's FLOP counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models["llava"]
    batch = tc.prepare(model, images[:1], PROMPTS[:1])
    method = tc.method("dart", budget=12, pivot_image=2, pivot_text=3)
    counter = FlopCounterMode(display=False)
    original = method.keep

    def counted(ctx):
        with counter:
            return original(ctx)

    method.keep = counted
    pre = tc.Engine(model, method).prefill(batch)
    measured = counter.get_total_flops()
    assert measured > 0
    with_dart = run_flops(model, pre.record, [method])[0].overhead
    without = run_flops(model, pre.record, [])[0].overhead
    d = model.hf.config.text_config.hidden_size
    n = pre.record.tokens_per_layer[0][1]
    assert with_dart - without == measured == 2 * 5 * n * d  # 5 pivots x n tokens x d


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0}, "budget"),
        ({"pivot_image": 5, "budget": 4}, "pivot_image"),
        ({"pivot_image": 0, "pivot_text": 0}, "pivot"),
        ({"count": "all"}, "count"),
        ({"similarity": "cosine"}, "similarity"),
        ({"pivot_order": "random"}, "pivot_order"),
        ({"k": 0}, "k"),
    ],
)
def test_dart_rejects_bad_parameters(kwargs, match):
    with pytest.raises(tc.TokencompError, match=match):
        tc.method("dart", **kwargs)


def test_dart_budget_beyond_the_image_is_refused_before_work(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images[:1], PROMPTS[:1])
    with pytest.raises(tc.BudgetError, match="budget"):
        tc.Engine(model, tc.method("dart", budget=1000)).prefill(batch)


def test_pivot_order_is_the_released_list_of_the_set():
    """The pivots are visited in the order of the released ``list(set(image + text))`` (each part by
    descending key norm). For these six indices a copy of the set lists them otherwise
    ([612, 615, 120, 88, 300, 45]), which the previous code followed."""
    from types import SimpleNamespace

    from tokencomp.methods.dart import DART

    image, text = [120, 88, 300, 45], [612, 615]  # each by descending norm
    n = 640
    norm = torch.zeros(1, n)
    for rank, c in enumerate(image + text):
        norm[0, c] = 100.0 - rank
    image_pivots = torch.zeros(1, n, dtype=torch.bool)
    text_pivots = torch.zeros(1, n, dtype=torch.bool)
    image_pivots[0, image] = True
    text_pivots[0, text] = True
    ctx = SimpleNamespace(valid=torch.ones(1, n, dtype=torch.bool))
    index, valid = DART.set_order(ctx, norm, image_pivots, text_pivots)
    assert index[0].tolist() == list(set(image + text))  # the released expression, in this interpreter
    assert valid.all()
