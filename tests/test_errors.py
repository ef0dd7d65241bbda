"""Bad input gets a clear error naming the value and the allowed range, before any forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

import tokencomp as tc


@pytest.fixture
def forward_calls(model):
    """Counts calls into the vision tower and the first decoder layer while a test runs."""
    calls = []
    hooks = [
        model.vision_model.embeddings.register_forward_pre_hook(lambda *a: calls.append("vision")),
        model.layers[0].register_forward_pre_hook(lambda *a: calls.append("decoder")),
        model.embed_tokens.register_forward_pre_hook(lambda *a: calls.append("embed")),
    ]
    yield calls
    for h in hooks:
        h.remove()


@tc.register("_test-needs-crops")
class _NeedsCrops(tc.VisionStrategy):
    """Stands in for a crop-allocation method (GlobalCom²-like) that cannot serve LLaVA-1.5."""

    def check(self, info):
        if not info.has_crops:
            raise tc.UnsupportedModelError(
                f"{self.name} needs a model with AnyRes crops; family {info.family!r} has none"
            )

    def select(self, view):
        return view.features.norm(dim=-1).topk(3, dim=-1).indices


def test_unknown_method():
    with pytest.raises(tc.UnknownMethodError, match="unknown method 'nope'.*available methods:.*fastv") as err:
        tc.method("nope")
    assert "_rank-probe" not in str(err.value)  # internal names ("_...") are not offered
    with pytest.raises(tc.TokencompError, match="no parameter.*'budgett'.*accepted"):
        tc.method("random", budgett=3)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: tc.method("random", budget=0), r"budget.*=0 is outside the allowed range \[1, 36\]"),
        (lambda: tc.method("random", budget=-4), r"budget.*=-4 is outside the allowed range \[1, 36\]"),
        (lambda: tc.method("random", budget=37), r"budget.*=37 is outside the allowed range \[1, 36\]"),
        (lambda: tc.method("pool", budget=500), r"budget.*=500 is outside the allowed range \[1, 36\]"),
        (lambda: tc.method("pool", budget=7), r"must multiply to budget=7 and fit the \(6, 6\)"),
        (lambda: tc.method("fastv", k=4), r"fastv\(k=4.*prune before layer=4 is outside the allowed range \[1, 3\]"),
        # past the last layer: named by the user's k, not the capture layer k - 1 derived from it
        (lambda: tc.method("fastv", k=9), r"fastv\(k=9.*prune before layer=9 is outside the allowed range \[1, 3\]"),
        (lambda: tc.method("fastv", k=0), r"fastv\(k=0.*prune before layer=0 is outside the allowed range \[1, 3\]"),
        (lambda: tc.method("dart", k=9, budget=8), r"dart\(k=9.*prune before layer=9 is outside the allowed range"),
        # SparseVLM prunes after its layers: named as given, not as the prune layer derived from them
        (
            lambda: tc.method("sparsevlm", counts=(20, 6), layers=(1, 3)),
            r"layers \(sparse layers\)=3 is outside the allowed range \[0, 2\]",
        ),
        (
            lambda: tc.method("fastv", budget=10_000),
            r"budget \(image tokens kept\)=10000 is outside the allowed range \[1, \d+\]",
        ),
        (
            lambda: tc.method("freeze", layers=(1, 9)),
            r"freeze\(layers=\(1, 9\).*\): frozen layer=9 is outside the allowed range \[0, 3\]",
        ),
    ],
)
def test_bad_budget_before_any_forward(model, images, forward_calls, make, pattern):
    with pytest.raises(tc.BudgetError, match=pattern):
        tc.generate(model, images[:1], PROMPTS[:1], method=make())
    assert forward_calls == []


def test_sparsevlm_layers_must_be_layer_numbers():
    for layers, pattern in (((-1, 2), r"layers \(sparse layers\)=-1 is outside"), (("0", "2"), "must be an integer")):
        with pytest.raises(tc.BudgetError, match=pattern):
            tc.method("sparsevlm", counts=(20, 6), layers=layers)


def test_bad_ratio_at_construction():
    with pytest.raises(tc.BudgetError, match=r"ratio=1.0 is outside the allowed range \[0.0, 1.0\)"):
        tc.method("fastv", ratio=1.0)


def test_bad_in_llm_settings_before_any_work(models):
    from tokencomp.methods.gsearch import gsearch, psigmoid

    with pytest.raises(tc.TokencompError, match="n= .* applies to calibration= only"):
        tc.method("shortv", layers=(1, 2), n=3)
    with pytest.raises(tc.TokencompError, match="scoring must be"):
        tc.method("pdrop", scoring="next")
    model = models["llava"]
    for search in (gsearch, lambda m, b, first_pruned: psigmoid(m, b, 0.5, first_pruned=first_pruned)):
        for bad in (0, model.num_layers):
            with pytest.raises(tc.BudgetError, match=f"first_pruned .*={bad} is outside the allowed range"):
                search(model, [], first_pruned=bad)  # no calibration batches: it must stop before using them


def test_method_model_cannot_serve(models, images):
    llava = models["llava"]
    calls = []
    h = llava.vision_model.embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(tc.UnsupportedModelError, match="needs a model with AnyRes crops.*'llava'"):
            tc.generate(llava, images[:1], PROMPTS[:1], method=_NeedsCrops())
    finally:
        h.remove()
    assert calls == []
    out = tc.generate(models["llava-next"], images[:1], PROMPTS[:1], method=_NeedsCrops(), max_new_tokens=1)
    assert out.record.visual_tokens_llm[0] > 0


def test_image_count_mismatch(model, images, forward_calls):
    with pytest.raises(tc.InputMismatchError, match="prompt 0 has 1 <image> placeholder.*2 image"):
        tc.generate(model, [images[:2]], PROMPTS[:1])
    with pytest.raises(tc.InputMismatchError, match="prompt 1 has 2 <image> placeholder.*1 image"):
        tc.generate(model, images[:2], [PROMPTS[0], "<image> <image> what ?"])
    with pytest.raises(tc.InputMismatchError, match="2 prompt.*3 image entries"):
        tc.generate(model, images, PROMPTS[:2])
    # a processed batch whose placeholders do not match its images (engine-level check)
    batch = tc.prepare(model, images[:2], PROMPTS[:2])
    batch.pixel_values = batch.pixel_values[:1]
    if batch.image_sizes is not None:
        batch.image_sizes = batch.image_sizes[:1]
    with pytest.raises(tc.InputMismatchError, match="more image placeholders than the 1 image"):
        tc.Engine(model).prefill(batch)
    assert forward_calls == []


@pytest.mark.parametrize("hole", ["last", "inside"])
def test_batch_not_left_padded(model, images, forward_calls, hole):
    batch = tc.prepare(model, images[:2], PROMPTS[:2])
    row = int(batch.attention_mask.sum(1).argmin())  # the shorter prompt has padding to play with
    if hole == "last":
        batch.attention_mask[row] = batch.attention_mask[row].flip(0)
    else:  # a gap after the first real token: the row is no longer padding, then tokens
        first = int(batch.attention_mask[row].argmax())
        batch.attention_mask[row, first + 1] = 0
    with pytest.raises(tc.InputMismatchError, match="must be left padded"):
        tc.Engine(model).prefill(batch)
    assert forward_calls == []


def test_composition_errors(model):
    with pytest.raises(tc.TokencompError, match="at most one vision strategy"):
        tc.Engine(model, [tc.method("random"), tc.method("pool")])
    with pytest.raises(tc.TokencompError, match="expected a tokencomp strategy"):
        tc.Engine(model, ["fastv"])


def test_overhead_flops_that_is_not_a_count_is_named(models, images):
    """A custom strategy whose overhead_flops returns no number fails generate with its name."""
    model = models["llava"]

    class Sloppy(tc.LayerStrategy):
        def prune_layers(self, num_layers):
            return []

        def overhead_flops(self, model, record, sample):
            return None  # forgot the return value

    with pytest.raises(tc.TokencompError, match=r"Sloppy.*overhead_flops must return a FLOP count >= 0, got None"):
        tc.Engine(model, [Sloppy()]).generate(tc.prepare(model, images[:1], PROMPTS[:1]), max_new_tokens=1)


class _Uneven(tc.VisionStrategy):
    """Keeps 5 tokens of the first view and 15 of the others: samples of different lengths."""

    def select(self, view):
        return [torch.arange(5 if v == 0 else 15) for v in range(view.num_views)]


def test_flash_attention_refuses_samples_of_different_lengths(models, images, monkeypatch):
    """FlashAttention would read the engine's (B, 1, q, n) mask as a padding mask: a clear error
    before the first decoder layer runs, instead of wrong attention."""
    model = models["llava"]
    batch = tc.prepare(model, images[:2], [PROMPTS[0]] * 2)  # no padding in the prompt
    calls = []
    h = model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(model, "attn_implementation", "flash_attention_2")
    try:
        with pytest.raises(tc.TokencompError, match="cannot run samples of different lengths"):
            tc.Engine(model, _Uneven()).prefill(batch)
    finally:
        h.remove()
    assert calls == []


def test_flash_attention_decodes_past_a_finished_sample(models, images, monkeypatch):
    """With FlashAttention (no masks), a same-length batch in which one sample reaches EOS keeps
    decoding the others, which get the tokens they get alone (the finished sample's padding steps
    change only its own, discarded rows)."""
    model = models["llava"]
    batch = tc.prepare(model, images[:2], [PROMPTS[1]] * 2)  # no padding in the prompt
    free, _ = tc.Engine(model).generate(batch, max_new_tokens=6, eos_token_id=None)
    # an EOS sample 0 emits before its last step and sample 1 never does
    k = next(k for k in range(1, 5) if free[0][k] not in free[1] and free[0][k] not in free[0][:k])
    monkeypatch.setattr(model, "attn_implementation", "flash_attention_2")
    tokens, _ = tc.Engine(model).generate(batch, max_new_tokens=6, eos_token_id=free[0][k])
    assert tokens[0] == free[0][: k + 1] and tokens[1] == free[1]


@tc.register("_test-late-capture")
class _LateCapture(tc.LayerStrategy):
    """Prunes before layer 2 on the attention captured while layer 2 runs: too late."""

    def needs(self):
        return [tc.Need("decoder_attention_last", 2)]

    def prune_layers(self, num_layers):
        return [2]

    def keep(self, ctx):
        return ctx.keep_top(ctx.attention(2), 4)


def test_errors_name_the_method_and_what_to_pass_instead(model, images):
    with pytest.raises(tc.BudgetError, match=r"^fastv: budget \(image tokens kept\)=10000"):
        tc.generate(
            model, images[:1], PROMPTS[:1], method=[tc.method("random", budget=9), tc.method("fastv", budget=10_000)]
        )
    with pytest.raises(tc.TokencompError, match=r"got str: 'fastv'; build one by name with tc.method\('fastv', ...\)"):
        tc.generate(model, images[:1], PROMPTS[:1], method="fastv")
    with pytest.raises(tc.TokencompError, match=r"_LateCapture is a class: pass an instance"):
        tc.generate(model, images[:1], PROMPTS[:1], method=_LateCapture)
    with pytest.raises(KeyError, match=r"read before decoder layer 2, but a capture at layer 2 is taken while"):
        tc.generate(model, images[:1], PROMPTS[:1], method=_LateCapture())


class _OwnError(tc.BudgetError):
    def __init__(self, value, allowed):
        super().__init__(f"value={value} outside {allowed}")


@tc.register("_test-own-error")
class _OwnErrorStrategy(tc.VisionStrategy):
    """Raises an error class of its own, which takes two arguments."""

    def check(self, info):
        raise _OwnError(7, "[0, 3]")


def test_a_strategys_own_error_class_is_still_named(model, images):
    with pytest.raises(tc.TokencompError, match=r"^_test-own-error: value=7 outside \[0, 3\]"):
        tc.generate(model, images[:1], PROMPTS[:1], method=tc.method("_test-own-error"))


def test_pinpoints_not_multiples_of_the_view_size_are_refused():
    """The processor would cut 3 views where the model counts 2 (and HF's own forward fails)."""
    from tokencomp.tiny import tiny_llava

    hf, proc = tiny_llava("llava-next", image_size=56)
    hf.config.image_grid_pinpoints = [[56, 84], [84, 56]]
    with pytest.raises(tc.UnsupportedModelError, match=r"\[\[56, 84\], \[84, 56\]\].*multiples of the view size 56"):
        tc.Model(hf, proc)


def test_processor_views_checked_against_the_model_before_work(images):
    """A processor with other pinpoints than the model's: the view mismatch is named (pinpoints,
    view size) before the vision tower runs."""
    from tokencomp.tiny import tiny_llava

    hf, proc = tiny_llava("llava-next", image_size=28)
    model = tc.Model(hf, proc)
    proc.image_processor.image_grid_pinpoints = [[28, 56]]  # every image: thumbnail + 1x2 crops
    calls = []
    handle = model.vision_model.embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        # the model cuts this image into 2x2 crops (pinpoint 56x56), the processor into 1x2
        batch = tc.prepare(model, [images[0]], [PROMPTS[0]])
        with pytest.raises(tc.InputMismatchError, match=r"fewer views than the model's 5 .*pinpoints \[\[28, 56\]"):
            tc.Engine(model).prefill(batch)
    finally:
        handle.remove()
    assert calls == []
