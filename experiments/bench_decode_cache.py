"""Decoding steps over the KV cache: a reserved buffer against concatenation, at 7B decoder shapes.

Usage::

    python experiments/bench_decode_cache.py [--batch 1 8 32] [--cached 640] [--steps 16] [--repeats 3] [--out FILE]

One Llama decoder layer with LLaVA-1.5-7B's shapes (hidden 4096, MLP 11008, 32 heads, random
weights; float32 on a CPU, float16 on a GPU) decodes ``--steps`` tokens after a cache of
``--cached`` positions (576 visual + 64 text by default), through `tokencomp.cache.LayerKVCache`
as the engine drives it: with ``reserve`` set to the steps to come (what `Engine.generate` does)
and with ``reserve=0``, which re-allocates and copies the layer's cache at every step, as
concatenating caches (transformers' ``DynamicCache``) do. Both are timed side by side, alternating,
``--repeats`` rounds after a warm-up; the table gives median milliseconds per step per layer.
A 7B model decodes through 32 such layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokencomp.cache import LayerKVCache  # noqa: E402


def decode(layer, rope, cfg, batch: int, cached: int, steps: int, reserve: int, device, dtype) -> float:
    """Seconds per step of ``steps`` single-token steps of ``layer`` after a random cache of
    ``cached`` positions, appends made with ``reserve`` free positions per (re)allocation."""
    heads, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device=device).manual_seed(0)
    cache = LayerKVCache(1, reserve=reserve)
    k = torch.randn(batch, heads, cached, hd, generator=g, device=device, dtype=dtype)
    cache.update(k, torch.randn_like(k), 0)
    x = torch.randn(batch, 1, cfg.hidden_size, generator=g, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(steps):
        pos = torch.full((batch, 1), cached + s, device=device)
        out = layer(x, position_ids=pos, past_key_values=cache, use_cache=True, position_embeddings=rope(x, pos))
        x = out[0] if isinstance(out, tuple) else out
    sync()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cached", type=int, default=640, help="positions cached before decoding")
    p.add_argument("--steps", type=int, default=16, help="tokens decoded per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.cached < 1 or args.steps < 2 or args.repeats < 1:
        p.error("--batch, --cached and --repeats must be >= 1, --steps >= 2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=1
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dtype).eval()
        rope = LlamaRotaryEmbedding(cfg)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [
        f"# Decoding over the KV cache at LLaVA-1.5-7B decoder shapes ({name}, {dtype}, one layer)",
        "",
        f"Command: `python experiments/bench_decode_cache.py --batch {' '.join(map(str, args.batch))} "
        f"--cached {args.cached} --steps {args.steps} --repeats {args.repeats}` (torch {torch.__version__})",
        "",
        "| batch | cached positions | concatenate: ms/step | reserved buffer: ms/step | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    with torch.no_grad():
        for b in args.batch:
            times = {0: [], args.steps: []}
            for r in range(args.repeats + 1):  # round 0: warm-up
                for reserve in (0, args.steps) if r % 2 else (args.steps, 0):
                    t = decode(layer, rope, cfg, b, args.cached, args.steps, reserve, device, dtype)
                    if r:
                        times[reserve].append(t)
            cat, buf = (statistics.median(times[k]) * 1e3 for k in (0, args.steps))
            lines.append(f"| {b} | {args.cached} | {cat:.2f} | {buf:.2f} | {cat / buf:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
