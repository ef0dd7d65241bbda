"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

After decoder layer ``k`` (default 2) drop the fraction ``ratio`` (default 50%) of image tokens
with the lowest head-mean attention they receive from the **last token** at layer ``k - 1``
(the released code). ``query="all"``: the attention each image token receives averaged over all
queries, as the paper describes it (computed a chunk of rows at a time, no n x n map kept);
``"text"``: averaged over the text-token queries only. Kept tokens keep
their position ids; the pruned tokens are gone from layer ``k`` on, KV cache included.
``budget`` (tokens kept) overrides ``ratio`` when given. On LLaVA-NeXT the image span includes
the newline tokens, as in the authors' span-index implementation.
"""

from __future__ import annotations

import tokencomp as tc
from tokencomp.strategy import check_image_budget, check_ratio


@tc.register("fastv")
class FastV(tc.LayerStrategy):
    """FastV (arXiv 2403.06764): from decoder layer ``k`` on, drop the ``ratio`` of image tokens
    that received the least attention at layer ``k - 1`` (from the last token by default)."""

    k: int = 2
    ratio: float = 0.5
    budget: int | None = None
    query: str = "last"

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio, 0.0, 1.0, open_high=True)
        if self.query not in ("last", "text", "all"):
            raise tc.TokencompError(f"query must be 'last', 'text' or 'all', got {self.query!r}")

    def check(self, info: tc.RunInfo) -> None:
        if self.budget is not None:
            check_image_budget(self.budget, info)

    def needs(self) -> list[tc.Need]:
        return [tc.Need(f"decoder_attention_{self.query}", self.k - 1)]

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.k]

    def keep(self, ctx: tc.LayerContext):
        scores = ctx.attention(self.k - 1, self.query)
        n_img = ctx.image_count
        keep = n_img.new_full(n_img.shape, self.budget) if self.budget else (n_img * (1 - self.ratio)).long()
        return ctx.keep_top(scores, keep)
