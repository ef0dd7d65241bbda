"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", arXiv 2412.04467), as the authors' released code does it.

Per view, from the vision tower's second-to-last encoder layer (the projector's input layer):

1. **Dominant tokens**: score each patch by the CLS query's softmax attention summed over heads;
   keep CLS plus the top ``dominant - 1`` patches, in raster order (CLS first).
2. **Contextual tokens**, from the remaining patches: L2-normalise their head-mean keys, take
   ``contextual`` targets uniformly by index (``step = max(1, n_rest // contextual)``), assign
   every other token to its most cosine-similar target, and emit per target
   ``target + mean(assigned)`` (released code; ``merge="average"`` gives the paper's plain average
   of the target and its assigned tokens).
3. Output per view: ``[CLS, dominant ; contextual]`` before the projector.

Towers without CLS (SigLIP, ``vision_feature_select_strategy="full"``): the dominant score is the
attention each patch receives averaged over all query rows (summed over heads), and all
``dominant`` slots are patches.

Budget split (tokens per view, CLS included): 192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10; for any
other budget ``contextual = round(budget * 5 / 32)`` (the same 15.6% share), unless ``dominant``
and ``contextual`` are given. LLaVA-NeXT: every view (thumbnail and each crop) gets the same split
(640 / 320 / 160 over 5 views = budgets 128 / 64 / 32). ``next_layout="code"`` assembles the crops
as the released code does: dominant patches of all crops in raster order of the combined crop grid
with no unpadding and no newline tokens, then each crop's CLS, then each crop's contextual tokens;
``next_layout="model"`` keeps LLaVA-NeXT's unpadding and newline tokens for the placed tokens;
a crop's dominant tokens are chosen over its whole padded grid, so those that fall in the padding
unpadding removes are dropped and such a view keeps fewer tokens than its budget (the record's
``tokens_per_view`` shows what each view kept).

LLaVA-OneVision (the authors released no code for it): the base view gets the split; each crop of
an image whose crop grid anyres_max downsamples by the area factor ``s`` keeps ``round(budget * s)``
tokens (rounded half up), ``round(contextual * s)`` of them contextual (`view_split`), so that a
budget keeps the same share of what the uncompressed model feeds the LLM; the kept crop tokens are
placed on the grid as on LLaVA-NeXT (``next_layout``), not resampled. ``next_layout="code"`` keeps
every crop's tokens, also crops that are all padding, so on images of extreme aspect ratio it can
send more tokens than the uncompressed model (as the released LLaVA-NeXT code does);
``"model"`` drops them with the padding.

The scores come from the engine's SDPA-compatible capture (CLS row and head-mean keys only), not
from an eager vision tower.
"""

from __future__ import annotations

import torch

import tokencomp as tc
from tokencomp import kernels
from tokencomp.errors import BudgetError, TokencompError
from tokencomp.layout import true_indices
from tokencomp.strategy import check_int, scale_budget

PUBLISHED_SPLITS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}


def default_split(budget: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for a per-view budget (CLS counted in ``dominant``)."""
    if budget in PUBLISHED_SPLITS:
        return PUBLISHED_SPLITS[budget]
    contextual = round(budget * 5 / 32)
    return budget - contextual, contextual


@tc.register("visionzip")
class VisionZip(tc.VisionStrategy):
    """VisionZip (arXiv 2412.04467): keep the dominant tokens (most CLS attention) and merge the
    rest into a few contextual tokens by key similarity; ``budget`` tokens per view."""

    budget: int = 64
    dominant: int | None = None
    contextual: int | None = None
    layer: int = -2
    merge: str = "code"
    next_layout: str = "code"

    def __post_init__(self) -> None:
        if self.merge not in ("code", "average"):
            raise TokencompError(f"merge must be 'code' or 'average', got {self.merge!r}")
        if self.next_layout not in ("code", "model"):
            raise TokencompError(f"next_layout must be 'code' or 'model', got {self.next_layout!r}")
        if (self.dominant is None) != (self.contextual is None):
            raise BudgetError("give both dominant and contextual, or neither (then budget is split)")
        if self.next_layout == "code":  # per-instance overrides of the class-level NeXT policies
            self.newline, self.unpad = "drop", False

    def split(self) -> tuple[int, int]:
        """``(dominant, contextual)`` tokens per view."""
        if self.dominant is not None:
            return self.dominant, self.contextual
        return default_split(self.budget)

    def check(self, info: tc.RunInfo) -> None:
        c = int(info.has_cls)  # 1: one dominant slot is the CLS token
        n = info.patches_per_view
        if self.dominant is None:
            check_int("budget (tokens per view, CLS included)", self.budget, 1 + c, n + c)
        dominant, contextual = self.split()
        check_int("dominant (CLS included)", dominant, c, n + c)
        check_int("contextual", contextual, 0, n - (dominant - c))

    def needs_for_model(self, model) -> list[tc.Need]:
        score = "vision_cls_attention" if model.has_cls else "vision_mean_attention"
        return [tc.Need(score, self.layer), tc.Need("vision_keys", self.layer)]

    def view_split(self, share: float, has_cls: bool) -> tuple[int, int]:
        """``(dominant, contextual)`` of a view whose tokens reach the LLM at ``share`` of their
        number (LLaVA-OneVision crops that anyres_max resizes): the view's total scaled and rounded
        half up (`tokencomp.strategy.scale_budget`, at least one token, the CLS token kept), of
        which ``contextual`` scaled the same way, the rest dominant."""
        dominant, contextual = self.split()
        if share == 1:
            return dominant, contextual
        c = int(has_cls)
        total = scale_budget(dominant + contextual, share, max(1, c))
        contextual = min(scale_budget(contextual, share), total - c)
        return total - contextual, contextual

    def overhead_flops(self, model, record, sample: int) -> float:
        """Key-cosine similarities of the contextual merge, ``2 * n_other * contextual * d_head`` per
        view (the profiler charges the captured attention: the CLS row, or every row without CLS)."""
        vc = model.hf.config.vision_config
        n, c = model.patches_per_view, int(model.has_cls)
        d_head = vc.hidden_size // vc.num_attention_heads
        flops = 0
        for share in record.shares(sample):
            dominant, contextual = self.view_split(share, model.has_cls)
            flops += 2 * (n - (dominant - c) - contextual) * contextual * d_head
        return float(flops)

    def compress(self, view: tc.VisionView) -> tc.ViewTokens:
        x = view.features  # (V, N, d)
        nv, n, d = x.shape
        c = int(view.cls is not None)  # the CLS token takes one dominant slot
        # 1. dominant score: CLS attention (or, without CLS, mean received attention) summed over heads
        if c:
            score = view.cls_attention(self.layer)[:, :, 1:].sum(dim=1)  # (V, N)
        else:
            score = view.mean_attention(self.layer).sum(dim=1)
        keys = view.keys(self.layer)[:, c:]
        cls = view.cls[:, None].to(x.dtype) if c else None
        shares = view.share or [1.0] * nv
        splits = [self.view_split(s, bool(c)) for s in shares]
        if len(set(splits)) == 1:  # every view alike (always but on resized OneVision crops)
            feats, idx, group = self._zip(x, score, keys, cls, *splits[0], view.backend)
            count = torch.full((nv,), feats.shape[1], device=x.device)
            return tc.ViewTokens(features=feats, index=idx, count=count, group=group)
        k = max(dom + ctx for dom, ctx in splits)
        feats, idx = x.new_zeros(nv, k, d), torch.zeros(nv, k, dtype=torch.long, device=x.device)
        group = torch.zeros_like(idx)
        for split in dict.fromkeys(splits):  # the views of one split at a time, padded to the widest
            rows = torch.tensor([v for v, sp in enumerate(splits) if sp == split], device=x.device)
            part = self._zip(x[rows], score[rows], keys[rows], None if cls is None else cls[rows], *split, view.backend)
            width = sum(split)
            for out, value in zip((feats, idx, group), part):
                out[rows, :width] = value
        count = torch.tensor([dom + ctx for dom, ctx in splits], device=x.device)
        return tc.ViewTokens(features=feats, index=idx, count=count, group=group)

    def _zip(self, x, score, keys, cls, dominant: int, contextual: int, be: str):
        """VisionZip on ``x (V, N, d)`` views that share one split: ``(features (V, dominant +
        contextual, d), source index (-1 for CLS and merged tokens), group)``."""
        nv, n, _ = x.shape
        dev = x.device
        c = int(cls is not None)
        top = score.topk(dominant - c, dim=-1).indices
        is_dom = torch.zeros(nv, n, dtype=torch.bool, device=dev).scatter_(1, top, True)
        dom_idx = top.sort(dim=-1).values  # raster order
        parts = [kernels.gather_tokens(x, dom_idx, backend=be)]
        index = [dom_idx]
        if c:
            parts.insert(0, cls)
            index.insert(0, torch.full((nv, 1), -1, device=dev))
        # 2. contextual: merge the remaining tokens into uniformly spaced targets by key cosine
        if contextual > 0:
            rest = true_indices(~is_dom, n - (dominant - c))  # raster order
            n_rest = rest.shape[1]
            step = max(1, n_rest // contextual)
            targets = torch.arange(0, n_rest, step, device=dev)[:contextual]
            is_target = torch.zeros(n_rest, dtype=torch.bool, device=dev).index_fill_(0, targets, True)
            others = true_indices(~is_target, n_rest - len(targets))
            target_idx, other_idx = rest[:, targets], rest[:, others]  # (V, contextual), (V, n_other)
            target_k, other_k = (kernels.gather_tokens(keys, i, backend=be) for i in (target_idx, other_idx))
            target_k, other_k = (k / k.norm(dim=-1, keepdim=True) for k in (target_k, other_k))
            assign = (other_k @ target_k.transpose(1, 2)).argmax(dim=-1)  # (V, n_other): the most similar target
            target_x = kernels.gather_tokens(x, target_idx, backend=be)
            other_x = kernels.gather_tokens(x, other_idx, backend=be)
            if self.merge == "code":
                merged = target_x + kernels.merge_tokens(other_x, assign, contextual, backend=be)
            else:  # paper: plain average of the target and the tokens assigned to it
                members = torch.cat([torch.arange(contextual, device=dev).expand(nv, -1), assign], 1)
                merged = kernels.merge_tokens(torch.cat([target_x, other_x], 1), members, contextual, backend=be)
            parts.append(merged)
            index.append(torch.full((nv, contextual), -1, device=dev))
        feats = torch.cat(parts, dim=1)
        idx = torch.cat(index, dim=1).long()
        group = torch.zeros_like(idx)
        group[:, dominant:] = 1  # NeXT crops: all CLS tokens first, then all contextual tokens
        return feats, idx, group
