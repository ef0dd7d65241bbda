"""Token kernels behind one dispatch layer.

Every kernel has a pure-PyTorch reference (`kernels.reference`). `backend()` says which
implementation runs for a tensor; today every device uses the reference (the Triton versions
arrive with their own tests, and this dispatch will pick them on CUDA tensors).
"""

from __future__ import annotations

import torch

from .reference import gather_tokens as _gather_ref
from .reference import pool_grid as _pool_ref

__all__ = ["backend", "gather_tokens", "pool_grid"]


def backend(x: torch.Tensor | None = None) -> str:
    """Name of the backend that serves tensors like ``x``: ``"torch"`` (reference) for now."""
    return "torch"


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, n, d), (B, k) -> (B, k, d)`` batched gather; see `kernels.reference.gather_tokens`."""
    return _gather_ref(x, index)


def pool_grid(x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str = "avg") -> torch.Tensor:
    """``(V, h*w, d) -> (V, gh*gw, d)`` grid pooling; see `kernels.reference.pool_grid`."""
    return _pool_ref(x, grid, out, mode)
