"""Each Triton kernel against its PyTorch reference (Triton's interpreter on CPU), and dispatch."""

from __future__ import annotations

import pytest
import torch

from tokencomp import kernels
from tokencomp.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,k,d", [(1, 7, 3, 5), (3, 33, 17, 70), (2, 10, 10, 129), (2, 9, 0, 8)])
def test_gather(dtype, b, n, k, d):
    g = torch.Generator().manual_seed(b * 100 + n)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    index = torch.randint(0, n, (b, k), generator=g)
    count = torch.randint(0, k + 1, (b,), generator=g)
    count[0] = k  # one row keeps everything
    if b > 1:
        count[1] = 0  # one row keeps nothing
    from tokencomp.kernels import triton_kernels

    for c in (None, count):
        got = kernels.gather_tokens(x, index, c, backend="triton")
        ref = reference.gather_tokens(x, index, c)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, ref)  # a copy: exact
        for rows in (1, 4):  # other tilings of the output rows (the default follows the row size)
            out, launch = triton_kernels.plan_gather(x, index, c, rows_per_program=rows)
            if launch is not None:
                assert launch.consts["ROWS"] == min(rows, triton_kernels.triton.next_power_of_2(b * k))
                launch()
            assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["avg", "bilinear"])
@pytest.mark.parametrize(
    "grid,out",
    [
        ((6, 6), (3, 3)),
        ((7, 5), (3, 2)),
        ((12, 12), (4, 8)),
        ((5, 9), (5, 9)),
        ((4, 4), (1, 1)),
        pytest.param((24, 24), (8, 16), marks=pytest.mark.slow),  # LLaVA's grid: ~10 s per case interpreted
    ],
)
def test_pool_grid(dtype, mode, grid, out):
    g = torch.Generator().manual_seed(grid[0] * 31 + out[1])
    x = torch.randn(3, grid[0] * grid[1], 19, generator=g).to(dtype)
    got = kernels.pool_grid(x, grid, out, mode, backend="triton")
    ref = reference.pool_grid(x, grid, out, mode)
    assert got.shape == (3, out[0] * out[1], 19)
    _close(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("b,n,t,d", [(2, 31, 5, 33), (1, 8, 8, 4), (3, 20, 1, 130)])
def test_merge(dtype, weighted, mean, b, n, t, d):
    g = torch.Generator().manual_seed(n * 7 + t)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    target = torch.randint(-1, t, (b, n), generator=g)
    weight = torch.rand(b, n, generator=g) if weighted else None
    got = kernels.merge_tokens(x, target, t, weight, mean, backend="triton")
    ref = reference.merge_tokens(x, target, t, weight, mean)
    if dtype == torch.bfloat16:  # Triton's interpreter rounds float32 -> bfloat16 toward zero (a GPU to nearest)
        _close(got, ref, dtype)
    else:  # each target sums its sources in source order in float32, as the reference does on a CPU
        assert torch.equal(got, ref)
    # independent check of the reference on one row: a plain loop
    tgt0 = int(target[0, 0]) if int(target[0, 0]) >= 0 else None
    if tgt0 is not None:
        sel = target[0] == tgt0
        w = weight[0][sel] if weighted else torch.ones(int(sel.sum()))
        s = (x[0][sel].float() * w[:, None]).sum(0)
        if mean:
            s = s / sel.sum()
        _close(ref[0, tgt0], s, dtype)


@pytest.mark.parametrize("chunk", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_in_chunks(chunk, dtype):
    """Summing ``chunk`` sources per step (a tail shorter than a chunk included: one target gets
    most of the 45 sources, as VisionZip's contextual tokens can) agrees with the reference to
    rounding, repeats bit for bit, and takes a weight broadcast over the batch as the reference does."""
    from tokencomp.kernels import triton_kernels

    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(3, 45, 70, generator=g).to(dtype)
    target = (torch.rand(3, 45, generator=g) ** 4 * 5).long()  # skewed: target 0 takes about half
    target[:, ::7] = -1
    weight = torch.rand(1, 45, generator=g)
    for w, mean in ((None, True), (weight, False)):
        ref = reference.merge_tokens(x, target, 5, w, mean)
        runs = []
        for _ in range(2):
            out, launch = triton_kernels.plan_merge(x, target, 5, w, mean, chunk=chunk)
            launch()
            runs.append(out)
        assert torch.equal(runs[0], runs[1])
        _close(runs[0], ref, dtype)
    assert int((target == 0).sum(1).min()) > 2 * chunk  # several steps and a tail for the big target


@pytest.mark.parametrize("be", ["torch", "triton"])
def test_merge_edges(be):
    """No targets gives an empty result; a source that goes nowhere (-1) leaves no trace, even an
    inf or NaN one (the reference used to multiply it by zero, which made NaN)."""
    x = torch.randn(2, 6, 8)
    target = torch.tensor([[0, 1, -1, 1, -1, 0], [-1, -1, -1, -1, -1, -1]])
    assert kernels.merge_tokens(x, torch.full((2, 6), -1), 0, backend=be).shape == (2, 0, 8)
    bad = x.clone()
    bad[0, 2], bad[0, 4] = float("inf"), float("nan")
    for mean in (True, False):
        got = kernels.merge_tokens(bad, target, 2, torch.rand(2, 6), mean=mean, backend=be)
        assert torch.isfinite(got).all()
        assert torch.equal(got[1], torch.zeros(2, 8))  # a row with no sources: zero targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,H,hkv,r,n,hd",
    [(2, 4, 2, 1, 37, 16), (1, 3, 3, 5, 200, 24), (2, 2, 1, 2, 9, 64), (1, 2, 1, 35, 70, 8)],  # 35 rows: 3 tiles
)
@pytest.mark.parametrize("tiled", [None, False, True])  # None: the wrapper's choice by row count
def test_attention_rows(dtype, b, H, hkv, r, n, hd, tiled):
    from tokencomp.kernels import triton_kernels

    g = torch.Generator().manual_seed(n + r)
    q = torch.randn(b, H, r, hd, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, hd, generator=g).to(dtype)
    valid = torch.rand(b, n, generator=g) > 0.2
    qi = torch.randint(0, n, (b, r), generator=g)
    qi[0, 0] = n - 1
    for kv, idx in ((None, None), (valid, qi)):
        if tiled is None:
            lg, pr = kernels.attention_rows(q, k, hd**-0.5, kv, idx, backend="triton")
        else:
            lg, pr = triton_kernels.attention_rows(q, k, hd**-0.5, kv, idx, tiled=tiled)
        rl, rp = reference.attention_rows(q, k, hd**-0.5, kv, idx)
        fin = torch.isfinite(rl)
        assert torch.equal(fin, torch.isfinite(lg))
        _close(lg[fin], rl[fin], dtype)
        _close(pr, rp, dtype)
    # the reference itself against an explicit softmax of the full score matrix, one row
    full = (q[0, 0].float() @ k[0, 0].float().T) * hd**-0.5
    torch.testing.assert_close(reference.attention_rows(q, k, hd**-0.5)[1][0, 0], full.softmax(-1))


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_against_reference(seed):
    """Every kernel at shapes drawn at random (odd sizes, sizes past one block, empty keeps, all
    tokens kept), each dtype drawn too: the Triton output against the reference."""
    g = torch.Generator().manual_seed(1000 + seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    dtype = DTYPES[seed % 3]
    b, n, d = draw(1, 4), draw(1, 80), draw(1, 300)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    k = (0, n, draw(1, n))[seed % 3]
    index = torch.randint(0, n, (b, k), generator=g)
    count = torch.randint(0, k + 1, (b,), generator=g)
    for c in (None, count):
        assert torch.equal(kernels.gather_tokens(x, index, c, backend="triton"), reference.gather_tokens(x, index, c))
    gh, gw = draw(1, 12), draw(1, 12)
    out = (draw(1, gh + 3), draw(1, gw + 3))  # up- and down-sampling
    grid_x = torch.randn(draw(1, 3), gh * gw, draw(1, 70), generator=g).to(dtype)
    for mode in ("avg", "bilinear"):
        got = kernels.pool_grid(grid_x, (gh, gw), out, mode, backend="triton")
        _close(got, reference.pool_grid(grid_x, (gh, gw), out, mode), dtype)
    t = draw(1, n)
    target = torch.randint(-1, t, (b, n), generator=g)
    weight = torch.rand(b, n, generator=g)
    for w, mean in ((None, True), (weight, False)):
        got = kernels.merge_tokens(x, target, t, w, mean, backend="triton")
        _close(got, reference.merge_tokens(x, target, t, w, mean), dtype)
    hkv, hd, r = draw(1, 3), draw(1, 40), draw(1, 40)
    heads = hkv * draw(1, 3)
    q = torch.randn(b, heads, r, hd, generator=g).to(dtype)
    keys = torch.randn(b, hkv, n, hd, generator=g).to(dtype)
    valid = torch.rand(b, n, generator=g) > 0.3
    qi = torch.randint(0, n, (b, r), generator=g)
    lg, pr = kernels.attention_rows(q, keys, hd**-0.5, valid, qi, backend="triton")
    rl, rp = reference.attention_rows(q, keys, hd**-0.5, valid, qi)
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lg))
    _close(lg[fin], rl[fin], dtype)
    _close(pr, rp, dtype)


