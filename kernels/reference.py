"""Pure-PyTorch reference implementations of the token kernels (the CPU backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Batched token gather.

    Args:
        x: ``(B, n, d)`` tokens.
        index: ``(B, k)`` long indices into ``n`` (padding rows may hold any valid index).

    Returns:
        ``(B, k, d)`` contiguous tensor with ``out[b, i] = x[b, index[b, i]]``.
    """
    return torch.gather(x, 1, index[..., None].expand(*index.shape, x.shape[-1]))


def pool_grid(x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str = "avg") -> torch.Tensor:
    """Resample each view's token grid.

    Args:
        x: ``(V, h*w, d)`` tokens in raster order of an ``h x w`` grid.
        grid: ``(h, w)``.
        out: ``(gh, gw)`` output grid.
        mode: ``"avg"`` (adaptive average pooling) or ``"bilinear"`` (align_corners=False).

    Returns:
        ``(V, gh*gw, d)`` tokens in raster order of the output grid.
    """
    v, n, d = x.shape
    h, w = grid
    img = x.transpose(1, 2).reshape(v, d, h, w)
    if mode == "avg":
        y = F.adaptive_avg_pool2d(img.float(), out)
    elif mode == "bilinear":
        y = F.interpolate(img.float(), size=out, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"pool mode must be 'avg' or 'bilinear', got {mode!r}")
    return y.to(x.dtype).flatten(2).transpose(1, 2).contiguous()
