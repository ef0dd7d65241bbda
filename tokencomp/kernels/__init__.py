"""Token kernels behind one dispatch layer.

Every kernel has a pure-PyTorch reference (`tokencomp.kernels.reference`) and a Triton
implementation (`tokencomp.kernels.triton_kernels`). Each public function takes
``backend="auto" | "torch" | "triton"``: ``"auto"`` picks Triton for CUDA tensors when Triton is
importable, the reference otherwise; an explicit choice overrides it (Triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before import, which is how the tests run it). `backend(x)` says what
``"auto"`` would pick, and the engine records it in the run record. The Triton gather, pooling and
merge use no atomics (each output is summed by one program in a fixed order;
`tokencomp.kernels.compile_check` holds them to it), so their results repeat bit for bit; the
reference merge on CUDA tensors (``scatter_add_``) does not.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from . import reference

__all__ = ["attention_rows", "backend", "gather_tokens", "merge_tokens", "pool_grid"]


@cache
def _triton():
    try:
        return importlib.import_module(".triton_kernels", __name__)
    except Exception:  # triton missing or unusable on this platform
        return None


def backend(x: torch.Tensor | None = None, choice: str = "auto") -> str:
    """The backend that serves tensors like ``x``: ``"triton"`` or ``"torch"``."""
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {choice!r}")
    if choice == "triton":
        if _triton() is None:
            raise RuntimeError("backend='triton' requested but triton cannot be imported here")
        return "triton"
    if choice == "torch":
        return "torch"
    return "triton" if x is not None and x.is_cuda and _triton() is not None else "torch"


def _impl(name: str, x: torch.Tensor, choice: str):
    mod = _triton() if backend(x, choice) == "triton" else reference
    return getattr(mod, name)


def gather_tokens(
    x: torch.Tensor, index: torch.Tensor, count: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """``(B, n, d), (B, k) -> (B, k, d)`` batched gather; see `tokencomp.kernels.reference.gather_tokens`."""
    return _impl("gather_tokens", x, backend)(x, index, count)


def pool_grid(
    x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str = "avg", backend: str = "auto"
) -> torch.Tensor:
    """``(V, h*w, d) -> (V, gh*gw, d)`` grid pooling; see `tokencomp.kernels.reference.pool_grid`."""
    return _impl("pool_grid", x, backend)(x, grid, out, mode)


def merge_tokens(
    x: torch.Tensor,
    target: torch.Tensor,
    num_targets: int,
    weight: torch.Tensor | None = None,
    mean: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``(B, n, d) -> (B, t, d)`` scatter-sum / mean into targets; see `tokencomp.kernels.reference.merge_tokens`."""
    return _impl("merge_tokens", x, backend)(x, target, num_targets, weight, mean)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``(logits, probs)`` ``(B, H, r, n)`` of r query rows; see `tokencomp.kernels.reference.attention_rows`.
    Rows with a logit soft-cap or an explicit ``allowed`` mask (a sliding window) are computed by
    the reference whatever the backend: the Triton kernel takes neither."""
    if softcap is not None or allowed is not None:
        return reference.attention_rows(q, k, scale, key_valid, query_index, softcap, allowed)
    return _impl("attention_rows", q, backend)(q, k, scale, key_valid, query_index)
