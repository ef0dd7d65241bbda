"""Token bookkeeping helpers: left padding and re-packing after tokens are dropped."""

from __future__ import annotations

import torch


def pad_left(rows: list[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D (or ``(n_i, d)``) tensors of different lengths, padding on the left.

    Returns ``(padded (B, n_max, ...), valid (B, n_max) bool)``.
    """
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), n, *rows[0].shape[1:]), value)
    valid = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        if r.shape[0]:
            out[b, n - r.shape[0] :] = r
            valid[b, n - r.shape[0] :] = True
    return out, valid


def repack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept tokens of each row, in order, right-aligned (left padded).

    Args:
        keep: ``(B, n)`` bool.

    Returns:
        ``index (B, k)`` long with ``k = max kept per row`` (padding slots hold 0) and
        ``valid (B, k)`` bool marking the real slots.
    """
    b, n = keep.shape
    counts = keep.sum(1)
    k = int(counts.max()) if b else 0  # the packed width: the one host sync
    dest = keep.long().cumsum(1) - 1 + (k - counts)[:, None]
    valid = torch.arange(k, device=keep.device)[None] >= (k - counts)[:, None]
    return place_columns(keep, dest, k), valid


def place_columns(keep: torch.Tensor, dest: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` long: slot ``dest[b, j]`` holds column ``j`` for each kept ``j`` (``keep``
    and ``dest`` ``(B, n)``), every other slot 0; one scatter, without a data-dependent shape
    (the dropped columns land in a spill slot, cut off)."""
    b, n = keep.shape
    cols = torch.arange(n, device=keep.device).expand(b, n)
    index = torch.zeros(b, width + 1, dtype=torch.long, device=keep.device)
    return index.scatter_(1, dest.masked_fill(~keep, width), cols)[:, :width].contiguous()


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``(..., n) -> (..., count)`` long: in order, the positions of the first ``count`` True
    entries of each row of ``mask`` (``mask.nonzero()`` when each row holds ``count`` Trues, known on
    the host): a stable sort puts them first, without a data-dependent shape (no host sync). A row
    with fewer than ``count`` Trues fills its last places with positions of False entries."""
    return (~mask).to(torch.uint8).sort(dim=-1, stable=True).indices[..., :count]


def filled_slots(count: torch.Tensor, width: int, total: int) -> torch.Tensor:
    """``(V,)`` counts -> ``(total,)`` long: the flat positions ``v * width + j`` of the first
    ``count[v]`` slots of each of ``V`` rows of ``width`` slots, in order (``total = count.sum()``,
    known on the host; no host sync)."""
    return true_indices((torch.arange(width, device=count.device)[None] < count[:, None]).flatten(), total)
