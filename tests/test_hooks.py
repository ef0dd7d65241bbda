"""Hooks are always removed: after a run, and after a strategy fails mid-run."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

import tokencomp as tc


def _hook_count(model: tc.Model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


@tc.register("_test-fails")
class _Fails(tc.LayerStrategy):
    def needs(self):
        return [tc.Need("decoder_attention_last", 0), tc.Need("decoder_attention_text", 1)]

    def prune_layers(self, num_layers):
        return [2]

    def keep(self, ctx):
        raise RuntimeError("strategy failed")


@tc.register("_test-vision-fails")
class _VisionFails(tc.VisionStrategy):
    def needs(self):
        return [tc.Need("vision_cls_attention", -2), tc.Need("vision_keys", -1)]

    def compress(self, view):
        raise RuntimeError("vision strategy failed")


def test_hooks_removed_after_success_and_failure(model, images):
    before = _hook_count(model)
    batch = tc.prepare(model, images, PROMPTS)
    tc.Engine(model, [tc.method("fastv", k=1, query="text"), tc.method("freeze", layers=(0,))]).generate(batch, 3)
    assert _hook_count(model) == before
    for strat in (_Fails(), _VisionFails()):
        with pytest.raises(RuntimeError, match="failed"):
            tc.Engine(model, strat).prefill(batch)
        assert _hook_count(model) == before
    # and the model is unchanged: identity still matches a fresh forward
    with torch.no_grad():
        ref = model.hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            **({"image_sizes": batch.image_sizes} if batch.image_sizes is not None else {}),
        ).logits[:, -1]
    torch.testing.assert_close(tc.Engine(model).prefill(batch).logits, ref.float(), rtol=1e-4, atol=1e-4)


def test_model_from_config(models):
    cfg = models["llava-next"].hf.config
    built = tc.Model.from_config(cfg)
    assert built.family == "llava-next" and built.num_layers == cfg.text_config.num_hidden_layers
    with pytest.raises(tc.UnsupportedModelError, match="model_type must be one of"):
        tc.Model.from_config(cfg.text_config)
