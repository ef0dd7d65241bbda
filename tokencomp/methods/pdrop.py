"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", arXiv 2410.17247).

The decoder is split into stages; at each stage boundary ``b`` (layers 8, 16 and 24 of LLaVA-1.5-7B
and -13B) the remaining image tokens are ranked by the head-mean attention they receive from the
last instruction token, and the top ``ratio`` (50%) are kept: ``int(ratio * remaining)``.

Where the authors' code and a FastV-style reading differ, both are options:

- ``scoring="preprune"`` (default, the released code): the attention of layer ``b`` itself, its
  ``input_layernorm`` and q/k projections applied to the hidden states leaving layer ``b - 1``,
  before the drop. ``"previous"``: the attention captured while layer ``b - 1`` ran (FastV's rule).
- ``llm_positions="contiguous"`` (default, the released code): the kept tokens are renumbered
  0..k-1 after each drop, and decoding continues from there. ``"original"``: they keep their ids.
- ``layers``: the boundaries. Default 8 / 16 / 24 on models of more than 24 layers (the authors use
  them for the 32-layer 7B and the 40-layer 13B alike), otherwise the quarter points of the depth.
"""

from __future__ import annotations

import tokencomp as tc
from tokencomp.strategy import check_ratio

PUBLISHED_LAYERS = (8, 16, 24)


@tc.register("pdrop")
class PyramidDrop(tc.LayerStrategy):
    """PyramidDrop (arXiv 2410.17247): at each stage boundary in ``layers`` keep the ``ratio`` of
    the remaining image tokens that the last instruction token attends to most."""

    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    query: str = "last"
    scoring: str = "preprune"
    llm_positions: str = "contiguous"

    def __post_init__(self) -> None:
        check_ratio("ratio (kept per stage)", self.ratio)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if self.query not in ("last", "text"):
            raise tc.TokencompError(f"query must be 'last' or 'text', got {self.query!r}")
        if self.scoring not in ("preprune", "previous"):
            raise tc.TokencompError(f"scoring must be 'preprune' or 'previous', got {self.scoring!r}")
        if self.llm_positions not in ("contiguous", "original"):
            raise tc.TokencompError(f"llm_positions must be 'contiguous' or 'original', got {self.llm_positions!r}")

    def boundaries(self, num_layers: int) -> list[int]:
        """Stage boundaries: the given layers, 8 / 16 / 24 beyond 24 layers, else the quarter points."""
        if self.layers is not None:
            return list(self.layers)
        if num_layers > PUBLISHED_LAYERS[-1]:
            return list(PUBLISHED_LAYERS)
        return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3)} - {num_layers})

    def prune_layers(self, num_layers: int) -> list[int]:
        return self.boundaries(num_layers)

    def needs_for(self, num_layers: int) -> list[tc.Need]:
        if self.scoring == "preprune":
            return [tc.Need(f"decoder_preprune_attention_{self.query}", b) for b in self.boundaries(num_layers)]
        return [tc.Need(f"decoder_attention_{self.query}", b - 1) for b in self.boundaries(num_layers)]

    def keep(self, ctx: tc.LayerContext):
        if self.scoring == "preprune":
            scores = ctx.attention(ctx.layer, self.query, preprune=True)
        else:
            scores = ctx.attention(ctx.layer - 1, self.query)
        return ctx.keep_top(scores, (ctx.image_count.double() * self.ratio).long())
