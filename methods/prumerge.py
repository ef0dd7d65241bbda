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

import kernels
import tokencomp as tc
from tokencomp.errors import TokencompError, UnsupportedModelError
from tokencomp.strategy import check_int


def cls_attention_single_head(q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(V, D), (V, 1+N, D) -> (V, N)``: softmax over all keys of one full-width head, CLS column dropped."""
    logits = (q_cls.float()[:, None] @ keys.float().transpose(1, 2)).squeeze(1) * keys.shape[-1] ** -0.5
    return logits.softmax(-1)[:, 1:]


def iqr_outliers(a: torch.Tensor) -> torch.Tensor:
    """``(N,) -> (N,)`` bool: values strictly above ``Q3 + 1.5 * (Q3 - Q1)``."""
    q1, q3 = torch.quantile(a.float(), torch.tensor([0.25, 0.75], device=a.device))
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

    def kept(self, a: torch.Tensor) -> torch.Tensor:
        """Indices kept for one view's CLS attention ``a (N,)``, in emission order."""
        n = a.shape[0]
        k = int(iqr_outliers(a).sum())
        top = a.topk(k).indices  # descending attention
        if self.plus and k > 0:
            stride = max(1, int(int(1 / (k / n)) / 3))
            sampled = torch.arange(0, n - 1, stride, device=a.device)
            sampled = sampled[~torch.isin(sampled, top)]
            top = torch.cat([top, sampled])
        return top.sort().values if self.order == "raster" else top

    def compress(self, view: tc.VisionView) -> tc.ViewTokens:
        x = view.features
        nv, n, d = x.shape
        dev = x.device
        be = view.backend
        a = cls_attention_single_head(view.cls_query(self.layer), view.keys_full(self.layer))  # (V, N)
        keys = torch.nn.functional.normalize(view.keys_full(self.layer)[:, 1:].float(), dim=-1)
        outs, idxs = [], []
        for v in range(nv):
            keep = self.kept(a[v])
            k = len(keep)
            sim = keys[v, keep] @ keys[v].T  # (k, N)
            sim[torch.arange(k, device=dev), keep] = float("-inf")  # never a token's own neighbour
            if self.neighbours == "pruned":
                sim[:, keep] = float("-inf")
            m = min(self.k_neighbours, n - (k if self.neighbours == "pruned" else 1))
            nn_idx = sim.topk(m, dim=-1).indices if k and m > 0 else keep.new_zeros(k, 0)
            src = kernels.gather_tokens(x[v : v + 1], nn_idx.reshape(1, -1), backend=be)
            target = torch.arange(k, device=dev).repeat_interleave(nn_idx.shape[1])[None]
            weight = a[v][nn_idx.reshape(-1)][None]
            merged = x[v, keep] + kernels.merge_tokens(src, target, k, weight, mean=False, backend=be)[0]
            tokens, index = [merged], [keep]
            if self.extra_token:
                pruned = torch.ones(n, dtype=torch.bool, device=dev)
                pruned[keep] = False
                tgt = torch.where(pruned, 0, -1)[None]
                tokens.append(kernels.merge_tokens(x[v : v + 1], tgt, 1, a[v][None], mean=False, backend=be)[0])
                index.append(keep.new_full((1,), -1))
            outs.append(torch.cat(tokens))
            idxs.append(torch.cat(index))
        count = torch.tensor([len(i) for i in idxs], device=dev)
        kmax = int(count.max())
        feats = x.new_zeros(nv, kmax, d)
        index = torch.full((nv, kmax), -1, dtype=torch.long, device=dev)
        for v in range(nv):
            feats[v, : count[v]] = outs[v].to(x.dtype)
            index[v, : count[v]] = idxs[v]
        return tc.ViewTokens(features=feats, index=index, count=count)


@tc.register("prumerge")
class PruMerge(_PruMergeBase):
    layer: int = -1
    k_neighbours: int = 32
    neighbours: str = "all"
    extra_token: bool = True
    order: str = "score"
    plus = False


@tc.register("prumerge+")
class PruMergePlus(PruMerge):
    plus = True
