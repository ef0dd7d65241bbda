"""The conformance matrix: every supported decoder inside LLaVA-1.5 and LLaVA-NeXT equals the
unmodified Hugging Face model, with sliding windows shorter than the prompt where the decoder has
them, per-layer-type rotary (Gemma3), logit soft-capping and query_pre_attn_scalar (Gemma2 / 3),
per-head query/key norms (Qwen3, Gemma3) and a fused qkv projection (Phi-3).

The references are Hugging Face's own code: the model's forward and ``generate``, its eager
attention maps (FastV's ranking), a fresh decoder built from the layers' config and weights that
runs the pruned sequence with the masks and rotary embeddings transformers builds for it, and the
model's forward with a hook that passes a frozen layer's image tokens through.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROMPTS, hf_inputs, make_images
from transformers import AutoModel

import tokencomp as tc
from tokencomp.errors import UnsupportedModelError
from tokencomp.tiny import tiny_llava

WINDOW = 12  # shorter than every prompt (LLaVA-1.5: 36 image tokens; NeXT: over 100)
DECODERS = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "gemma": {},
    # eager: transformers' Gemma2 does not support SDPA (it has no soft-cap); a cap small enough to bite
    # on tiny random weights (their scaled logits stay near 0.1)
    "gemma2": {"sliding_window": WINDOW, "attn_logit_softcapping": 0.05, "query_pre_attn_scalar": 24},
    "gemma3_text": {"sliding_window": WINDOW, "query_pre_attn_scalar": 24, "sliding_window_pattern": 2},
    "phi3": {"sliding_window": WINDOW, "partial_rotary_factor": 0.5},
}
EAGER = {"gemma2"}


@pytest.fixture(scope="module", params=[(f, d) for f in ("llava", "llava-next") for d in DECODERS], ids=str)
def case(request):
    family, decoder = request.param
    attn = "eager" if decoder in EAGER else "sdpa"
    hf, proc = tiny_llava(family, seed=2, decoder=decoder, decoder_config=DECODERS[decoder], attn_implementation=attn)
    return tc.Model(hf, proc), decoder


@pytest.fixture(scope="module")
def images():
    return make_images()


def _eager(model: tc.Model):
    hf = copy.deepcopy(model.hf)
    hf.set_attn_implementation("eager")
    return hf


def test_identity_forward_and_window_matters(case, images):
    model, decoder = case
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model).prefill(batch, all_logits=True)
    with torch.no_grad():
        ref = model.hf(**hf_inputs(batch)).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(pre.logits[pre.state.valid], ref[valid].float(), rtol=1e-4, atol=1e-4)
    # the window and the soft-cap shape the output: a model without them would not pass
    for key, off in (("sliding_window", 10**6), ("attn_logit_softcapping", None)):
        if DECODERS[decoder].get(key):
            other = copy.deepcopy(model.hf)
            setattr(other.config.text_config, key, off)
            for layer in other.model.language_model.layers:
                if key == "attn_logit_softcapping":
                    layer.self_attn.attn_logit_softcapping = off
            with torch.no_grad():
                far = other(**hf_inputs(batch)).logits
            assert (far[valid] - ref[valid]).abs().max() > 1e-3, key


def test_identity_generate(case, images):
    model, _ = case
    batch = tc.prepare(model, images, PROMPTS)
    tokens, _ = tc.Engine(model).generate(batch, max_new_tokens=12, eos_token_id=None)
    with torch.no_grad():
        ref = model.hf.generate(
            **hf_inputs(batch), max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None
        )
    assert tokens == ref[:, batch.input_ids.shape[1] :].tolist()


def test_padded_batch_equals_each_alone(case, images):
    model, _ = case
    batch = tc.prepare(model, images, PROMPTS)
    assert bool((batch.attention_mask == 0).any())
    for method in (None, tc.method("fastv", k=2, budget=8, query="all")):  # per-sample keep counts too
        engine = tc.Engine(model, method)
        tokens, pre = engine.generate(batch, max_new_tokens=6, eos_token_id=None)
        for i in range(len(PROMPTS)):
            one, p1 = engine.generate(tc.prepare(model, [images[i]], [PROMPTS[i]]), max_new_tokens=6, eos_token_id=None)
            assert one[0] == tokens[i]
            torch.testing.assert_close(p1.logits[0], pre.logits[i], rtol=1e-4, atol=1e-4)


@tc.register("_test-conformance-captures")
class _Captures(tc.LayerStrategy):
    """Asks for every decoder capture at layers 1 and 2 (a full and a sliding layer where the
    decoder alternates) and keeps every token."""

    def needs(self):
        kinds = ["decoder_attention_last", "decoder_attention_all", "decoder_attention_text"]
        kinds += ["decoder_preprune_attention_last", "decoder_key_norm"]
        return [tc.Need(kind, layer) for kind in kinds for layer in (1, 2)]

    def prune_layers(self, num_layers):
        return [2, 3]

    def keep(self, ctx):
        return ctx.valid


def test_captured_rows_and_key_norms_match_hf(case, images):
    """The rows FastV, PDrop, SparseVLM and the schedules rank by, and DART's key norms, are the
    model's own: eager attention maps (window, soft-cap, query scale, rotary of the layer's kind,
    per-head norms, fused projection) and the keys transformers caches."""
    from transformers import DynamicCache

    model, _ = case
    batch = tc.prepare(model, images, PROMPTS)  # padded
    pre = tc.Engine(model, _Captures()).prefill(batch)
    # position ids that skip the left padding (as generate gives them): key norms are not invariant
    # to a shift of every position, as attention is
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = _eager(model)(
            **hf_inputs(batch), position_ids=positions, output_attentions=True, use_cache=True, cache=DynamicCache()
        )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    valid = batch.attention_mask.bool()
    for layer in (1, 2):
        att = out.attentions[layer]  # (B, H, T, T)
        for b in range(len(PROMPTS)):
            v = valid[b]
            mine = pre.input_state.valid[b]
            text = v & (batch.input_ids[b] != model.image_token_id)
            rows = att[b][:, v][:, :, v]  # (H, n, n) over the real tokens
            refs = {
                "decoder_attention_last": rows[:, -1],
                "decoder_preprune_attention_last": rows[:, -1],
                "decoder_attention_all": rows.mean(1),
                "decoder_attention_text": att[b][:, text][:, :, v].mean(1),
            }
            for kind, ref in refs.items():
                got = pre.captures[tc.Need(kind, layer)][b, :, 0, mine]
                torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5, msg=f"{kind} at layer {layer}")
            keys = cache.layers[layer].keys[b][:, v]  # (H_kv, n, d_head), RoPE applied
            norm = pre.captures[tc.Need("decoder_key_norm", layer)][b, mine]
            torch.testing.assert_close(norm, keys.float().abs().sum((0, 2)), rtol=1e-4, atol=1e-4)


IN_LLM = {
    "pdrop-preprune": lambda: tc.method("pdrop", scoring="preprune"),
    "dart": lambda: tc.method("dart", k=1, budget=8, pivot_image=2, pivot_text=2),
    "sparsevlm": lambda: tc.method("sparsevlm", counts=(12, 6), layers=(1, 2)),
    "schedule": lambda: tc.method("schedule", rates=(1, 1, 0.5, 0.25), query="text"),
}


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_methods_batch_equals_each_alone(case, images, method):
    """PDrop (pre-prune rows), DART (key norms), SparseVLM (rater rows, recycled tokens) and a
    schedule run on every decoder, a padded batch equal to each sample alone."""
    model, _ = case
    engine = tc.Engine(model, IN_LLM[method]())
    tokens, pre = engine.generate(tc.prepare(model, images, PROMPTS), max_new_tokens=4, eos_token_id=None)
    for i in range(len(PROMPTS)):
        one, p1 = engine.generate(tc.prepare(model, [images[i]], [PROMPTS[i]]), max_new_tokens=4, eos_token_id=None)
        assert one[0] == tokens[i]
        torch.testing.assert_close(p1.logits[0], pre.logits[i], rtol=1e-4, atol=1e-4)
        assert p1.record.tokens_per_layer[0] == pre.record.tokens_per_layer[i]


def _suffix_model(hf, k: int):
    """A fresh decoder of layers ``k..L-1`` of ``hf``'s (same config, same weights)."""
    lm = hf.model.language_model
    cfg = copy.deepcopy(lm.config)
    n = cfg.num_hidden_layers - k
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[k:]
    sub = AutoModel.from_config(cfg).to(lm.dtype).eval()
    for j in range(n):
        sub.layers[j].load_state_dict(lm.layers[k + j].state_dict())
    sub.norm.load_state_dict(lm.norm.state_dict())
    return sub


