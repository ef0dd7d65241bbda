"""Pure-PyTorch reference implementations of the token kernels (the CPU backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_tokens(x: torch.Tensor, index: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Batched token gather with a keep count per sample.

    Args:
        x: ``(B, n, d)`` tokens.
        index: ``(B, k)`` long indices into ``n`` (padding slots may hold any valid index).
        count: ``(B,)`` optional number of real slots per row; slots ``i >= count[b]`` are zeros.

    Returns:
        ``(B, k, d)`` contiguous tensor with ``out[b, i] = x[b, index[b, i]]``.
    """
    out = torch.gather(x, 1, index[..., None].expand(*index.shape, x.shape[-1]))
    if count is not None:
        pad = torch.arange(index.shape[1], device=index.device)[None] >= count[:, None]
        out = out.masked_fill(pad[..., None], 0)
    return out


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


def merge_tokens(
    x: torch.Tensor,
    target: torch.Tensor,
    num_targets: int,
    weight: torch.Tensor | None = None,
    mean: bool = True,
) -> torch.Tensor:
    """Scatter-sum (or scatter-mean) of many tokens into a few targets.

    Args:
        x: ``(B, n, d)`` source tokens.
        target: ``(B, n)`` long, the target index in ``[0, num_targets)`` of each source, or -1
            for a source that goes nowhere.
        num_targets: t, targets per row.
        weight: ``(B, n)`` optional weight of each source (default 1).
        mean: divide each target's sum by its number of sources (clamped to 1); with ``weight``
            the divisor is still the source count (PruMerge-style weighted sums use ``mean=False``).

    Returns:
        ``(B, t, d)`` in ``x.dtype``, accumulated in float32.
    """
    b, n, d = x.shape
    if num_targets == 0:
        return x.new_zeros(b, 0, d)
    src = x.float() if weight is None else x.float() * weight.float()[..., None]
    ok = target >= 0
    t_idx = target.clamp(min=0)
    out = torch.zeros(b, num_targets, d, dtype=torch.float32, device=x.device)
    # a source going nowhere adds an exact zero (masked, not multiplied: an inf or NaN there stays out)
    out.scatter_add_(1, t_idx[..., None].expand(b, n, d), src.masked_fill(~ok[..., None], 0.0))
    if mean:
        cnt = torch.zeros(b, num_targets, dtype=torch.float32, device=x.device)
        cnt.scatter_add_(1, t_idx, ok.float())
        out = out / cnt.clamp(min=1)[..., None]
    return out.to(x.dtype)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    softcap: float | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of a few query rows against many keys, per head.

    Args:
        q: ``(B, H, r, d_head)`` queries (RoPE already applied where the model uses it).
        k: ``(B, H_kv, n, d_head)`` keys; ``H`` must be a multiple of ``H_kv`` (grouped-query attention).
        scale: logit scale, usually ``d_head ** -0.5``.
        key_valid: ``(B, n)`` bool, keys that may be attended (default all).
        query_index: ``(B, r)`` long, each row's index in the key sequence; keys after it are
            masked (causal). Default: no causal limit.
        softcap: logit soft-cap (Gemma2): scaled logits become ``softcap * tanh(logits / softcap)``.
        allowed: ``(B, r, n)`` bool, keys each row may attend besides the limits above (a sliding
            window's mask).

    Returns:
        ``(logits, probs)``, both ``(B, H, r, n)`` float32: scaled pre-softmax logits (masked keys
        hold ``-inf``) and softmax probabilities (0 on masked keys; a row with no visible key is 0).
    """
    groups = q.shape[1] // k.shape[1]
    kh = k.float().repeat_interleave(groups, dim=1)
    logits = (q.float() @ kh.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    b, _, r, n = logits.shape
    allow = torch.ones(b, r, n, dtype=torch.bool, device=q.device) if allowed is None else allowed.clone()
    if key_valid is not None:
        allow &= key_valid[:, None, :]
    if query_index is not None:
        allow &= torch.arange(n, device=q.device)[None, None] <= query_index[..., None]
    logits = logits.masked_fill(~allow[:, None], float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)
    return logits, probs
