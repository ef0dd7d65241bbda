"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's AnyRes with two
differences, as transformers' ``pack_image_features`` does them.

* **anyres_max** (``vision_aspect_ratio="anyres_max_K"``): when the unpadded crop grid holds more
  than about ``K`` views' worth of tokens (``ratio = sqrt(h * w / (K * g^2)) > 1.1`` for a ``g x g``
  patch grid), it is bilinearly resized to ``(int(h // ratio), int(w // ratio))`` tokens before the
  newline tokens close its rows. A resized token has no single source patch (``patch = -1``); its
  view is the crop under its centre and its offset its place in the resized grid.
* **Several images in one prompt**: each is its base view alone, followed by one newline token (no
  crops), as the model was trained on interleaved images.

An image's size is an `ImageSize`: ``(height, width)`` and whether it is its prompt's only image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import InputMismatchError, UnsupportedModelError
from ..strategy import NEWLINE
from .llava_next import LlavaNextLayout


class ImageSize(NamedTuple):
    """An image's original ``(height, width)`` in pixels and whether it is the only image of its
    prompt (then cut into crops; else its base view alone)."""

    height: int
    width: int
    alone: bool = True


class OnevisionLayout(LlavaNextLayout):
    """LLaVA-OneVision's layout: LLaVA-NeXT's, with anyres_max resizing and base-only images in
    prompts of several images."""

    family = "llava-onevision"
    groups_images = True

    def __init__(self, model) -> None:
        super().__init__(model)
        aspect = getattr(model.hf.config, "vision_aspect_ratio", "anyres_max_9")
        if not (isinstance(aspect, str) and aspect.startswith("anyres_max_") and aspect[11:].isdigit()):
            raise UnsupportedModelError(f"vision_aspect_ratio {aspect!r} is not supported (anyres_max_<K> only)")
        self.max_views = int(aspect[11:])

    def image_sizes(self, batch, n_images: int) -> list[ImageSize]:
        """Each image's size, and whether it is alone in its prompt (``batch.batch_num_images``, the
        processor's count per prompt; without it every image is alone, as transformers assumes)."""
        sizes = super().image_sizes(batch, n_images)
        counts = getattr(batch, "batch_num_images", None)
        if counts is None:
            return [ImageSize(h, w) for h, w in sizes]
        alone = [int(n) == 1 for n in counts.tolist() for _ in range(int(n))]
        if len(alone) != n_images:
            raise InputMismatchError(f"batch_num_images {counts.tolist()} does not account for the {n_images} images")
        return [ImageSize(h, w, a) for (h, w), a in zip(sizes, alone)]

    def crop_grid(self, image_size) -> tuple[int, int]:
        """No crops for an image that shares its prompt; else LLaVA-NeXT's grid."""
        if isinstance(image_size, ImageSize) and not image_size.alone:
            return (0, 0)
        return super().crop_grid(image_size)

    def ratio(self, height: int, width: int) -> float:
        """anyres_max's side ratio for an ``height x width`` unpadded crop grid of tower tokens:
        resized when above 1.1."""
        return math.sqrt(height * width / (self.max_views * self.model.grid[0] ** 2))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The token grid an ``height x width`` unpadded crop grid becomes (anyres_max)."""
        ratio = self.ratio(height, width)
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)

    def image_token_count(self, image_size) -> int:
        """The base view's tokens, then the (resized) unpadded crop grid with a newline closing each
        row; an image that shares its prompt: its base view and one newline."""
        n = self.model.patches_per_view
        if isinstance(image_size, ImageSize) and not image_size.alone:
            return n + 1
        _, _, _, height, _, width = self.crop_region(image_size)
        height, width = self.resized(height, width)
        return n + height * (width + 1)

    def view_share(self, image_size) -> list[float]:
        """1.0 for the base view; for each crop, the area factor ``h2 * w2 / (h * w)`` by which
        anyres_max resizes the image's ``h x w`` unpadded crop grid (1.0 when it is not resized)."""
        shares = super().view_share(image_size)
        if len(shares) > 1:
            _, _, _, height, _, width = self.crop_region(image_size)
            h2, w2 = self.resized(height, width)
            if (h2, w2) != (height, width):
                shares[1:] = [h2 * w2 / (height * width)] * (len(shares) - 1)
        return shares

    def assemble(self, out, proj, rows, counts, size, crop_grid, engine):
        """LLaVA-NeXT's assembly; an image without crops ends with one newline token."""
        tok = super().assemble(out, proj, rows, counts, size, crop_grid, engine)
        if len(rows) == 1:
            newline = self.model.image_newline.to(proj.dtype)[None]
            n = tok["feats"].shape[0]
            minus = tok["patch"].new_full((1,), -1)
            tok["feats"] = torch.cat([tok["feats"], newline])
            tok["kind"] = torch.cat([tok["kind"], tok["kind"].new_full((1,), NEWLINE)])
            tok["patch"] = torch.cat([tok["patch"], minus])
            tok["view"] = torch.cat([tok["view"], minus])
            tok["offset"] = torch.cat([tok["offset"], minus + 1 + n])
        return tok

    def _resample(self, f: torch.Tensor, src: torch.Tensor, vid: torch.Tensor, size):
        """The unpadded crop grid resized as anyres_max resizes the full grid of the image's ``size``:
        the full grid to its resized shape; a pooled grid by the same ratio (its budget per view thus
        scaled as a selection's is, `view_share`)."""
        height, width = f.shape[:2]
        _, _, _, full_h, _, full_w = self.crop_region(size)
        ratio = self.ratio(full_h, full_w)
        h2, w2 = int(height // ratio), int(width // ratio)
        if ratio <= 1.1:
            return f, src, vid
        if not h2 * w2:  # a pooled grid too small to keep a row or a column
            return f[:h2, :w2], src[:h2, :w2], vid[:h2, :w2]
        # as transformers: (d, h, w) bilinear, align_corners=False, in the features' dtype
        f = F.interpolate(f.permute(2, 0, 1)[None], [h2, w2], mode="bilinear")[0].permute(1, 2, 0)
        rows = ((torch.arange(h2, device=f.device) + 0.5) * height / h2).long().clamp(max=height - 1)
        cols = ((torch.arange(w2, device=f.device) + 0.5) * width / w2).long().clamp(max=width - 1)
        return f, src.new_full((h2, w2), -1), vid[rows][:, cols]


class OnevisionInputs:
    """LLaVA-OneVision's processor where transformers' cannot be built (it needs torchvision for
    its video processor): the image processor and the tokenizer, each ``<image>`` expanded to the
    number of placeholder tokens transformers' ``LlavaOnevisionProcessor`` computes for it (its own
    functions, called here), prompts padded on the left. Images come grouped by prompt, so that
    ``batch_num_images`` says which prompts hold several.

    Args:
        image_processor: a ``LlavaOnevisionImageProcessor`` (or its PIL twin).
        tokenizer: the tokenizer, which knows ``<image>``.
        num_image_tokens: patch tokens of one view (``(image_size // patch_size) ** 2``).
        vision_aspect_ratio: the model config's (``"anyres_max_9"``).
    """

    image_token = "<image>"

    def __init__(self, image_processor, tokenizer, num_image_tokens: int, vision_aspect_ratio: str = "anyres_max_9"):
        from types import MethodType

        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.num_image_tokens, self.vision_aspect_ratio = num_image_tokens, vision_aspect_ratio
        for name in ("_get_number_of_features", "_get_unpadded_features"):
            setattr(self, name, MethodType(getattr(LlavaOnevisionProcessor, name), self))

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True):
        """``images``: per prompt a list of images (or a flat list, one per prompt); ``text``: the
        prompts. Returns ``input_ids``, ``attention_mask`` and, with images, ``pixel_values``,
        ``image_sizes``, ``batch_num_images``."""
        out = {}
        texts = list(text)
        if images:
            groups = [g if isinstance(g, (list, tuple)) else [g] for g in images]
            pix = self.image_processor([list(g) for g in groups], return_tensors=return_tensors)
            out.update(pix)
            sizes, side = pix["image_sizes"].tolist(), pix["pixel_values"].shape[-1]
            alone = [len(g) == 1 for g in groups for _ in g]
            counts = iter(
                self._get_number_of_features(h, w, side, side) if a else self.num_image_tokens + 1
                for (h, w), a in zip(sizes, alone)
            )
            texts = [
                "".join(
                    part if i == 0 else self.image_token * next(counts) + part
                    for i, part in enumerate(t.split(self.image_token))
                )
                for t in texts
            ]
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding)
        out.update({k: enc[k] for k in ("input_ids", "attention_mask")})
        return out