def test_attention_rows_all_masked_row_is_zero():
    from tokencomp.kernels import triton_kernels

    for r in (1, 3):  # one program per row, and a tile
        q = torch.randn(1, 2, r, 8)
        k = torch.randn(1, 2, 5, 8)
        valid = torch.zeros(1, 5, dtype=torch.bool)
        for be in ("torch", "triton"):
            _, p = kernels.attention_rows(q, k, 0.3, valid, None, backend=be)
            assert torch.equal(p, torch.zeros_like(p))
        assert triton_kernels.plan_attention_rows(q, k, 0.3)[1].kernel is (
            triton_kernels._rows_tiled_kernel if r >= triton_kernels.TILED_MIN_ROWS else triton_kernels._rows_kernel
        )


def test_attention_rows_precision_and_head_limit():
    """The interpreter ignores tl.dot's precision, so the choice is checked on the plan: float32
    inputs must never be rounded to TF32 (16-bit ones are exact in it); too wide a head is refused."""
    from tokencomp.kernels import triton_kernels

    for qd, kd, want in [
        (torch.float32, torch.float32, "ieee"),
        (torch.float16, torch.float32, "ieee"),
        (torch.float16, torch.float16, "tf32"),
        (torch.bfloat16, torch.bfloat16, "tf32"),
    ]:
        q, k = torch.zeros(1, 2, 4, 16, dtype=qd), torch.zeros(1, 2, 9, 16, dtype=kd)
        assert triton_kernels.plan_attention_rows(q, k, 0.25, tiled=True)[1].consts["PRECISION"] == want
    with pytest.raises(ValueError, match="head dimension 320"):
        kernels.attention_rows(torch.zeros(1, 1, 2, 320), torch.zeros(1, 1, 5, 320), 0.1, backend="triton")


