"""Benchmark the token kernels at LLaVA shapes against the best plain-PyTorch equivalent.

Usage::

    python experiments/bench_kernels.py [--out experiments/results/kernels-<device>.md] [--quick]

For each kernel and shape it prints the median time of the Triton kernel and of the fastest
plain-PyTorch equivalent we know (functions ``*_torch`` below: the same result from PyTorch
operators alone, with fewer passes than the project's readable references), measured side by
side with CUDA events after warm-up; the speed-up; the achieved bandwidth (the bytes the operation
must read and write / time) and that bandwidth as a fraction of the device's copy bandwidth (a
plain ``dst.copy_(src)`` moving the same number of bytes, measured in the same run). Before timing
a case it checks both the Triton output and the PyTorch equivalent's against the reference
(`tokencomp.kernels.reference`; exactly for the gather, within dtype tolerance otherwise), so a wrong
kernel never reaches the table. With ``--out`` the table is rewritten after every shape, so a run
cut short keeps what it measured.

Shapes: batch 1, 8, 64 (``--quick``: 1, 16); 576 tokens (one LLaVA-1.5 view) and 2880 (LLaVA-NeXT's
thumbnail + four crops); hidden 1024 (CLIP ViT-L, 16 heads of 64) and 4096 (Vicuna-7B, 32 heads
of 128); fp16 and bf16. The attention-rows cases score one query row (the CLS or last-token
query), 32 rows and 256 rows (the engine's chunk of text or vision queries) against all tokens of
every head; the multi-row cases are also timed on the one-program-per-row kernel, to show where
the row-tiled kernel that the dispatch picks for them pays off. The merge cases are 64 evenly
filled targets, VisionZip's 10 contextual tokens unevenly filled (the largest takes about half the
sources) and PruMerge+'s one extra token (the weighted sum of the three quarters not kept): a
merge program sums its target's sources in order, so the last two are its slow cases.

Triton needs a CUDA device; on a CPU-only machine the script says so and exits without a table.
``--tiny`` runs small shapes on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` must
be set before launch): a check that every case runs and agrees with its reference, whose times
mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokencomp import kernels  # noqa: E402

# Tolerance of the Triton output against the reference's, by input dtype (as in tests/test_kernels.py).
TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float32: (1e-5, 1e-5)}


@dataclass(frozen=True)
class Shape:
    """One benchmark point: ``batch`` samples of ``views`` square views of ``side x side`` tokens."""

    dtype: torch.dtype
    hidden: int
    views: int
    side: int
    batch: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return self.views * self.side * self.side


def shapes(quick: bool = False, tiny: bool = False) -> Iterator[Shape]:
    """The benchmark's grid of shapes (see the module docstring)."""
    if tiny:
        for dtype in (torch.float16, torch.bfloat16):
            yield Shape(dtype, hidden=48, views=2, side=6, batch=2, head_dim=16)
        return
    for dtype in (torch.float16, torch.bfloat16):
        for hidden in (1024, 4096):
            for views in (1, 5):
                for batch in [1, 16] if quick else [1, 8, 64]:
                    yield Shape(dtype, hidden, views, 24, batch, 64 if hidden == 1024 else 128)


@dataclass(frozen=True)
class Case:
    """One kernel at one shape.

    ``triton`` runs the Triton kernel, ``torch`` the fastest plain-PyTorch way to compute the same
    thing that we know of (what the table times against), ``reference`` the project's PyTorch
    reference (the CPU backend, written for clarity; both others are checked against it), and
    ``nbytes`` is the traffic the operation cannot avoid: each input element read once and each
    output element written once, indices and masks included.
    """

    triton: Callable[[], Any]
    torch: Callable[[], Any]
    reference: Callable[[], Any]
    nbytes: int


