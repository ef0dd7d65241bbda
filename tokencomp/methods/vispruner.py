"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818; FasterVLM shares the arXiv number), as the
authors' released code (Theia-4869/VisPruner) does it.

Per view, ``budget`` = ``T`` tokens, ``int(T * important_ratio)`` of them important, the rest diverse:

1. **Important tokens**: the patches with the most CLS attention at the vision tower's
   second-to-last layer (the projector's input layer; softmax row of CLS, mean over heads).
2. **Diverse tokens**, from the remaining patches in descending attention order: repeatedly
   split the list into ``A`` (even positions) and ``B`` (odd positions), score each ``A`` token by
   its largest cosine similarity to a ``B`` token (L2-normalised features of the same layer), and
   drop the ``r = min(8, remaining - wanted)`` highest-scoring ``A`` tokens; the list becomes the
   other ``A`` tokens in descending score, then ``B`` in its order. Stop when the wanted number
   is left.
3. The important and diverse patches go to the projector in raster order.

LLaVA-NeXT: every view (thumbnail and each crop) keeps ``budget`` (the released code's
"32 * 5 = 160"); crop tokens outside the unpadded window are dropped and every row of the
unpadded grid keeps its newline, as the uncompressed model's layout. LLaVA-OneVision (no released
code): a crop of an image whose grid anyres_max shrinks by ``s`` keeps ``round(budget * s)``
(`tokencomp.strategy.scale_budget`), split by the same ratio. Towers without CLS (SigLIP): the
attention each patch receives averaged over all query rows replaces the CLS row (as `visionzip`).

Differences from the released code: its sorts are unstable (ties of equal attention or equal
similarity may order otherwise there; here the lower index first); it fails when the list of
remaining patches has odd length (an odd important count), which here splits as the even/odd
slices do (``A`` one longer).
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.strategy import check_int, check_ratio, scale_budget


def diverse_tokens(unit: torch.Tensor, order: torch.Tensor, wanted: int) -> torch.Tensor:
    """VisPruner's similarity-based removal, on a batch of views with equal counts.

    Args:
        unit: ``(V, N, C)`` L2-normalised patch features.
        order: ``(V, R)`` candidate patch indices, in descending attention.
        wanted: how many to keep (``0 <= wanted <= R``).
    Returns: ``(V, wanted)`` kept patch indices, in the list's final order.
    """
    while wanted > 0:
        r = min(8, order.shape[1] - wanted)
        if r <= 0:
            break
        tokens = torch.gather(unit, 1, order[..., None].expand(-1, -1, unit.shape[-1]))
        a, b = tokens[:, ::2], tokens[:, 1::2]
        scores = (a @ b.transpose(1, 2)).amax(-1)  # (V, |A|) each A token's closest B token
        distinct = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        order = torch.cat([torch.gather(order[:, ::2], 1, distinct), order[:, 1::2]], dim=1)
    return order if wanted > 0 else order[:, :0]


@tc.register("vispruner")
class VisPruner(tc.VisionStrategy):
    """VisPruner (arXiv 2412.01818): per view, the most CLS-attended patches plus diverse ones
    left by removing near-duplicates; ``budget`` tokens per view, ``important_ratio`` important."""

    budget: int = 64
    important_ratio: float = 0.5
    layer: int = -2

    def __post_init__(self) -> None:
        check_ratio("important_ratio", self.important_ratio)

    def check(self, info: tc.RunInfo) -> None:
        check_int("budget (tokens per view)", self.budget, 1, info.patches_per_view)

    def needs_for_model(self, model) -> list[tc.Need]:
        return [tc.Need("vision_cls_attention" if model.has_cls else "vision_mean_attention", self.layer)]

    def split(self, budget: int) -> tuple[int, int]:
        """``(important, diverse)`` of a view's ``budget``: ``int(budget * important_ratio)`` important."""
        important = int(budget * self.important_ratio)
        return important, budget - important

    def select(self, view: tc.VisionView) -> list[torch.Tensor]:
        x = view.features  # (V, N, C)
        if view.cls is not None:  # 1. CLS row of the softmax attention, mean over heads
            score = view.cls_attention(self.layer)[:, :, 1:].mean(dim=1)
        else:
            score = view.mean_attention(self.layer).mean(dim=1)
        ranked = score.argsort(dim=-1, descending=True, stable=True)  # (V, N)
        unit = x / x.norm(dim=-1, keepdim=True)
        budgets = view.budget_for(self.budget, 1)
        kept: list[torch.Tensor | None] = [None] * len(budgets)
        for budget in sorted(set(budgets)):  # views of one budget at once (all, but on resized OneVision crops)
            rows = [i for i, b in enumerate(budgets) if b == budget]
            important, diverse = self.split(budget)
            idx = torch.tensor(rows, device=x.device)
            chosen = torch.cat(
                [ranked[idx, :important], diverse_tokens(unit[idx], ranked[idx, important:], diverse)], dim=1
            )
            for j, row in enumerate(rows):
                kept[row] = chosen[j]
        return kept  # 3. the engine restores raster order

    def overhead_flops(self, model, record, sample: int) -> float:
        """The A-B cosine similarities of every removal round, ``2 |A| |B| C`` each (``C`` the vision
        width), for each view's budget (`tokencomp.strategy.scale_budget` on OneVision crops)."""
        n, c = model.patches_per_view, model.hf.config.vision_config.hidden_size
        flops = 0
        for share in record.shares(sample):
            important, wanted = self.split(scale_budget(self.budget, share, 1))
            remaining = n - important
            while wanted > 0 and remaining - wanted > 0:
                r = min(8, remaining - wanted)
                flops += 2 * ((remaining + 1) // 2) * (remaining // 2) * c
                remaining -= r
        return float(flops)
