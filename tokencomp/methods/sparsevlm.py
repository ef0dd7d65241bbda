"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", arXiv 2410.04417), as its released code does it: the fixed-schedule version
(``USE_VERSION=1_0``; the 192 / 128 / 64 schedules are the v1.5 branch's, 96 is the later main
branch's); the first release chose the kept counts from the rank of the attention matrix and
pruned at four layers, which is not reproduced.

1. **Raters**: the text tokens after the image that are relevant to it. From the input
   embeddings, ``softmax_t(V Tᵀ)`` averaged over the visual tokens scores each text token; the
   raters are those scoring above the mean.
2. **Sparsification**: at each sparse layer ``l`` (2, 6, 15, as the code fixes them for every
   depth) the layer's own softmax attention, averaged over heads and over the raters' rows, ranks
   the image tokens; the top ``min(k_l, v - 1)`` stay in the layer's output (the pruning is before
   layer ``l + 1``). ``k_l`` comes from the published schedules (``budget`` 192: 300 / 200 / 110;
   128: 303 / 110 / 36; 96: 238 / 48 / 26; 64: 66 / 30 / 17) or ``counts``.
3. **Recycling**: of the deleted tokens, the ``recycle_ratio`` (30%) + 1 with the highest rater
   attention are clustered by density-peak k-NN clustering (DPC-KNN) into ``int(m / 10) + 1``
   tokens, each the mean of its cluster, placed after the kept image tokens. Merged tokens of one
   step are image tokens for the next.
4. Positions are renumbered 0..n-1 after each step, and each layer's decoded tokens continue
   its own numbering (the released code's position ids: the layer's cache length).

Choices where the code is not reproduced exactly:

- DPC-KNN density ties are not broken: the code adds 1e-6 uniform noise to the densities, which
  rounds away in the fp16 it runs in. With 2 clusters two mutual nearest neighbours tie exactly.
  Distances are computed in float32; centres are ordered by a stable sort.
- ``layers``: 2 / 6 / 15 wherever they fit (17 layers or more); on the shallower test decoders
  they are scaled by depth (``max(1, round(l * L / 32))``), unless given.
- The image span of LLaVA-NeXT (newline tokens included) is one pool; give ``counts`` for it
  (the published schedules are for 576 tokens). ``recycling=False`` drops instead of merging.
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp import kernels
from tokencomp.layout import repack
from tokencomp.strategy import check_int, check_ratio

PUBLISHED_LAYERS = (2, 6, 15)
PUBLISHED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


