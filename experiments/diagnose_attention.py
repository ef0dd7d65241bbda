"""Where a trained tiny-llava looks when it answers: the attention of the heads that
``train_tiny.py`` teaches (decoder layer ``TAUGHT_LAYER``, heads 0 and 1) at the answer position of
single-turn validation questions, per question type, next to the model's accuracy on them.

The recipe teaches those heads to attend to each question's evidence (the named object's patches;
for counting and existence, BOS plus the centre patch of every matching object). A type whose
heads put little mass on its evidence has not learnt to match the question's words to the objects,
and its accuracy stays near the answer prior. Usage::

    python experiments/diagnose_attention.py --model tokencomp/assets/tiny-llava --per-type 40 \\
        --out experiments/results/embedded/taught-attention.md

Columns: ``evidence``: mean attention mass (head mean) on the target's support (for count / exist:
BOS included); ``objects``: mass on the evidence patches alone (BOS excluded); ``BOS``: mass on BOS;
``accuracy``: greedy first answer token correct. For ``position`` (each head is taught its own
object: head 0 the object asked about, head 1 the reference): ``own``: mean over the two heads of
the mass each puts on its own object; ``crossed``: on the other head's object. When ``own`` is no
larger than ``crossed`` the heads do not tell the two named objects apart, and their difference
(what the answer needs) carries nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny as T  # noqa: E402  (the recipe's evidence targets and attention recomputation)

from tokencomp.benchmark import QUESTION_TYPES, SPLIT_SEED  # noqa: E402


@torch.no_grad()
def diagnose(model, processor, per_type: int, seed0: int) -> list[dict]:
    """One row per question type: mean evidence / object / BOS attention mass and accuracy over
    ``per_type`` validation scenes (seeds from ``seed0``)."""
    rows = []
    for qt in QUESTION_TYPES:
        mass, objects, bos, hits, own, crossed, seed = [], [], [], [], [], [], seed0
        rng = random.Random(seed0)
        while len(hits) < per_type:
            scene, turns = T.conversation(seed, (336, 336), T.LLAVA_TAG, [qt], rng)
            seed += 1
            if not turns:
                continue
            item = T.encode(processor, "llava", scene.image, turns, train=False)
            targets, *_ = T.sample_targets(model, processor, scene, turns, item, 0, "llava")
            if not targets:
                continue
            inputs, _ = T.collate([item[:3]], processor.tokenizer.pad_token_id, "cpu")
            with T.TaughtAttention(model) as taught:
                logits = model(**inputs).logits
            pos, cols, target = targets[0].pos, targets[0].cols, targets[0].target
            heads = taught.rows(torch.tensor([0]), torch.tensor([pos]))[0][:, torch.from_numpy(cols)].numpy()
            p = heads.mean(0)
            if qt == "position":  # (2 heads, 2 objects) mass of each head on each named object
                on = heads[:, None, 1:] * (target[None, :, 1:] > 0)
                per = on.sum(-1)
                own.append((per[0, 0] + per[1, 1]) / 2)
                crossed.append((per[0, 1] + per[1, 0]) / 2)
            support = target.max(0) > 0  # (577,) over (BOS, patches); both heads' evidence
            mass.append(p[support].sum())
            objects.append(p[1:][support[1:]].sum())
            bos.append(p[0])
            answer = processor.tokenizer(f" {turns[0][1]}", add_special_tokens=False)["input_ids"][0]
            hits.append(int(logits[0, pos].argmax()) == answer)
        rows.append(
            dict(
                type=qt,
                evidence=float(np.mean(mass)),
                objects=float(np.mean(objects)),
                bos=float(np.mean(bos)),
                accuracy=float(np.mean(hits)),
                n=len(hits),
                own=float(np.mean(own)) if own else None,
                crossed=float(np.mean(crossed)) if crossed else None,
            )
        )
    return rows


def table(rows: list[dict], model: str) -> str:
    lines = [
        f"Taught heads (layer {T.TAUGHT_LAYER}, heads 0-1, head mean) of `{model}` at the answer position",
        "",
        "| type | n | evidence | objects | BOS | own | crossed | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['n']} | {r['evidence']:.3f} | {r['objects']:.3f} | {r['bos']:.3f} "
            f"| {f(r['own'])} | {f(r['crossed'])} | {r['accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tokencomp/assets/tiny-llava", help="a tiny-llava checkpoint folder")
    ap.add_argument("--per-type", type=int, default=40, help="validation questions per type")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the table here (markdown) as well")
    args = ap.parse_args()
    if args.per_type < 1:
        raise SystemExit("--per-type must be at least 1")
    if not (Path(args.model) / "model.safetensors").exists():
        raise SystemExit(f"--model: no model.safetensors in {args.model}")
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    text = table(diagnose(model, processor, args.per_type, SPLIT_SEED["val"] + 6_000_000), args.model)
    print(text)
    if args.out:
        args.out.write_text(
            text + f"\nCommand: `python experiments/diagnose_attention.py --model {args.model} "
            f"--per-type {args.per_type}`\n"
        )


if __name__ == "__main__":
    main()
