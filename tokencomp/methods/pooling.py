"""Spatial pooling baselines: resample each view's patch grid to ``budget`` tokens.

``pool``: adaptive average pooling; ``bilinear``: bilinear downsampling (align_corners=False),
as LLaVA-NeXT-style grid pooling does. The output grid is ``grid=(gh, gw)`` when given, else the
factor pair of ``budget`` closest to square (64 -> 8x8, 128 -> 8x16, 192 -> 12x16). Pooling acts on
vision features before the projector. On LLaVA-NeXT the pooled crop grids are re-assembled,
unpadded to the image's content (by its aspect ratio, also on a non-square grid such as 8 x 16:
`tokencomp.Model.crop_region`) and given newline tokens as the uncompressed model does on its full
grid, so the tokens entering the LLM can be fewer than ``budget`` per crop.
"""

from __future__ import annotations

import math

import tokencomp as tc
from tokencomp import kernels
from tokencomp.errors import BudgetError
from tokencomp.strategy import check_int


def budget_grid(budget: int) -> tuple[int, int]:
    """The factor pair ``(rows, cols)`` of ``budget`` with rows <= cols closest to square."""
    rows = max(r for r in range(1, math.isqrt(budget) + 1) if budget % r == 0)
    return rows, budget // rows


class _GridPool(tc.VisionStrategy):
    mode = "avg"

    def out_grid(self) -> tuple[int, int]:
        return tuple(self.grid) if self.grid else budget_grid(self.budget)

    def check(self, info: tc.RunInfo) -> None:
        check_int("budget (tokens per view)", self.budget, 1, info.patches_per_view)
        gh, gw = self.out_grid()
        if gh * gw != self.budget or gh > info.grid[0] or gw > info.grid[1]:
            raise BudgetError(
                f"grid={self.grid} must multiply to budget={self.budget} and fit the {info.grid} patch grid"
            )

    def compress(self, view: tc.VisionView) -> tc.ViewTokens:
        out = self.out_grid()
        feats = kernels.pool_grid(view.features, view.grid, out, self.mode, backend=view.backend)
        nv, k = feats.shape[:2]
        index = feats.new_full((nv, k), -1).long()
        count = index.new_full((nv,), k)
        return tc.ViewTokens(features=feats, index=index, count=count, grid=out)


@tc.register("pool")
class AveragePool(_GridPool):
    """Adaptive average pooling of each view's patch grid to ``budget`` tokens (a baseline)."""

    budget: int = 64
    grid: tuple[int, int] | None = None
    mode = "avg"


@tc.register("bilinear")
class BilinearDownsample(_GridPool):
    """Bilinear downsampling of each view's patch grid to ``budget`` tokens (a baseline; the
    grid pooling LLaVA-NeXT-style models use)."""

    budget: int = 64
    grid: tuple[int, int] | None = None
    mode = "bilinear"