def _position_window_mask(positions: torch.Tensor, window: int) -> torch.Tensor:
    """``(1, 1, n, n)`` additive mask, by a loop: causal, and a key within ``window`` of the query
    in position ids."""
    n = len(positions)
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for q in range(n):
        for k in range(q + 1):
            if positions[q] - positions[k] < window:
                mask[0, 0, q, k] = 0.0
    return mask


def _fastv_reference(model: tc.Model, eager, inputs: dict, k: int, budget: int, steps: int, by_position=False):
    """FastV (mean attention over every query row) on one unpadded sample: ranked from the eager
    attention maps of layer ``k - 1``, then layers ``k..`` run by a fresh decoder on the kept tokens
    at their original positions; greedy steps recomputed without a cache. ``by_position``: the
    decoder's window counts in position ids (an explicit mask; every layer must be sliding)."""
    hf = model.hf
    suffix = _suffix_model(hf, k)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        out = eager(**inputs, output_hidden_states=True, output_attentions=True)
        img = (ids == model.image_token_id).nonzero().flatten()
        score = out.attentions[k - 1][0].mean(0).mean(0)[img]
        top = img[score.argsort(descending=True, stable=True)[:budget]]
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[img] = False
        keep[top] = True
        kept = keep.nonzero().flatten()
        x0, n = out.hidden_states[0], len(ids)
        tokens, logits = [], None
        for step in range(steps):
            if step:  # the prompt plus the tokens so far, from scratch
                x = torch.cat([x0, hf.model.language_model.embed_tokens(torch.tensor([tokens]))], dim=1)
                full = eager.model.language_model(inputs_embeds=x, output_hidden_states=True, use_cache=False)
                hidden_k = full.hidden_states[k]
            else:
                hidden_k = out.hidden_states[k]
            sel = torch.cat([kept, torch.arange(n, hidden_k.shape[1])])
            if by_position:
                mask = _position_window_mask(sel, model.hf.config.text_config.sliding_window)
            else:
                mask = torch.ones(1, len(sel), dtype=torch.long)
            h = suffix(
                inputs_embeds=hidden_k[:, sel], position_ids=sel[None], attention_mask=mask, use_cache=False
            ).last_hidden_state
            last = hf.lm_head(h[:, -1]).float()
            logits = last if logits is None else logits
            tokens.append(int(last.argmax(-1)))
    return kept, logits, tokens


