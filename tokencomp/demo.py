"""``tokencomp demo``: every registered method on tiny random-weight LLaVA-1.5 / LLaVA-NeXT models.

Until the project's trained embedded models ship, this is the smoke-scale comparison: it checks
that every method runs at batch > 1 on both model classes and reports, per method, the visual
tokens entering the LLM, the tokens each decoder layer processes, the measured prefill time and
the agreement of greedy answers with the uncompressed model (a fidelity proxy; the weights are
random, so no accuracy is claimed). Results are written as CSV and markdown under the output dir.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from .api import prepare
from .engine import Engine
from .model import Model
from .registry import method
from .tiny import tiny_llava

QUESTIONS = [
    "what color is the big circle ?",
    "how many square are there ?",
    "is there a red star ?",
    "where is the small blue triangle ?",
]


def demo_grid(family: str) -> list[tuple[str, object]]:
    """(label, strategy) pairs compared on one model family (budgets per view)."""
    budgets = [192, 128, 64] if family == "llava" else [128, 64, 32]
    grid: list[tuple[str, object]] = [("identity", None)]
    for b in budgets:
        for name in ("random", "pool", "bilinear"):
            grid.append((f"{name}-{b}", method(name, budget=b)))
    grid += [
        ("fastv-k2-r50", method("fastv", k=2, ratio=0.5)),
        ("fastv-k2-r75", method("fastv", k=2, ratio=0.75)),
        ("freeze-upper-half", method("freeze", layers=tuple(range(4, 8)))),
        ("pool-64+fastv", [method("pool", budget=64), method("fastv", k=2, ratio=0.5)]),
    ]
    return grid


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (336, 336) if i % 2 == 0 else (300, 560)
        arr = (rng.random((h, w, 3)) * 60 + 100).astype("uint8")
        y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
        arr[y : y + 50, x : x + 50] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(arr))
    return out


def run_demo(
    out_dir: Path, samples: int = 8, batch_size: int = 4, repeats: int = 3, new_tokens: int = 4
) -> pd.DataFrame:
    """Run the demo grid and write ``results.csv`` and ``results.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    images = _images(samples)
    prompts = [f"USER : <image> {QUESTIONS[i % len(QUESTIONS)]} ASSISTANT :" for i in range(samples)]
    rows = []
    for family in ("llava", "llava-next"):
        hf, proc = tiny_llava(family, image_size=336, text_layers=8, vision_layers=4, hidden=64, seed=0)
        model = Model(hf, proc, name=f"tiny-random-{family}")
        batches = [
            prepare(model, images[i : i + batch_size], prompts[i : i + batch_size])
            for i in range(0, samples, batch_size)
        ]
        reference = None
        for label, strat in tqdm(demo_grid(family), desc=f"demo {family}", unit="method"):
            engine = Engine(model, strat)
            tokens, times, recs = [], [], []
            for batch in batches:
                engine.generate(batch, max_new_tokens=1)  # warm-up
                t = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    engine.prefill(batch)
                    t.append(time.perf_counter() - t0)
                times.append(statistics.median(t))
                toks, pre = engine.generate(batch, max_new_tokens=new_tokens, eos_token_id=None)
                tokens += toks
                recs.append(pre.record)
            if reference is None:
                reference = tokens
            tpl = [np.mean(r) for rec in recs for r in rec.tokens_per_layer]
            rows.append(
                {
                    "model": model.name,
                    "method": label,
                    "visual_tokens_in": np.mean([v for rec in recs for v in rec.visual_tokens_in]),
                    "visual_tokens_llm": np.mean([v for rec in recs for v in rec.visual_tokens_llm]),
                    "mean_tokens_per_layer": float(np.mean(tpl)),
                    "prefill_ms_per_batch": 1e3 * statistics.median(times),
                    "first_token_agreement": float(np.mean([a[0] == b[0] for a, b in zip(tokens, reference)])),
                    "all_tokens_agreement": float(np.mean([a == b for a, b in zip(tokens, reference)])),
                }
            )
    df = pd.DataFrame(rows)
    df.to_csv(out_dir / "results.csv", index=False)
    (out_dir / "results.md").write_text(
        "# tokencomp demo (tiny random-weight models)\n\n"
        "Command: `tokencomp demo --out runs/demo`. "
        f"{samples} samples, batch {batch_size}, prefill median of {repeats} after warm-up, CPU.\n"
        "Agreement = share of samples whose greedy tokens equal the uncompressed model's.\n\n"
        + df.to_markdown(index=False, floatfmt=".3g")
        + "\n"
    )
    print(df.to_string(index=False))
    print(f"\nwritten: {out_dir / 'results.csv'}, {out_dir / 'results.md'}")
    return df
