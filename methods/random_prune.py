"""Random selection: keep ``budget`` uniformly random patch tokens per view (seeded).

A strong baseline: random pruning matches or beats many published methods on several benchmarks
(the project spec's baselines, `METHODS.md` §5 in the team's shared folder, not in this repository). ``draw="image"`` (default) draws afresh for every image: the generator is
seeded by ``seed`` and a hash of the view's pixels (`VisionView.content_key`), so an image gets
the same tokens alone or in a batch, and a different set from another image. ``draw="fixed"``
keeps the same patch positions for every image (seeded by ``seed`` and the view's role: a fixed
random mask). Only tokens that survive LLaVA-NeXT unpadding are drawn; a crop with fewer valid
tokens than ``budget`` keeps them all.
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.strategy import check_int


@tc.register("random")
class RandomSelection(tc.VisionStrategy):
    budget: int = 64
    seed: int = 0
    draw: str = "image"

    def __post_init__(self) -> None:
        if self.draw not in ("image", "fixed"):
            raise tc.TokencompError(f"draw must be 'image' or 'fixed', got {self.draw!r}")

    def check(self, info: tc.RunInfo) -> None:
        check_int("budget (tokens kept per view)", self.budget, 1, info.patches_per_view)

    def select(self, view: tc.VisionView) -> list[torch.Tensor]:
        ids = view.content_key() if self.draw == "image" else view.key.tolist()
        out = []
        for v in range(view.num_views):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + ids[v]) % 2**63)
            scores = torch.rand(view.features.shape[1], generator=g).to(view.features.device)
            valid = view.valid[v]
            scores = scores.masked_fill(~valid, -1.0)
            k = min(self.budget, int(valid.sum()))
            out.append(scores.topk(k).indices)
        return out
