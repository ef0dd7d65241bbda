"""Position answers of a LLaVA-NeXT model on tc-scenes-next, split by whether the two objects lie in
one AnyRes crop or in two.

The tiny tower codes a patch's row and column within its own 336 px view (``train_tiny`` stage 1c),
so in a crop it says where a patch lies in that crop, not in the scene. If a model answers position
questions from crop tokens, it can be right when both objects share a crop and must work out the crops'
places from the token order when they do not. This script reads a harness predictions file
(``<run>/predictions/<cell>.jsonl`` of a ``tokencomp compare`` run over a ``tc-scenes-next`` split),
regenerates each position question's scene from its seed, and prints accuracy per (axis, scene larger
than one crop along it, same or different crop) as a markdown table. tc-scenes-next's sizes
(``NEXT_SIZES``) are tiled by AnyRes without resampling, so crop k along an axis covers scene pixels
[336 k, 336 k + 336). Usage::

    python experiments/position_by_crop.py runs/embedded-300/predictions/identity-c9cc878b35.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from tokencomp.benchmark import PRESETS, SPLIT_SEED, split_sample

CROP = 336  # AnyRes crop side in scene pixels for NEXT_SIZES


def crop_table(rows: list[dict]) -> dict[tuple[str, bool, bool], list[float]]:
    """Position rows (harness predictions with ``id`` = "<split>-<seed>", ``score``) grouped by
    (axis "left/right" or "above/below", the scene spans more than one crop along that axis, the two
    objects lie in the same crop along it): the list of their scores."""
    groups: dict[tuple[str, bool, bool], list[float]] = defaultdict(list)
    for r in rows:
        split, seed = r["id"].rsplit("-", 1)
        if split not in SPLIT_SEED:
            raise SystemExit(f"{r['id']!r}: not a tc-scenes id (<split>-<seed>)")
        scene, qa = split_sample(int(seed), "position", **PRESETS["tc-scenes-next"])
        w, h = scene.image.size
        if qa is None or [qa.answer] != r["answers"]:
            raise SystemExit(f"{r['id']}: the regenerated question does not match; not a tc-scenes-next split?")
        (a,), (b,) = qa.evidence[:2]
        ca, cb = scene.objects[a].center, scene.objects[b].center
        axis = 0 if qa.answer in ("left", "right") else 1  # x for left / right, y for above / below
        spans = (w, h)[axis] > CROP
        groups[("left/right", "above/below")[axis], spans, ca[axis] // CROP == cb[axis] // CROP].append(r["score"])
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", type=Path, help="a harness predictions JSONL over a tc-scenes-next split")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("type") == "position"]
    if not rows:
        raise SystemExit(f"{args.predictions}: no position questions")
    print(f"{args.predictions}: {len(rows)} position questions\n")
    print("| axis | scene spans more than one crop along it | objects | right / asked | accuracy |")
    print("|---|---|---|---|---|")
    for (axis, spans, same), scores in sorted(crop_table(rows).items()):
        where = "same crop" if same else "different crops"
        print(
            f"| {axis} | {'yes' if spans else 'no'} | {where} | {sum(scores):g} / {len(scores)} | {np.mean(scores):.2f} |"
        )


if __name__ == "__main__":
    main()
