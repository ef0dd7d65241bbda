"""GlobalCom² (Liu et al., "Compression with Global Guidance: Towards Training-free High-Resolution
MLLMs Acceleration", arXiv 2501.05179), as the authors' released code does it (LLaVA-NeXT), and on
LLaVA-OneVision by the two extensions at the end.

Scores: the CLS row of the vision tower's **last** encoder layer, head-mean of the pre-softmax scaled
logits q·k/sqrt(d_head), patches only. With the global retention ratio R (``ratio``, the budget):

1. **Thumbnail**: keep the top ``int(N * R)`` tokens by its own score (released code: emitted in
   descending score, ``thumbnail_order="score"``; ``"raster"`` restores raster order).
2. **Crop importance**: split the thumbnail's h x w score grid into the rows x cols crop grid with
   integer blocks (``max(h // rows, 1)``, the last block takes the remainder); ``s_j`` = sum of the
   block's scores.
3. ``sigma = softmax((s - max s) / tau)`` with ``tau = 10`` (denominator + 1e-8).
4. **Crop retention** ``r_j = R * (1 + sigma_j - mean(sigma))``, clipped above at 1, no lower clamp.
5. **In-crop selection** among the crop's unpadded tokens: score = L2-normalised own CLS logits +
   L2-normalised thumbnail scores bilinearly interpolated (align_corners=False) to the unpadded
   combined crop grid and cut per crop; keep the top ``int(N_j * r_j)`` (N_j = unpadded count), in
   raster order.
6. Unpadding as the uncompressed model. Newline tokens (``newline_rows``): ``"model"`` one after
   every unpadded row, as the uncompressed model; ``"code"`` one after every row of the padded crop
   grid, as the released code emits them. (The released code also places kept tokens of padded
   crops by their index in the unpadded list, shifting them in the grid; that bug is not reproduced.
   Nor is its reading of the first image's scores for every image of a batch: here each image is
   scored by its own views.)

Two smaller differences with the released code, documented rather than optional (measured by
running both rules on the same inputs; released code at commit 96b2d00):

- **Unpadding rounding.** The released code unpads as the original LLaVA does, truncating the
  resized side (``int(original_height * scale)``); transformers' ``unpad_image``, which this engine
  follows for every LLaVA-NeXT model, rounds first (``int(round(..., 7))``). Over every image size
  from 10 to 1250 px a side (1.54 million sizes, 336 px views, the default pinpoints) 36 unpadded
  grids differ, always by 2 rows or columns, e.g. 55 x 176 px: 14 rows released, 16 here.
  (A larger source of difference with the released pipeline is the crop grid itself: see the
  README on ``image_grid_pinpoints``.)
- **Ties.** The released thumbnail ranks with an unstable ``torch.argsort(descending=True)`` and the
  crops with ``torch.topk``; here both use ``topk``. Equal scores at the cut-off may keep other
  tokens than the released code (as they may between its CPU and GPU runs); with real-valued CLS
  logits such ties are rare.

Scores come from the engine's SDPA-compatible capture (the CLS row of one layer only).

LLaVA-OneVision (the authors support CLIP towers on LLaVA-NeXT only; these are tokencomp's):

- **No CLS** (SigLIP): the score is the logits each token receives averaged over all query rows,
  i.e. the logits of the mean query (`tokencomp.VisionView.mean_logits`), head-mean, in place of
  the CLS row.
- **anyres_max**: a crop of an image whose unpadded crop grid the model downsamples by the area
  factor ``s`` keeps ``int(N_j * s * r_j)`` tokens, the share of the resized grid the uncompressed
  model would feed; the kept tokens are placed on the grid at their own positions, not resampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tokencomp as tc
from tokencomp import kernels
from tokencomp.errors import TokencompError, UnsupportedModelError
from tokencomp.strategy import check_ratio

PRESETS = {"R25": 0.25, "R10": 0.10}


def crop_block_scores(thumb: torch.Tensor, grid: tuple[int, int], crops: tuple[int, int]) -> torch.Tensor:
    """``(h*w,)`` thumbnail scores -> ``(rows*cols,)`` sums over each crop's block (row-major)."""
    h, w = grid
    rows, cols = crops
    ph, pw = max(h // rows, 1), max(w // cols, 1)
    i = torch.arange(h * w, device=thumb.device)
    block = (i // w // ph).clamp(max=rows - 1) * cols + (i % w // pw).clamp(max=cols - 1)
    return torch.zeros(rows * cols, dtype=thumb.dtype, device=thumb.device).index_add(0, block, thumb)


def crop_retention(s: torch.Tensor, ratio: float, tau: float) -> torch.Tensor:
    """``r_j = R (1 + sigma_j - mean sigma)``, ``sigma = softmax((s - max s) / tau)``, clipped at 1."""
    e = torch.exp((s - s.max()) / tau)
    sigma = e / (e.sum() + 1e-8)
    return (ratio * (1 + sigma - sigma.mean())).clamp(max=1.0)


@tc.register("globalcom2")
class GlobalCom2(tc.VisionStrategy):
    """GlobalCom² (arXiv 2501.05179), families with crops: the thumbnail's CLS scores (mean-query
    scores without CLS) set how many tokens each crop keeps (global ratio ``ratio``) and guide which."""

    ratio: float = 0.25
    tau: float = 10.0
    layer: int = -1
    thumbnail_order: str = "score"
    newline_rows: str = "model"

    def __post_init__(self) -> None:
        check_ratio("ratio (global retention R)", self.ratio, 0.0, 1.0, open_high=False)
        if self.ratio == 0:
            raise tc.BudgetError("ratio (global retention R)=0 is outside the allowed range (0, 1]")
        if self.thumbnail_order not in ("score", "raster"):
            raise TokencompError(f"thumbnail_order must be 'score' or 'raster', got {self.thumbnail_order!r}")
        if self.newline_rows not in ("model", "code"):
            raise TokencompError(f"newline_rows must be 'model' or 'code', got {self.newline_rows!r}")
        self.unpad = self.newline_rows == "model"  # "code": newline after every padded-grid row

    def check(self, info: tc.RunInfo) -> None:
        if not info.has_crops:
            raise UnsupportedModelError(
                f"GlobalCom² allocates tokens over LLaVA-NeXT crops; model family {info.family!r} has none"
            )

    def needs_for_model(self, model) -> list[tc.Need]:
        return [tc.Need("vision_cls_logits" if model.has_cls else "vision_mean_logits", self.layer)]

    def compress(self, view: tc.VisionView) -> tc.ViewTokens:
        x = view.features
        nv, n, d = x.shape
        h, w = view.grid
        dev = x.device
        if any(rows for rows, _ in view.crop_grid) and len(view.crop_window) != len(view.crop_grid):
            raise TokencompError("GlobalCom² needs the views' crop_window (the unpadded crop windows)")
        if sum(1 + rows * cols for rows, cols in view.crop_grid) != nv:
            raise TokencompError(f"the crop grids {view.crop_grid} do not account for the {nv} views")
        if view.cls is not None:
            scores = view.cls_logits(self.layer)[:, :, 1:].mean(dim=1)  # (V, N) head-mean logits
        else:
            scores = view.mean_logits(self.layer).mean(dim=1)
        # 1. thumbnails keep their top int(N R) by their own score; crops are scored below
        combined = scores.clone()
        k = torch.full((nv,), int(n * self.ratio), dtype=torch.long, device=dev)
        first = 0
        for img, (rows, cols) in enumerate(view.crop_grid):  # an image: its thumbnail, then its crops
            crops = slice(first + 1, first + 1 + rows * cols)
            first = crops.stop
            if not rows * cols:
                continue
            thumb = scores[crops.start - 1]
            # 2-4. crop retention r_j from the thumbnail's block scores
            r = crop_retention(crop_block_scores(thumb, (h, w), (rows, cols)), self.ratio, self.tau)
            valid = view.valid[crops]  # (C, N) unpadded tokens
            r0, height, c0, width = view.crop_window[img]
            share = view.share[crops.start] if view.share else 1.0  # anyres_max's area factor (OneVision)
            k[crops] = (valid.sum(1).double() * share * r.double()).trunc().long()  # int(N_j s r_j)
            if not height * width:  # unpadding keeps no crop token
                continue
            # 5. own scores + the thumbnail's scores resampled onto the unpadded crop window
            glob = kernels.pool_grid(thumb.view(1, h * w, 1), (h, w), (height, width), "bilinear", backend=view.backend)
            j, p = torch.arange(rows * cols, device=dev)[:, None], torch.arange(n, device=dev)[None]
            rg = ((j // cols) * h + p // w - r0).clamp(0, height - 1)
            cg = ((j % cols) * w + p % w - c0).clamp(0, width - 1)
            own = F.normalize(scores[crops].masked_fill(~valid, 0), dim=-1)
            glb = F.normalize(glob.view(height, width)[rg, cg].masked_fill(~valid, 0), dim=-1)
            combined[crops] = (own + glb).masked_fill(~valid, float("-inf"))
        top = combined.topk(int(k.max()), dim=-1).indices  # one host read: the widest view
        pad = torch.arange(top.shape[1], device=dev)[None] >= k[:, None]
        index = top.masked_fill(pad, n).sort(dim=-1).values.masked_fill(pad, 0)  # raster order
        if self.thumbnail_order == "score":  # thumbnails in descending score, as the released code
            index = torch.where((view.role == 0)[:, None], top.masked_fill(pad, 0), index)
        feats = kernels.gather_tokens(x, index, k, backend=view.backend)
        return tc.ViewTokens(features=feats, index=index, count=k)
