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


def test_compare_runs_an_offloaded_model_as_the_whole_one(tmp_path):
    """An experiment file's [[model]] takes device_map and offload_folder (relative to the file):
    the offloaded run's predictions equal the whole model's, and models.json records the map."""
    import json

    from tokencomp.data import read_rows
    from tokencomp.runner import load_experiment, run_experiment

    hf, proc = tiny_llava("llava-next", seed=1)
    hf.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    table = (
        "device_map = {"
        + ", ".join(f'"{k}" = "{v}"' for k, v in {**OFFLOAD, "model.image_newline": "cpu"}.items())
        + "}"
    )
    text = """
[experiment]
name = "x"
batch_size = 2
max_new_tokens = 3
latency_repeats = 1

[[model]]
name = "m"
source = "{source}"
{extra}

[[dataset]]
name = "d"
generator = "tc-scenes-next"
n = 4

[[method]]
name = "fastv"
k = 2
"""
    runs = {}
    for label, extra in (("whole", ""), ("offloaded", table + '\noffload_folder = "offload"')):
        path = tmp_path / f"{label}.toml"
        path.write_text(text.format(source=tmp_path / "model", extra=extra))
        exp = load_experiment(path, tmp_path / label)
        run_experiment(exp, progress=False, side_by_side=False)
        runs[label] = exp.out
    (cell,) = [r["cell"] for r in read_rows(runs["whole"] / "results.jsonl")]
    assert read_rows(runs["whole"] / "predictions" / f"{cell}.jsonl") == read_rows(
        runs["offloaded"] / "predictions" / f"{cell}.jsonl"
    )
    recorded = json.loads((runs["offloaded"] / "models.json").read_text())["m"]
    assert recorded["device_map"]["lm_head"] == "disk" and recorded["offload_folder"] == str(tmp_path / "offload")


@pytest.mark.parametrize(
    "extra,match",
    [
        ('source = "tiny-random:llava"\ndevice_map = "auto"', "not tiny-random models"),
        ('source = "tiny-llava"\ndevice_map = 3', r"device_map=3 must be a string"),
        ('source = "tiny-llava"\ndevice_map = {"lm_head" = true}', r"must be a string .* or a table"),
        ('source = "tiny-llava"\noffload_folder = 1', "offload_folder must be a path string"),
    ],
)
def test_bad_dispatch_settings_are_refused_before_any_model_loads(tmp_path, extra, match):
    from tokencomp.runner import load_experiment

    path = tmp_path / "x.toml"
    path.write_text(
        f'[[model]]\nname = "m"\n{extra}\n\n[[dataset]]\nname = "d"\ngenerator = "tc-scenes"\n\n[[method]]\nname = "identity"\n'
    )
    with pytest.raises(tc.TokencompError, match=match):
        load_experiment(path)
