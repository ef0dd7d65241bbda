"""LLaVA-PruMerge and PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for
Efficient Large Multimodal Models", arXiv 2403.15388), as the authors' released code does it.

Per view, with the CLS query and the keys of the vision tower's last encoder block (``layer=-1``,
whose input is the projector's feature layer), taken as one head over the full width:

1. **CLS attention** ``a = softmax(q_cls · K^T / sqrt(D))`` over all 1 + N keys; patches only.
2. **Adaptive pruning**: the outliers of ``a`` above ``Q3 + 1.5 * IQR`` (linear-interpolated
   quartiles) are kept; their number k is the method's own budget.
3. **Merging**: each kept token i becomes ``x_i + sum_j a_j x_j`` over its 32 nearest tokens j by
   cosine of the (L2-normalised) keys, weights the raw CLS attention. Released code: neighbours are
   drawn from every other patch (kept ones too, ``neighbours="all"``); the paper describes pruned
   tokens only (``neighbours="pruned"``).
4. Released code appends one **extra token** ``sum_{j pruned} a_j x_j`` (``extra_token``), and emits
   the kept tokens in descending attention (``order="score"``; ``"raster"`` sorts them).

PruMerge+ (``prumerge+``) adds spatially sampled tokens before merging: a raster stride of
``int(int(N / k) / 3)`` over the patches (the released code), skipping the ones already kept,
appended after the outliers in index order. Deviations from the released code, for robustness:
the stride is at least 1, and no tokens are sampled when there is no outlier (the code divides by
zero). CLS does not reach the LLM. The IQR is taken per view (the released code pools the batch,
which it always runs at batch size 1).
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp import kernels
from tokencomp.errors import TokencompError, UnsupportedModelError
from tokencomp.strategy import check_int


def cls_attention_single_head(q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(V, D), (V, 1+N, D) -> (V, N)``: softmax over all keys of one full-width head, CLS column dropped."""
    logits = (q_cls.float()[:, None] @ keys.float().transpose(1, 2)).squeeze(1) * keys.shape[-1] ** -0.5
    return logits.softmax(-1)[:, 1:]


def iqr_outliers(a: torch.Tensor) -> torch.Tensor:
    """``(..., N) -> (..., N)`` bool: values strictly above ``Q3 + 1.5 * (Q3 - Q1)`` of their row."""
    q = torch.linspace(0.25, 0.75, 2, device=a.device)  # made on the device: no upload
    q1, q3 = torch.quantile(a.float(), q, dim=-1, keepdim=True)
    return a > q3 + 1.5 * (q3 - q1)


