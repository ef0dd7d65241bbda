"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025, arXiv 2503.02175), as the authors' released code (vbdi/divprune) does it.

Per image, on its tokens as they enter the LLM (after the projector: LLaVA-NeXT's whole image
span, thumbnail, unpadded crops and newline tokens alike), a max-min diversity subset:

1. **Distances**: ``D = 1 - cos`` between every two tokens (each L2-normalised, no epsilon), in
   the model's dtype, as the released code computes them (float16 there).
2. **First pick**: the token whose nearest other token is farthest (``argmax`` over columns of
   the second-smallest entry of each column: the smallest is the token itself).
3. **Greedy**: repeatedly add the token whose distance to the chosen set (its minimum over the
   chosen tokens) is largest; ``argmax`` takes the first of equal values.
4. The chosen tokens are kept in their original order; the rest are gone from layer 0 on.

Kept count per image: ``int(round(ratio * n))`` of its ``n`` tokens with Python's ``round``
(halves to even), as the released code computes it (its ``SUBSET_RATIO``, 0.098 in the
authors' runs: 56 of LLaVA-1.5's 576), or ``budget`` tokens when ``ratio`` is not given
(at most ``n``). The prompt is renumbered 0..k-1 (``llm_positions="contiguous"``, as the released
code runs the shortened sequence; ``"original"`` keeps each token's position).

Differences from the released code, none of which changes a selection it makes: it serves one
image at batch size 1 at a fixed offset (35, the ``vicuna_v1`` system prompt); here each image of
each sample is found by its token record, at any batch size. Already-chosen tokens are not
masked out (as released): where every remaining token duplicates a chosen one, a chosen token can
be picked again; the released code then keeps that token twice in the sequence, here once.
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.strategy import check_image_budget, check_ratio


def max_min_diverse(distances: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """DivPrune's greedy max-min selection on a batch of padded distance matrices.

    Args:
        distances: ``(G, n, n)`` pairwise distances of each group's tokens (padding anywhere).
        valid: ``(G, n)`` bool, each group's real tokens.
        counts: ``(G,)`` long, tokens to choose per group (at most its real tokens).
    Returns: ``(G, n)`` bool, the chosen tokens.
    """
    g, n, _ = distances.shape
    d = distances.masked_fill(~valid[:, :, None], float("inf"))  # padding rows: never a minimum
    # 2. first pick: the largest nearest-other distance (the second smallest of each column)
    nearest = d.topk(min(2, n), dim=1, largest=False).values[:, -1]
    rows = torch.arange(g, device=d.device)
    chosen = torch.zeros(g, n, dtype=torch.bool, device=d.device)
    pick = nearest.masked_fill(~valid, float("-inf")).argmax(1)
    steps = int(counts.max()) if g else 0
    score = d[rows, pick]  # 3. each token's minimum distance to the chosen set, kept as it grows
    for i in range(steps):
        chosen[rows, pick] |= i < counts
        if i + 1 < steps:
            pick = score.masked_fill(~valid, float("-inf")).argmax(1)
            score = torch.minimum(score, d[rows, pick])
    return chosen


@tc.register("divprune")
class DivPrune(tc.LayerStrategy):
    """DivPrune (arXiv 2503.02175): before the LLM, keep each image's most diverse tokens (greedy
    max-min cosine distance on the projected tokens); ``budget`` per image, or ``ratio``."""

    budget: int = 64
    ratio: float | None = None
    llm_positions: str = "contiguous"
    first_prune_layer = 0  # on the LLM's input

    def __post_init__(self) -> None:
        if self.ratio is not None:
            check_ratio("ratio", self.ratio, 0.0, 1.0)
        if self.llm_positions not in ("contiguous", "original"):
            raise tc.TokencompError(f"llm_positions must be 'contiguous' or 'original', got {self.llm_positions!r}")

    def check(self, info: tc.RunInfo) -> None:
        if self.ratio is None:
            check_image_budget(self.budget, info)

    def prune_layers(self, num_layers: int) -> list[int]:
        return [0]

    def keep(self, ctx: tc.LayerContext) -> torch.Tensor:
        span = ctx.image_mask
        key = torch.where(span, ctx.image, -1)
        groups = [(b, i) for b, images in enumerate(key.amax(1).add(1).tolist()) for i in range(images)]
        keep = ctx.valid & ~span
        if not groups:
            return keep
        members = [key[b] == i for b, i in groups]
        sizes = torch.stack([m.sum() for m in members]).tolist()  # one read
        width = max(sizes)
        distances = ctx.hidden.new_zeros(len(groups), width, width)
        for j, ((b, _), m, size) in enumerate(zip(groups, members, sizes)):
            x = ctx.hidden[b][m]  # (n, d) this image's tokens, in sequence order
            unit = x / x.norm(dim=1, keepdim=True)  # 1. as released: no epsilon, the model's dtype
            distances[j, :size, :size] = 1.0 - unit @ unit.T
        valid = torch.arange(width, device=key.device) < torch.tensor(sizes, device=key.device)[:, None]
        counts = torch.tensor([self.kept(n) for n in sizes], device=key.device)
        chosen = max_min_diverse(distances, valid, counts)
        for j, ((b, _), m, size) in enumerate(zip(groups, members, sizes)):
            keep[b, m] = chosen[j, :size]  # 4. chosen tokens stay where they are
        return keep

    def kept(self, n: int) -> int:
        """Tokens kept of an image's ``n``: ``int(round(ratio * n))`` (Python's ``round``), or
        ``min(budget, n)``."""
        return int(round(self.ratio * n)) if self.ratio is not None else min(self.budget, n)

    def overhead_flops(self, model, record, sample: int) -> float:
        """The cosine matrix of each image's tokens, ``2 n^2 d`` FLOPs (``n`` its tokens entering
        the LLM, ``d`` the LLM width; the norms and the greedy loop are element-wise)."""
        d = model.hf.config.text_config.hidden_size
        return float(sum(2 * n * n * d for n in record.span_tokens[sample]))
