"""Random selection: keep ``budget`` uniformly random patch tokens per view (seeded).

A strong baseline: random pruning matches or beats many published methods on several benchmarks
(the project spec's baselines, `METHODS.md` §5 in the team's shared folder, not in this
repository). ``draw="image"`` (default) draws afresh for every image: the generator is seeded by
``seed`` and a hash of the view's pixels as the processor made them (`VisionView.content_key`),
so an image gets the same tokens alone or in a batch and in any model dtype, and a different set
from another image. ``draw="fixed"`` keeps the same patch positions for every image (seeded by
``seed`` and the view's role: a fixed random mask). Only tokens that survive LLaVA-NeXT unpadding
are drawn; a crop with fewer valid tokens than ``budget`` keeps them all. On LLaVA-OneVision the
crops of an image whose crop grid anyres_max downsamples by the area factor ``s`` keep
``round(budget * s)`` each (rounded half up, `tokencomp.VisionView.budget_for`), and at most
``floor(valid * s)``, the share of their unpadded tokens the uncompressed model feeds (so that no
image sends more than the uncompressed model).
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.strategy import check_int


@tc.register("random")
class RandomSelection(tc.VisionStrategy):
    """Keep ``budget`` uniformly random patch tokens per view (seeded by ``seed``; a baseline)."""

    budget: int = 64
    seed: int = 0
    draw: str = "image"

    def __post_init__(self) -> None:
        if self.draw not in ("image", "fixed"):
            raise tc.TokencompError(f"draw must be 'image' or 'fixed', got {self.draw!r}")

    def check(self, info: tc.RunInfo) -> None:
        check_int("budget (tokens kept per view)", self.budget, 1, info.patches_per_view)

    def select(self, view: tc.VisionView) -> torch.Tensor:
        """``(V, budget)`` kept patch indices, -1 past a view's valid-token count."""
        ids = view.content_key() if self.draw == "image" else view.key.tolist()
        n = view.features.shape[1]
        # one generator per view (its draw does not depend on the batch), one upload for all
        scores = torch.stack(
            [torch.rand(n, generator=torch.Generator().manual_seed((self.seed * 1_000_003 + i) % 2**63)) for i in ids]
        ).to(view.features.device)
        budgets = view.budget_for(self.budget, low=1)  # per view (resized OneVision crops: scaled)
        top = scores.masked_fill(~view.valid, -1.0).topk(max(budgets), dim=-1).indices  # valid tokens first
        limit = view.valid.sum(1)
        if any(s < 1 for s in view.share):  # resized OneVision crops: their valid tokens' share, floored (one read)
            valid = [int(v * s + 1e-9) for v, s in zip(limit.tolist(), view.share)]
            limit = torch.tensor([min(b, v) for b, v in zip(budgets, valid)], device=top.device)
        keep = torch.arange(top.shape[1], device=top.device)[None] < limit[:, None]
        return top.masked_fill(~keep, -1)
