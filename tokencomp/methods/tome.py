"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461), as the
authors' released code (facebookresearch/ToMe) merges, applied to the LLaVA vision tower.

Inside each encoder layer, after the attention (residual added) and before the MLP:

1. **Bipartite soft matching** on the layer's keys averaged over heads (L2-normalised): tokens at
   even positions form ``A``, odd ones ``B``; each ``A`` token's best match is its most
   cosine-similar ``B`` token; the ``r`` ``A`` tokens with the best matches are merged into them
   (the CLS token, first in ``A``, never is). ``r`` is at most half the tokens.
2. **Weighted average**: each merged token is the size-weighted mean of what it absorbed, and
   its size (how many patches it stands for) the sum; the output is the unmerged ``A`` tokens
   (in their original order when there is a CLS token, as released) followed by ``B``.
3. **Proportional attention** (``proportional``, the released default): every later attention
   adds ``log(size)`` of each key to its logits, so a merged token weighs as the patches it holds.

The tokens reaching the projector (the feature layer's output, CLS dropped) are merged ones, with
no patch grid: LLaVA-NeXT's crops' tokens follow one another, crop by crop, without newline
tokens (there is no released LLaVA code; the tower also runs fewer tokens, which no other method
here does). ``r``: tokens merged per layer in every layer up to the feature layer (ToMe's own
parameter, clipped as released); or ``budget``: tokens per view reaching the projector, the
merges spread over those layers as evenly as they go (``ceil`` of what is left over the layers
left; a layer merges at most half its tokens, so a budget that asks more keeps more, as the
record's counts show). LLaVA-OneVision crops keep as many as the thumbnail (no anyres_max share: one ``r`` per
layer serves every view).

Differences from the released code: ties between equally good matches go to the lower index (its
``argsort`` is unstable); the weighted sums run in float32 (the released code sums in the model's
dtype: in float16 a large merged token can overflow, in bfloat16 sizes above 256 round). ``budget``
is ignored when ``r`` is given.
"""

from __future__ import annotations

import math

import torch

import tokencomp as tc
from tokencomp.strategy import check_int


def bipartite_soft_matching(keys: torch.Tensor, r: int, class_token: bool):
    """ToMe's matching: ``keys`` ``(V, n, c)``; returns ``merge(x (V, n, d), mode) -> (V, n - r, d)``."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)  # (V, |A|, |B|)
    if class_token:
        scores[:, 0, :] = -math.inf
    best, match = scores.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True, stable=True)[..., None]  # (V, |A|, 1)
    unmerged, merged = edges[:, r:], edges[:, :r]
    into = match[..., None].gather(1, merged)
    if class_token:
        unmerged = unmerged.sort(dim=1).values

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        v, _, d = src.shape
        kept = src.gather(1, unmerged.expand(v, unmerged.shape[1], d))
        moved = src.gather(1, merged.expand(v, r, d))
        dst = dst.scatter_reduce(1, into.expand(v, r, d), moved, reduce=mode)
        return torch.cat([kept, dst], dim=1)

    return merge


@tc.register("tome")
class ToMe(tc.TowerStrategy):
    """ToMe (arXiv 2210.09461): merge similar tokens inside the vision tower's layers (bipartite
    soft matching on keys, size-weighted, proportional attention); ``budget`` tokens per view
    reach the projector, or ``r`` merged per layer."""

    budget: int | None = 64
    r: int | None = None
    proportional: bool = True

    def __post_init__(self) -> None:
        if self.r is not None:
            check_int("r (tokens merged per layer)", self.r, 0)

    def check(self, info: tc.RunInfo) -> None:
        if self.r is None:
            check_int("budget (tokens per view)", self.budget, 1, info.patches_per_view)

    def reduce_layers(self, layers_run: int) -> list[int]:
        return list(range(layers_run))

    def reduce(self, ctx: tc.TowerContext) -> tuple[torch.Tensor, torch.Tensor]:
        n = ctx.hidden.shape[1]
        protected = int(ctx.has_cls)
        if self.r is not None:
            r = self.r
        else:  # what is left above the budget, over the layers left (this one included)
            r = math.ceil(max(0, n - protected - self.budget) / ctx.layers_left)
        r = min(r, (n - protected) // 2)
        if r <= 0:
            return ctx.hidden, ctx.size
        merge = bipartite_soft_matching(ctx.keys, r, ctx.has_cls)
        size = ctx.size[..., None].float()  # the weighted sums in float32 (exact sizes, no half overflow)
        x = merge(ctx.hidden.float() * size)
        size = merge(size)
        return (x / size).to(ctx.hidden.dtype), size[..., 0]

    def overhead_flops(self, model, record, sample: int) -> float:
        """The A-B key cosines of every merging layer, ``2 |A| |B| d_head`` per view."""
        vc = model.hf.config.vision_config
        d_head = vc.hidden_size // vc.num_attention_heads
        views = sum(len(image) for image in record.tokens_per_view[sample])
        flops = sum(2 * ((a + 1) // 2) * (a // 2) * d_head for a, m in record.vision_layer_tokens if m < a)
        return float(views * flops)
