"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", arXiv 2410.17247).

The decoder is split into stages; at each stage boundary (after layers 8, 16 and 24 of a 32-layer
LLaVA-1.5-7B) the remaining visual tokens are ranked by the head-mean attention they receive from
the last instruction token at the layer just before the boundary, and the top ``ratio`` (50%) are
kept. ``layers`` defaults to the quarter points of the model's depth (8/16/24 for 32 layers);
the kept count is ``int(ratio * remaining)``.
"""

from __future__ import annotations

import tokencomp as tc
from tokencomp.strategy import check_ratio


@tc.register("pdrop")
class PyramidDrop(tc.LayerStrategy):
    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    query: str = "last"

    def __post_init__(self) -> None:
        check_ratio("ratio (kept per stage)", self.ratio)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if self.query not in ("last", "text"):
            raise tc.TokencompError(f"query must be 'last' or 'text', got {self.query!r}")

    def boundaries(self, num_layers: int) -> list[int]:
        """Stage boundaries: the given layers, or the model's quarter points (8, 16, 24 of 32)."""
        if self.layers is not None:
            return list(self.layers)
        return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)} - {num_layers})

    def prune_layers(self, num_layers: int) -> list[int]:
        return self.boundaries(num_layers)

    def needs_for(self, num_layers: int) -> list[tc.Need]:
        return [tc.Need(f"decoder_attention_{self.query}", b - 1) for b in self.boundaries(num_layers)]

    def keep(self, ctx: tc.LayerContext):
        scores = ctx.attention(ctx.layer - 1, self.query)
        return ctx.keep_top(scores, (ctx.image_count.double() * self.ratio).long())