def cases(s: Shape, device: str) -> dict[str, Case]:
    """``name -> Case`` for one shape."""
    g = torch.Generator(device=device).manual_seed(0)
    b, n, d, el = s.batch, s.tokens, s.hidden, s.dtype.itemsize
    x = torch.randn(b, n, d, device=device, dtype=s.dtype, generator=g)
    k = n // 4
    index = torch.rand(b, n, device=device, generator=g).argsort(-1)[:, :k]
    count = torch.randint(k // 2, k + 1, (b,), device=device, generator=g)
    xv = x.view(b * s.views, s.side * s.side, d)
    views = b * s.views
    grid = (s.side, s.side)
    pool_out, bil_out = (s.side // 3, s.side // 3), (s.side // 2, 2 * s.side // 3)
    t = 64 if s.side >= 24 else 4
    target = torch.randint(-1, t, (b, n), device=device, generator=g)
    u = torch.rand(b, n, device=device, generator=g)
    skewed = torch.where(u < 0.2, -1, ((u - 0.2) / 0.8) ** 4 * 10).long()  # -1 or 0..9, mostly 0
    pruned = torch.where(u < 0.25, -1, 0)  # kept tokens (-1) and the rest, all merged into one
    weight = torch.rand(b, n, device=device, generator=g)
    heads = d // s.head_dim

    def case(kernel: Callable, best: Callable, *args: Any, nbytes: int) -> Case:
        return Case(
            partial(kernel, *args, backend="triton"),
            partial(best, *args),
            partial(kernel, *args, backend="torch"),
            nbytes,
        )

    out = {
        "gather n/4": case(
            kernels.gather_tokens, gather_torch, x, index, count, nbytes=2 * b * k * d * el + b * k * 8 + b * 8
        ),
        f"avg pool {s.side}x{s.side}->{pool_out[0]}x{pool_out[1]}": case(
            kernels.pool_grid,
            pool_torch,
            xv,
            grid,
            pool_out,
            "avg",
            nbytes=views * (s.side * s.side + pool_out[0] * pool_out[1]) * d * el,
        ),
        f"bilinear {s.side}x{s.side}->{bil_out[0]}x{bil_out[1]}": case(
            kernels.pool_grid,
            pool_torch,
            xv,
            grid,
            bil_out,
            "bilinear",
            nbytes=views * (s.side * s.side + bil_out[0] * bil_out[1]) * d * el,
        ),
        f"merge n->{t} mean": case(
            kernels.merge_tokens, merge_torch, x, target, t, None, True, nbytes=b * (n + t) * d * el + b * n * 8
        ),
        # VisionZip's contextual tokens: few targets, unevenly filled (the largest takes about half)
        "merge n->10 skewed mean": case(
            kernels.merge_tokens, merge_torch, x, skewed, 10, None, True, nbytes=b * (n + 10) * d * el + b * n * 8
        ),
        # PruMerge+'s extra token: the attention-weighted sum of every token it did not keep
        "merge n->1 weighted sum": case(
            kernels.merge_tokens,
            merge_torch,
            x,
            pruned,
            1,
            weight,
            False,
            nbytes=b * (n + 1) * d * el + b * n * (8 + 4),
        ),
    }
    kk = torch.randn(b, heads, n, s.head_dim, device=device, dtype=s.dtype, generator=g)
    for rows in (1, 32, 256) if s.side >= 24 else (1, 3):
        q = torch.randn(b, heads, rows, s.head_dim, device=device, dtype=s.dtype, generator=g)
        nbytes = (q.numel() + kk.numel()) * el + 2 * b * heads * rows * n * 4  # logits + probs, float32
        out[f"attention rows r={rows}"] = case(
            kernels.attention_rows, attention_rows_torch, q, kk, s.head_dim**-0.5, nbytes=nbytes
        )
        if rows > 1:  # the same rows through the one-program-per-row kernel: is tiling worth it here?
            per_row = out[f"attention rows r={rows}"]
            out[f"attention rows r={rows} per-row kernel"] = Case(
                partial(attention_rows_per_row, q, kk, s.head_dim**-0.5), per_row.torch, per_row.reference, nbytes
            )
    return out


# ------------------------------------------------------------------------------------------------
# The plain-PyTorch competitors: the fastest ways we know to compute each kernel's result with
# PyTorch operators alone (fewer passes and conversions than the readable references).


def gather_torch(x: torch.Tensor, index: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
    """`tokencomp.kernels.gather_tokens` as one ``index_select`` on the flattened batch and an in-place zeroing of padding."""
    b, n, d = x.shape
    rows = (index + torch.arange(b, device=x.device)[:, None] * n).flatten()
    out = x.reshape(b * n, d).index_select(0, rows).view(b, -1, d)
    if count is not None:
        pad = torch.arange(index.shape[1], device=x.device)[None] >= count[:, None]
        out.masked_fill_(pad[..., None], 0)
    return out


def pool_torch(x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], mode: str) -> torch.Tensor:
    """`tokencomp.kernels.pool_grid` on a channels-last view of the tokens (no transposing copy), in their dtype.

    ``(V, h*w, d)`` viewed as ``(V, h, w, d)`` and permuted to NCHW is already channels-last memory,
    which PyTorch's pooling and interpolation kernels take and return as is.
    """
    v, _, d = x.shape
    img = x.view(v, *grid, d).permute(0, 3, 1, 2)
    if mode == "avg":
        y = F.adaptive_avg_pool2d(img, out)
    else:
        y = F.interpolate(img, size=out, mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(v, -1, d)


def merge_torch(x: torch.Tensor, target: torch.Tensor, t: int, weight: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """`tokencomp.kernels.merge_tokens` as one float32 ``index_add_``; dropped sources go to a spare slot per row.

    One target is a masked (weighted) matrix-vector product instead (``bmm``)."""
    b, n, d = x.shape
    if t == 1:  # one target: a masked (weighted) matrix-vector product in x's dtype, float32 accumulation
        if weight is None:
            acc = torch.bmm((target >= 0).to(x.dtype)[:, None, :], x).float()
        else:  # the float32 weight as two x-dtype parts (high and the rest): x is still read once
            w = torch.where(target >= 0, weight.float(), 0)
            hi = w.to(x.dtype)
            acc = torch.bmm(torch.stack([hi, (w - hi.float()).to(x.dtype)], 1), x).float().sum(1, keepdim=True)
        return (acc / (target >= 0).sum(1).clamp(min=1)[:, None, None] if mean else acc).to(x.dtype)
    slot = torch.where(target >= 0, target, t) + torch.arange(b, device=x.device)[:, None] * (t + 1)
    src = x.reshape(b * n, d).float()
    if weight is not None:
        src = src * weight.reshape(-1, 1).float()
    acc = torch.zeros(b * (t + 1), d, dtype=torch.float32, device=x.device).index_add_(0, slot.flatten(), src)
    acc = acc.view(b, t + 1, d)[:, :t]
    if mean:
        ones = torch.ones(b * n, dtype=torch.float32, device=x.device)  # (bincount would sync with the host)
        cnt = torch.zeros(b * (t + 1), dtype=torch.float32, device=x.device).index_add_(0, slot.flatten(), ones)
        cnt = cnt.view(b, t + 1)[:, :t]
        acc = acc / cnt.clamp(min=1)[..., None]
    return acc.to(x.dtype)


def attention_rows_torch(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokencomp.kernels.attention_rows` (no masks, as benchmarked) as a matmul in the input dtype and a softmax.

    The matmul accumulates in float32 but rounds the logits to the input dtype before they are
    widened, a little less precise than the kernel (and a little cheaper).
    """
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    return logits, logits.softmax(-1)


def attention_rows_per_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokencomp.kernels.attention_rows` on the one-program-per-row Triton kernel."""
    from tokencomp.kernels import triton_kernels

    return triton_kernels.attention_rows(q, k, scale, tiled=False)


def check(name: str, case: Case, dtype: torch.dtype) -> None:
    """Raise if the Triton kernel or the PyTorch competitor disagrees with the reference."""
    ref = case.reference()
    for who, fn in (("Triton kernel", case.triton), ("PyTorch equivalent", case.torch)):
        got = fn()
        pairs = zip(*((got, ref) if isinstance(got, tuple) else ((got,), (ref,))), strict=True)
        for a, r in pairs:
            if name.startswith("gather"):
                ok = torch.equal(a, r)
            else:
                rtol, atol = TOL[dtype]
                ok = torch.allclose(a.float(), r.float(), rtol=rtol, atol=atol, equal_nan=True)
            if not ok:
                raise AssertionError(f"{name}: the {who} disagrees with the reference")


def _time(fn: Callable, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, wall clock on the CPU."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, device: str, repeats: int = 30, warmup: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` moving ``nbytes`` in all (``nbytes / 2`` read, as much written)."""
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / _time(lambda: dst.copy_(src), repeats, warmup)


def _bandwidth(nbytes: int, seconds: float, device: str, repeats: int, warmup: int) -> dict[str, float]:
    """``GB/s`` achieved moving ``nbytes`` in ``seconds``, and ``copy_frac``: that over the copy
    bandwidth of a ``dst.copy_(src)`` moving as many bytes, timed now."""
    bw = nbytes / seconds
    return {"GB/s": bw / 1e9, "copy_frac": bw / copy_bandwidth(nbytes, device, repeats, warmup)}


def run(
    quick: bool = False,
    tiny: bool = False,
    device: str = "cuda",
    repeats: int = 30,
    warmup: int = 5,
    on_shape: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Check and time every case of every shape; one row per (kernel, shape).

    ``on_shape(rows)`` is called with all rows so far after each shape (to save partial results).
    """
    rows = []
    for s in shapes(quick, tiny):
        for name, case in cases(s, device).items():
            check(name, case, s.dtype)
            t_tri = _time(case.triton, repeats, warmup)
            t_ref = _time(case.torch, repeats, warmup)
            rows.append(
                {
                    "kernel": name,
                    "dtype": str(s.dtype).removeprefix("torch."),
                    "hidden": s.hidden,
                    "tokens": s.tokens,
                    "batch": s.batch,
                    "triton_us": t_tri * 1e6,
                    "torch_us": t_ref * 1e6,
                    "speedup": t_ref / t_tri,
                    **_bandwidth(case.nbytes, t_tri, device, repeats, warmup),
                }
            )
            print(rows[-1], flush=True)
        if on_shape is not None:
            on_shape(rows)
    return rows


def sweep_cases(device: str, tiny: bool = False) -> Iterator[tuple[str, str, bool, Shape, Case]]:
    """``(kernel, config, is_default, shape, case)`` for the launch settings the kernels leave open.

    At the largest shape of each hidden size (float16, batch 64, 2880 tokens): the gather's rows
    per program and warps, the pooling's warps, the merge's sources per step and warps, and the
    attention-rows kernels' row tile, key block and warps. Each ``case.triton`` launches one
    setting through the wrappers' plans.
    """
    from tokencomp.kernels import triton_kernels as tk

    if tiny:
        sizes = [Shape(torch.float16, hidden=48, views=2, side=6, batch=2, head_dim=16)]
    else:
        sizes = [
            Shape(torch.float16, h, views=5, side=24, batch=64, head_dim=hd) for h, hd in ((1024, 64), (4096, 128))
        ]

    def launched(plan: Callable, *args: Any, **kw: Any) -> Callable[[], Any]:
        def fn() -> Any:
            out, launch = plan(*args, **kw)
            launch()
            return out

        return fn

    for s in sizes:
        base = cases(s, device)
        gather = base["gather n/4"]
        x, index, count = gather.torch.args
        default_rows = tk.plan_gather(x, index, count)[1].consts["ROWS"]
        for rows in sorted({1, 2, 4, 8, 16, default_rows}):
            for warps in (2, 4, 8):
                fn = launched(tk.plan_gather, x, index, count, rows_per_program=rows, num_warps=warps)
                yield (
                    "gather n/4",
                    f"rows={rows} warps={warps}",
                    (rows, warps) == (default_rows, 4),
                    s,
                    dataclasses.replace(gather, triton=fn),
                )
        for name, case in base.items():
            if case.torch.func is pool_torch:
                for warps in (1, 2, 4, 8):
                    fn = launched(tk.plan_pool, *case.torch.args, num_warps=warps)
                    yield name, f"warps={warps}", warps == 4, s, dataclasses.replace(case, triton=fn)
        for name, case in base.items():
            if case.torch.func is merge_torch:
                for chunk in (1, 2, 4, 8, 16):
                    for warps in (4, 8):
                        fn = launched(tk.plan_merge, *case.torch.args, chunk=chunk, num_warps=warps)
                        default = (chunk, warps) == (tk.MERGE_CHUNK, 4)
                        yield name, f"chunk={chunk} warps={warps}", default, s, dataclasses.replace(case, triton=fn)
        for rows, tiled, tiles, blocks in (
            (1, False, (1,), (16, 32, 64, 128)),
            (256 if not tiny else 3, True, (16, 32, 64), (32, 64)),
        ):
            case = base[f"attention rows r={rows}"]
            q, k, scale = case.torch.args
            default_block = tk.plan_attention_rows(q, k, scale, tiled=tiled)[1].consts["BLOCK_N"]
            for tile in tiles:
                for block in sorted({*blocks, default_block}):
                    for warps in (4, 8):
                        fn = launched(
                            tk.plan_attention_rows,
                            q,
                            k,
                            scale,
                            tiled=tiled,
                            row_tile=tile,
                            key_block=block,
                            num_warps=warps,
                        )
                        default = (tile, block, warps) == (tk.ROW_TILE if tiled else 1, default_block, 4)
                        config = f"{'tile=' + str(tile) + ' ' if tiled else ''}keys={block} warps={warps}"
                        yield f"attention rows r={rows}", config, default, s, dataclasses.replace(case, triton=fn)


def sweep(
    device: str = "cuda",
    tiny: bool = False,
    repeats: int = 30,
    warmup: int = 5,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Check and time every setting of `sweep_cases`; one row per (kernel, setting, shape)."""
    rows = []
    for name, config, default, s, case in sweep_cases(device, tiny):
        row = {"kernel": name, "config": config + (" (default)" if default else ""), "hidden": s.hidden}
        row |= {"tokens": s.tokens, "batch": s.batch}
        try:  # a setting that does not compile or disagrees is a finding, not the end of the sweep
            check(name, case, s.dtype)
            t = _time(case.triton, repeats, warmup)
        except Exception as e:
            if default:
                raise
            rows.append(row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            print(rows[-1], flush=True)
            continue
        rows.append(row | {"triton_us": t * 1e6, **_bandwidth(case.nbytes, t, device, repeats, warmup)})
        print(rows[-1], flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="markdown table to write")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes")
    p.add_argument(
        "--sweep", action="store_true", help="time the kernels' launch settings instead (rows, tiles, warps)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="small shapes on the CPU, interpreted (a check, not a benchmark)"
    )
    args = p.parse_args(argv)
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--tiny runs Triton's interpreter: launch with TRITON_INTERPRET=1 set")
        if args.sweep:
            sweep(tiny=True, device="cpu", repeats=1, warmup=0)
        else:
            run(tiny=True, device="cpu", repeats=1, warmup=0)
        print("bench_kernels --tiny: every case agrees with its reference")
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels are benchmarked on a GPU only.")
        return 0
    import pandas as pd
    import triton

    flags = "".join(f" --{f}" for f in ("quick", "sweep") if getattr(args, f))
    command = f"python experiments/bench_kernels.py{flags} --out {args.out}"
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"

    def write(rows: list[dict], peak: float | None = None) -> str:
        table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g")
        if args.out:
            done = (
                f"the peak copy bandwidth (2 GiB moved) was {peak:.0f} GB/s."
                if peak is not None
                else "**partial: the run has not finished.**"
            )
            Path(args.out).write_text(
                f"# Token kernels on {torch.cuda.get_device_name()}\n\nCommand: `{command}` ({versions})\n\n"
                + (
                    "Times are medians of 30 runs after 5 of warm-up (CUDA events) of each launch setting at\n"
                    "float16, batch 64, 2880 tokens; `(default)` marks the setting the wrappers use.\n"
                    if args.sweep
                    else "Times are medians of 30 runs after 5 of warm-up (CUDA events); `torch_us` is the fastest\n"
                    "plain-PyTorch equivalent (`*_torch` in the script), `speedup` its time over the kernel's.\n"
                )
                + "`copy_frac` is the achieved bandwidth over that of a `dst.copy_(src)` moving the same bytes,\n"
                f"timed in the same run; {done}\n\n{table}\n"
            )
        return table

    rows = sweep(on_row=write) if args.sweep else run(args.quick, on_shape=write)
    peak = copy_bandwidth(2**31, "cuda") / 1e9
    print(write(rows, peak))
    print(f"peak copy bandwidth (2 GiB moved): {peak:.0f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
