"""Prefill speed at LLaVA-1.5-7B decoder shapes: measured speed-up next to the FLOPs-ideal one.

Usage::

    python experiments/bench_prefill.py [--layers 2] [--repeats 3] [--text 64] [--out FILE]

The decoder has LLaVA-1.5-7B's shapes (hidden 4096, MLP 11008, 32 heads, random weights) with as
many layers as ``--layers`` (all 32 fit on a GPU; a few on a 24 GiB CPU machine); the vision tower
is a small CLIP at 336 px / patch 14, so each image gives the real 576 tokens while costing little.
Visual tokens entering the LLM are 576 (identity) and 192 / 128 / 64 (random selection, the
cheapest selection, so the timing is the LLM's). Median of ``--repeats`` after a warm-up, measured
side by side in one process; the ideal speed-up is the ratio of analytic LLM prefill FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokencomp as tc  # noqa: E402
from tokencomp.profiler import run_flops  # noqa: E402
from tokencomp.tiny import word_tokenizer  # noqa: E402


def build(layers: int, device: str, dtype: torch.dtype) -> tc.Model:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = word_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=336, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
    )
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return tc.Model(hf, proc, name=f"llava-1.5-7b-shapes-{layers}L")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text", type=int, default=64, help="text tokens in the prompt")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = build(args.layers, device, dtype)
    words = "what color is the big red circle left of the small blue square in the picture".split()
    question = " ".join((words * 8)[: args.text - 3])  # BOS + "<image>" span + question ~ text tokens
    image = Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype("uint8"))
    batch = tc.prepare(model, [image], [f"<image> {question}"])
    rows = []
    for label, strat in [("576 (identity)", None)] + [(str(b), tc.method("random", budget=b)) for b in (192, 128, 64)]:
        engine = tc.Engine(model, strat)
        with torch.no_grad():
            engine.prefill(batch)  # warm-up
            times = []
            for _ in range(args.repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                pre = engine.prefill(batch)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        flops = run_flops(model, pre.record)[0].prefill
        rows.append(
            (label, pre.record.tokens_per_layer[0][0], statistics.median(times), max(times) - min(times), flops)
        )
    base_t, base_f = rows[0][2], rows[0][4]
    lines = [
        f"# Prefill at LLaVA-1.5-7B decoder shapes ({device}, {dtype}, {args.layers} of 32 layers, batch 1)",
        "",
        f"Command: `python experiments/bench_prefill.py --layers {args.layers} --repeats {args.repeats} --text {args.text}`",
        "",
        "| visual tokens | tokens in LLM | prefill ms (median) | spread ms | LLM prefill GFLOPs | measured speed-up | FLOPs-ideal speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, n, t, spread, f in rows:
        lines.append(
            f"| {label} | {n} | {t * 1e3:.1f} | {spread * 1e3:.1f} | {f / 1e9:.1f} | {base_t / t:.2f}x | {base_f / f:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
