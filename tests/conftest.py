"""Shared fixtures: tiny random-weight LLaVA-1.5 and LLaVA-NeXT models from real configs."""

from __future__ import annotations

import os

# Triton kernels are tested on CPU through Triton's interpreter. The variable must be set before
# anything imports triton (transformers may), since triton.language decorates its own library
# functions at import time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest
import torch
from PIL import Image

import tokencomp as tc
from tokencomp.tiny import tiny_llava

PROMPTS = [
    "USER : <image> what color is the big circle ? ASSISTANT :",
    "USER : <image> how many ? ASSISTANT :",
    "USER : <image> is there a red square left of the small blue star in the image ? ASSISTANT :",
]
# (height, width): different aspect ratios give LLaVA-NeXT different crop grids and unpadding
SIZES = [(60, 100), (100, 70), (90, 90)]


def make_images(sizes=SIZES, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


@pytest.fixture(scope="session", params=["llava", "llava-next"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models() -> dict:
    torch.manual_seed(0)
    out = {}
    for fam in ("llava", "llava-next"):
        hf, proc = tiny_llava(fam, seed=1)
        out[fam] = tc.Model(hf, proc)
    return out


@pytest.fixture(scope="session")
def model(models, family) -> tc.Model:
    return models[family]


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return make_images()


def hf_inputs(batch: tc.Batch) -> dict:
    d = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    if batch.image_sizes is not None:
        d["image_sizes"] = batch.image_sizes
    return d


def eager_copy(model: tc.Model):
    """A deep copy of the HF model switched to eager attention (for output_attentions references)."""
    import copy

    hf = copy.deepcopy(model.hf)
    hf.set_attn_implementation("eager")
    return hf


def batch_and_alone(engine: tc.Engine, model: tc.Model, images, prompts, new_tokens: int = 3):
    """Generate ``prompts`` as one padded batch and each alone: every sample's first logits and
    greedy tokens equal its own run's. Returns (the batch's prefill, each sample's prefill alone)."""
    tokens, pre = engine.generate(tc.prepare(model, images, prompts), new_tokens, eos_token_id=None)
    alone = []
    for b in range(len(prompts)):
        one, single = engine.generate(tc.prepare(model, [images[b]], [prompts[b]]), new_tokens, eos_token_id=None)
        torch.testing.assert_close(pre.logits[b], single.logits[0], rtol=1e-4, atol=1e-4)
        assert one[0] == tokens[b]
        alone.append(single)
    return pre, alone
