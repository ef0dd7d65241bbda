"""Benchmark the token kernels at LLaVA shapes against the best plain-PyTorch equivalent.

Usage::

    python experiments/bench_kernels.py [--out experiments/results/kernels-<device>.md] [--quick]

For each kernel and shape it prints the median time of the Triton kernel and of the PyTorch
reference (measured side by side, CUDA events, after warm-up), the speed-up, the achieved
bandwidth (bytes read + written / time) and that bandwidth as a fraction of the device's copy
bandwidth (a plain ``dst.copy_(src)`` of the same number of bytes, measured in the same run).
Triton needs a CUDA device; on a CPU-only machine the script says so and exits without a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402


def _time(fn, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_bw(nbytes: int) -> float:
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / _time(lambda: dst.copy_(src))


def cases(quick: bool):
    batches = [1, 16] if quick else [1, 8, 64]
    for dtype in (torch.float16, torch.bfloat16):
        for d in (1024, 4096):
            for n in (576, 2880):
                for b in batches:
                    yield dtype, d, n, b


def run(quick: bool) -> list[dict]:
    rows = []
    for dtype, d, n, b in cases(quick):
        if b * n * d * 2 > 6e9:
            continue
        x = torch.randn(b, n, d, device="cuda", dtype=dtype)
        el = x.element_size()
        k = n // 4
        index = torch.stack([torch.randperm(n, device="cuda")[:k] for _ in range(b)])
        count = torch.randint(k // 2, k + 1, (b,), device="cuda")
        views = b * (n // 576)
        xv = x.view(views, 576, d)
        target = torch.randint(-1, 64, (b, n), device="cuda")
        specs = {
            "gather n/4": (partial(kernels.gather_tokens, x, index, count), 2 * b * k * d * el),
            "avg pool 24x24->8x8": (
                partial(kernels.pool_grid, xv, (24, 24), (8, 8), "avg"),
                views * (576 + 64) * d * el,
            ),
            "bilinear 24x24->12x16": (
                partial(kernels.pool_grid, xv, (24, 24), (12, 16), "bilinear"),
                views * (576 + 192) * d * el,
            ),
            "merge n->64 mean": (partial(kernels.merge_tokens, x, target, 64, None, True), b * (n + 64) * d * el),
        }
        for name, (fn, nbytes) in specs.items():
            t_tri = _time(partial(fn, backend="triton"))
            t_ref = _time(partial(fn, backend="torch"))
            bw = nbytes / t_tri
            rows.append(
                {
                    "kernel": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "hidden": d,
                    "tokens": n,
                    "batch": b,
                    "triton_us": t_tri * 1e6,
                    "torch_us": t_ref * 1e6,
                    "speedup": t_ref / t_tri,
                    "GB/s": bw / 1e9,
                    "copy_frac": bw / _copy_bw(nbytes),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="markdown table to write")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels are benchmarked on a GPU only.")
        return 0
    import pandas as pd

    df = pd.DataFrame(run(args.quick))
    table = df.to_markdown(index=False, floatfmt=".3g")
    print(table)
    if args.out:
        name = torch.cuda.get_device_name()
        Path(args.out).write_text(
            f"# Token kernels on {name}\n\nCommand: `python experiments/bench_kernels.py"
            f"{' --quick' if args.quick else ''} --out {args.out}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
