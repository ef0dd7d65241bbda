"""Compile every Triton kernel, exactly as the wrappers launch it, for a GPU architecture, without a GPU.

Triton's interpreter (how the tests run the kernels on a CPU) executes the kernels' Python with
numpy; it does not check what only the compiler sees: loop-carried types, layouts of ``tl.dot``
operands, register pressure. This module takes the launches the wrappers plan
(`tokencomp.kernels.triton_kernels.plan_*`) at LLaVA shapes, in every dtype and variant they can take, and
compiles each ahead of time through Triton's CUDA backend and the ``ptxas`` bundled with Triton
to a cubin for the given architecture. ``cuobjdump`` (bundled too) then reports each cubin's
registers per thread and its local memory (register spills), a first sign of a slow kernel.

It also reads the PTX for how wide each global memory access is (`global_accesses`). The copy
kernels (gather, pooling) can only near the device's copy bandwidth when every load and store of
token data moves 16 bytes per thread (``ld.global.v4.b32``): a narrower access means the
compiler could not prove alignment or contiguity, and the kernel issues two to eight times as
many memory instructions. The check fails on a gather or pooling variant with a narrower data
access, or with no data load or store it could size (so that it cannot pass by seeing nothing).
Loads of 64-bit elements are the index and count tensors, not token data. What it establishes
holds for the shapes of `launches`: Triton proves 16-byte alignment from integer arguments
divisible by 16, so a hidden size that is not (1000, or 1032 in fp16) compiles to narrow accesses.
Gather, pooling and merge must also have no atomics (``atom``/``red``): each output element is
then written by one program, summed in a fixed order, and a run gives the same bits every time.

Usage (``TRITON_INTERPRET`` must not be set, or the kernels are interpreter functions)::

    python -m tokencomp.kernels.compile_check [--arch 90 80]

It prints one line per kernel variant and exits non-zero if any fails to compile, if a gather
or pooling variant accesses token data less than 16 bytes at a time, or if a gather, pooling or
merge variant uses atomics.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import triton
from triton._C.libtriton import native_specialize_impl  # the JIT launcher's own argument specialiser
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from . import triton_kernels as tk

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def launches() -> Iterator[tuple[str, tk.Launch]]:
    """``(name, launch)`` for every kernel variant the wrappers plan, at LLaVA shapes.

    Only the argument types and the compile-time constants matter to the compiler, so one
    sample per view and CPU tensors stand in for a real batch.
    """
    n, side = 576, 24
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        for d in (1024, 4096):
            x = torch.zeros(1, n, d, dtype=dt)
            index = torch.zeros(1, n // 4, dtype=torch.long)
            for count in (None, torch.ones(1, dtype=torch.long)):
                tag = "count" if count is not None else "all"
                yield f"gather d={d} {tag} {name}", tk.plan_gather(x, index, count)[1]
            for mode, out in (("avg", (8, 8)), ("avg", (12, 12)), ("bilinear", (12, 16))):
                yield f"pool {mode} 24x24->{out[0]}x{out[1]} d={d} {name}", tk.plan_pool(x, (side, side), out, mode)[1]
            target = torch.zeros(1, n, dtype=torch.long)
            for weight in (None, torch.ones(1, n)):
                tag = "weighted" if weight is not None else "plain"
                for chunk in sorted({tk.MERGE_CHUNK, 8}):  # the default and a chunked sum the sweep times
                    launch = tk.plan_merge(x, target, 64, weight, chunk=chunk)[1]
                    yield f"merge {tag} chunk={chunk} d={d} {name}", launch
        for heads, hd, keys in ((16, 64, n), (32, 128, 5 * n)):
            k = torch.zeros(1, heads, keys, hd, dtype=dt)
            for r, tiled in ((1, False), (32, True)):
                q = torch.zeros(1, heads, r, hd, dtype=dt)
                for masked in (False, True):
                    valid = torch.ones(1, keys, dtype=torch.bool) if masked else None
                    qi = torch.zeros(1, r, dtype=torch.long) if masked else None
                    kind = "tiled" if tiled else "per-row"
                    tag = f"attention rows {kind} hd={hd} {'masked' if masked else 'open'} {name}"
                    yield tag, tk.plan_attention_rows(q, k, hd**-0.5, valid, qi, tiled)[1]


def signature(launch: tk.Launch) -> tuple[dict[str, str], dict, dict]:
    """Triton's ``(signature, constexprs, attrs)`` for a launch, specialised as its JIT would.

    Each runtime argument is typed and specialised by Triton's own rule (the one its launcher
    applies): 16-byte-aligned pointers and integers divisible by 16 get a divisibility hint, which
    is what lets the compiler emit vector loads, and an integer equal to 1 becomes a constant.
    """
    fn = launch.kernel
    names = list(fn.arg_names)
    sig: dict[str, str] = {}
    consts: dict = {}
    attrs: dict = {}
    for i, (name, arg) in enumerate(zip(names, launch.args, strict=False)):
        kind, spec = native_specialize_impl(CUDABackend, arg, False, True, True)
        if kind == "constexpr":
            consts[name] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
        sig[name] = kind
    for name, value in launch.consts.items():
        sig[name] = "constexpr"
        consts[name] = value
    missing = [a for a in names if a not in sig]
    if missing:
        raise TypeError(f"{fn.__name__}: the launch gives no value for {missing}")
    return sig, consts, attrs


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, local memory (spills) and static shared memory of a cubin, in bytes."""
    with tempfile.TemporaryDirectory() as tmp:  # cuobjdump reads files only
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out.stdout}{out.stderr}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


