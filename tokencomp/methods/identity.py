"""Identity: every visual token, exactly as the unmodified Hugging Face model sees them."""

from __future__ import annotations

import torch

import tokencomp as tc


@tc.register("identity")
class Identity(tc.VisionStrategy):
    """Keep all N patch tokens of every view (LLaVA-NeXT unpadding and newlines as the model does)."""

    def compress(self, view: tc.VisionView) -> tc.ViewTokens:
        nv, n = view.features.shape[:2]
        index = torch.arange(n, device=view.features.device).expand(nv, n)
        count = torch.full((nv,), n, device=view.features.device)
        return tc.ViewTokens(features=view.features, index=index, count=count, grid=view.grid)