class _PruMergeBase(tc.VisionStrategy):
    plus = False

    def __post_init__(self) -> None:
        if self.neighbours not in ("all", "pruned"):
            raise TokencompError(f"neighbours must be 'all' or 'pruned', got {self.neighbours!r}")
        if self.order not in ("score", "raster"):
            raise TokencompError(f"order must be 'score' or 'raster', got {self.order!r}")
        self.keep_order = self.order == "raster"

    def check(self, info: tc.RunInfo) -> None:
        if not info.has_cls:
            raise UnsupportedModelError(f"{self.name} needs a vision tower with a CLS token")
        check_int("k_neighbours", self.k_neighbours, 0, info.patches_per_view - 1)

    def needs(self) -> list[tc.Need]:
        return [tc.Need("vision_cls_query", self.layer), tc.Need("vision_keys_full", self.layer)]

    def overhead_flops(self, model, record, sample: int) -> float:
        """Single-head CLS attention ``2 (1+N) D`` per view and key cosines ``2 k N D`` for the
        ``k`` tokens each view keeps, counted before LLaVA-NeXT unpadding drops any (from
        ``record.projected_tokens``, the extra tokens taken off)."""
        n, dim = model.patches_per_view, model.hf.config.vision_config.hidden_size
        views = sum(len(image) for image in record.tokens_per_view[sample])
        if record.projected_tokens:
            kept = record.projected_tokens[sample]
        else:  # an older record: counts after unpadding (an undercount on LLaVA-NeXT)
            kept = sum(sum(image) for image in record.tokens_per_view[sample])
        kept -= views if self.extra_token else 0
        return views * 2.0 * (n + 1) * dim + 2.0 * kept * n * dim

    def kept(self, a: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """``(V, N)`` CLS attention -> ``(V, K)`` kept indices per view in emission order, -1 after a
        view's last; each view's count (one host read); the ``(V, N)`` bool mask of kept tokens."""
        v, n = a.shape
        i = torch.arange(n, device=a.device)
        outlier = iqr_outliers(a)  # the top-k values: k is the view's adaptive budget
        keep = outlier
        if self.plus:  # raster samples at stride int(int(1 / (k / N)) / 3), at least 1; none when k = 0
            k = outlier.sum(1, keepdim=True)
            stride = (1 / (k.clamp(min=1).double() / n)).trunc().div(3).trunc().clamp(min=1).long()
            keep = outlier | ((k > 0) & (i % stride == 0) & (i < n - 1))
        if self.order == "score":  # outliers by descending attention, then samples in raster order
            rank = torch.empty_like(i.expand(v, n)).scatter_(
                1, a.sort(dim=-1, descending=True, stable=True).indices, i.expand(v, n)
            )
            key = torch.where(outlier, rank, n + i)
        else:
            key = i.expand(v, n)
        key = torch.where(keep, key, 2 * n + i)
        count = keep.sum(1)
        counts = count.tolist()
        width = max(counts, default=0)
        order = key.argsort(dim=-1)[:, :width]
        return order.masked_fill(torch.arange(width, device=a.device) >= count[:, None], -1), counts, keep

    def compress(self, view: tc.VisionView) -> tc.ViewTokens:
        x = view.features
        nv, n, d = x.shape
        dev = x.device
        be = view.backend
        a = cls_attention_single_head(view.cls_query(self.layer), view.keys_full(self.layer))  # (V, N)
        keys = torch.nn.functional.normalize(view.keys_full(self.layer)[:, 1:].float(), dim=-1)
        keep, k, is_kept = self.kept(a)  # (V, K), -1 padding; k per view; (V, N) mask
        width = keep.shape[1]
        real = keep >= 0
        safe = keep.clamp(min=0)
        # 3. each kept token's nearest neighbours by key cosine, never itself (nor, "pruned", a kept one);
        # the cosines a matmul per view, so that no padding row is computed
        kept_keys = kernels.gather_tokens(keys, safe, backend=be)  # (V, K, D)
        cosines = [kept_keys[v, : k[v]] @ keys[v].T for v in range(nv)]
        sim = torch.nn.utils.rnn.pad_sequence(cosines, batch_first=True, padding_value=float("-inf"))
        sim.scatter_(2, safe[..., None], float("-inf"))  # (V, K, N)
        if self.neighbours == "pruned":
            sim.masked_fill_(is_kept[:, None], float("-inf"))
        m = min(self.k_neighbours, n - 1)  # a view with fewer candidates ("pruned") draws -inf ones: dropped
        near, nn_idx = sim.topk(m, dim=-1) if width and m > 0 else (sim[..., :0], keep.new_zeros(nv, width, 0))
        use = real[..., None] & (near > float("-inf"))
        src = kernels.gather_tokens(x, nn_idx.reshape(nv, -1), backend=be)
        target = torch.where(use, torch.arange(width, device=dev)[:, None], -1).reshape(nv, -1)
        weight = a.gather(1, nn_idx.reshape(nv, -1))
        merged = kernels.gather_tokens(x, safe, backend=be) + kernels.merge_tokens(
            src, target, width, weight, mean=False, backend=be
        )
        feats = merged.masked_fill(~real[..., None], 0).to(x.dtype)
        index, count = keep, real.sum(1)
        if self.extra_token:  # 4. the pruned tokens' attention-weighted sum, after the kept ones
            extra = kernels.merge_tokens(x, torch.where(is_kept, -1, 0), 1, a, mean=False, backend=be)
            feats = torch.cat([feats, feats.new_zeros(nv, 1, d)], 1)
            feats.scatter_(1, count[:, None, None].expand(-1, 1, d), extra.to(x.dtype))
            index = torch.cat([keep, keep.new_full((nv, 1), -1)], 1)
            count = count + 1
        return tc.ViewTokens(features=feats, index=index, count=count)


@tc.register("prumerge")
class PruMerge(_PruMergeBase):
    """LLaVA-PruMerge (arXiv 2403.15388): keep the tokens whose CLS attention is an outlier (IQR)
    and fold their nearest neighbours (by key) into them; the token count adapts per image."""

    layer: int = -1
    k_neighbours: int = 32
    neighbours: str = "all"
    extra_token: bool = True
    order: str = "score"
    plus = False


@tc.register("prumerge+")
class PruMergePlus(PruMerge):
    """PruMerge+ (arXiv 2403.15388): PruMerge's outliers plus spatially uniform samples, each
    folding in its nearest neighbours."""

    plus = True