# op, then any qualifiers (state space, scope, ordering, cache hints such as ``.nc``,
# ``.L1::evict_first`` or ``.L2::cache_hint``), then an optional vector width and the element type
_ACCESS = re.compile(
    r"\b(ld|st|atom|red)((?:\.[A-Za-z0-9_]+(?:::[A-Za-z0-9_]+)*)*?)(?:\.v(\d+))?\.(bf|[bfsu])(\d+)(x2)?\b"
)
_OTHER = re.compile(r"\b(?:cp\.async|ldu|multimem)[.\w:]*\.global")  # global traffic the reader cannot size

COPY_KERNELS = ("gather", "pool")  # the kernels held to 16-byte data accesses
DETERMINISTIC_KERNELS = ("gather", "pool", "merge")  # no atomics: each output is summed in one fixed order


def global_accesses(ptx: str) -> list[tuple[str, int, int]]:
    """``(op, element bits, bytes per access)`` of each global load, store or atomic in ``ptx``
    (``op`` is ``ld``, ``st``, ``atom`` or ``red``; a ``.v4.b32`` access is ``(op, 32, 16)``,
    a ``.f16x2`` one ``(op, 32, 4)``), whatever its cache-hint qualifiers."""
    out = []
    for op, quals, vec, _, bits, pair in _ACCESS.findall(ptx):
        if ".global" in quals:  # a packed pair (``.f16x2``) is one element of twice the bits
            element = int(bits) * (2 if pair else 1)
            out.append((op, element, int(vec or 1) * element // 8))
    return out


def unsized_accesses(ptx: str) -> int:
    """Global memory instructions `global_accesses` does not size (``cp.async``, ``ldu``,
    ``multimem``): the copy kernels must have none, or the width check would not see them."""
    return len(_OTHER.findall(ptx))


def narrow_data_accesses(ptx: str) -> int:
    """Global accesses of elements of 32 bits or fewer (token data, weights, counts) that move
    fewer than 16 bytes per instruction."""
    return sum(1 for _, bits, width in global_accesses(ptx) if bits <= 32 and width < 16)


def compile_all(archs: tuple[int, ...] = (90,)) -> list[dict]:
    """Compile every launch of `launches` for each CUDA compute capability in ``archs`` (90: H100/H200).

    Returns one row per (variant, arch) with the resource usage, the number of global memory
    accesses in the PTX (``accesses``), how many of those move 32-bit-or-narrower elements
    fewer than 16 bytes at a time (``narrow``), the loads and stores of such elements seen
    (``data_ld``, ``data_st``) and the global instructions left unsized (``unsized``); raises
    on the first failure, naming the variant.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreter functions and cannot be compiled")
    rows = []
    for name, launch in launches():
        sig, consts, attrs = signature(launch)
        for arch in archs:
            try:
                src = ASTSource(launch.kernel, sig, consts, attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
            except Exception as e:
                raise RuntimeError(f"{name} does not compile for sm_{arch}: {e}") from e
            ptx = compiled.asm["ptx"]
            accesses = global_accesses(ptx)
            rows.append(
                {
                    "kernel": name,
                    "arch": f"sm_{arch}",
                    **resource_usage(compiled.asm["cubin"]),
                    "accesses": len(accesses),
                    "narrow": narrow_data_accesses(ptx),
                    # the data loads and stores the check did see (element of 32 bits or fewer)
                    "data_ld": sum(1 for op, bits, _ in accesses if op == "ld" and bits <= 32),
                    "data_st": sum(1 for op, bits, _ in accesses if op == "st" and bits <= 32),
                    "unsized": unsized_accesses(ptx),
                    "atomics": sum(1 for op, _, _ in accesses if op in ("atom", "red")),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90 = H100/H200)")
    args = p.parse_args(argv)
    rows = compile_all(tuple(args.arch))
    for r in rows:
        print(
            f"{r['kernel']:<48} {r['arch']}  reg {r['registers']:>3}  local {r['local']:>5} B  shared {r['shared']} B"
            f"  global accesses {r['accesses']:>2} ({r['narrow']} under 16 B)"
        )
    spills = [r for r in rows if r["local"]]
    copy = [r for r in rows if r["kernel"].startswith(COPY_KERNELS)]
    narrow = [r for r in copy if r["narrow"]]
    unseen = [r for r in copy if r["unsized"] or not (r["data_ld"] and r["data_st"])]  # not a vacuous pass
    racy = [r for r in rows if r["kernel"].startswith(DETERMINISTIC_KERNELS) and r["atomics"]]
    print(f"{len(rows)} compiled; {len(spills)} with local memory (spills)")
    print(f"{len(narrow)} gather/pooling variants with a data access under 16 B")
    print(f"{len(racy)} gather/pooling/merge variants with atomics (sums in no fixed order)")
    for r in racy:
        print(f"  atomics: {r['kernel']} {r['arch']}", file=sys.stderr)
    for r in narrow:
        print(f"  narrow: {r['kernel']} {r['arch']}", file=sys.stderr)
    for r in unseen:
        print(f"  data accesses not seen by the width check: {r['kernel']} {r['arch']}", file=sys.stderr)
    return 1 if narrow or unseen or racy else 0


if __name__ == "__main__":
    sys.exit(main())
