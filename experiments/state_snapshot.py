"""Snapshots of what every cell of an experiment computes, to check that a refactor changed nothing.

Usage::

    python experiments/state_snapshot.py dump experiments/demo.toml SNAPSHOT.pt [--code TREE]
        [--run-dir DIR] [--kernel-backend torch|triton|auto] [--new-tokens 3]
    python experiments/state_snapshot.py diff OLD.pt NEW.pt

``dump`` runs each cell of the experiment on the batch the runner times latency on (the dataset's
first ``batch_size`` samples), and saves per cell: the packed sequence entering the decoder (hidden
states and the token record: kind, positions, prompt index, image, view, patch, validity), the
sequence leaving it, the first token's logits, the tokens the vision stage kept per view, the
projected tokens, the visual tokens per layer, the KV-cache lengths and ``--new-tokens`` greedy
tokens. ``--code`` names the checkout whose tokencomp and methods run (default: this
one's): dump once with ``--code`` on an older commit (``git worktree add /tmp/old <commit>``),
once without, and ``diff`` the files. Commits before the kernels moved into ``tokencomp.kernels``
have a top-level ``kernels`` package that shadows Hugging Face's, which transformers >= 5.25
imports: dump those in an environment with transformers < 5.25. It lists each field that is not
bit-identical, with the largest difference of a float
field, and exits 1 if any differ. Last-bit differences are expected where an equivalent change
reorders a floating-point reduction (a matrix product of another shape); the token record is not.

``--kernel-backend triton`` on a CPU needs Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment; slow: the demo's 30 cells took 8 min on 2 cores, against 37 s with ``torch``). On
the demo's cells its snapshot was bit-identical to the PyTorch references' (2026-11-25).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
STATE_FIELDS = ("hidden", "valid", "kind", "positions", "orig_index", "image", "view", "patch")


def snapshot(engine, batch, new_tokens: int) -> dict:
    """One cell's fields (module docstring), on the host."""
    with torch.no_grad():
        pre = engine.prefill(batch)
        tokens, gen = engine.generate(batch, max_new_tokens=new_tokens)
    got = {f"in.{f}": getattr(pre.input_state, f) for f in STATE_FIELDS}
    got |= {f"out.{f}": getattr(pre.state, f) for f in STATE_FIELDS}
    got["logits"] = pre.logits
    got = {k: v.detach().cpu() for k, v in got.items()}
    rec = gen.record
    got |= {
        "tokens_per_view": rec.tokens_per_view,
        "projected_tokens": rec.projected_tokens,
        "visual_per_layer": rec.visual_per_layer,
        "kv_cache_lengths": rec.kv_cache_lengths,
        "generated": tokens,
    }
    return got


def dump(args) -> int:
    sys.path.insert(0, str(Path(args.code).resolve()))  # before the first import of its packages
    from tokencomp.engine import Engine, EngineOptions
    from tokencomp.runner import _dataset, _latency_batch, _load_model, load_experiment

    exp = load_experiment(args.experiment, args.run_dir)
    exp.out.mkdir(parents=True, exist_ok=True)
    models = {name: _load_model(src, exp.load[name]) for name, src in exp.models.items()}
    datasets = {name: _dataset(spec, exp.out) for name, spec in exp.datasets.items()}
    batches, out = {}, {}
    options = EngineOptions(kernel_backend=args.kernel_backend)
    for cell in exp.cells:
        key = (cell.model, cell.dataset)
        if key not in batches:
            batches[key] = _latency_batch(exp, models[cell.model], datasets[cell.dataset])
        out[cell.id] = snapshot(Engine(models[cell.model], cell.strategies(), options), batches[key], args.new_tokens)
        print(f"{cell.id}: {out[cell.id]['generated']}", file=sys.stderr)
    torch.save(out, args.snapshot)
    print(f"{len(out)} cells -> {args.snapshot}")
    return 0


def differences(old: dict, new: dict) -> list[str]:
    """One line per cell or field of ``old`` that ``new`` lacks or does not hold bit for bit."""
    lines = [f"{cell}: only in the new snapshot" for cell in new if cell not in old]
    for cell, fields in old.items():
        if cell not in new:
            lines.append(f"{cell}: only in the old snapshot")
            continue
        for name, a in fields.items():
            b = new[cell].get(name)
            if isinstance(a, torch.Tensor):
                said = _tensor_difference(a, b)
                if said:
                    lines.append(f"{cell}: {name} {said}")
            elif isinstance(b, torch.Tensor) or a != b:
                lines.append(f"{cell}: {name} differs")
    return lines


def _tensor_difference(a: torch.Tensor, b) -> str | None:
    """None where ``b`` holds ``a`` bit for bit (NaN where ``a`` has NaN), else what differs: for
    floats, the largest difference where both are finite, or where infinities or NaNs moved."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return "differs (type or shape)"
    if a.dtype != b.dtype:
        return f"differs in dtype ({a.dtype} -> {b.dtype})"
    if not a.is_floating_point():
        return None if torch.equal(a, b) else "differs (integers)"
    nan_a, nan_b = a.isnan(), b.isnan()
    if torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)):
        return None  # (not nan_to_num: it would also make an infinity the largest finite value)
    finite = a.isfinite()
    if not torch.equal(finite, b.isfinite()) or not torch.equal(
        a[~finite].masked_fill(nan_a[~finite], 0), b[~finite].masked_fill(nan_b[~finite], 0)
    ):
        return "differs in its infinities or NaNs"
    return f"max |diff| {(a[finite].double() - b[finite].double()).abs().max().item():.3g}"


def diff(args) -> int:
    old, new = torch.load(args.old), torch.load(args.new)
    lines = differences(old, new)
    print("\n".join(lines + [f"compared {len(old)} cells; {len(lines)} differences"]))
    return int(bool(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="run every cell and save what it computed")
    d.add_argument("experiment")
    d.add_argument("snapshot")
    d.add_argument("--code", default=str(HERE), help="checkout whose code runs (default: this one)")
    d.add_argument("--run-dir", default="runs/state-snapshot", help="where generated data is written")
    d.add_argument("--kernel-backend", default="torch", choices=("torch", "triton", "auto"))
    d.add_argument("--new-tokens", type=int, default=3)
    c = sub.add_parser("diff", help="compare two snapshots bit for bit")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args(argv)
    return dump(args) if args.command == "dump" else diff(args)


if __name__ == "__main__":
    sys.exit(main())