def test_compile_check_covers_every_triton_kernel():
    """tokencomp.kernels.compile_check plans a launch of every @triton.jit kernel, through the wrappers' own plans."""
    from tokencomp.kernels import compile_check, triton_kernels

    jitted = {
        v for k, v in vars(triton_kernels).items() if k.startswith("_") and k.endswith("_kernel") and hasattr(v, "fn")
    }
    launched = [launch for _, launch in compile_check.launches()]
    assert len(jitted) == 5 and {launch.kernel for launch in launched} == jitted
    for launch in launched:
        sig, consts, _ = compile_check.signature(launch)
        assert list(sig) == list(launch.kernel.arg_names)
        assert {a for a, t in sig.items() if t == "constexpr"} == set(consts) >= set(launch.consts)


def test_triton_kernels_compile_for_hopper():
    """Every kernel variant compiles to an sm_90 (H100/H200) cubin through Triton and its bundled ptxas,
    with no register spills: what the interpreter cannot check. Run in a child process, where
    TRITON_INTERPRET is unset so that the kernels are compiled functions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no CUDA backend with ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "tokencomp.kernels.compile_check", "--arch", "90"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from tokencomp.kernels import compile_check

    expected = sum(1 for _ in compile_check.launches())
    assert f"{expected} compiled; 0 with local memory (spills)" in out.stdout
    assert "0 gather/pooling variants with a data access under 16 B" in out.stdout
    assert "0 gather/pooling/merge variants with atomics" in out.stdout  # deterministic sums
    # the width check sees a gather that cannot use 16-byte accesses: Triton proves alignment from
    # integer arguments divisible by 16, and a hidden size of 1000 is not
    probe = (
        "import torch, triton; from tokencomp.kernels import compile_check as cc, triton_kernels as tk;"
        "from triton.compiler import ASTSource; from triton.backends.compiler import GPUTarget\n"
        "for d in (1024, 1000):\n"
        " x = torch.zeros(1, 576, d, dtype=torch.float16); i = torch.zeros(1, 144, dtype=torch.long)\n"
        " launch = tk.plan_gather(x, i)[1]\n"
        " c = triton.compile(ASTSource(launch.kernel, *cc.signature(launch)), target=GPUTarget('cuda', 90, 32))\n"
        " print(d, cc.narrow_data_accesses(c.asm['ptx']))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    narrow = dict(line.split() for line in out.stdout.split("\n") if line)
    assert narrow["1024"] == "0" and int(narrow["1000"]) > 0, out.stdout


def test_compile_check_reads_access_widths():
    """The PTX reader behind the 16-byte check: vector width times element size, per access,
    whatever the cache hints (the forms Triton emits for ``eviction_policy``), shared-memory
    accesses left out, and the global traffic it cannot size counted apart."""
    from tokencomp.kernels import compile_check

    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.b64 { %rd5 }, [ %rd2 + 0 ];
    ld.global.v2.b64 { %rd6, %rd7 }, [ %rd3 + 0 ];
    @%p2 st.global.b16 [ %rd4 + 0 ], { %rs1 };
    atom.global.gpu.acq_rel.add.v4.f32 { %f1, %f2, %f3, %f4 }, [ %rd5 + 0 ], { %f5, %f6, %f7, %f8 };
    atom.global.gpu.acq_rel.add.f32 %f9, [ %rd6 + 0 ], %f10;
    ld.global.L1::evict_first.L2::cache_hint.b16 { %rs2 }, [ %rd7 + 0 ], %rd20;
    @!%p3 ld.global.nc.L1::no_allocate.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd8 + 0 ];
    st.global.L1::evict_last.L2::cache_hint.v2.f32 [ %rd9 + 0 ], { %f11, %f12 }, %rd21;
    red.global.gpu.acq_rel.add.noftz.bf16 [ %rd10 + 0 ], %rs3;
    red.global.add.noftz.f16x2 [ %rd11 + 0 ], %r9;
    ld.shared.v4.b32 { %r10, %r11, %r12, %r13 }, [ %r14 + 0 ];
    cp.async.cg.shared.global [ %r15 + 0 ], [ %rd12 + 0 ], 0x10, %r16;
    """
    assert compile_check.global_accesses(ptx) == [
        ("ld", 32, 16),
        ("ld", 64, 8),
        ("ld", 64, 16),
        ("st", 16, 2),
        ("atom", 32, 16),
        ("atom", 32, 4),
        ("ld", 16, 2),
        ("ld", 32, 16),
        ("st", 32, 8),
        ("red", 16, 2),
        ("red", 32, 4),
    ]
    assert compile_check.narrow_data_accesses(ptx) == 6
    assert compile_check.unsized_accesses(ptx) == 1


