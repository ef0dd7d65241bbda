"""Host syncs per method: how often each cell of an experiment makes the host wait for the device.

Usage::

    python experiments/host_syncs.py experiments/demo.toml [--out FILE] [--run-dir DIR]
        [--device cuda --dtype float16]

On a GPU each host sync (a Python value read from a tensor, a data-dependent shape) waits until
the queued kernels finish, so the launches after it are no longer hidden behind device work;
latency measured on a GPU includes that cost. This script counts the syncs of each cell with
`tokencomp.syncs.HostSyncs`, on the CPU (counts do not depend on the device), on the batch the
runner times latency on (the dataset's first ``batch_size`` samples): one prefill, and one decode
step (the difference between generating 3 and 2 tokens), as timed (no EOS token: nothing to look
for) and as served (an EOS token to look for after each step). ``sites`` names the lines that sync
most. Data is generated under ``--run-dir`` (default ``runs/host-syncs``) as `tokencomp compare`
does.

With ``--device cuda`` the models run on the GPU and a column ``CUDA`` gives, for the same prefill,
the synchronizing CUDA calls PyTorch itself reports (``torch.cuda.set_sync_debug_mode("warn")``):
a check of the counter on real hardware (it sees syncs inside C++ operators too, but not the
reads of a tensor already on the host).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokencomp.engine import Engine  # noqa: E402
from tokencomp.runner import _dataset, _latency_batch, _load_model, load_experiment  # noqa: E402
from tokencomp.syncs import HostSyncs, host_tensors  # noqa: E402


def count(engine: Engine, batch, new_tokens: int | None = None, eos: int | None = None) -> HostSyncs:
    """Syncs of one prefill (``new_tokens=None``) or one `Engine.generate` call (``eos``: its EOS id)."""
    with torch.no_grad(), HostSyncs(host=host_tensors(batch)) as syncs:
        if new_tokens is None:
            engine.prefill(batch)
        else:
            engine.generate(batch, max_new_tokens=new_tokens, eos_token_id=eos)
    return syncs


def cuda_syncs(engine: Engine, batch) -> int | None:
    """Synchronizing CUDA calls of one prefill, as PyTorch's sync debug mode reports them (None
    off CUDA)."""
    if engine.model.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                engine.prefill(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in got)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--run-dir", default="runs/host-syncs")
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--device", default=None, help="load the models here (default: the file's, cpu)")
    p.add_argument("--dtype", default=None, help="and in this dtype (default: the file's, float32)")
    args = p.parse_args(argv)
    exp = load_experiment(args.experiment, args.run_dir, device=args.device, dtype=args.dtype)
    exp.out.mkdir(parents=True, exist_ok=True)
    models = {name: _load_model(src, exp.load[name]) for name, src in exp.models.items()}
    datasets = {name: _dataset(spec, exp.out) for name, spec in exp.datasets.items()}
    on = " ".join(f"--{k} {v}" for k, v in (("device", args.device), ("dtype", args.dtype)) if v)
    cuda = any(m.device.type == "cuda" for m in models.values())
    lines = [
        f"# Host syncs per cell ({args.experiment}, batch {exp.settings['batch_size']})",
        "",
        f"Command: `python experiments/host_syncs.py {args.experiment}{' ' + on if on else ''}`",
        "",
        "| model | layers | cell | prefill syncs |"
        + (" CUDA |" if cuda else "")
        + " per decode step (timed) | (with EOS) | most from |",
        "|---|---:|---|---:|" + ("---:|" if cuda else "") + "---:|---:|---|",
    ]
    for cell in exp.cells:
        model = models[cell.model]
        batch = _latency_batch(exp, model, datasets[cell.dataset])
        engine = Engine(model, cell.strategies())
        engine.prefill(batch)  # warm-up: lazy imports and caches outside the count
        pre = count(engine, batch)
        step = count(engine, batch, 3).total - count(engine, batch, 2).total
        step_eos = count(engine, batch, 3, eos=-1).total - count(engine, batch, 2, eos=-1).total  # never generated
        sites = ", ".join(f"{site} ({n})" for site, n in pre.sites.most_common(2))
        seen = f" {cuda_syncs(engine, batch)} |" if cuda else ""
        lines.append(
            f"| {cell.model} | {model.num_layers} | {cell.label} | {pre.total} |{seen} {step} | {step_eos} | {sites} |"
        )
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
