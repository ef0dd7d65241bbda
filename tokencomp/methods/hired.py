"""HiRED (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models", AAAI 2025, arXiv 2408.10945), as the authors' released
code (hasanar1f/HiRED) does it.

Scores: the CLS row of the vision tower's softmax attention, summed over heads, at two encoder
layers: the first (``budget_layer=0``, which allots the budget) and the second-to-last
(``layer=-2``, the projector's input layer, which picks the tokens).

LLaVA-1.5 (one view): keep the ``min(N, int(N * ratio))`` patches with the most attention.

LLaVA-NeXT, per image of ``P`` views (thumbnail + ``P - 1`` crops) of ``N`` patches:

1. **Budget**: ``total = int(P * N * ratio)``; the thumbnail keeps ``full = min(int(total * alpha), N)``,
   the crops share ``min(total - full, (P - 1) * N)``.
2. **Allotment**: mark the thumbnail's ``int(N * (1 - alpha))`` patches with the most first-layer
   attention; cut its raster into ``P - 1`` equal consecutive runs (bands of rows), crop ``j``
   getting run ``j``, and give crop ``j`` the share of the marks in its run (float32,
   truncated, at most ``N``: left-overs are not redistributed), as the released code does (its
   paper speaks of each crop's own region of the thumbnail; the released bands are implemented).
3. **Selection**: each view keeps its budget of patches with the most attention at ``layer``.

The kept crop tokens are placed on the crop grid in raster order and unpadded, without newline
tokens (the released code passes no ``image_newline``). Published setting: ``ratio=0.2``,
``alpha=0.5`` (all the authors' benchmark scripts).

Differences from the released code: ties of equal attention go to the lower index (its
``topk`` leaves them unspecified); with ``alpha=1`` no thumbnail patch is marked and the crops
keep nothing (the released code divides by zero). Its copy of transformers 4.42 lays non-square
crop grids out transposed (as that version did for the uncompressed model too); here the layout
is the model's, as for every method.
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp.errors import UnsupportedModelError
from tokencomp.strategy import check_ratio


@tc.register("hired")
class HiRED(tc.VisionStrategy):
    """HiRED (arXiv 2408.10945): a ``ratio`` of each image's tokens, ``alpha`` of them to the
    thumbnail, the crops' share allotted by first-layer CLS attention; top CLS attention within each view."""

    ratio: float = 0.2
    alpha: float = 0.5
    layer: int = -2
    budget_layer: int = 0
    newline = "drop"

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_ratio("alpha", self.alpha)

    def check(self, info: tc.RunInfo) -> None:
        if not info.has_cls:
            raise UnsupportedModelError("hired scores by the vision tower's CLS attention: this tower has no CLS token")

    def needs(self) -> list[tc.Need]:
        return [tc.Need("vision_cls_attention", self.layer), tc.Need("vision_cls_attention", self.budget_layer)]

    def budgets(self, views: int, n: int, marks: list[int]) -> list[int]:
        """Tokens each view of an image keeps: ``views`` views of ``n`` patches; ``marks``: the
        thumbnail's first-layer marks in each crop's run (empty for one view)."""
        if views == 1:
            return [min(n, int(n * self.ratio))]
        total = int(views * n * self.ratio)
        full = min(int(total * self.alpha), n)
        shared = min(total - full, (views - 1) * n)
        if shared <= 0 or sum(marks) == 0:
            return [full] + [0] * (views - 1)
        counts = torch.tensor(marks)
        share = counts / counts.sum()  # float32, as released
        return [full] + (share * shared).int().clamp(max=n).tolist()

    def select(self, view: tc.VisionView) -> list[torch.Tensor]:
        score = view.cls_attention(self.layer)[:, :, 1:].sum(dim=1)  # (V, N) heads summed
        ranked = score.argsort(dim=-1, descending=True, stable=True)
        n = score.shape[1]
        image, role = view.image.tolist(), view.role.tolist()
        views = {i: image.count(i) for i in image}
        marks: dict[int, list[int]] = {}
        bases = [v for v in range(len(image)) if role[v] == 0 and views[image[v]] > 1]
        if bases:  # 2. the thumbnails' first-layer marks, counted per run: one read for the batch
            first = view.cls_attention(self.budget_layer)[bases][:, :, 1:].sum(dim=1)
            top = first.argsort(dim=-1, descending=True, stable=True)[:, : int(n * (1 - self.alpha))]
            marked = torch.zeros_like(first, dtype=torch.bool).scatter_(1, top, True)
            for v in bases:
                if n % (views[image[v]] - 1):
                    raise UnsupportedModelError(
                        f"hired cuts the thumbnail's {n} patches into one run per crop: {views[image[v]] - 1} crops do not divide them"
                    )
            per_run = [marked[i].view(views[image[v]] - 1, -1).sum(1) for i, v in enumerate(bases)]
            counts = torch.cat(per_run).tolist()
            at = 0
            for v in bases:
                marks[image[v]] = counts[at : at + views[image[v]] - 1]
                at += views[image[v]] - 1
        kept, allotted = [], {}
        for v in range(len(image)):
            if image[v] not in allotted:
                allotted[image[v]] = self.budgets(views[image[v]], n, marks.get(image[v], []))
            kept.append(ranked[v, : allotted[image[v]][role[v]]])  # 3. each view's most attended
        return kept