def test_dispatch_rules():
    cpu = torch.zeros(2, 3)
    assert kernels.backend(cpu) == "torch"
    assert kernels.backend(cpu, "triton") == "triton"
    assert kernels.backend(None) == "torch"
    with pytest.raises(ValueError, match="backend must be"):
        kernels.backend(cpu, "cuda")
    # auto on CPU runs the reference: identical object semantics to calling it directly
    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 1]])
    assert torch.equal(kernels.gather_tokens(x, idx), reference.gather_tokens(x, idx))


def _refuse(*args, **kwargs):
    raise AssertionError("a kernel call ignored the engine's kernel_backend='triton'")


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_engine_with_triton_backend_equals_reference(models, images, family):
    """The whole engine on the Triton kernels (interpreted) equals the PyTorch-reference run, for
    every method that calls a kernel: the vision-stage gathers, pooling and merges (VisionZip in
    both merge modes, PruMerge, PruMerge+, GlobalCom², both poolings), the projector's and crop
    layout's gathers (crops placed back on the grid by a selection), the frozen layers' gathers,
    the decoder attention rows (FastV), SparseVLM's gathers and cluster sums and DART's pivot
    gather. In the Triton run the PyTorch references refuse to run, so a call that drops the
    engine's backend choice fails here."""
    from conftest import PROMPTS

    import tokencomp as tc

    model = models[family]
    batch = tc.prepare(model, images, PROMPTS)

    @tc.register("_test-cls-top")
    class ClsTop(tc.VisionStrategy):
        def needs(self):
            return [tc.Need("vision_cls_attention", -2)]

        def select(self, view):
            return view.cls_attention(-2)[:, :, 1:].mean(1).topk(12, dim=-1).indices

    strategies = [
        [ClsTop(), tc.method("fastv", k=2, ratio=0.5)],
        tc.method("pool", budget=9),
        [tc.method("bilinear", budget=9), tc.method("freeze", layers=(1, 2))],
        tc.method("visionzip", dominant=10, contextual=4),
        tc.method("visionzip", dominant=10, contextual=4, merge="average"),
        tc.method("prumerge"),
        tc.method("prumerge+"),
        tc.method("sparsevlm", counts=(20, 6), layers=(0, 2)),
        tc.method("dart", budget=16, pivot_image=2, pivot_text=2),
    ]
    if family == "llava-next":
        strategies.append(tc.method("globalcom2"))
    for strat in strategies:
        runs = {}
        for be in ("torch", "triton"):
            eng = tc.Engine(model, strat, tc.EngineOptions(kernel_backend=be))
            with pytest.MonkeyPatch.context() as mp:
                if be == "triton":  # every kernel call must honour the override: the reference refuses
                    for name in ("gather_tokens", "pool_grid", "merge_tokens", "attention_rows"):
                        mp.setattr(reference, name, _refuse)
                runs[be] = eng.generate(batch, max_new_tokens=3, eos_token_id=None)
            assert runs[be][1].record.kernel_backend == be
        assert runs["torch"][0] == runs["triton"][0], strat
        torch.testing.assert_close(runs["torch"][1].logits, runs["triton"][1].logits, rtol=1e-4, atol=1e-4)
        for b in range(3):
            assert (
                runs["torch"][1].state.layout(b)["orig_index"].tolist()
                == runs["triton"][1].state.layout(b)["orig_index"].tolist()
            ), strat
    with pytest.raises(ValueError, match="backend must be"):
        tc.EngineOptions(kernel_backend="cuda")


