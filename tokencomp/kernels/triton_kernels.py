"""Triton implementations of the token kernels (same contracts as `tokencomp.kernels.reference`).

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which is how the tests check them without a GPU.
Every kernel accumulates in float32 and writes the input dtype (float32 for attention rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl


def _block(d: int, cap: int = 1024, floor: int = 1) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(int(d), 1))))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the JIT function, its grid, its runtime arguments and its compile-time constants.

    Every wrapper below plans its launch with a ``plan_*`` function and then calls it, so that
    `tokencomp.kernels.compile_check` compiles exactly what the wrappers launch (same argument types and
    constants) for a GPU architecture, on a machine without one.
    """

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    consts: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # launch options such as num_warps

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.consts, **self.options)


# ------------------------------------------------------------------------------------------------
# gather


@triton.jit
def _gather_kernel(
    x_ptr, idx_ptr, cnt_ptr, out_ptr, n, k, total, d, HAS_COUNT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # flat output rows b * k + i
    blk = tl.program_id(1)
    rm = rows < total
    b = rows // k
    i = rows % k
    offs = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    m = rm[:, None] & (offs < d)[None, :]
    src = tl.load(idx_ptr + rows, mask=rm, other=0).to(tl.int64)
    take = m
    if HAS_COUNT:
        c = tl.load(cnt_ptr + b, mask=rm, other=0)
        take = take & (i < c)[:, None]  # padding slots read nothing and store zeros
    v = tl.load(x_ptr + ((b.to(tl.int64) * n + src) * d)[:, None] + offs[None, :], mask=take, other=0.0)
    tl.store(out_ptr + (rows.to(tl.int64) * d)[:, None] + offs[None, :], v, mask=m)


# Output rows per gather program: enough that a program moves about 8 KiB, so that each thread has
# several independent 16-byte loads in flight. A first choice until measured on a GPU
# (`experiments/bench_kernels.py --sweep` times the alternatives).
GATHER_BYTES_PER_PROGRAM = 8192


def plan_gather(
    x: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, Launch | None]:
    """The output ``(B, k, d)`` and the launch that fills it (None when there is nothing to copy).

    ``rows_per_program`` (a power of two) defaults to what `GATHER_BYTES_PER_PROGRAM` asks for.
    """
    b, n, d = x.shape
    k = index.shape[1]
    x = x.contiguous()
    out = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    if b * k == 0 or d == 0:
        return out, None
    idx = index.contiguous().to(torch.int64)
    cnt = count.contiguous().to(torch.int64) if count is not None else idx
    block = _block(d)
    if rows_per_program is None:
        rows_per_program = triton.next_power_of_2(max(1, GATHER_BYTES_PER_PROGRAM // (block * x.element_size())))
    rows_per_program = min(rows_per_program, triton.next_power_of_2(b * k))
    grid = (triton.cdiv(b * k, rows_per_program), triton.cdiv(d, block))
    consts = {"HAS_COUNT": count is not None, "ROWS": rows_per_program, "BLOCK_D": block}
    return out, Launch(_gather_kernel, grid, (x, idx, cnt, out, n, k, b * k, d), consts, {"num_warps": num_warps})


def gather_tokens(x: torch.Tensor, index: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, n, d), (B, k) -> (B, k, d)``; see `tokencomp.kernels.reference.gather_tokens`."""
    out, launch = plan_gather(x, index, count)
    if launch is not None:
        launch()
    return out


# ------------------------------------------------------------------------------------------------
# grid pooling


@triton.jit
def _pool_kernel(x_ptr, out_ptr, h, w, gh, gw, d, MODE: tl.constexpr, MAX_WIN: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # v * gh * gw + o
    blk = tl.program_id(1)
    o = pid % (gh * gw)
    v = pid // (gh * gw)
    oy = o // gw
    ox = o % gw
    offs = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < d
    base = x_ptr + v.to(tl.int64) * h * w * d
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    if MODE == 0:  # adaptive average pooling: window [floor(o*h/g), ceil((o+1)*h/g))
        y0 = (oy * h) // gh
        y1 = ((oy + 1) * h + gh - 1) // gh
        x0 = (ox * w) // gw
        x1 = ((ox + 1) * w + gw - 1) // gw
        for dy in range(0, MAX_WIN):
            for dx in range(0, MAX_WIN):
                yy = y0 + dy
                xx = x0 + dx
                ok = ((offs * 0 + yy) < y1) & ((offs * 0 + xx) < x1)  # vector masks only
                val = tl.load(base + (yy * w + xx) * d + offs, mask=m & ok, other=0.0)
                acc += val.to(tl.float32)
        acc = acc / ((y1 - y0) * (x1 - x0)).to(tl.float32)
    else:  # bilinear, align_corners=False (PyTorch's source-coordinate rule, no antialias)
        sy = tl.maximum((oy.to(tl.float32) + 0.5) * (h / gh) - 0.5, 0.0)
        sx = tl.maximum((ox.to(tl.float32) + 0.5) * (w / gw) - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        v00 = tl.load(base + (y0 * w + x0) * d + offs, mask=m, other=0.0).to(tl.float32)
        v01 = tl.load(base + (y0 * w + x1) * d + offs, mask=m, other=0.0).to(tl.float32)
        v10 = tl.load(base + (y1 * w + x0) * d + offs, mask=m, other=0.0).to(tl.float32)
        v11 = tl.load(base + (y1 * w + x1) * d + offs, mask=m, other=0.0).to(tl.float32)
        acc = (1 - ly) * ((1 - lx) * v00 + lx * v01) + ly * ((1 - lx) * v10 + lx * v11)
    tl.store(out_ptr + pid.to(tl.int64) * d + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def plan_pool(
    x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str = "avg", num_warps: int = 4
) -> tuple[torch.Tensor, Launch | None]:
    """The output ``(V, gh*gw, d)`` and the launch that fills it (None when it is empty)."""
    if mode not in ("avg", "bilinear"):
        raise ValueError(f"pool mode must be 'avg' or 'bilinear', got {mode!r}")
    v, n, d = x.shape
    h, w = grid
    gh, gw = out
    if n != h * w:
        raise ValueError(f"x has {n} tokens per view, grid {grid} needs {h * w}")
    x = x.contiguous()
    res = torch.empty(v, gh * gw, d, dtype=x.dtype, device=x.device)
    if v * gh * gw == 0 or d == 0:
        return res, None
    block = _block(d)
    max_win = max(-(-h // gh), -(-w // gw)) + 1
    consts = {"MODE": 0 if mode == "avg" else 1, "MAX_WIN": max_win, "BLOCK_D": block}
    grid_ = (v * gh * gw, triton.cdiv(d, block))
    return res, Launch(_pool_kernel, grid_, (x, res, h, w, gh, gw, d), consts, {"num_warps": num_warps})


def pool_grid(x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str = "avg") -> torch.Tensor:
    """``(V, h*w, d) -> (V, gh*gw, d)``; see `tokencomp.kernels.reference.pool_grid`."""
    res, launch = plan_pool(x, grid, out, mode)
    if launch is not None:
        launch()
    return res


# ------------------------------------------------------------------------------------------------
# merge


@triton.jit
def _merge_kernel(
    x_ptr, order_ptr, start_ptr, cnt_ptr, w_ptr, out_ptr, n, t, d,
    HAS_W: tl.constexpr, MEAN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bt = tl.program_id(0)  # b * t + target
    blk = tl.program_id(1)
    b = bt // t
    row0 = b.to(tl.int64) * n
    first = tl.load(start_ptr + bt)
    count = tl.load(cnt_ptr + bt)
    offs = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < d
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # this target's sources in ascending source order, CHUNK rows per step: their loads are in
    # flight together, and the step's sum is a fixed reduction, so the result is deterministic
    # (CHUNK = 1 adds one source after the other, the reference's order on a CPU)
    for i in range(0, count, CHUNK):
        j = i + tl.arange(0, CHUNK)
        ok = j < count
        src = row0 + tl.load(order_ptr + row0 + first + j, mask=ok, other=0)
        val = tl.load(x_ptr + (src * d)[:, None] + offs[None, :], mask=ok[:, None] & m[None, :], other=0.0)
        val = val.to(tl.float32)
        if HAS_W:
            val = val * tl.load(w_ptr + src, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(val, axis=0)
    if MEAN:
        acc = acc / tl.maximum(count, 1).to(tl.float32)
    tl.store(out_ptr + bt.to(tl.int64) * d + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


# Sources each merge program loads per step. 1 sums them one after the other (bit for bit the
# reference's order on a CPU); more keeps more row loads in flight, which a target with hundreds of
# sources (PruMerge+'s extra token, a VisionZip contextual token) needs on a GPU. A first choice
# until measured (`experiments/bench_kernels.py --sweep` times the alternatives).
MERGE_CHUNK = 1


def plan_merge(
    x: torch.Tensor,
    target: torch.Tensor,
    num_targets: int,
    weight: torch.Tensor | None = None,
    mean: bool = True,
    chunk: int = MERGE_CHUNK,
    num_warps: int = 4,
) -> tuple[torch.Tensor, Launch | None]:
    """The output ``(B, t, d)`` and the launch that fills it: one program per target and feature
    block sums the target's sources in ascending source order (a stable sort by target gives
    them), ``chunk`` (a power of two) at a time, in float32, so the result is deterministic, with
    no atomics and no zero-fill pass. ``target`` must lie in ``[-1, t)`` (checked upstream)."""
    b, n, d = x.shape
    x = x.contiguous()
    out = torch.empty(b, num_targets, d, dtype=x.dtype, device=x.device)  # the kernel writes every element
    if not (b and d and num_targets):
        return out, None
    tgt = target.to(torch.int64)
    key = torch.where(tgt >= 0, tgt, num_targets)  # sources that go nowhere sort last
    order = torch.sort(key, dim=1, stable=True).indices.contiguous()
    count = torch.zeros(b, num_targets + 1, dtype=torch.int64, device=x.device).scatter_add_(
        1, key, torch.ones_like(key)
    )
    count = count[:, :num_targets].contiguous()
    first = (count.cumsum(1) - count).contiguous()
    wt = weight.expand(b, n).contiguous().float() if weight is not None else x  # (B, n): the kernel reads it so
    block = _block(d)
    grid = (b * num_targets, triton.cdiv(d, block))
    args = (x, order, first, count, wt, out, n, num_targets, d)
    consts = {"HAS_W": weight is not None, "MEAN": mean, "CHUNK": chunk, "BLOCK_D": block}
    return out, Launch(_merge_kernel, grid, args, consts, {"num_warps": num_warps})


def merge_tokens(
    x: torch.Tensor,
    target: torch.Tensor,
    num_targets: int,
    weight: torch.Tensor | None = None,
    mean: bool = True,
) -> torch.Tensor:
    """``(B, n, d) -> (B, t, d)`` scatter-sum / scatter-mean; see `tokencomp.kernels.reference.merge_tokens`."""
    out, launch = plan_merge(x, target, num_targets, weight, mean)
    if launch is not None:
        launch()
    return out


# ------------------------------------------------------------------------------------------------
# attention rows


@triton.jit
def _softmax_step(run_max, run_sum, s, ROWS: tl.constexpr):
    """One key block of the online softmax: the new running max and sum of ``exp(s - max)``.

    ``s``: ``(BLOCK_N,)`` logits of one row (``ROWS=False``) or ``(BLOCK_R, BLOCK_N)`` of a tile
    (``ROWS=True``), masked keys at ``-inf``; a row with no visible key yet keeps max ``-inf``, sum 0.
    """
    if ROWS:
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)
        total = tl.sum(tl.exp(s - safe[:, None]), axis=1)
    else:
        new_max = tl.maximum(run_max, tl.max(s, axis=0))
        safe = tl.where(new_max == -float("inf"), 0.0, new_max)
        total = tl.sum(tl.exp(s - safe), axis=0)
    return new_max, run_sum * tl.exp(run_max - safe) + total


@triton.jit
def _softmax_norm(run_max, run_sum):
    """The shift and the scale that turn logits into probabilities (0 for a row with no visible key)."""
    safe = tl.where(run_max == -float("inf"), 0.0, run_max)
    return safe, tl.where(run_sum > 0, 1.0 / tl.where(run_sum > 0, run_sum, 1.0), 0.0)


@triton.jit
def _rows_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    qi_ptr,
    logit_ptr,
    prob_ptr,
    H,
    groups,
    r,
    n,
    hd,
    scale,
    HAS_VALID: tl.constexpr,
    HAS_QI: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * H + h) * r + j
    j = pid % r
    bh = pid // r
    h = bh % H
    b = bh // H
    hk = h // groups
    dofs = tl.arange(0, BLOCK_D)
    dm = dofs < hd
    q = tl.load(q_ptr + pid.to(tl.int64) * hd + dofs, mask=dm, other=0.0).to(tl.float32)
    kbase = k_ptr + ((b * (H // groups) + hk).to(tl.int64) * n) * hd
    limit = n - 1
    if HAS_QI:
        limit = tl.load(qi_ptr + b * r + j)
    row = pid.to(tl.int64) * n
    run_max = -float("inf")
    run_sum = 0.0
    for start in range(0, n, BLOCK_N):
        nofs = start + tl.arange(0, BLOCK_N)
        nm = nofs < n
        kb = tl.load(kbase + nofs[:, None] * hd + dofs[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        s = tl.sum(kb.to(tl.float32) * q[None, :], axis=1) * scale
        ok = nm & (nofs <= limit)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * n + nofs, mask=nm, other=0) != 0)
        s = tl.where(ok, s, -float("inf"))
        tl.store(logit_ptr + row + nofs, s, mask=nm)
        run_max, run_sum = _softmax_step(run_max, run_sum, s, ROWS=False)
    safe, inv = _softmax_norm(run_max, run_sum)
    for start in range(0, n, BLOCK_N):
        nofs = start + tl.arange(0, BLOCK_N)
        nm = nofs < n
        s = tl.load(logit_ptr + row + nofs, mask=nm, other=-float("inf"))
        tl.store(prob_ptr + row + nofs, tl.exp(s - safe) * inv, mask=nm)


@triton.jit
def _rows_tiled_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    qi_ptr,
    logit_ptr,
    prob_ptr,
    H,
    groups,
    r,
    n,
    hd,
    scale,
    HAS_VALID: tl.constexpr,
    HAS_QI: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``BLOCK_R`` query rows of one head per program: each key block is read once per tile (not
    once per row) and scored with one ``tl.dot``; the online softmax runs per row as in `_rows_kernel`.

    The dot runs on float32 operands: ``PRECISION="ieee"`` for float32 inputs, and ``"tf32"`` for
    float16 / bfloat16 inputs, whose values TF32 holds exactly (10 and 7 mantissa bits against
    TF32's 10), so the products are exact either way. (It also keeps bfloat16 off the interpreter's
    numpy dot, which has no bfloat16.)"""
    pid = tl.program_id(0)  # (b * H + h) * tiles + t
    tiles = tl.cdiv(r, BLOCK_R)
    t = pid % tiles
    bh = pid // tiles
    h = bh % H
    b = bh // H
    hk = h // groups
    rofs = t * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rofs < r
    dofs = tl.arange(0, BLOCK_D)
    dm = dofs < hd
    rows = bh.to(tl.int64) * r + rofs  # (BLOCK_R,) flat row index
    q = tl.load(q_ptr + rows[:, None] * hd + dofs[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
    q = q.to(tl.float32)
    kbase = k_ptr + ((b * (H // groups) + hk).to(tl.int64) * n) * hd
    limit = rofs * 0 + (n - 1)
    if HAS_QI:
        limit = tl.load(qi_ptr + b * r + rofs, mask=rm, other=-1)
    out_row = rows * n
    run_max = tl.full([BLOCK_R], -float("inf"), tl.float32)
    run_sum = tl.full([BLOCK_R], 0.0, tl.float32)
    for start in range(0, n, BLOCK_N):
        nofs = start + tl.arange(0, BLOCK_N)
        nm = nofs < n
        kb = tl.load(kbase + nofs[:, None] * hd + dofs[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        kb = kb.to(tl.float32)
        s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_N)
        ok = nm[None, :] & (nofs[None, :] <= limit[:, None])
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * n + nofs, mask=nm, other=0) != 0)[None, :]
        s = tl.where(ok, s, -float("inf"))
        tl.store(logit_ptr + out_row[:, None] + nofs[None, :], s, mask=rm[:, None] & nm[None, :])
        run_max, run_sum = _softmax_step(run_max, run_sum, s, ROWS=True)
    safe, inv = _softmax_norm(run_max, run_sum)
    for start in range(0, n, BLOCK_N):
        nofs = start + tl.arange(0, BLOCK_N)
        m = rm[:, None] & (nofs < n)[None, :]
        s = tl.load(logit_ptr + out_row[:, None] + nofs[None, :], mask=m, other=-float("inf"))
        tl.store(prob_ptr + out_row[:, None] + nofs[None, :], tl.exp(s - safe[:, None]) * inv[:, None], mask=m)


# Rows per program of the tiled kernel, and the fewest query rows for which it is used instead of
# one program per row. A tile reads each key block once for all its rows; one program per row
# reads it once per row but does no padded tensor-core work, which wins for a single row (a CLS
# or last-token query). The threshold is a first guess until measured on a GPU
# (experiments/bench_kernels.py times both kernels at r = 32).
ROW_TILE = 16
TILED_MIN_ROWS = 2


def plan_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    tiled: bool | None = None,
    row_tile: int = ROW_TILE,
    key_block: int | None = None,
    num_warps: int = 4,
) -> tuple[tuple[torch.Tensor, torch.Tensor], Launch | None]:
    """The ``(logits, probs)`` outputs and the launch that fills them.

    ``tiled``: True for the row-tiled kernel, False for one program per row, None to choose by
    the number of rows (``r >= TILED_MIN_ROWS`` tiles). ``row_tile`` (rows per tiled program) and
    ``key_block`` (keys per loop step; powers of two, >= 16 when tiled) and ``num_warps`` are
    there for tuning (`experiments/bench_kernels.py --sweep`); the defaults are first guesses.
    """
    b, H, r, hd = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if H % hkv:
        raise ValueError(f"query heads {H} must be a multiple of key heads {hkv}")
    if hd > 256:
        raise ValueError(f"head dimension {hd} > 256: the attention-rows kernels load one head row in one block")
    logits = torch.empty(b, H, r, n, dtype=torch.float32, device=q.device)
    probs = torch.empty_like(logits)
    if b * H * r == 0 or n == 0:
        return (logits, probs), None
    q = q.contiguous()
    k = k.contiguous()
    valid = key_valid.contiguous().to(torch.int8) if key_valid is not None else q
    qi = query_index.contiguous().to(torch.int64) if query_index is not None else q
    args = (q, k, valid, qi, logits, probs, H, H // hkv, r, n, hd, float(scale))
    consts = {"HAS_VALID": key_valid is not None, "HAS_QI": query_index is not None}
    if tiled if tiled is not None else r >= TILED_MIN_ROWS:
        consts |= {
            # float32 inputs must not be rounded to TF32; 16-bit ones are exact in it
            "PRECISION": "ieee" if torch.float32 in (q.dtype, k.dtype) else "tf32",
            "BLOCK_R": row_tile,
            "BLOCK_N": key_block or 32,
            "BLOCK_D": _block(hd, 256, floor=16),  # tl.dot needs every dimension >= 16
        }
        grid = (b * H * triton.cdiv(r, row_tile),)
        return (logits, probs), Launch(_rows_tiled_kernel, grid, args, consts, {"num_warps": num_warps})
    block_d = _block(hd, 256)
    consts |= {"BLOCK_N": key_block or max(16, 4096 // block_d), "BLOCK_D": block_d}  # 4096-element key blocks
    return (logits, probs), Launch(_rows_kernel, (b * H * r,), args, consts, {"num_warps": num_warps})


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    tiled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head logits and softmax of a few query rows; see `tokencomp.kernels.reference.attention_rows`.

    ``tiled`` picks the kernel (see `plan_attention_rows`); both give the same result.
    """
    out, launch = plan_attention_rows(q, k, scale, key_valid, query_index, tiled)
    if launch is not None:
        launch()
    return out
