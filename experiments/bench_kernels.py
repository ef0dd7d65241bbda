"""Benchmark the token kernels at LLaVA shapes against the best plain-PyTorch equivalent.

Usage::

    python experiments/bench_kernels.py [--out experiments/results/kernels-<device>.md] [--quick]

For each kernel and shape it prints the median time of the Triton kernel and of the PyTorch
reference (measured side by side, CUDA events, after warm-up), the speed-up, the achieved
bandwidth (the bytes the operation must read and write / time) and that bandwidth as a fraction
of the device's copy bandwidth (a plain ``dst.copy_(src)`` moving the same number of bytes,
measured in the same run). Before timing a case it checks that the Triton output equals the
reference's (exactly for the gather, within dtype tolerance otherwise), so a wrong kernel never
reaches the table.

Shapes: batch 1, 8, 64 (``--quick``: 1, 16); 576 tokens (one LLaVA-1.5 view) and 2880 (LLaVA-NeXT's
thumbnail + four crops); hidden 1024 (CLIP ViT-L, 16 heads of 64) and 4096 (Vicuna-7B, 32 heads
of 128); fp16 and bf16. The attention-rows cases score one query row (the CLS or last-token
query), 32 rows and 256 rows (the engine's chunk of text or vision queries) against all tokens of
every head; the multi-row cases are also timed on the one-program-per-row kernel, to show where
the row-tiled kernel that the dispatch picks for them pays off.

Triton needs a CUDA device; on a CPU-only machine the script says so and exits without a table.
``--tiny`` runs small shapes on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` must
be set before launch): a check that every case runs and agrees with its reference, whose times
mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402

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


def cases(s: Shape, device: str) -> dict[str, tuple[Callable, int]]:
    """``name -> (fn(backend=...), bytes the operation must move)`` for one shape.

    The byte counts are the unavoidable traffic: each input element read once and each output
    element written once (indices and masks included).
    """
    g = torch.Generator(device=device).manual_seed(0)
    b, n, d, el = s.batch, s.tokens, s.hidden, s.dtype.itemsize
    x = torch.randn(b, n, d, device=device, dtype=s.dtype, generator=g)
    k = n // 4
    index = torch.rand(b, n, device=device, generator=g).argsort(-1)[:, :k]
    count = torch.randint(k // 2, k + 1, (b,), device=device, generator=g)
    xv = x.view(b * s.views, s.side * s.side, d)
    views = b * s.views
    pool_out, bil_out = (s.side // 3, s.side // 3), (s.side // 2, 2 * s.side // 3)
    t = 64 if s.side >= 24 else 4
    target = torch.randint(-1, t, (b, n), device=device, generator=g)
    heads = d // s.head_dim
    out = {
        "gather n/4": (partial(kernels.gather_tokens, x, index, count), 2 * b * k * d * el + b * k * 8 + b * 8),
        f"avg pool {s.side}x{s.side}->{pool_out[0]}x{pool_out[1]}": (
            partial(kernels.pool_grid, xv, (s.side, s.side), pool_out, "avg"),
            views * (s.side * s.side + pool_out[0] * pool_out[1]) * d * el,
        ),
        f"bilinear {s.side}x{s.side}->{bil_out[0]}x{bil_out[1]}": (
            partial(kernels.pool_grid, xv, (s.side, s.side), bil_out, "bilinear"),
            views * (s.side * s.side + bil_out[0] * bil_out[1]) * d * el,
        ),
        f"merge n->{t} mean": (
            partial(kernels.merge_tokens, x, target, t, None, True),
            b * (n + t) * d * el + b * n * 8,
        ),
    }
    kk = torch.randn(b, heads, n, s.head_dim, device=device, dtype=s.dtype, generator=g)
    for rows in (1, 32, 256) if s.side >= 24 else (1, 3):
        q = torch.randn(b, heads, rows, s.head_dim, device=device, dtype=s.dtype, generator=g)
        nbytes = (q.numel() + kk.numel()) * el + 2 * b * heads * rows * n * 4  # logits + probs, float32
        out[f"attention rows r={rows}"] = (partial(kernels.attention_rows, q, kk, s.head_dim**-0.5), nbytes)
        if rows > 1:  # the same rows through the one-program-per-row kernel: is tiling worth it here?
            out[f"attention rows r={rows} per-row kernel"] = (
                partial(attention_rows_per_row, q, kk, s.head_dim**-0.5),
                nbytes,
            )
    return out


def attention_rows_per_row(
    q: torch.Tensor, k: torch.Tensor, scale: float, backend: str = "triton"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.attention_rows` forced onto the one-program-per-row Triton kernel (``backend="triton"``)."""
    if backend == "torch":
        return kernels.attention_rows(q, k, scale, backend="torch")
    from kernels import triton_kernels

    return triton_kernels.attention_rows(q, k, scale, tiled=False)


def check(name: str, fn: Callable, dtype: torch.dtype) -> None:
    """Raise if the Triton output of ``fn`` differs from the reference's."""
    got, ref = fn(backend="triton"), fn(backend="torch")
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    for a, r in zip(got, ref, strict=True):
        if name.startswith("gather"):
            ok = torch.equal(a, r)
        else:
            rtol, atol = TOL[dtype]
            ok = torch.allclose(a.float(), r.float(), rtol=rtol, atol=atol, equal_nan=True)
        if not ok:
            raise AssertionError(f"{name}: the Triton kernel disagrees with the reference")


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


def run(
    quick: bool = False, tiny: bool = False, device: str = "cuda", repeats: int = 30, warmup: int = 5
) -> list[dict]:
    """Check and time every case of every shape; one row per (kernel, shape)."""
    rows = []
    for s in shapes(quick, tiny):
        for name, (fn, nbytes) in cases(s, device).items():
            check(name, fn, s.dtype)
            t_tri = _time(partial(fn, backend="triton"), repeats, warmup)
            t_ref = _time(partial(fn, backend="torch"), repeats, warmup)
            bw = nbytes / t_tri
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
                    "GB/s": bw / 1e9,
                    "copy_frac": bw / copy_bandwidth(nbytes, device, repeats, warmup),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="markdown table to write")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes")
    p.add_argument(
        "--tiny", action="store_true", help="small shapes on the CPU, interpreted (a check, not a benchmark)"
    )
    args = p.parse_args(argv)
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--tiny runs Triton's interpreter: launch with TRITON_INTERPRET=1 set")
        run(tiny=True, device="cpu", repeats=1, warmup=0)
        print("bench_kernels --tiny: every case agrees with its reference")
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels are benchmarked on a GPU only.")
        return 0
    import pandas as pd

    df = pd.DataFrame(run(args.quick))
    table = df.to_markdown(index=False, floatfmt=".3g")
    peak = copy_bandwidth(2**31, "cuda") / 1e9
    print(table)
    print(f"peak copy bandwidth (2 GiB moved): {peak:.0f} GB/s")
    if args.out:
        name = torch.cuda.get_device_name()
        Path(args.out).write_text(
            f"# Token kernels on {name}\n\nCommand: `python experiments/bench_kernels.py"
            f"{' --quick' if args.quick else ''} --out {args.out}`\n\n"
            "Times are medians of 30 runs after 5 of warm-up (CUDA events). `copy_frac` is the achieved\n"
            "bandwidth over that of a `dst.copy_(src)` moving the same bytes, timed in the same run; "
            f"the peak copy bandwidth (2 GiB moved) was {peak:.0f} GB/s.\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