def test_kernel_benchmark_covers_and_checks_every_kernel(monkeypatch):
    """experiments/bench_kernels.py times every public kernel (both pooling modes) and refuses a wrong one.

    Run at its tiny shapes on the CPU through the interpreter, so a GPU session finds a script
    that works; its times here mean nothing and are not looked at.
    """
    import dataclasses
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)

    shapes = list(bench.shapes(tiny=True))
    cases = bench.cases(shapes[0], "cpu")
    names = {case.triton.func.__name__ for case in cases.values()}
    assert names == set(kernels.__all__) - {"backend"} | {"attention_rows_per_row"}
    pooled = [case for case in cases.values() if case.triton.func is kernels.pool_grid]
    assert {case.triton.args[3] for case in pooled} == {"avg", "bilinear"}
    for name, case in cases.items():
        out = case.reference()
        outs = out if isinstance(out, tuple) else (out,)
        # the byte counts are at least what the outputs alone take
        assert case.nbytes > sum(o.nbytes for o in outs), name
        # each PyTorch competitor computes the reference's result (the check in run() relies on it)
        best = case.torch()
        for a, r in zip(best if isinstance(best, tuple) else (best,), outs, strict=True):
            assert a.shape == r.shape and a.dtype == r.dtype, name
            _close(a, r, shapes[0].dtype)

    # the competitors at a real view's size (one view of 576 tokens): rounding that the tiny shapes
    # hide (float32 weights rounded to half precision before summing 432 sources) shows here
    for dtype in (torch.float16, torch.bfloat16):
        view = bench.Shape(dtype, hidden=128, views=1, side=24, batch=2, head_dim=64)
        for name, case in bench.cases(view, "cpu").items():
            bench.check(name, dataclasses.replace(case, triton=case.torch), dtype)  # the competitor alone

    partial_rows = []
    rows = bench.run(tiny=True, device="cpu", repeats=1, warmup=0, on_shape=lambda r: partial_rows.append(len(r)))
    assert len(rows) == len(shapes) * len(cases)
    assert partial_rows == [len(cases) * (i + 1) for i in range(len(shapes))]  # saved after every shape
    assert all(r["triton_us"] > 0 and r["copy_frac"] > 0 for r in rows)

    # the launch-setting sweep: every setting agrees with the reference (checked inside), and
    # exactly one per kernel and shape is the wrappers' default
    swept = bench.sweep(tiny=True, device="cpu", repeats=1, warmup=0)
    assert not [r for r in swept if "error" in r]
    kinds = {r["kernel"] for r in swept}
    merges = {n for n in cases if n.startswith("merge")}
    assert {"gather n/4", "attention rows r=1", "attention rows r=3"} | merges <= kinds and len(kinds) == 8
    assert len(merges) == 3 and {"merge n->10 skewed mean", "merge n->1 weighted sum"} <= merges
    for kind in kinds:
        assert sum(r["config"].endswith("(default)") for r in swept if r["kernel"] == kind) == 1, kind

    # a wrong kernel, or a wrong PyTorch competitor, stops the run before it is timed
    name = next(n for n in cases if n.startswith("merge"))
    good = cases[name]
    wrong = [
        bench.Case(lambda: good.triton() + 1e-2, good.torch, good.reference, good.nbytes),
        bench.Case(good.triton, lambda: good.torch() + 1e-2, good.reference, good.nbytes),
    ]
    for case, who in zip(wrong, ("Triton kernel", "PyTorch equivalent"), strict=True):
        with pytest.raises(AssertionError, match=f"the {who} disagrees"):
            bench.check(name, case, shapes[0].dtype)
