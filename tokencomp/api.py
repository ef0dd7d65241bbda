"""The front-door functions: `generate`, `prepare` and `evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .data import check_image, load_rgb
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
    flat, groups = [], []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        if not isinstance(prompt, str):
            raise InputMismatchError(f"prompt {i} must be a string, got {type(prompt).__name__}")
        imgs = [] if imgs is None else list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
        if prompt.count(token) != len(imgs):
            raise InputMismatchError(
                f"prompt {i} has {prompt.count(token)} {token} placeholder(s) but {len(imgs)} image(s) were given"
            )
        group = [_image(im, f"prompt {i}, image {j}") for j, im in enumerate(imgs)]
        flat += group
        if group:
            groups.append(group)
    tok = model.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        # grouped by prompt where the family tells several images of one prompt apart (OneVision)
        given = groups if model.layout.groups_images else flat
        out = model.processor(images=given or None, text=list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return Batch.from_processor(out)


def _image(image, where: str):
    """A PIL image from what `prepare` accepts: a PIL image, an ``(H, W, 3)`` / ``(3, H, W)`` array
    or tensor (uint8 0-255 or float 0-1, as the processor reads them), or a path to an image file;
    anything else an `InputMismatchError` naming ``where`` and what is allowed."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        problem = check_image(Path(image), decode=False)  # missing, a folder, not an image
        if problem:
            raise InputMismatchError(f"{where}: {problem}")
        try:  # one full decode, which finds a truncated file
            return load_rgb(image)
        except Exception as e:  # PIL raises many kinds
            raise InputMismatchError(f"{where}: image {str(image)!r} does not decode: {type(e).__name__}: {e}") from e
    shape = getattr(image, "shape", None)
    if shape is None:
        raise InputMismatchError(
            f"{where}: expected a PIL image, an (H, W, 3) array or tensor, or an image path; got {type(image).__name__}"
        )
    shape = tuple(shape)
    if len(shape) != 3 or not (shape[-1] == 3 or shape[0] == 3) or 0 in shape:
        raise InputMismatchError(
            f"{where}: an array image must be RGB, shaped (H, W, 3) or (3, H, W); got shape {shape}"
            + (" (a grey image: stack it to 3 channels, or pass a PIL image)" if len(shape) == 2 else "")
        )
    return image


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
        options: engine policies (`EngineOptions`: position ids, kernel backend).

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


@dataclass
class EvalResult:
    """Result of `evaluate`.

    Attributes:
        accuracy: mean score over the samples (exact match, or VQA soft accuracy for 10-answer items).
        by_type: mean score per question type.
        predictions: one dict per sample: ``id``, ``type``, ``prediction``, ``answers``, ``score``;
            a sample whose image did not load (a lazily validated dataset) has ``skipped`` (why)
            instead of a prediction and is not scored, as `tokencomp compare` records it.
        accuracy_ci95: ``(low, high)`` bootstrap 95% interval of the accuracy, as `tokencomp
            compare` reports it (`tokencomp.metrics.mean_ci`).
        yes_no: accuracy, precision, recall and F1 over the yes/no items (POPE-style, "yes" the
            positive class), as `compare` reports them; None without such items.
    """

    accuracy: float
    by_type: dict[str, float]
    predictions: list[dict]
    accuracy_ci95: tuple[float, float] | None = None
    yes_no: dict[str, float] | None = None


def evaluate(
    model: Model,
    data,
    method=None,
    batch_size: int = 8,
    max_new_tokens: int = 4,
    template: str | None = None,
    progress: bool = False,
    scoring: str = "vqa",
) -> EvalResult:
    """Score a method on a dataset (greedy answers; no latency or FLOPs: see ``tokencomp compare``).

    Args:
        model: a `tokencomp.Model`.
        data: a `tokencomp.data.JsonlDataset` (or any iterable of `Sample`).
        method: as in `generate`.
        batch_size: samples per forward pass.
        max_new_tokens: answer length limit in tokens.
        template: prompt template name or format string (default: the model's family).
        progress: show a progress bar.
        scoring: ``"vqa"`` normalises answers as lmms-eval does, ``"exact"`` more plainly
            (`tokencomp.metrics.answer_score`).
    """
    from tqdm import tqdm

    from .data import prompt
    from .metrics import SCORINGS, answer_score, mean_ci, scores_by_type, yes_no_scores

    if scoring not in SCORINGS:
        raise InputMismatchError(f"evaluate: scoring={scoring!r} must be one of {list(SCORINGS)}")
    samples = list(data)
    if not samples:
        raise InputMismatchError("evaluate needs at least one sample")
    engine = Engine(model, method)
    tok = model.tokenizer
    template = template or model.family
    rows = []
    skipped, order = [], {}
    for i, s in enumerate(samples):
        order.setdefault(s.id, i)
    for i in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress):
        loaded = [(s, *s.try_image()) for s in samples[i : i + batch_size]]
        skipped += [{"id": s.id, "type": s.type, "answers": s.answers, "skipped": why} for s, im, why in loaded if why]
        chunk, images = [s for s, im, why in loaded if not why], [im for _, im, why in loaded if not why]
        if not chunk:
            continue
        batch = prepare(model, images, [prompt(s, template) for s in chunk])
        with torch.no_grad():
            tokens, _ = engine.generate(batch, max_new_tokens, tok.eos_token_id, tok.pad_token_id or 0)
        for s, t in zip(chunk, tokens):
            text = tok.decode(t, skip_special_tokens=True).strip()
            score = answer_score(text, s.answers, scoring)
            rows.append({"id": s.id, "type": s.type, "prediction": text, "answers": s.answers, "score": score})
    if not rows:
        raise InputMismatchError(f"no image of the {len(samples)} samples loaded: {skipped[0]['skipped']}")
    yn = [r for r in rows if r["answers"][0].strip().lower() in ("yes", "no")]  # as compare picks them
    return EvalResult(
        accuracy=sum(r["score"] for r in rows) / len(rows),
        by_type=scores_by_type(rows),
        predictions=sorted(rows + skipped, key=lambda r: order[r["id"]]),  # in the data's order
        accuracy_ci95=mean_ci([r["score"] for r in rows]),
        yes_no=yes_no_scores([r["prediction"] for r in yn], [r["answers"][0] for r in yn]) if yn else None,
    )
