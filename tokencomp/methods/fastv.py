"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

After decoder layer ``k`` (default 2) drop the fraction ``ratio`` (default 50%) of image tokens
with the lowest head-mean attention they receive from the **last token** at layer ``k - 1``
(the released code). ``query="all"``: the attention each image token receives averaged over all
queries, as the paper describes it (computed a chunk of rows at a time, no n x n map kept);
``"text"``: averaged over the text-token queries only. Kept tokens keep
their position ids; the pruned tokens are gone from layer ``k`` on, KV cache included.
``budget`` (tokens kept) overrides ``ratio`` when given. On LLaVA-NeXT the image span includes
the newline tokens, as in the authors' span-index implementation.

Kept count from ``ratio`` over ``N`` image tokens (``rounding``): ``"round"`` (default) keeps
``round(N * (1 - ratio))``, as the authors' Hugging Face integration (``fastv_config``, both its
KV-cache and its in-place branch) computes it; ``"floor"`` keeps ``int(N * (1 - ratio))``, as their
lmms-eval KV-cache script does with its keep ratio (57 instead of 58 of 576 at ``ratio=0.9``). Their
original in-place code takes the kept count itself (``budget`` here). Python's ``round``: halves go
to the even neighbour.
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
    rounding: str = "round"

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio, 0.0, 1.0, open_high=True)
        if self.query not in ("last", "text", "all"):
            raise tc.TokencompError(f"query must be 'last', 'text' or 'all', got {self.query!r}")
        if self.rounding not in ("round", "floor"):
            raise tc.TokencompError(f"rounding must be 'round' or 'floor', got {self.rounding!r}")

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
        if self.budget:
            keep = n_img.new_full(n_img.shape, self.budget)
        else:  # in double precision, as Python computes the authors' N * (1 - R)
            exact = n_img.double() * (1 - self.ratio)
            keep = (exact.round() if self.rounding == "round" else exact.floor()).long()
        return ctx.keep_top(scores, keep)
