"""Input downsampling: a smaller image, so that the vision tower itself emits about ``budget``
tokens per view (the baseline the VTC-Bench study finds ahead of many methods; not the
token-level ``pool`` / ``bilinear``, which resample the full-size tower's output).

Every view (the LLaVA-1.5 image; the LLaVA-NeXT thumbnail and each crop) is resized from its
``H x W`` pixels to a ``g_h x g_w`` patch grid, ``g = round(side * sqrt(budget / N))`` of its
``N`` patches, at least 1 (576 patches: 192 -> 14 x 14 = 196 tokens, 128 -> 11 x 11 = 121,
64 -> 8 x 8 = 64), resampled from the processor's pixels (``mode``: ``"bicubic"`` with
antialiasing by default, as an image library shrinks an image; ``"bilinear"``, ``"area"``). The
tower runs on it with its position embeddings interpolated (Hugging Face's
``interpolate_pos_encoding``: bicubic) and every layer costs what its fewer tokens cost. The grid
reaches the LLM as a pooled grid does: LLaVA-NeXT's crops re-assembled, unpadded by the model's
rule at this grid, a newline token per row; LLaVA-OneVision resizes a large crop grid by the same
ratio as the full one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import tokencomp as tc
from tokencomp.strategy import check_int

MODES = ("bicubic", "bilinear", "area")


@tc.register("downsample")
class Downsample(tc.TowerStrategy):
    """Input downsampling (VTC-Bench's baseline): each view resized so that the vision tower emits
    about ``budget`` tokens (position embeddings interpolated)."""

    budget: int = 64
    mode: str = "bicubic"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise tc.TokencompError(f"mode must be one of {MODES}, got {self.mode!r}")

    def check(self, info: tc.RunInfo) -> None:
        check_int("budget (tokens per view)", self.budget, 1, info.patches_per_view)

    def grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The patch grid a view of ``grid`` patches is resized to."""
        scale = math.sqrt(self.budget / (grid[0] * grid[1]))
        return max(1, round(grid[0] * scale)), max(1, round(grid[1] * scale))

    def resize(self, pixels: torch.Tensor, patch: int) -> torch.Tensor:
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)  # SigLIP 384 px: 27 x 27 of 14 px
        h, w = self.grid(grid)
        if (h, w) == grid:  # the tower's own grid: the image as it is
            return pixels
        smooth = {"antialias": True, "align_corners": False} if self.mode != "area" else {}
        return F.interpolate(pixels, size=(h * patch, w * patch), mode=self.mode, **smooth)
