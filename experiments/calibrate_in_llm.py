"""Calibrate the in-LLM methods on the embedded ``tiny-llava`` (tc-scenes validation split).

Writes, under ``--out`` (default ``experiments/results/in-llm``):

* ``shortv-lc.json`` / ``shortv-lc.png``: ShortV layer contribution per layer (visual and text
  tokens) on ``--shortv-samples`` validation samples, the frozen layers marked (the lowest
  ``round(19/32 * L)`` visual LC, ShortV's LLaVA-1.5-7B proportion);
* ``rank-similarity.md`` / ``.png``: Kendall tau of visual-token rankings between layers;
* ``gsearch.json``: the G-Search schedule (accuracy drop <= ``--tolerance`` on ``--calib-samples``
  validation samples, step ``--step``);
* ``psigmoid-fastv.json``, ``psigmoid-pdrop.json``, ``psigmoid-gsearch.json``: P-Sigmoid schedules
  tuned by Bayesian optimisation at the LLM prefill FLOPs of FastV (K=2, R=50%), PyramidDrop
  (default stages) and the G-Search schedule (sigmoid centre ``alpha`` searched over [0, L-1], so a
  steep drop right at the first pruned layer, as G-Search may find, is reachable);
* ``flops.md``: each method's LLM prefill FLOPs ratio.

``experiments/in_llm.toml`` then scores them all on the test split. Each output that exists is
kept (the script resumes). Usage::

    python experiments/calibrate_in_llm.py
    tokencomp compare experiments/in_llm.toml --out runs/in-llm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tokencomp as tc
from tokencomp.benchmark import PRESETS, generate_split
from tokencomp.data import JsonlDataset, prompt
from tokencomp.methods.gsearch import (
    gsearch,
    plot_rank_similarity,
    psigmoid,
    rank_similarity,
    rank_similarity_table,
    save_schedule,
    schedule_flops_ratio,
)
from tokencomp.methods.shortv import calibrate, lowest_layers, plot_layer_contribution
from tokencomp.profiler import prefill_flops_from_config


def batches_of(model, samples, batch_size: int):
    return [
        tc.prepare(
            model,
            [s.load_image() for s in samples[i : i + batch_size]],
            [prompt(s, model.family) for s in samples[i : i + batch_size]],
        )
        for i in range(0, len(samples), batch_size)
    ]


def visual_keep_per_layer(model, method, batch) -> tuple[list[int], int, int]:
    """Visual tokens each layer processes for sample 0 of ``batch`` under ``method``."""
    engine = tc.Engine(model, method)
    spans = engine.image_spans(batch)
    n_visual = sum(c for _, c in spans[0])
    n_text = int(batch.attention_mask[0].sum()) - n_visual
    with torch.no_grad():
        rec = engine.prefill(batch).record
    return [t - n_text for t in rec.tokens_per_layer[0]], n_visual, n_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--out", default="experiments/results/in-llm")
    ap.add_argument("--data", default="runs/in-llm-data", help="where the validation split is generated")
    ap.add_argument("--shortv-samples", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--tolerance", type=float, default=0.02, help="G-Search: allowed accuracy drop")
    ap.add_argument("--step", type=float, default=0.1, help="G-Search: keep-rate step")
    ap.add_argument("--bo-iter", type=int, default=12, help="P-Sigmoid: Bayesian optimisation iterations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tc.load_model(args.model)
    path = Path(args.data) / "val.jsonl"
    if not path.is_file():
        generate_split(args.data, "val", 400, **PRESETS["tc-scenes"])
    val = JsonlDataset(path)

    lc_path = out / "shortv-lc.json"
    if not lc_path.is_file():
        calibrate(model, val, num_samples=args.shortv_samples, seed=args.seed, batch_size=8, path=lc_path)
    lc = json.loads(lc_path.read_text())
    chosen = lowest_layers(lc, round(19 / 32 * model.num_layers))
    plot_layer_contribution(lc, out / "shortv-lc.png", chosen=chosen)
    print("ShortV frozen layers:", chosen)

    calib = val.samples[: args.calib_samples]  # the first samples; ShortV drew its own at random
    batches = batches_of(model, calib, 8)
    answers = [[s.answers for s in calib[i : i + 8]] for i in range(0, len(calib), 8)]

    rs = out / "rank-similarity.md"
    if not rs.is_file():
        tau = rank_similarity(model, batches[:4])
        used = sum(len(b) for b in answers[:4])
        plot_rank_similarity(tau, out / "rank-similarity.png", title=f"{model.name}: Kendall tau of visual-token ranks")
        rs.write_text(
            f"# Rank similarity of visual tokens between decoder layers ({model.name}, {used} validation samples)\n\n"
            "Kendall tau between the rankings of visual tokens by the attention they receive from the last\n"
            "token at each layer, averaged over samples (`python experiments/calibrate_in_llm.py`).\n\n"
            + rank_similarity_table(tau)
            + "\n"
        )

    gs_path = out / "gsearch.json"
    if not gs_path.is_file():
        sched = gsearch(model, batches, tolerance=args.tolerance, step=args.step, metric="accuracy", answers=answers)
        save_schedule(sched, gs_path)
    gs = json.loads(gs_path.read_text())
    print("G-Search:", gs["keep"])

    cfg = model.hf.config.text_config
    ratios = {}
    for label, method in (
        ("fastv", tc.method("fastv", k=2, ratio=0.5)),
        ("pdrop", tc.method("pdrop")),
        ("gsearch", tc.method("schedule", path=str(gs_path))),
    ):
        keep, nv, nt = visual_keep_per_layer(model, method, batches[0])
        ratios[label] = prefill_flops_from_config(cfg, nv, nt, keep=keep) / prefill_flops_from_config(cfg, nv, nt)
    for label, ratio in ratios.items():
        p = out / f"psigmoid-{label}.json"
        if not p.is_file():
            sched = psigmoid(
                model,
                batches,
                flops_ratio=ratio,
                n_iter=args.bo_iter,
                alpha_bounds=(0.0, model.num_layers - 1.0),  # the drop may centre before the first pruned layer
                metric="accuracy",
                answers=answers,
                seed=args.seed,
            )
            save_schedule(sched, p)
        print(f"P-Sigmoid at {label}'s FLOPs ({ratio:.3f}):", json.loads(p.read_text())["keep"])
    # nv, nt: visual / text tokens of the first calibration sample (set by the ratio loop above)
    lines = [
        f"# LLM prefill FLOPs ratios on {model.name} ({nv} visual + {nt} text tokens of the first sample)",
        "",
        "| method | keep rates per layer | prefill FLOPs / unreduced |",
        "|---|---|---|",
    ]
    for label in ("fastv", "pdrop", "gsearch"):
        if label == "gsearch":
            lines.append(f"| gsearch | {', '.join(f'{r:.2f}' for r in gs['keep'])} | {ratios['gsearch']:.3f} |")
        else:
            lines.append(f"| {label} | (attention-ranked at its own layers) | {ratios[label]:.3f} |")
        p = json.loads((out / f"psigmoid-{label}.json").read_text())
        rates = ", ".join(f"{r:.2f}" for r in p["keep"])
        lines.append(f"| psigmoid @ {label} | {rates} | {schedule_flops_ratio(model, p['keep'], nv, nt):.3f} |")
    (out / "flops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
