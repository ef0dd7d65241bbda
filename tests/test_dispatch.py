"""Models larger than one device: a checkpoint loaded with accelerate's big-model dispatch, weights
offloaded to the CPU or disk, runs through the engine and equals the model loaded whole."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images

import tokencomp as tc
from tokencomp.tiny import tiny_llava

pytest.importorskip("accelerate")

# the vision tower, two decoder layers and the LM head on disk; the rest on the computing device
OFFLOAD = {
    "model.vision_tower": "disk",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "cpu",
    "model.language_model.layers.3": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.mark.parametrize(
    "family,decoder",
    [("llava-next", "llama"), ("llava", "phi3"), ("llava-onevision", "qwen2")],
)
def test_offloaded_model_equals_the_model_loaded_whole(tmp_path, family, decoder):
    """Identity, a vision method, an in-LLM method reading attention rows (through offloaded q/k
    projections; Phi-3's fused one) and a frozen layer give the same logits and tokens."""
    kw = {"image_size": 42, "patch_size": 7} if family == "llava-onevision" else {}
    hf, proc = tiny_llava(family, seed=1, decoder=decoder, **kw)
    hf.save_pretrained(tmp_path / "model")
    if hasattr(proc, "save_pretrained"):
        proc.save_pretrained(tmp_path / "model")
    else:  # OneVision's stand-in processor (transformers' needs torchvision)
        proc.image_processor.save_pretrained(tmp_path / "model")
        proc.tokenizer.save_pretrained(tmp_path / "model")
    whole = tc.load_model(tmp_path / "model")
    device_map = {**OFFLOAD, "model.image_newline": "cpu"} if family != "llava" else OFFLOAD
    offloaded = tc.load_model(tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload")
    assert offloaded.lm_head.weight.is_meta and offloaded.device == torch.device("cpu")
    images = make_images([(60, 100), (300, 400), (90, 90)]) if family == "llava-onevision" else make_images()
    batch = tc.prepare(whole, images, PROMPTS)
    methods = [
        None,
        tc.method("random", budget=12),
        tc.method("fastv", k=2, ratio=0.5),
        tc.method("freeze", layers=(3,)),
    ]
    for method in methods:
        a_tokens, a = tc.Engine(whole, method).generate(batch, 4, eos_token_id=None)
        b_tokens, b = tc.Engine(offloaded, method).generate(batch, 4, eos_token_id=None)
        assert a_tokens == b_tokens, method
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_a_model_on_several_devices_is_refused(models):
    """A device_map over several GPUs (here: one layer's hook computing on cuda:1) is refused when
    the model is wrapped, before any work."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    layer = models["llava"].hf.model.language_model.layers[2]
    add_hook_to_module(layer, AlignDevicesHook(execution_device=1))
    try:
        with pytest.raises(tc.UnsupportedModelError, match=r"computes on \['cpu', 'cuda:1'\].*data-parallel"):
            tc.Model(models["llava"].hf, models["llava"].processor)
    finally:
        remove_hook_from_module(layer)
