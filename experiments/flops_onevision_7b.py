"""The profiler's FLOPs for LLaVA-OneVision-7B against a hand count, at the checkpoint's shapes.

The model is built on PyTorch's ``meta`` device (shapes only, no weights, no download): SigLIP
so400m (26 layers as LLaVA-OneVision keeps them, 384 px, patch 14: 729 tokens per view, no CLS),
the 2-layer GELU projector 1152 -> 3584 -> 3584, the Qwen2-7B decoder (28 layers, 3584 hidden,
18944 MLP, 28 query / 4 key-value heads of 128, vocabulary 152128) and ``anyres_max_9`` over the
36 pinpoints 384 x {1..6} by 384 x {1..6}.

For each image size the prompt's visual tokens come from `tokencomp.Model.image_token_count`, the
run record is the identity run's, and `tokencomp.profiler.run_flops` is compared with the count
written out below term by term (FLOPs = 2 x multiply-adds, matrix products only; the bilinear
downsampling is element-wise work, which the convention leaves out).

    python experiments/flops_onevision_7b.py [--text 64] [--out experiments/results/flops-onevision-7b.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

import tokencomp as tc
from tokencomp.families import ImageSize
from tokencomp.profiler import run_flops
from tokencomp.record import RunRecord

SIZES = [(384, 384), (768, 1024), (1080, 1920), (2304, 2304)]  # (height, width) px

# LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov-hf) shapes
D, MLP, HEADS, KV, HEAD, LAYERS, VOCAB = 3584, 18944, 28, 4, 128, 28, 152128
VD, VMLP, VLAYERS, PATCH, VIEW_TOKENS = 1152, 4304, 26, 14, 729


def model_7b() -> tc.Model:
    config = LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            hidden_size=D,
            intermediate_size=MLP,
            num_attention_heads=HEADS,
            num_key_value_heads=KV,
            num_hidden_layers=LAYERS,
            vocab_size=VOCAB,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=VD,
            intermediate_size=VMLP,
            num_attention_heads=16,
            num_hidden_layers=VLAYERS,
            image_size=384,
            patch_size=PATCH,
        ),
        image_grid_pinpoints=[[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    with torch.device("meta"):
        hf = LlavaOnevisionForConditionalGeneration(config)
    return tc.Model(hf, None)


def hand_count(views: int, visual: int, text: int) -> dict[str, float]:
    """Vision tower, projector and LLM prefill FLOPs, each matrix product written out."""
    n = VIEW_TOKENS
    conv = 2 * n * (3 * PATCH * PATCH) * VD  # patch embedding
    attn_proj = 4 * (2 * n * VD * VD)  # q, k, v, o
    attn = 2 * (2 * n * n * VD)  # QK^T and AV
    mlp = 2 * (2 * n * VD * VMLP)  # fc1, fc2
    vision = views * (conv + VLAYERS * (attn_proj + attn + mlp))
    projector = views * n * 2 * (VD * D + D * D)
    t = visual + text
    layer = (
        2 * (2 * t * D * HEADS * HEAD)  # q, o
        + 2 * (2 * t * D * KV * HEAD)  # k, v (grouped-query)
        + 2 * (2 * t * t * HEADS * HEAD)  # QK^T and AV
        + 3 * (2 * t * D * MLP)  # gate, up, down
    )
    prefill = LAYERS * layer + 2 * D * VOCAB  # + the LM head at the last position
    return {"vision": vision, "projector": projector, "prefill": prefill}


def profiled(model: tc.Model, size: tuple[int, int], text: int):
    """The identity run's record for one image of ``size`` and ``text`` text tokens, the profiler's
    report of it, and the hand count; `SystemExit` when they differ."""
    image = ImageSize(*size)
    views = model.layout.views_per_image(image)
    visual = model.image_token_count(image)
    n = visual + text
    record = RunRecord(
        method=["identity"],
        visual_tokens_in=[visual],
        visual_tokens_llm=[visual],
        tokens_per_layer=[[n] * LAYERS],
        visual_per_layer=[[visual] * LAYERS],
        tokens_per_view=[[[VIEW_TOKENS] * views]],
        projected_tokens=[VIEW_TOKENS * views],
        vision_layers_run=VLAYERS,
    )
    got = run_flops(model, record)[0]
    hand = hand_count(views, visual, text)
    for part, value in (("vision", got.vision), ("projector", got.projector), ("prefill", got.prefill)):
        if value != hand[part]:
            raise SystemExit(f"{size}: the profiler's {part} {value:.6e} != the hand count {hand[part]:.6e}")
    return record, got, hand


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=int, default=64, help="text tokens in the prompt")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    model = model_7b()
    rows = []
    for size in SIZES:
        image = ImageSize(*size)
        record, got, _ = profiled(model, size, args.text)
        views, visual = len(record.tokens_per_view[0][0]), record.visual_tokens_in[0]
        _, _, _, height, _, width = model.crop_region(image)
        h2, w2 = model.layout.resized(height, width)
        share = model.layout.view_share(image)[-1]
        zip64 = 64 + (views - 1) * sum(tc.method("visionzip", budget=64).view_split(share, has_cls=False))
        rows.append(
            f"| {size[1]} x {size[0]} | {views - 1} ({'x'.join(map(str, model.crop_grid(image)))}) | "
            f"{height} x {width} | {h2} x {w2} | {visual} | {got.vision / 1e12:.2f} | {got.projector / 1e12:.3f} | "
            f"{got.prefill / 1e12:.2f} | {got.total_prefill / 1e12:.2f} | equal | {zip64} |"
        )
    table = "\n".join(
        [
            f"# FLOPs of LLaVA-OneVision-7B, identity, one image + {args.text} text tokens (profiler = hand count)",
            "",
            f"Command: `python experiments/flops_onevision_7b.py --text {args.text}`",
            "",
            "TFLOPs, 2 x multiply-adds, matrix products only. 'resized' is the crop grid after anyres_max_9; "
            "the last column is what VisionZip at budget 64 (54 + 10 per view; a resized grid's crops "
            "round(64 s) each) sends to the LLM, newlines not counted.",
            "",
            "| image (w x h) | crops | unpadded grid | resized | visual tokens | vision | projector "
            "| LLM prefill | total | hand count | VisionZip-64 tokens |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
