"""Overhead of score capture in the vision tower (CLIP ViT-L/14-336 shapes, random weights).

Usage::

    python experiments/bench_vision_capture.py [--layers 24] [--batch 1] [--repeats 5] [--out FILE]

Measures, side by side in one run (median of ``--repeats`` after one warm-up; CUDA events on GPU,
a monotonic clock on CPU):

* ``plain``: the engine's tower run with no capture (stops at the projector's feature layer, -2),
* ``visionzip``: the same with VisionZip's captures (CLS attention row + head-mean keys at -2),
* ``hf-sdpa``: Hugging Face's own tower call (``output_hidden_states=True``, all layers, SDPA),
* ``prumerge`` / ``globalcom2``: captures at the last layer (-1: the layers to -2 whole, then only the last
  one's norm and q/k projections, its output feeding nothing), against ``hf-sdpa``,
* ``hf-eager-attn``: what the released VisionZip code does (eager tower, every attention map).

The ratios printed are the capture overhead, which the project requires to stay within 5%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokencomp as tc  # noqa: E402


def build(layers: int, dtype: torch.dtype, device: str) -> tc.Model:
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2)
    cfg._attn_implementation = "sdpa"
    for sub in (cfg.vision_config, cfg.text_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tc.Model(LlavaForConditionalGeneration(cfg).to(device, dtype).eval())


def timer(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = build(args.layers, dtype, device)
    pix = torch.randn(args.batch, 3, 336, 336, device=device, dtype=dtype)
    engines = {
        "plain": tc.Engine(model),
        "visionzip": tc.Engine(model, tc.method("visionzip", budget=64)),
        "prumerge": tc.Engine(model, tc.method("prumerge")),
    }
    hf_tower = model.hf.model.vision_tower
    res = {}
    with torch.no_grad():
        for name, eng in engines.items():
            res[name] = timer(lambda eng=eng: eng._vision_tower(pix), args.repeats, device)
        res["hf-sdpa"] = timer(lambda: hf_tower(pix, output_hidden_states=True), args.repeats, device)
        model.hf.set_attn_implementation("eager")
        res["hf-eager-attn"] = timer(
            lambda: hf_tower(pix, output_hidden_states=True, output_attentions=True), args.repeats, device
        )
        model.hf.set_attn_implementation("sdpa")
    lines = [
        f"# Vision-tower score capture overhead ({device}, {dtype}, CLIP-L/14-336 shapes, {args.layers} layers, "
        f"batch {args.batch}, median of {args.repeats})",
        "",
        f"Command: `python experiments/bench_vision_capture.py --layers {args.layers} --batch {args.batch} "
        f"--repeats {args.repeats}`",
        "",
        "| run | median ms | vs |",
        "|---|---:|---|",
        f"| plain engine tower (to layer -2) | {res['plain'] * 1e3:.1f} | |",
        f"| VisionZip capture (-2) | {res['visionzip'] * 1e3:.1f} | {res['visionzip'] / res['plain']:.3f}x plain |",
        f"| HF SDPA tower (all layers) | {res['hf-sdpa'] * 1e3:.1f} | |",
        f"| PruMerge capture (-1: layers to -2, then q/k only) | {res['prumerge'] * 1e3:.1f} | {res['prumerge'] / res['hf-sdpa']:.3f}x HF SDPA |",
        f"| HF eager tower + all attention maps (released VisionZip) | {res['hf-eager-attn'] * 1e3:.1f} | "
        f"{res['hf-eager-attn'] / res['hf-sdpa']:.3f}x HF SDPA |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