def test_fastv_matches_reference(case, images):
    model, _ = case
    eager = _eager(model)
    for i in range(2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        check_fastv(model, eager, batch, hf_inputs(batch))


def check_fastv(model: tc.Model, eager, batch: tc.Batch, inputs: dict) -> None:
    """FastV (k=2, 8 tokens kept by every row's attention) on one unpadded sample equals
    `_fastv_reference`: the kept tokens, the first logits and 5 greedy tokens."""
    kept, ref_logits, ref_tokens = _fastv_reference(model, eager, inputs, k=2, budget=8, steps=5)
    tokens, pre = tc.Engine(model, tc.method("fastv", k=2, budget=8, query="all")).generate(
        batch, max_new_tokens=5, eos_token_id=None
    )
    assert pre.state.orig_index[0].tolist() == kept.tolist()
    torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
    assert tokens[0] == ref_tokens


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_window_counted_in_position_ids(family, images):
    """``EngineOptions(window="position")``: after FastV, a Mistral window spans the kept tokens'
    original positions (a loop-built mask on Hugging Face's layers), not the kept order."""
    hf, proc = tiny_llava(family, seed=2, decoder="mistral", decoder_config=DECODERS["mistral"])
    model = tc.Model(hf, proc)
    eager = _eager(model)
    method = tc.method("fastv", k=2, budget=8, query="all")
    for i in range(2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        kept, ref_logits, ref_tokens = _fastv_reference(model, eager, hf_inputs(batch), 2, 8, 5, by_position=True)
        engine = tc.Engine(model, method, tc.EngineOptions(window="position"))
        tokens, pre = engine.generate(batch, max_new_tokens=5, eos_token_id=None)
        assert pre.state.orig_index[0].tolist() == kept.tolist()
        torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == ref_tokens
        by_sequence = tc.Engine(model, method).prefill(batch).logits
        assert (by_sequence - pre.logits).abs().max() > 1e-3  # the two readings differ here


@pytest.mark.parametrize("layer", [1, 2])  # a full and a sliding layer where the decoder alternates
def test_frozen_layer_matches_reference(case, images, layer):
    model, _ = case
    for i in range(2):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        pre = tc.Engine(model, tc.method("freeze", layers=(layer,))).prefill(batch)
        ref = _frozen_reference(model, hf_inputs(batch), layer)
        torch.testing.assert_close(pre.logits, ref, rtol=1e-4, atol=1e-4)


def _frozen_reference(model: tc.Model, inputs: dict, layer: int) -> torch.Tensor:
    """Last-token logits ``(1, V)`` of Hugging Face's forward on one unpadded sample, with a hook
    that passes decoder ``layer``'s image tokens through unchanged."""
    visual = (inputs["input_ids"][0] == model.image_token_id)[None, :, None]

    def through(_module, args, kwargs, out):
        return torch.where(visual, args[0] if args else kwargs["hidden_states"], out)

    handle = model.hf.model.language_model.layers[layer].register_forward_hook(through, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.hf(**inputs).logits[:, -1].float()
    finally:
        handle.remove()


def _greedy_without_cache(hf, inputs: dict, steps: int) -> list[int]:
    """Greedy tokens of one unpadded sample, each from a forward over the whole sequence so far
    (Hugging Face's masks built afresh every step, no cache)."""
    ids, tokens = inputs["input_ids"], []
    with torch.no_grad():
        for _ in range(steps):
            step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            nxt = hf(**step).logits[0, -1].argmax()
            tokens.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokens


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@pytest.mark.parametrize("past", [-1, 0, 1, 3])
def test_window_edge_crossed_while_decoding(family, images, past):
    """A Mistral window a few tokens longer or shorter than the prompt: where decoding crosses it,
    the engine's masks (its full-attention shortcut while the window reaches every key included)
    equal Hugging Face's forward over the whole sequence at each step."""
    hf, proc = tiny_llava(family, seed=2, decoder="mistral")
    batch = tc.prepare(tc.Model(hf, proc), [images[1]], [PROMPTS[1]])
    n = batch.input_ids.shape[1]
    hf.config.text_config.sliding_window = n + past  # crossed at decode step `past` (or before)
    model = tc.Model(hf, proc)
    tokens, _ = tc.Engine(model).generate(batch, max_new_tokens=6, eos_token_id=None)
    assert tokens[0] == _greedy_without_cache(hf, hf_inputs(batch), 6)
    # the prompt alone at the edge (past = -1: the first key just out of the last query's reach)
    pre = tc.Engine(model).prefill(batch, all_logits=True)
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits
    torch.testing.assert_close(pre.logits[0], ref[0].float(), rtol=1e-5, atol=1e-5)


def test_a_window_key_on_a_decoder_without_windows_is_ignored(images):
    """Llama and Gemma have no sliding layers whatever their config says (as transformers runs them)."""
    for decoder in ("llama", "gemma"):
        hf, proc = tiny_llava("llava", seed=2, decoder=decoder)
        hf.config.text_config.sliding_window = 4
        model = tc.Model(hf, proc)
        assert set(model.layer_kinds) == {"full_attention"} and model.sliding_window is None
        batch = tc.prepare(model, images, PROMPTS)
        with torch.no_grad():
            ref = hf(**hf_inputs(batch)).logits
        pre = tc.Engine(model).prefill(batch, all_logits=True)
        torch.testing.assert_close(pre.logits[pre.state.valid], ref[batch.attention_mask.bool()], rtol=1e-4, atol=1e-4)


def test_softcap_without_an_attention_that_applies_it_is_refused():
    hf, proc = tiny_llava("llava", decoder="gemma2", decoder_config={"attn_logit_softcapping": 50.0})
    with pytest.raises(UnsupportedModelError, match="attn_implementation 'sdpa' cannot do; load it with .*'eager'"):
        tc.Model(hf, proc)


def test_processor_pinpoints_must_be_the_models(images):
    hf, proc = tiny_llava("llava-next", image_size=28)
    proc.image_processor.image_grid_pinpoints = [[56, 28], [28, 56], [56, 56]]  # the model's, reordered
    with pytest.raises(UnsupportedModelError, match="image_grid_pinpoints .* differ from the model's"):
        tc.Model(hf, proc)


@pytest.mark.parametrize("decoder", ["granite", "cohere"])
def test_unsupported_decoder_refused_before_any_forward(decoder):
    hf, proc = tiny_llava("llava", decoder=decoder)
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in hf.modules()]
    try:
        with pytest.raises(UnsupportedModelError, match=f"decoder model_type '{decoder}' is not supported"):
            tc.Model(hf, proc)
    finally:
        for h in handles:
            h.remove()
    assert calls == []