@tc.register("sparsevlm")
class SparseVLM(tc.LayerStrategy):
    """SparseVLM (arXiv 2410.04417): text tokens relevant to the image rate the image tokens at
    a few decoder layers; the least rated are dropped and some recycled into merged tokens."""

    budget: int | None = 64
    counts: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    recycling: bool = True
    recycle_ratio: float = 0.3
    llm_positions: str = "contiguous"

    def __post_init__(self) -> None:
        if self.counts is None:
            if self.budget not in PUBLISHED_COUNTS:
                raise tc.BudgetError(
                    f"budget={self.budget!r} has no published schedule (one of {sorted(PUBLISHED_COUNTS)}); give counts="
                )
            self.counts = PUBLISHED_COUNTS[self.budget]
        else:
            self.budget = None  # the counts decide; records show them, not a budget
        self.counts = tuple(check_int("counts (image tokens kept per sparse layer)", c, 1) for c in self.counts)
        if self.layers is not None:
            self.layers = tuple(check_int("layers (sparse layers)", lay, 0) for lay in self.layers)
            if len(self.layers) != len(self.counts) or list(self.layers) != sorted(set(self.layers)):
                raise tc.TokencompError(
                    f"layers must be increasing, one per count: layers={self.layers}, counts={self.counts}"
                )
        check_ratio("recycle_ratio (share of the deleted tokens recycled)", self.recycle_ratio)
        if self.llm_positions != "contiguous":
            raise tc.TokencompError("SparseVLM renumbers positions after each step (llm_positions='contiguous')")

    def sparse_layers(self, num_layers: int) -> list[int]:
        """The layers whose output is sparsified: given, else 2 / 6 / 15 where they fit, else scaled."""
        if self.layers is not None:  # each layer's output is pruned before the next: the last two cannot be
            return [check_int("layers (sparse layers)", lay, 0, num_layers - 2) for lay in self.layers]
        if num_layers >= PUBLISHED_LAYERS[-1] + 2 and len(self.counts) == len(PUBLISHED_LAYERS):
            return list(PUBLISHED_LAYERS)
        layers = sorted({max(1, round(lay * num_layers / 32)) for lay in PUBLISHED_LAYERS})
        if len(layers) != len(self.counts) or layers[-1] > num_layers - 2:
            raise tc.TokencompError(
                f"cannot place {len(self.counts)} sparse layers in {num_layers} layers; give layers="
            )
        return layers

    def needs_for(self, num_layers: int) -> list[tc.Need]:
        return [tc.Need("decoder_attention_raters", lay) for lay in self.sparse_layers(num_layers)]

    def prune_layers(self, num_layers: int) -> list[int]:
        return [lay + 1 for lay in self.sparse_layers(num_layers)]

    def raters(self, ctx: tc.LayerContext) -> torch.Tensor:
        """``(B, n)`` bool: text tokens after the image whose image relevance exceeds the mean."""
        (vi, v_ok), (ti, t_ok) = repack(ctx.image_mask), repack(ctx.text_after_image)
        v = kernels.gather_tokens(ctx.hidden, vi, backend=ctx.backend).float()  # (B, V, d), padded
        t = kernels.gather_tokens(ctx.hidden, ti, backend=ctx.backend).float()  # (B, T, d), padded
        logits = (v @ t.transpose(1, 2)).masked_fill(~t_ok[:, None, :], float("-inf"))
        probs = logits.softmax(dim=2).nan_to_num(0.0) * v_ok[:, :, None]  # softmax over the text
        relevance = probs.sum(1) / v_ok.sum(1, keepdim=True).clamp(min=1)  # (B, T), mean over images
        mean = (relevance * t_ok).sum(1, keepdim=True) / t_ok.sum(1, keepdim=True).clamp(min=1)
        chosen = t_ok & (relevance > mean)
        # back to token columns (padding slots point at column 0 and add nothing)
        return torch.zeros(ctx.valid.shape, dtype=torch.long, device=ti.device).scatter_add_(1, ti, chosen.long()) > 0

    def keep(self, ctx: tc.LayerContext) -> torch.Tensor:
        stage = self.prune_layers(ctx.num_layers).index(ctx.layer)
        relation = ctx.attention(ctx.layer - 1, "raters")
        return ctx.keep_top(relation, (ctx.image_count - 1).clamp(max=self.counts[stage]))

    def recycle_tokens(self, ctx: tc.LayerContext, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Deleted image tokens with the highest rater attention, clustered and averaged, the whole
        batch at once: ``(B, r, d)`` tokens and ``(B,)`` counts (None with ``recycling=False``)."""
        if not self.recycling:
            return None
        relation = ctx.attention(ctx.layer - 1, "raters")
        deleted = ctx.image_mask & ~keep
        m = deleted.sum(1)
        take = torch.minimum((m.double() * self.recycle_ratio).long() + 1, m)  # int(m * ratio) + 1, as in Python
        clusters = torch.where(take > 0, take // 10 + 1, 0)
        most = int(take.max())
        if most == 0:
            return ctx.hidden[:, :0], clusters
        # the `take` most attended deleted tokens of each sample, descending
        order = relation.float().masked_fill(~deleted, float("-inf")).argsort(dim=1, descending=True, stable=True)
        order = order[:, :most]
        chosen = torch.arange(order.shape[1], device=order.device) < take[:, None]
        x = kernels.gather_tokens(ctx.hidden, order, backend=ctx.backend)
        return dpc_knn_merge(x, chosen, clusters, ctx.backend).to(ctx.hidden.dtype), clusters

    def overhead_flops(self, model, record, sample: int) -> float:
        """Matrix products of its own (the profiler's convention): the raters' ``V Tᵀ`` on the
        input embeddings, ``2 v t d`` with t all text tokens (an upper bound for the text after
        the image), and per step the DPC-KNN pairwise distances, ``2 take² d`` (``take`` the
        tokens clustered, worked out from the image tokens before and after the step). The rater
        attention rows are counted by the profiler as a decoder capture."""
        d = model.hf.config.text_config.hidden_size
        visual = record.visual_per_layer[sample]
        total = 2.0 * visual[0] * (record.tokens_per_layer[sample][0] - visual[0]) * d
        if self.recycling:
            for stage, lay in enumerate(self.sparse_layers(len(visual))):
                deleted = visual[lay] - max(min(self.counts[stage], visual[lay] - 1), 0)
                take = min(int(deleted * self.recycle_ratio) + 1, deleted)
                total += 2.0 * take * take * d
        return total


def dpc_knn_merge(x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Density-peak k-NN clustering (the released code's ``cluster_and_merge``), batched: sample
    ``b``'s tokens ``x[b][valid[b]]`` (``x`` ``(B, m, d)``, ``valid`` ``(B, m)`` bool) go into
    ``clusters[b]`` groups. Density from the ``clusters[b]`` nearest distances, centres by density
    x distance to a denser token, every token to its nearest centre. Returns ``(B, C, d)`` float32
    cluster means (sum / (count + 1e-6), as the code divides), ``C = clusters.max()``; rows past
    ``clusters[b]`` are zero. ``backend``: the token-kernel backend of the cluster sums."""
    b, m, d = x.shape
    k = int(clusters.max())
    x32 = x.float()
    pair = valid[:, :, None] & valid[:, None, :]
    raw = torch.cdist(x32, x32, compute_mode="donot_use_mm_for_euclid_dist") / d**0.5  # (B, m, m)
    dist = raw.masked_fill(~pair, float("inf"))
    first = torch.arange(k, device=x.device) < clusters[:, None]  # (B, k): sample b's k nearest
    nearest = dist.topk(k, dim=-1, largest=False).values.masked_fill(~first[:, None, :], 0.0)
    density = (-(nearest**2).sum(-1) / clusters.clamp(min=1)[:, None]).exp()  # (B, m)
    denser = pair & (density[:, None, :] > density[:, :, None])
    far = raw.masked_fill(~pair, 0.0).amax(dim=(1, 2))  # each sample's largest distance
    parent_dist = torch.where(denser, raw, far[:, None, None]).min(-1).values
    score = (parent_dist * density).masked_fill(~valid, float("-inf"))
    centres = score.argsort(dim=1, descending=True, stable=True)[:, :k]  # (B, k); sample b's first clusters[b]
    to_centre = raw.gather(1, centres[:, :, None].expand(-1, -1, m)).masked_fill(~first[:, :, None], float("inf"))
    assign = to_centre.argmin(1)  # (B, m)
    assign.scatter_(1, centres, torch.arange(k, device=x.device).expand(b, -1).where(first, assign.gather(1, centres)))
    assign = assign.masked_fill(~valid, -1)  # padding goes into no cluster
    sums = kernels.merge_tokens(x32, assign, k, mean=False, backend=backend)  # (B, k, d) float32
    size = torch.zeros(b, k + 1, device=x.device).scatter_add_(1, assign + 1, valid.float())[:, 1:] + 1e-6
    return sums / size[:, :, None] * first[:, :, None]
