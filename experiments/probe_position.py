"""Where a trained tiny-llava loses the position of the two objects a ``position`` question names.

A position answer needs a chain of linear codes: every visual token's (row, column) at the input of
the decoder layer whose heads 0 and 1 ``train_tiny.py`` teaches to look at the two objects
(``TAUGHT_LAYER``), then the two heads' outputs (their attention-weighted values) differing by the
objects' offset, then that layer's output at the answer position. This script fits ridge read-outs
of each link on single-turn ``position`` questions from training scenes and scores them (R^2) on
validation scenes, and counts the model's answers against the true ones. Usage::

    python experiments/probe_position.py --model tokencomp/assets/tiny-llava \\
        --out experiments/results/embedded/position-probe.md

A link with R^2 near 0 (or below: the read-out does worse than the mean) is where the chain breaks.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny as T  # noqa: E402  (the recipe's prompts and scene geometry)

from tokencomp.benchmark import SPLIT_SEED  # noqa: E402


@torch.no_grad()
def collect(model, processor, seed0: int, n: int) -> dict:
    """Captures of ``n`` single-turn position questions from seeds ``seed0`` on: the taught layer's
    output at the answer ``(n, d)``, the taught heads' outputs ``(n, 2 * head_dim)``, every 7th visual
    token at the layer's input with its (row, column) ``(n * 83, d)`` / ``(n * 83, 2)``, the objects'
    offset in patches ``(n, 2)`` and (question, answer, greedy answer) rows."""
    layer = model.model.language_model.layers[T.TAUGHT_LAYER]
    attn = layer.self_attn
    tok = processor.tokenizer
    got: dict = {k: [] for k in ("out", "heads", "tokens", "grid", "offset", "answers")}
    seen: dict = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args: seen.update(input=args[0])),
        layer.register_forward_hook(lambda _m, _a, out: seen.update(out=out[0] if isinstance(out, tuple) else out)),
        attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.update(heads=args[0])),
    ]
    rng, seed = random.Random(0), seed0
    try:
        while len(got["offset"]) < n:
            scene, turns = T.conversation(seed, (336, 336), T.LLAVA_TAG, ["position"], rng)
            seed += 1
            if not turns:
                continue
            question, answer, _, evidence = turns[0]
            ids, _, extra, (pos,) = T.encode(processor, "llava", scene.image, turns[:1], train=False)
            logits = model(input_ids=torch.tensor([ids]), **extra).logits[0, pos]
            image = [i for i, t in enumerate(ids) if t == model.config.image_token_id][::7]
            (asked,), (ref,) = evidence[:2]
            where = [T._grid_xy(scene.objects[j], 336, 336) for j in (asked, ref)]
            got["out"].append(seen["out"][0, pos])
            got["heads"].append(seen["heads"][0, pos, : 2 * attn.head_dim])
            got["tokens"].append(seen["input"][0, image])
            got["grid"].append(torch.from_numpy(np.stack(np.divmod(np.arange(T.GRID * T.GRID)[::7], T.GRID), -1)))
            got["offset"].append(torch.from_numpy(where[0] - where[1]))
            got["answers"].append((question, answer, tok.convert_ids_to_tokens(int(logits.argmax()))))
    finally:
        for h in hooks:
            h.remove()
    return {
        k: v if k == "answers" else (torch.cat(v) if k in ("tokens", "grid") else torch.stack(v))
        for k, v in got.items()
    }


def ridge_r2(xtr, ytr, xte, yte, lam: float = 10.0) -> list[float]:
    """Test R^2 per column of ``y`` of a ridge read-out (standardised features, bias) fitted on train."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    design = lambda x: torch.cat([((x - mu) / sd).double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)  # noqa: E731
    x = design(xtr)
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64), x.T @ ytr.double())
    err = ((design(xte) @ w - yte.double()) ** 2).sum(0)
    return (1 - err / ((yte.double() - yte.double().mean(0)) ** 2).sum(0)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tokencomp/assets/tiny-llava", help="a tiny-llava checkpoint folder")
    ap.add_argument("--train", type=int, default=400, help="training-scene questions to fit on")
    ap.add_argument("--test", type=int, default=120, help="validation-scene questions to score on")
    ap.add_argument("--out", type=Path, help="write the table here (markdown) as well")
    args = ap.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    tr = collect(model, processor, SPLIT_SEED["train"] + 9_000_000, args.train)
    te = collect(model, processor, SPLIT_SEED["val"], args.test)
    links = [
        ("visual tokens at the taught layer's input -> their (row, column)", "tokens", "grid"),
        ("taught heads' outputs at the answer -> offset (row, column)", "heads", "offset"),
        ("taught layer's output at the answer -> offset (row, column)", "out", "offset"),
    ]
    lines = [
        f"# Position chain of {args.model}",
        "",
        f"`python experiments/probe_position.py --model {args.model} --train {args.train} --test {args.test}`",
        "",
        "| link (ridge read-out, test R^2) | row | column |",
        "|---|---|---|",
    ]
    for name, x, y in links:
        r2 = ridge_r2(tr[x], tr[y], te[x], te[y])
        lines.append(f"| {name} | {r2[0]:.2f} | {r2[1]:.2f} |")
    pairs = Counter((a, p) for _, a, p in te["answers"])
    accuracy = sum(v for (a, p), v in pairs.items() if a == p) / len(te["answers"])
    lines += [
        "",
        f"Accuracy on the {args.test} held-out (validation-split) questions: {accuracy:.3f}.",
        "",
        "| answer | model said | count |",
    ]
    lines += ["|---|---|---|"] + [f"| {a} | {p} | {v} |" for (a, p), v in sorted(pairs.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
