"""The front-door functions: `generate` and `prepare`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import Batch, Engine, EngineOptions, PrefillOutput
from .errors import InputMismatchError
from .model import Model
from .record import RunRecord


@dataclass
class GenerationOutput:
    """Result of `generate`.

    Attributes:
        text: decoded answer per prompt (special tokens removed).
        tokens: generated token ids per prompt (EOS included when reached).
        record: per-sample, per-layer counts and timings of the run.
        prefill: the `PrefillOutput` (logits, final token layout, KV cache, captures).
    """

    text: list[str]
    tokens: list[list[int]]
    record: RunRecord
    prefill: PrefillOutput


def prepare(model: Model, images, prompts: str | list[str]) -> Batch:
    """Check images against prompts and run the model's processor (left padding).

    Args:
        images: one image per prompt, or a list of images per prompt (PIL images or arrays);
            ``None`` entries for text-only prompts.
        prompts: strings containing the image placeholder (``"<image>"``) once per image.

    Raises:
        InputMismatchError: batch sizes differ, or a prompt's placeholder count differs from its images.
    """
    if isinstance(prompts, str):
        prompts, images = [prompts], [images]
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        n = len(images) if isinstance(images, (list, tuple)) else 1
        raise InputMismatchError(f"got {len(prompts)} prompt(s) but {n} image entries; give one entry per prompt")
    token = getattr(model.processor, "image_token", "<image>")
    flat = []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        imgs = [] if imgs is None else list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
        if prompt.count(token) != len(imgs):
            raise InputMismatchError(
                f"prompt {i} has {prompt.count(token)} {token} placeholder(s) but {len(imgs)} image(s) were given"
            )
        flat += imgs
    tok = model.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        out = model.processor(images=flat or None, text=list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return Batch.from_processor(out)


def generate(
    model: Model,
    images,
    prompts: str | list[str],
    method=None,
    max_new_tokens: int = 32,
    options: EngineOptions | None = None,
) -> GenerationOutput:
    """Greedy generation with a compression method.

    Args:
        model: a `tokencomp.Model` (see `tokencomp.load_model`).
        images: one image (or a list of images) per prompt.
        prompts: one string per sample, each with one ``<image>`` placeholder per image.
        method: None (the unmodified model), a strategy from `tokencomp.method`, or a list of
            strategies to compose (at most one vision strategy).
        max_new_tokens: generated tokens at most (stops early at EOS).
        options: position-id policies (`EngineOptions`).

    Returns:
        `GenerationOutput` with ``text``, ``tokens`` and the run ``record``.
    """
    engine = Engine(model, method, options)
    batch = prepare(model, images, prompts)
    tok = model.tokenizer
    with torch.no_grad():
        tokens, pre = engine.generate(
            batch, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0
        )
    text = [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return GenerationOutput(text=text, tokens=tokens, record=pre.record, prefill=pre)
