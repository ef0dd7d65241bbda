"""Linear probes of a LLaVA checkpoint's vision features: how well each per-patch scene property
(colour, shape, size of the object over the patch, the tag character, object centres) can be read
from the feature layer the projector sees (``vision_feature_layer``), on generated tc-scenes.

The language model can only answer a question type if the features carry its evidence: this is the
first thing to check when a type stays at chance. Usage::

    python experiments/probe_tower.py --model tiny-llava --out experiments/results/embedded/tower-probe.md

Fits a linear soft-max probe per property on ``--train`` scenes (object patches only, full batch,
Adam) and reports its accuracy on ``--test`` other scenes, next to the majority-class rate. Then
the linear code of position: the R^2 of a least-squares read-out of every patch's row and column
from the feature layer and from the projector's output (the visual tokens the decoder sees);
position questions need their difference between two objects, which a decoder head reads linearly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny as T  # noqa: E402  (the recipe's per-patch targets)

import tokencomp as tc  # noqa: E402

PROPERTIES = ["colour", "shape", "size", "character", "centre"]


@torch.no_grad()
def features(model, seeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-layer patch features ``(N * 576, d)``, the projector's output for them
    ``(N * 576, d_text)`` and per-patch targets ``(N * 576, 7)`` (see ``T.view_targets``)."""
    hf = model.hf
    layer = hf.config.vision_feature_layer
    xs, ps, ys = [], [], []
    for s in seeds:
        scene = T.make_scene(s, (336, 336), **T.LLAVA_TAG)
        pix = model.processor.image_processor(scene.image, return_tensors="pt")["pixel_values"]
        f = hf.model.vision_tower(pixel_values=pix, output_hidden_states=True).hidden_states[layer][0, 1:]
        xs.append(f)
        ps.append(hf.model.multi_modal_projector(f))
        ys.append(torch.from_numpy(T.view_targets(scene, T.label_map(scene), (0, 0, 336, 336))[0].T))
    return torch.cat(xs), torch.cat(ps), torch.cat(ys)


def linear_r2(xtr, ytr, xte, yte) -> list[float]:
    """Test R^2 of a least-squares linear read-out (with bias) of each column of ``y`` from ``x``."""
    ones = lambda x: torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)  # noqa: E731
    w = torch.linalg.lstsq(ones(xtr), ytr.double()).solution
    err = ((ones(xte) @ w - yte) ** 2).sum(0)
    return (1 - err / ((yte - yte.mean(0)) ** 2).sum(0)).tolist()


def probe(xtr, ytr, xte, yte, steps: int = 300) -> tuple[float, float]:
    """(test accuracy of a linear probe, majority-class rate on the test patches)."""
    lin = torch.nn.Linear(xtr.shape[1], int(max(ytr.max(), yte.max())) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(lin(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (lin(xte).argmax(-1) == yte).float().mean().item()
    majority = torch.bincount(yte).max().item() / len(yte)
    return acc, majority


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llava", help="embedded name or local checkpoint path")
    ap.add_argument("--train", type=int, default=300, help="scenes to fit the probes on")
    ap.add_argument("--test", type=int, default=80, help="scenes to score them on")
    ap.add_argument("--out", type=Path, help="write the table here (markdown) as well")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = tc.load_model(args.model)
    xtr, ptr, ytr = features(model, range(900_000, 900_000 + args.train))  # train-range seeds, unused elsewhere
    xte, pte, yte = features(model, range(990_000, 990_000 + args.test))
    rows = ["| property (patches) | probe accuracy | majority class | test patches |", "|---|---|---|---|"]
    for i, name in enumerate(PROPERTIES):
        # the character on tag patches; the rest on object patches (centre: is it the object's centre)
        on_tr = ytr[:, 3] > 0 if i == 3 else ytr[:, 0] > 0
        on_te = yte[:, 3] > 0 if i == 3 else yte[:, 0] > 0
        acc, maj = probe(xtr[on_tr], ytr[on_tr, i], xte[on_te], yte[on_te, i])
        where = "tag" if i == 3 else "object"
        rows.append(f"| {name} ({where}) | {acc:.3f} | {maj:.3f} | {int(on_te.sum())} |")
    rows += ["", "| linear code of position (all patches) | R^2 row | R^2 column |", "|---|---|---|"]
    for name, tr, te in (("feature layer", xtr, xte), ("projector output", ptr, pte)):
        r2 = linear_r2(tr, ytr[:, 5:].double(), te, yte[:, 5:].double())
        rows.append(f"| {name} | {r2[0]:.3f} | {r2[1]:.3f} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        cmd = f"python experiments/probe_tower.py --model {args.model} --train {args.train} --test {args.test}"
        args.out.write_text(f"# Linear probes of {args.model}'s vision features\n\n`{cmd}`\n\n{table}\n")


if __name__ == "__main__":
    main()
