"""Train the embedded default models ``tiny-llava`` and ``tiny-llava-next`` on tc-scenes.

One script, fixed seed, four stages (each resumes: a stage whose output exists is skipped, and a
decoder stage stopped part-way goes on from its last validation point, ``train_lm``):

1. **tower**: a CLIP vision tower (336 px, patch 14, 576 patches + CLS) trained from scratch on
   scene views with dense targets. The CLS token of the feature layer (``vision_feature_layer=-2``)
   predicts which (colour, shape) pairs are present, how many objects of each shape there are and
   the tag's character, so CLS attention carries trained global meaning (VisionZip reads this
   layer's); every patch predicts the colour, shape and size of the object over it, the tag
   character over the tag plate, whether an object's centre lies in it, and its own row and column
   (position questions compare them). Views: 336 px LLaVA-1.5 scenes, and thumbnails and
   336 px crops of larger LLaVA-NeXT scenes. Most steps train the per-patch read-outs on
   ``WINDOW`` x ``WINDOW``-patch windows around objects (the view's forward with the other patches
   removed: ``tower_features``); every ``FULL_EVERY``-th step adds a batch of whole views.
1c. **position code** (``--position-steps``; runs before 1b, so the last layer learns on its output):
   the tower up to the feature layer learns a linear code of every patch's row and column while its
   feature layer is distilled to what it was, so a projector and decoder trained on the old features
   keep reading them (``train_tower_position``).
1b. **last layer**: the tower's last layer (which the projector never reads, so stage 1 leaves it
   untrained) learns the CLS read-outs on its pooled output, everything else frozen; GlobalCom² and
   PruMerge read that layer's CLS attention (``train_last_layer``).
2. **llava**: LLaVA-1.5 stage with the tower frozen: a two-layer MLP projector and a Llama decoder
   trained from scratch (multi-turn: every scene asks several questions, the first turn being the
   harness's single-turn prompt) with four losses:

   * the answers (cross-entropy on the answer word and EOS);
   * **taught attention**: at each answer position, heads 0 and 1 of decoder layer ``TAUGHT_LAYER``
     should attend to the question's evidence (the named object's patches; for counting and
     existence, BOS plus the centre patch of each matching object, so the share left on BOS says
     how many). A from-scratch decoder facing 576 mostly-background tokens otherwise stays at the
     answer prior for hundreds of steps (measured in the earlier recipe: validation accuracy at
     chance after 260 steps of batch 16, and still at chance on every type but ``read`` after 900);
   * **naming**: at each visual token over an object the LM head names its colour and shape, over
     the tag its character (aligns the projected tokens with the answer words early);
   * **position code**: linear read-outs of each visual token's row and column, and of the two named
     objects' offset at a position turn's answer (``PositionCode``);
   * **looking**: a linear read-out of each taught head's output (its attention-weighted values) should
     tell the centroid of that head's evidence, so the two heads' difference is the offset a position
     question asks about (``looking_loss``).

   The model answers from the visual tokens alone at test time: these are training signals only.
3. **next**: ``LlavaNextForConditionalGeneration`` initialised from stage 2 (same tower, projector and
   decoder, new ``image_newline``) and fine-tuned on larger images (AnyRes: thumbnail + up to 4 crops)
   whose small tags are readable only in the crops.

Stages 2 and 3 log training loss and validation accuracy (greedy first answer token, which is the
whole answer: every answer is one word) per question type. Usage::

    python experiments/train_tiny.py --work runs/train-tiny --out tokencomp/assets
    # longer decoder training from the shipped weights (stage 1 skipped, stage 1b run again):
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --llava-steps 2000 \
        --scene-offset 200000 ...
    # longer NeXT fine-tune from the shipped NeXT weights (the LLaVA-1.5 model left as it is):
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --llava-steps 0 \
        --next-init-from tokencomp/assets/tiny-llava-next --next-steps 150 --out runs/next/assets

The shipped checkpoints come from runs of this script: tiny-llava from seven, tiny-llava-next from those
seven and four NeXT runs of its own. First its defaults at commit d08815d
(tower 2400 steps, LLaVA stage 600 steps, without the rules added later; 82 minutes on 2 CPU cores),
then a continuation with de-duplicated turns and word-position attention targets (``conversation``,
``WORD_TARGETS``; 63 minutes), then one with the position-code losses (``PositionCode``; 76 minutes:
LLaVA stage 1789 s, NeXT stage 200 steps, 2755 s), stage 1b alone (the last of the NeXT model's), stage
1c with a LLaVA continuation, a LLaVA continuation with the looking loss, and one on new scenes
(``--scene-offset``). A NeXT continuation of the NeXT model then shipped (thumbnail-taught, with the tower
from before stage 1c) on the stage-1c tower was not shipped: its validation accuracy came back to
that model's (0.65 after 75 steps, 0.695 after 150), with position at 0.40, below its prior. The
shipped tiny-llava-next is a new NeXT stage from the last tiny-llava, taught on its crops, and three
continuations of it on new scenes (the last four commands; the last teaches position on the thumbnail)::

    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --work runs/v5 \
        --out runs/v5/assets --llava-lr 1e-3 --llava-steps 1000 --next-steps 60
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --work runs/v6 \
        --out runs/v6/assets --llava-lr 1e-3 --llava-steps 600 --next-steps 200 --val-every 150
    # stage 1b only (7.5 minutes; the first three runs predate it): both models' towers get the
    # trained last layer, nothing else changes
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --llava-steps 0 \
        --next-init-from tokencomp/assets/tiny-llava-next --next-steps 0 --work runs/v8 --out runs/v8/assets
    # stage 1c (400 steps, 316 s), stage 1b again (100 steps) and 600 LLaVA steps (1620 s); its NeXT
    # stage was stopped after 20 steps (the log says so) to make room for the next run
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --position-steps 400 \
        --tower-batch 16 --last-layer-steps 100 --llava-lr 1e-3 --llava-steps 600 --val-every 150 \
        --next-init-from tokencomp/assets/tiny-llava-next --next-steps 150 --work runs/v9 --out runs/v9/assets
    # the looking loss: 600 LLaVA steps (1732 s), tower unchanged
    python experiments/train_tiny.py --init-from runs/v9/assets/tiny-llava --position-steps 0 \
        --last-layer-steps 0 --llava-lr 1e-3 --llava-steps 600 --val-every 150 --next-steps 0 \
        --work runs/v10 --out runs/v10/assets
    # the NeXT model on that tower (its own decoder continued, 2053 s): not shipped
    python experiments/train_tiny.py --init-from runs/v10/assets/tiny-llava --llava-steps 0 \
        --position-steps 0 --last-layer-steps 0 --next-init-from tokencomp/assets/tiny-llava-next \
        --next-steps 150 --val-every 75 --work runs/v11 --out runs/v11/assets
    # 900 LLaVA steps on scenes no earlier run saw (--scene-offset; 2668 s)
    python experiments/train_tiny.py --init-from runs/v10/assets/tiny-llava --position-steps 0 \
        --last-layer-steps 0 --llava-lr 1e-3 --llava-steps 900 --val-every 150 --next-steps 0 \
        --scene-offset 100000 --work runs/v12 --out runs/v12/assets
    # a new NeXT model from that one, taught on its crops (--next-evidence crops)
    python experiments/train_tiny.py --init-from runs/v12/assets/tiny-llava --position-steps 0 \
        --last-layer-steps 0 --llava-steps 0 --next-steps 120 --val-every 40 --scene-offset 100000 \
        --work runs/v13 --out runs/v13/assets
    # its continuation on newer scenes (1715 s)
    python experiments/train_tiny.py --init-from runs/v12/assets/tiny-llava --position-steps 0 \
        --last-layer-steps 0 --llava-steps 0 --next-init-from runs/v13/assets/tiny-llava-next \
        --next-steps 120 --next-lr 3e-4 --val-every 60 --scene-offset 200000 --work runs/v14 --out runs/v14/assets
    # a longer, position-heavier continuation of that (3675 s)
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --position-steps 0 \
        --last-layer-steps 0 --llava-steps 0 --next-init-from tokencomp/assets/tiny-llava-next \
        --next-steps 240 --next-lr 3e-4 --val-every 40 --scene-offset 300000 \
        --type-mix attribute=3,count=3,position=4,exist=2,read=1 --work runs/v15 --out runs/v15/assets
    # that one continued with position turns taught on the thumbnail (3770 s): shipped
    python experiments/train_tiny.py --init-from tokencomp/assets/tiny-llava --position-steps 0 \
        --last-layer-steps 0 --llava-steps 0 --next-init-from runs/v15/assets/tiny-llava-next \
        --next-steps 240 --next-lr 5e-4 --val-every 40 --scene-offset 400000 --next-evidence position-thumbnail \
        --type-mix attribute=3,count=3,position=4,exist=2,read=1 --work runs/v16 --out runs/v16/assets

(each ``--init-from`` being the previous run's LLaVA-1.5 output, and ``--next-init-from`` the NeXT model
then shipped; in the second and third runs the NeXT stage started again from the LLaVA-1.5 weights
just written). The stage-1c run's log lines came from a first run of that stage in its own work
folder, whose ``tower-position.pt`` the run above then loaded. The logs are in
experiments/results/embedded/train-log.jsonl, one after the other. ``--device cuda`` uses a GPU. Every
continuation before ``--scene-offset`` drew its training scenes from the start of the train seed range
again.

Status (2026-11-24): validation accuracy (200 questions) of the LLaVA-1.5 model 0.615 after the first
run, 0.735 after the second, 0.755 after the third, 0.785 after stage 1c, 0.81 after the looking loss
(attribute 0.75, count 0.90, exist 0.80, position 0.60, read 1.0), 0.895 after 900 steps on new scenes
(0.80 / 0.85 / 0.885 / 0.905 / 0.895 every 150 steps; attribute 0.85, count 0.90, exist 0.875,
position 0.85, read 1.0): the earlier continuations' plateau was largely their re-seeing the same
scenes. Of the NeXT model 0.55, 0.57, 0.695, and 0.745 / 0.765 / 0.81 (every 40 steps) for the new
crop-taught NeXT stage (attribute 0.625, count 0.825, exist 0.80, position 0.80, read 1.0), 0.785 /
0.805 for its continuation (attribute 0.75, count 0.825, exist 0.825, position 0.625, read 1.0). On
the harness (``tokencomp compare``, greedy generation, its own question draw) the NeXT model scores
0.845 on 200 validation questions after the continuation (0.74 before it; 0.715 for the
thumbnail-taught model) and 0.80 on the 60 test questions (0.683; 0.733); tiny-llava 0.92 on the 300
test questions. Position was long at its prior although every
link of the chain it needs held some of it: the feature layer codes row / column linearly (R^2
0.91 / 0.92 after stage 1c, was 0.27 / 0.31: ``experiments/probe_tower.py``), and the visual tokens
still do at the taught layer's input. After stage 1c and before the looking loss, a ridge read-out of
the two named objects' offset from the taught heads' outputs explained R^2 0.26 of the row offset and
nothing of the column offset, and the model answered "left" to all 29 "right" questions among 120
(``experiments/probe_position.py``, ``results/embedded/position-probe-stage1c.md``). After the looking
loss the heads' outputs explain R^2 0.47 / 0.13 of the row / column offset, and the model answers 0.69
of those questions (above / below 55 of 68, left / right 28 of 52; ``position-probe-looking.md``);
after the 900 steps on new scenes, R^2 0.63 / 0.68 and 0.892 (above / below 58 of 68, left / right 49
of 52; ``position-probe.md``).
Before its continuation the crop-taught NeXT model answered a position word ("above", "below") to
a colour or shape question in 22 of its 26 attribute errors on those 260 harness questions (the
thumbnail-taught model: 10 of 21; tiny-llava: 0 of its 7 on the test split); after it, in 3 of 10.
On 300 test questions (``experiments/embedded.toml`` since 2026-11-24; 60 before) the NeXT model of
the v14 run scores 0.783 (attribute 0.70, count 0.767, exist 0.75, position 0.70, read 1.0): its 0.80
on 60 was the luck of a small draw, and it sat just under its bar. The position-heavier continuation above
(validation 0.81 / 0.845 / 0.84 / 0.81 / 0.835 / 0.83 every 40 steps) scores 0.793 there (attribute
0.783, count 0.75, exist 0.75, position 0.683): within the noise of 300 questions (standard error
about 0.023), so it was not shipped. Left / right stays the weak pair (19 / 30 and 17 / 30; above /
below 23 / 29 and 24 / 30), because the tower's position code (stage 1c) is relative to the view: in
a crop it says where the object lies in that crop, not in the scene. Both models answered left / right
at chance (10 and 9 of 20) when the two objects lay in different crops, and 7 and 6 of 8 when they
shared one (``experiments/position_by_crop.py``). The shipped tiny-llava-next is therefore the
position-heavier continuation continued once more with its position turns taught on the thumbnail
(``--next-evidence position-thumbnail``, the last command above; the thumbnail is the whole scene, so
its code is the scene's): validation 0.86 / 0.865 / 0.875 / 0.87 / 0.875 / 0.88 every 40 steps
(position 0.775 / 0.90 / 0.825 / 0.875 / 0.85 / 0.85); on the harness 0.887 on 300 validation
questions (the model before: 0.847) and **0.853 on the 300 test questions** (attribute 0.80, count
0.85, exist 0.767, position 0.85, read 1.0), left / right across crops 19 / 20
(but 3 / 8 within one crop, where the two objects lie close and the thumbnail halves the gap; 5 / 7 on
the validation questions: ``results/embedded/position-by-crop.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llama.modeling_llama import rotate_half

from tokencomp.benchmark import (
    CHARACTERS,
    COLORS,
    NEXT_SIZES,
    PRESETS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SPLIT_SEED,
    label_map,
    make_question,
    make_scene,
    vocabulary,
)
from tokencomp.data import TEMPLATES
from tokencomp.model import Model
from tokencomp.tiny import tiny_llava

# Architecture of both embedded models (the NeXT model shares all weights with the 1.5 one).
ARCH = dict(
    image_size=336,
    patch_size=14,
    vision_layers=4,
    vision_hidden=96,
    vision_mlp=384,
    text_layers=8,
    hidden=128,
    mlp=384,
    heads=4,
    kv_heads=2,
)
# tag settings of the benchmark presets (a 14 px plate on the patch grid; NeXT: readable in crops only)
LLAVA_TAG = {k: v for k, v in PRESETS["tc-scenes"].items() if k != "size"}
NEXT_TAG = {k: v for k, v in PRESETS["tc-scenes-next"].items() if k != "size"}
TRAIN_MIX = "attribute=3,count=3,position=2,exist=2,read=2"  # turns asked per training scene (--type-mix)
MEAN = np.array([0.481, 0.458, 0.408], dtype=np.float32)
STD = np.array([0.269, 0.261, 0.276], dtype=np.float32)
GRID, PATCH = 24, 14
TAUGHT_LAYER = 3  # decoder layer whose heads 0 and 1 are taught where the evidence lies
ATTN_WEIGHT = 1.0  # weight of that attention loss (see evidence_target)
# Also teach those heads at the question's last attribute word ("... the red circle ?": at "circle")
# for attribute, count and exist turns, with the same evidence target: there the query is the word's
# own embedding (plus its neighbour), an easier match than at the answer position, whose query must
# first gather the named words. Without it the heads put 0.72 (count) / 0.78 (exist) of their
# attention on BOS and 0.047 / 0.027 on the matching objects' centres after 600 steps (40 validation
# questions per type: experiments/results/embedded/taught-attention.md, checkpoint of d08815d).
WORD_TARGETS = True
NAMING_WEIGHT = 0.3  # weight of naming what lies under each visual token (see naming_targets)
POSITION_WEIGHT = 1.0  # weight of the two linear position-code losses (see PositionCode)
LOOKING_WEIGHT = 1.0  # weight of the taught heads' "where I look" read-out (see looking_loss)


def log(path: Path, **row) -> None:
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def autocast(args) -> torch.autocast:
    """bf16 autocast of the decoder stages' forward (``--precision bf16``; weights stay fp32). Measured
    on 2 CPU cores (AVX512-BF16): forward + backward of a batch-16 LLaVA step 2.25 s against 3.4 s in
    fp32 (the whole step, with data and optimiser: ~2.7 s)."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


# ----------------------------------------------------------------------------------------------
# Stage 1: the vision tower
# ----------------------------------------------------------------------------------------------

# per-patch read-outs: colour, shape, size, character, object centre (by shape), row, column
PATCH_HEADS = [1 + len(COLORS), 1 + len(SHAPES), 1 + len(SIZES), 1 + len(CHARACTERS), 1 + len(SHAPES), GRID, GRID]
HEAD_WEIGHT = [1.0, 2.0, 1.0, 1.0, 2.0, 0.2, 0.2]  # shape is the hard one (see experiments/probe_tower.py)
# Object-patch losses are averaged over object patches; background patches weigh this much. (The
# earlier 5x-per-object-patch weighting left object patches at ~10% of the loss, as 2.2% of the
# tower's training-view patches are object patches; measured, a tower trained 150 steps with it on
# shape alone had weighted loss 0.2 and object-patch accuracy at chance.)
BACKGROUND_WEIGHT = 0.2
# Most tower steps see windows of WINDOW x WINDOW patches around objects (the forward of a view
# with every other patch removed): ~9x cheaper than a whole view and ~10x denser in object patches.
# Every FULL_EVERY-th step also trains on whole views (CLS read-outs, the tag, full-view context).
WINDOW = 6
FULL_EVERY = 4
N_PATCH_OUT = sum(PATCH_HEADS)
N_PAIRS = len(COLORS) * len(SHAPES)
N_CLS_OUT = N_PAIRS + len(SHAPES) * 5 + (1 + len(CHARACTERS))
TAG_OUT = slice(N_PAIRS + len(SHAPES) * 5, N_CLS_OUT)  # the CLS read-outs' tag-character logits


def _cover(scene, labels: np.ndarray, region: tuple[int, int, int, int], grid: tuple[int, int] = (GRID, GRID)):
    """Per patch of the view ``region`` (x0, y0, x1, y1) of the scene resized to ``grid`` (rows, cols)
    patches (default: one 336 px view): which label covers most of it (0 background, j + 1 object j,
    k + 1 the tag) and whether that cover exceeds 20%."""
    x0, y0, x1, y1 = region
    gh, gw = grid
    lab = Image.fromarray(labels[y0:y1, x0:x1].astype(np.uint8)).resize((gw * PATCH, gh * PATCH), Image.NEAREST)
    lab = np.asarray(lab).astype(np.int64)
    k = len(scene.objects)
    frac = np.stack([(lab == j).reshape(gh, PATCH, gw, PATCH).mean((1, 3)) for j in range(k + 2)])
    frac[0] = 0  # background never "covers"
    return frac.argmax(0), frac.max(0) > 0.2


def _centre(o, region, grid: tuple[int, int] = (GRID, GRID)) -> tuple[int, int] | None:
    """(row, col) of the patch of view ``region`` (resized to ``grid`` patches) holding object ``o``'s
    centre (None if outside)."""
    x0, y0, x1, y1 = region
    cx, cy = o.center
    if not (x0 <= cx < x1 and y0 <= cy < y1):
        return None
    gh, gw = grid
    sx, sy = gw * PATCH / (x1 - x0), gh * PATCH / (y1 - y0)
    return min(gh - 1, int((cy - y0) * sy / PATCH)), min(gw - 1, int((cx - x0) * sx / PATCH))


def view_targets(scene, labels: np.ndarray, region: tuple[int, int, int, int]):
    """Targets of one 336 px view = ``region`` (x0, y0, x1, y1) of the scene, resized to 336."""
    cover, hit = _cover(scene, labels, region)
    k = len(scene.objects)
    colour = np.zeros((GRID, GRID), np.int64)
    shape = np.zeros((GRID, GRID), np.int64)
    size = np.zeros((GRID, GRID), np.int64)
    char = np.zeros((GRID, GRID), np.int64)
    centre = np.zeros((GRID, GRID), np.int64)
    pairs = np.zeros(N_PAIRS, np.float32)
    counts = np.zeros(len(SHAPES), np.int64)
    for j, o in enumerate(scene.objects):
        m = hit & (cover == j + 1)
        colour[m] = 1 + list(COLORS).index(o.color)
        shape[m] = 1 + SHAPES.index(o.shape)
        size[m] = 1 + SIZES.index(o.size)
        rc = _centre(o, region)
        if rc is not None:
            centre[rc] = 1 + SHAPES.index(o.shape)
            pairs[list(COLORS).index(o.color) * len(SHAPES) + SHAPES.index(o.shape)] = 1
            counts[SHAPES.index(o.shape)] += 1
    m = hit & (cover == k + 1)
    char[m] = 1 + CHARACTERS.index(scene.char)
    tag = 1 + CHARACTERS.index(scene.char) if m.any() else 0
    row, col = np.indices((GRID, GRID))  # kept in the features: position questions compare them
    patch = np.stack([colour, shape, size, char, centre, row, col]).reshape(7, -1)
    return patch, pairs, np.minimum(counts, 4), tag


def evidence_target(scene, keys: Keys, qtype: str, evidence) -> np.ndarray | None:
    """Where the answer's evidence lies among the visual ``keys``' n patches, as the attention
    distribution the taught heads should have at the answer position: ``(2, 1 + n)`` over (BOS,
    patches), one row per taught head (the second evidence group for ``position``, else the first
    again).

    ``attribute``, ``position``, ``read``: uniform over the named object's patches. ``count`` and
    ``exist``: uniform over BOS and the centre patch of each matching object, so the share left on
    BOS tells how many there are (1 / (n + 1); all of it when none matches)."""
    gw = keys.shape[1]
    rows = []
    for group in evidence[:2]:
        t = np.zeros(1 + len(keys.positions), np.float32)
        if qtype in ("count", "exist"):
            t[0] = 1
            for j in group:
                rc = _centre(scene.objects[j], keys.region, keys.shape)
                if rc is not None:
                    t[1 + rc[0] * gw + rc[1]] = 1
        else:
            for j in group:
                t[1:][keys.hit & (keys.cover == j + 1)] = 1
        if t.sum() == 0:
            return None
        rows.append(t / t.sum())
    return np.stack([rows[0], rows[-1]])


def scene_code(frac: np.ndarray) -> np.ndarray:
    """The position code of a patch whose centre lies at fraction ``frac`` of the scene's height (or
    width), float32: a 336 px view's patch r (centre at (r + 0.5) / 24) gets r / 23 * 2 - 1, in
    [-1, 1]; the same scale covers any patch grid over the scene, so a LLaVA-NeXT crop's patch and
    the thumbnail's patch over the same place get the same code."""
    return ((frac * GRID - 0.5) / (GRID - 1) * 2 - 1).astype(np.float32)


def scaled_grid() -> torch.Tensor:
    """``scene_code`` of every patch of one 24 x 24 view: ``(576, 2)`` float32 (row, column), raster
    order (the target of the linear position read-outs of stage 1c and ``PositionCode``)."""
    row, col = np.indices((GRID, GRID))
    code = np.stack([scene_code((row + 0.5) / GRID), scene_code((col + 0.5) / GRID)], -1)
    return torch.from_numpy(code.reshape(-1, 2))


def tower_views(rng: random.Random, seed: int):
    """A few (pixels 336x336x3 uint8, targets) views of one scene: a 1.5 scene, or a NeXT scene's
    thumbnail and two random crops."""
    if rng.random() < 0.5:
        scene = make_scene(seed, (336, 336), **LLAVA_TAG)
        regions = [(0, 0, 336, 336)]
    else:
        h, w = rng.choice(NEXT_SIZES)
        scene = make_scene(seed, (h, w), **NEXT_TAG)
        regions = [(0, 0, w, h)]
        for _ in range(2):
            # crops on the 14 px grid, as LLaVA-NeXT's tiles of these sizes are
            x, y = PATCH * rng.randrange(0, (w - 336) // PATCH + 1), PATCH * rng.randrange(0, (h - 336) // PATCH + 1)
            regions.append((x, y, x + 336, y + 336))
        tr, tc_ = scene.tag_box[1] // PATCH, scene.tag_box[0] // PATCH
        x = min(max(0, (tc_ - rng.randrange(2, 22)) * PATCH), w - 336)  # a crop that holds the tag
        y = min(max(0, (tr - rng.randrange(2, 22)) * PATCH), h - 336)
        regions.append((x, y, x + 336, y + 336))
    labels = label_map(scene)
    out = []
    for reg in regions:
        pix = np.asarray(scene.image.crop(reg).resize((336, 336), Image.BICUBIC))
        out.append((pix, *view_targets(scene, labels, reg)))
    return out


def view_batches(rng: random.Random, seed: int, size: int):
    """Endless batches of ``size`` whole views (see ``tower_views``) of scenes ``seed``, ``seed + 1``, ..."""
    views: list = []
    while True:
        while len(views) < size:
            views += tower_views(rng, seed)
            seed += 1
        batch, views = views[:size], views[size:]
        yield batch


def object_windows(pix: np.ndarray, patch: np.ndarray, rng: random.Random, size: int = WINDOW):
    """Windows of ``size`` x ``size`` patches cut from one 336 px view, one around each object whose
    centre patch lies in the view (at a random offset that keeps that patch inside): (pixels
    ``(14 size, 14 size, 3)`` uint8, targets ``(7, size**2)``, patch indices ``(size**2,)`` into the
    view's 24 x 24 grid). Objects fill ~20% of a window's patches against ~2% of a whole view's."""
    out = []
    for r, c in zip(*np.nonzero(patch[4].reshape(GRID, GRID))):
        # the centre patch at least one patch in from the window's edges (where the grid allows)
        r0, c0 = (rng.randint(*(min(max(0, v), GRID - size) for v in (x - size + 2, x - 1))) for x in (r, c))
        rows, cols = np.meshgrid(np.arange(r0, r0 + size), np.arange(c0, c0 + size), indexing="ij")
        idx = (rows * GRID + cols).reshape(-1)
        out.append((pix[r0 * PATCH : (r0 + size) * PATCH, c0 * PATCH : (c0 + size) * PATCH], patch[:, idx], idx))
    return out


def tower_features(tower, pixel_values: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """The tower's feature layer (``hidden_states[-2]``, CLS first) for ``pixel_values`` ``(B, 3, h, w)``.
    ``index`` ``(B, n)``: the patch positions (in the 24 x 24 grid) of a window's ``n`` patches, which
    receive those positions' embeddings; the forward then equals the full view's with every other
    patch removed. None: the whole view, via the model's own forward."""
    if index is None:
        return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    emb = tower.embeddings
    pos = emb.position_embedding.weight
    x = emb.patch_embedding(pixel_values.to(pos.dtype)).flatten(2).transpose(1, 2) + pos[1 + index]
    cls = (emb.class_embedding + pos[0]).expand(x.shape[0], 1, -1)
    h = tower.pre_layrnorm(torch.cat([cls, x], 1))
    for layer in tower.encoder.layers[:-1]:
        h = layer(h, None)
    return h


def stacked(rows, i: int, device, join=np.stack) -> torch.Tensor:
    """Field ``i`` of every row (numpy arrays), joined by ``join`` (stack or concatenate) on ``device``."""
    return torch.from_numpy(join([r[i] for r in rows])).to(device)


def _pixels(batch) -> torch.Tensor:
    """Normalised ``(B, 3, h, w)`` float pixels from the uint8 images of a batch of views/windows."""
    pix = ((np.stack([b[0] for b in batch]) / 255.0 - MEAN) / STD).astype(np.float32)
    return torch.from_numpy(pix).permute(0, 3, 1, 2)


class TowerHeads(nn.Module):
    """Linear read-outs of the feature layer: per patch and on CLS."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.patch = nn.Linear(d, N_PATCH_OUT)
        self.cls = nn.Linear(d, N_CLS_OUT)

    def forward(self, feats: torch.Tensor):
        h = self.norm(feats)
        return self.cls(h[:, 0]), self.patch(h[:, 1:])


def patch_loss(patch_out: torch.Tensor, patch_t: torch.Tensor) -> torch.Tensor:
    """Loss of the per-patch read-outs ``patch_out`` ``(B, n, N_PATCH_OUT)`` against ``patch_t``
    ``(B, 7, n)`` (see ``view_targets``)."""
    loss, start = 0.0, 0
    for i, n in enumerate(PATCH_HEADS):
        logits = patch_out[..., start : start + n].reshape(-1, n)
        tgt = patch_t[:, i].reshape(-1)
        if i == 3:  # the character: a 26-way read-out on the tag patches only (a handful per view)
            on_tag = tgt > 0
            if on_tag.any():
                loss = loss + F.cross_entropy(logits[on_tag], tgt[on_tag])
        elif i >= 5:  # row, column
            loss = loss + HEAD_WEIGHT[i] * F.cross_entropy(logits, tgt)
        else:  # object patches are rare (~3%): average over them, background at a small weight
            ce = F.cross_entropy(logits, tgt, reduction="none")
            on = tgt > 0
            obj = ce[on].mean() if on.any() else ce.sum() * 0
            loss = loss + HEAD_WEIGHT[i] * (obj + BACKGROUND_WEIGHT * ce[~on].mean())
        start += n
    return loss


def cls_loss(cls_out: torch.Tensor, pairs_t, counts_t, tag_t) -> torch.Tensor:
    """Loss of the CLS read-outs ``cls_out`` ``(B, N_CLS_OUT)``: which (colour, shape) pairs are present,
    how many objects of each shape (0-4), the tag's character."""
    loss = F.binary_cross_entropy_with_logits(cls_out[:, :N_PAIRS], pairs_t)
    counts = cls_out[:, N_PAIRS : N_PAIRS + len(SHAPES) * 5].reshape(-1, len(SHAPES), 5)
    loss = loss + F.cross_entropy(counts.reshape(-1, 5), counts_t.reshape(-1))
    return loss + F.cross_entropy(cls_out[:, TAG_OUT], tag_t)


def tower_loss(heads: TowerHeads, feats, patch_t, pairs_t, counts_t, tag_t):
    """Per-patch losses plus the CLS read-outs of a batch of whole views."""
    cls_out, patch_out = heads(feats)
    loss = patch_loss(patch_out, patch_t) + cls_loss(cls_out, pairs_t, counts_t, tag_t)
    return loss, cls_out, patch_out


def _acc(out: torch.Tensor, target: torch.Tensor, head: int, on: torch.Tensor) -> float:
    """Accuracy of per-patch read-out ``head`` over the patches selected by ``on``."""
    start = sum(PATCH_HEADS[:head])
    hit = out[..., start : start + PATCH_HEADS[head]].argmax(-1) == target[:, head]
    return round(hit[on].float().mean().item(), 3)


def train_tower(args, model, logf: Path) -> None:
    tower = model.model.vision_tower
    heads = TowerHeads(tower.config.hidden_size).to(args.device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.tower_lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    seed = SPLIT_SEED["train"] + 5_000_000  # tower scenes: a train-range block of their own
    tower.train()
    views: list = []
    windows: list = []
    t0 = time.time()
    for step in range(args.tower_steps):
        full = step % FULL_EVERY == 0
        while len(windows) < args.window_batch or (full and len(views) < args.tower_batch):
            for view in tower_views(rng, seed):
                windows.extend(object_windows(view[0], view[1], rng))
                views.append(view)
            views = views[-4 * args.tower_batch :]  # whole views are needed less often than windows
            seed += 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.tower_steps, args.tower_lr)
        batch, windows = windows[: args.window_batch], windows[args.window_batch :]
        index = stacked(batch, 2, args.device)
        _, patch_out = heads(tower_features(tower, _pixels(batch).to(args.device), index))
        patch_t = stacked(batch, 1, args.device)
        loss = patch_loss(patch_out, patch_t)
        if full:
            batch, views = views[: args.tower_batch], views[args.tower_batch :]
            full_t = [stacked(batch, i, args.device) for i in (1, 2, 3)]
            tag_t = torch.tensor([b[4] for b in batch], device=args.device)
            feats = tower_features(tower, _pixels(batch).to(args.device))
            full_loss, cls_out, full_out = tower_loss(heads, feats, *full_t, tag_t)
            loss = loss + full_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % (25 * FULL_EVERY) == 0 or step == args.tower_steps - 1:
            with torch.no_grad():
                row = dict(stage="tower", step=step, loss=round(loss.item(), 4))
                obj = patch_t[:, 0] > 0
                row.update(
                    window_shape_acc=_acc(patch_out, patch_t, 1, obj), window_size_acc=_acc(patch_out, patch_t, 2, obj)
                )
                row.update(window_centre_acc=_acc(patch_out, patch_t, 4, patch_t[:, 4] > 0))
                if full:
                    view_t = full_t[0]
                    obj = view_t[:, 0] > 0
                    row.update(
                        object_patch_colour_acc=_acc(full_out, view_t, 0, obj),
                        object_patch_shape_acc=_acc(full_out, view_t, 1, obj),
                        tag_patch_char_acc=_acc(full_out, view_t, 3, view_t[:, 3] > 0),
                        centre_patch_shape_acc=_acc(full_out, view_t, 4, view_t[:, 4] > 0),
                        cls_tag_acc=round((cls_out[:, TAG_OUT].argmax(-1) == tag_t).float().mean().item(), 3),
                    )
                log(logf, **row, seconds=round(time.time() - t0))
    tower.eval()


POSITION_CODE_WEIGHT = 4.0  # stage 1c: weight of the position read-out against feature distillation


def train_tower_position(args, model, logf: Path, steps: int) -> None:
    """Stage 1c: a linear code of position in the feature layer, the rest of the features kept.

    Stage 1's 24-way row and column read-outs leave little *linear* position in the feature layer
    (R^2 0.27 / 0.31 for row / column, ``experiments/probe_tower.py``), and a decoder head compares two
    objects' positions linearly (the difference of its values at the two objects). Here the tower up to
    the feature layer (embeddings, ``pre_layrnorm`` and the layers the feature layer comes from) is
    fine-tuned on whole views with two losses: a linear read-out of every patch's (row, column), scaled
    to [-1, 1] (mean squared error, weight ``POSITION_CODE_WEIGHT``), and the distance of the feature
    layer to that of the tower before this stage (mean squared error over the features' variance), so a
    projector and decoder already trained on the old features go on reading them."""
    tower = model.model.vision_tower
    teacher = type(tower)(tower.config).to(args.device)
    teacher.load_state_dict(tower.state_dict())
    teacher.requires_grad_(False).eval()
    trained = nn.ModuleList([tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers[:-1]])
    tower.requires_grad_(False)
    trained.requires_grad_(True)
    grid = scaled_grid().to(args.device)
    # (a train-range block of its own)
    batches = view_batches(random.Random(args.seed + 3), SPLIT_SEED["train"] + 7_000_000, args.tower_batch)
    first = next(batches)
    head = nn.Linear(tower.config.hidden_size, 2).to(args.device)
    with torch.no_grad():  # the read-out starts as the least-squares fit to the features as they are
        feats = tower_features(teacher, _pixels(first).to(args.device))[:, 1:].flatten(0, 1)
        x = torch.cat([feats, torch.ones(len(feats), 1, device=feats.device)], 1).double()
        w = torch.linalg.lstsq(x, grid.repeat(args.tower_batch, 1).double()).solution.float()
        head.weight.copy_(w[:-1].T)
        head.bias.copy_(w[-1])
    lr = args.tower_lr / 4
    opt = torch.optim.AdamW(
        [{"params": list(trained.parameters()), "peak": lr}, {"params": list(head.parameters()), "peak": 10 * lr}],
        weight_decay=0.0,
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    t0 = time.time()
    tower.train()
    for step, batch in zip(range(steps), itertools.chain([first], batches)):
        pix = _pixels(batch).to(args.device)
        with torch.no_grad():
            old = tower_features(teacher, pix)
        feats = tower_features(tower, pix)
        keep = F.mse_loss(feats, old) / old.var()
        code = F.mse_loss(head(feats[:, 1:]), grid.expand(len(batch), -1, -1))
        loss = keep + POSITION_CODE_WEIGHT * code
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, g["peak"], warmup=20)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            # R^2 of the read-out on this batch: 1 - mse / variance of the scaled grid
            r2 = 1 - code.item() / grid.var(0).mean().item()
            log(
                logf,
                stage="tower-position",
                step=step,
                keep=round(keep.item(), 4),
                code_r2=round(r2, 3),
                seconds=round(time.time() - t0),
            )
    tower.requires_grad_(False)
    tower.eval()


def last_layer(tower) -> nn.ModuleList:
    """What stage 1b trains (and saves): the tower's last encoder layer and ``post_layernorm``."""
    return nn.ModuleList([tower.encoder.layers[-1], tower.post_layernorm])


def train_last_layer(args, model, logf: Path, steps: int) -> None:
    """Stage 1b: the tower's last encoder layer and ``post_layernorm``, everything else frozen.

    The projector reads the feature layer (``hidden_states[-2]``), so stage 1 never trains the last
    layer and leaves it at its random init. Methods that score tokens by that layer's CLS attention
    (GlobalCom² and PruMerge read ``layer=-1``, as their authors' code does on CLIP) then read untrained
    attention. Measured on the test split of tiny-llava-next (60 samples), GlobalCom² at R = 0.25 scores
    0.367 with ``layer=-1`` and 0.65 with ``layer=-2``; random selection at 128 tokens per view scores
    0.50. As in CLIP, whose pooled output (the last layer's CLS after ``post_layernorm``) is the image
    embedding, that pooled output is trained here on stage 1's CLS read-outs. The feature layer and
    everything after it are unchanged (checked in tests/test_train_recipe.py)."""
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    last = last_layer(tower)
    last.requires_grad_(True)
    head = nn.Linear(tower.config.hidden_size, N_CLS_OUT).to(args.device)
    params = list(last.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.tower_lr, weight_decay=0.01)
    # (a train-range block of its own)
    batches = view_batches(random.Random(args.seed + 2), SPLIT_SEED["train"] + 6_000_000, args.tower_batch)
    t0 = time.time()
    for step, batch in zip(range(steps), batches):
        with torch.no_grad():
            feats = tower_features(tower, _pixels(batch).to(args.device))  # the (frozen) feature layer
        pooled = tower.post_layernorm(tower.encoder.layers[-1](feats, None)[:, 0])  # CLIP's pooled output
        tag_t = torch.tensor([b[4] for b in batch], device=args.device)
        out = head(pooled)
        loss = cls_loss(out, *(stacked(batch, i, args.device) for i in (2, 3)), tag_t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.tower_lr)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            tag_acc = (out[:, TAG_OUT].argmax(-1) == tag_t).float().mean().item()
            log(
                logf,
                stage="last-layer",
                step=step,
                loss=round(loss.item(), 4),
                cls_tag_acc=round(tag_acc, 3),
                seconds=round(time.time() - t0),
            )
    tower.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Stages 2 and 3: the multimodal model
# ----------------------------------------------------------------------------------------------


# words that name what a question asks about (two turns naming the same ones ask the same thing)
ATTRIBUTE_WORDS = frozenset([*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES])


def parse_mix(mix: str) -> list[str]:
    """``"attribute=3,count=2"`` -> ``["attribute"] * 3 + ["count"] * 2``; a clear error on a bad mix."""
    types = []
    for part in mix.split(","):
        name, _, n = part.partition("=")
        if name.strip() not in QUESTION_TYPES or not n.strip().isdigit():
            raise SystemExit(f"--type-mix {mix!r}: expected type=count pairs, the types from {QUESTION_TYPES}")
        types += [name.strip()] * int(n)
    if not types:
        raise SystemExit(f"--type-mix {mix!r}: asks no turns")
    return types


def conversation(seed: int, size, tag: dict, types: list[str], rng: random.Random):
    """(scene, [(question, answer, type, evidence), ...]) for one scene, the turns in random order.

    A turn that repeats an earlier one (same type, same attribute words, same evidence: e.g. a second
    ``read`` or a second count of the same shape) is dropped: in a multi-turn sample its answer could
    be copied from the earlier turn instead of read from the image, and the single-turn test has no
    earlier turn (measured on 500 training scenes before this rule: 23% of the turns were repeats; 65% of
    the samples asked one count twice, and every sample asked ``read`` twice)."""
    scene = make_scene(seed, size, **tag)
    if not scene.objects:
        return scene, []
    types = types[:]
    rng.shuffle(types)
    turns, asked = [], set()
    for i, qt in enumerate(types):
        qa = make_question(np.random.default_rng(seed * 31 + i), scene.objects, scene.char, qt)
        if qa is None:
            continue
        key = (qt, frozenset(qa.question.split()) & ATTRIBUTE_WORDS, qa.evidence)
        if key not in asked:  # a repeated question's answer could be copied from the earlier turn
            asked.add(key)
            turns.append((qa.question, qa.answer, qt, qa.evidence))
    return scene, turns


def encode(processor, family: str, image, turns, train: bool):
    """Token ids (image placeholders expanded by the processor), labels, pixels of one sample and the
    position that predicts each turn's answer."""
    prompt = TEMPLATES[family].format(question=turns[0][0])
    enc = processor(images=image, text=prompt, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    answer_pos = []
    for i, (q, a, *_) in enumerate(turns):
        if i > 0:
            more = tok(f" USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += more
            labels += [-100] * len(more)
        answer_pos.append(len(ids) - 1)
        if not train:
            break
        ans = tok(f" {a}", add_special_tokens=False)["input_ids"] + [eos]
        ids += ans
        labels += ans
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return ids, labels, extra, answer_pos


def collate(items, pad_id: int, device: str):
    """Right-padded batch (training and teacher-forced validation only)."""
    n = max(len(i[0]) for i in items)
    ids = torch.full((len(items), n), pad_id)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for b, (i, lab, *_) in enumerate(items):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(i)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    extra = [i[2] for i in items]
    if "image_sizes" in extra[0]:
        views = max(e["pixel_values"].shape[1] for e in extra)
        pv = torch.zeros((len(items), views, *extra[0]["pixel_values"].shape[2:]))
        for b, e in enumerate(extra):
            pv[b, : e["pixel_values"].shape[1]] = e["pixel_values"][0]
        batch["pixel_values"] = pv
        batch["image_sizes"] = torch.cat([e["image_sizes"] for e in extra])
    else:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in extra])
    return {k: v.to(device) for k, v in batch.items()}, labels.to(device)


def validation_set(processor, family: str, size_of, tag: dict, n: int):
    """``n`` single-turn validation items from the val seed range, question types cycled."""
    items, seed = [], SPLIT_SEED["val"] + 5_000_000
    while len(items) < n:
        qt = QUESTION_TYPES[len(items) % len(QUESTION_TYPES)]
        scene, turns = conversation(seed, size_of(seed), tag, [qt], random.Random(seed))
        seed += 1
        if turns:
            ids, _, extra, _ = encode(processor, family, scene.image, turns, train=False)
            answer = processor.tokenizer(f" {turns[0][1]}", add_special_tokens=False)["input_ids"][0]
            items.append((ids, [-100] * len(ids), extra, answer, qt))
    return items


@torch.no_grad()
def validate(model, items, pad_id: int, device: str, batch: int = 8) -> dict:
    """Greedy first-token accuracy per question type; every module is left in the mode it was in."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    hits: dict[str, list[bool]] = {}
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        inputs, _ = collate([c[:3] for c in chunk], pad_id, device)
        logits = model(**inputs).logits
        last = inputs["attention_mask"].sum(1) - 1
        pred = logits[torch.arange(len(chunk)), last].argmax(-1).tolist()
        for c, p in zip(chunk, pred):
            hits.setdefault(c[4], []).append(p == c[3])
    for m, training in modes.items():
        m.train(training)
    per = {t: round(float(np.mean(v)), 3) for t, v in sorted(hits.items())}
    per["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 3)
    return per


class Keys(NamedTuple):
    """The visual tokens the taught heads are taught on, for one sample: ``n`` patches on a
    ``shape`` = (rows, cols) grid over the scene's pixel ``region`` (x0, y0, x1, y1)."""

    positions: np.ndarray  # (n,) their positions in the token sequence, raster order
    cover: np.ndarray  # (n,) label covering most of each patch (see _cover)
    hit: np.ndarray  # (n,) bool: that cover exceeds 20%
    region: tuple[int, int, int, int]
    shape: tuple[int, int]
    grid: np.ndarray  # (n, 2) float32: each patch's place in the scene (see scene_code)


class Evidence(NamedTuple):
    """One attention target: at (batch row ``b``, query position ``pos``) the taught heads should
    attend over ``cols`` = (BOS, the keys' positions) as ``target`` ``(2, len(cols))`` says; ``grid``
    ``(len(cols) - 1, 2)``: the keys' places in the scene (``scene_code``), for ``looking_loss``."""

    b: int
    pos: int
    cols: np.ndarray
    target: np.ndarray
    grid: np.ndarray


def thumbnail_keys(scene, labels: np.ndarray, image_pos: np.ndarray) -> Keys:
    """The first view's 576 patches: the LLaVA-1.5 image, or the LLaVA-NeXT thumbnail (the whole
    scene resized to 336 px); ``image_pos``: positions of the sample's image tokens."""
    w, h = scene.image.size
    cover, hit = _cover(scene, labels, (0, 0, w, h))
    return Keys(
        image_pos[: GRID * GRID], cover.reshape(-1), hit.reshape(-1), (0, 0, w, h), (GRID, GRID), scaled_grid().numpy()
    )


def crop_region(model, size: tuple[int, int]) -> tuple[int, int, int, int, int, int]:
    """The LLaVA-NeXT ``model``'s crop layout for a ``size`` (height, width) image: (crop rows, crop
    cols, r0, height, c0, width), the unpadded window of the crop grid in patches
    (``tokencomp.Model.crop_region``); the model's train / eval mode is kept."""
    training = model.training
    region = Model(model).crop_region(size)
    model.train(training)
    return region


def crop_keys(model, scene, labels: np.ndarray, image_pos: np.ndarray) -> tuple[Keys, np.ndarray]:
    """The LLaVA-NeXT crops' patches that survive unpadding (each image token after the thumbnail's
    576, row by row, each row closed by a newline token), and the position code of every token the
    projector makes for this sample: ``(1 + crops, 576, 2)``, thumbnail first, then the crops in raster
    order, NaN on the padding that unpadding drops. Needs a scene size that AnyRes tiles without
    resampling (``NEXT_SIZES``): then crop patch (R, C) of the unpadded grid covers scene pixels
    [14 R, 14 R + 14) x [14 C, 14 C + 14)."""
    w, h = scene.image.size
    rows, cols, r0, height, c0, width = crop_region(model, (h, w))
    if (height * PATCH, width * PATCH) != (h, w) or len(image_pos) != GRID * GRID + height * (width + 1):
        raise ValueError(f"a {h}x{w} scene is not tiled without resampling: crop targets need one of {NEXT_SIZES}")
    # every crop's 24 x 24 tokens, placed on the scene: canvas patch (kr * 24 + r, kc * 24 + c)
    cr, cc = np.indices((rows * GRID, cols * GRID))
    sr, sc = cr - r0, cc - c0
    canvas = np.stack([scene_code((sr + 0.5) / height), scene_code((sc + 0.5) / width)], -1)
    grid = canvas[r0 : r0 + height, c0 : c0 + width].reshape(-1, 2)  # the unpadded window: the scene
    canvas[(sr < 0) | (sr >= height) | (sc < 0) | (sc >= width)] = np.nan
    R, C = np.indices((height, width))
    positions = image_pos[GRID * GRID + R * (width + 1) + C].reshape(-1)
    cover, hit = _cover(scene, labels, (0, 0, w, h), (height, width))
    keys = Keys(positions, cover.reshape(-1), hit.reshape(-1), (0, 0, w, h), (height, width), grid)
    crops = canvas.reshape(rows, GRID, cols, GRID, 2).transpose(0, 2, 1, 3, 4).reshape(rows * cols, GRID * GRID, 2)
    return keys, np.concatenate([scaled_grid().numpy()[None], crops])


# Which LLaVA-NeXT tokens the taught heads are taught on (``--next-evidence``): "crops" (the
# full-resolution crop patches, where objects look as they do in a LLaVA-1.5 view and the tag is
# legible), "thumbnail" (the first view; the NeXT runs before 2026-11-24, which left attribute
# questions near chance: the thumbnail halves every object, so "big" ones there look like LLaVA-1.5's
# small ones) or "position-thumbnail" (position turns on the thumbnail, the rest on the crops: the
# tower codes a patch's row and column within its own view, so only the thumbnail's code says where
# in the scene a patch lies; a crop-taught model answered left / right at chance, 10 of 20, when the
# two objects lay in different crops, and 7 of 8 when they shared one).
NEXT_EVIDENCE = ("crops", "thumbnail", "position-thumbnail")


def sample_targets(model, processor, scene, turns, item, b: int, family: str, evidence: str = "crops"):
    """Auxiliary targets of one encoded training sample ``item`` (batch row ``b``). The taught heads
    are taught on its one view (LLaVA-1.5) or, for LLaVA-NeXT, on the keys ``evidence`` (one of
    ``NEXT_EVIDENCE``) names (on the thumbnail, ``read`` turns are not taught: the tag is legible only
    in the crops).

    Returns (attention targets: an ``Evidence`` per taught turn; naming targets: (row, positions
    ``(K,)``, word ids ``(K, 2)``, weights ``(K, 2)``) over every view; offset targets: per ``position``
    turn (row, answer position, ``(2,)`` = (row, column) of the object asked about minus the reference
    object's, in patches of a 336 px view of the scene / ``OFFSET_SCALE``); the position code of every
    projected token, ``(views, 576, 2)`` (see ``crop_keys``))."""
    ids, _, _, answer_pos = item
    image_pos = np.array([i for i, t in enumerate(ids) if t == model.config.image_token_id])
    w, h = scene.image.size
    labels = label_map(scene)
    thumb = thumbnail_keys(scene, labels, image_pos)
    if family == "llava":  # one view, which every turn is taught on
        crops, views, codes = thumb, [thumb], scaled_grid().numpy()[None]
    else:
        crops, codes = crop_keys(model, scene, labels, image_pos)
        views = [thumb, crops]

    def keys_for(qt: str) -> Keys:
        on_thumb = evidence == "thumbnail" or (evidence == "position-thumbnail" and qt == "position")
        return thumb if on_thumb else crops

    tok = processor.tokenizer
    named = {tok.convert_tokens_to_ids(w) for w in ATTRIBUTE_WORDS}
    turn_start = {tok.convert_tokens_to_ids("USER"), model.config.image_token_id}
    attention, offsets = [], []
    for (_, _, qt, groups), pos in zip(turns, answer_pos):
        if qt == "position":
            (asked,), (ref,) = groups[:2]
            offsets.append(
                (b, pos, (_grid_xy(scene.objects[asked], w, h) - _grid_xy(scene.objects[ref], w, h)) / OFFSET_SCALE)
            )
        keys = keys_for(qt)
        if family != "llava" and qt == "read" and keys is thumb:
            continue
        t = evidence_target(scene, keys, qt, groups)
        if t is None:
            continue
        cols = np.concatenate([[0], keys.positions])
        attention.append(Evidence(b, pos, cols, t, keys.grid))
        if WORD_TARGETS and qt in ("attribute", "count", "exist"):
            word = last_named_word(ids, pos, named, turn_start)
            if word is not None:
                attention.append(Evidence(b, word, cols, t, keys.grid))
    return attention, naming_targets(tok, scene, views, b), offsets, codes


def _grid_xy(o, w: int, h: int) -> np.ndarray:
    """(row, column) of object ``o``'s centre on the 24 x 24 patch grid of a ``w`` x ``h`` scene
    resized to one 336 px view (float32, in patches)."""
    return np.array([o.center[1] * GRID / h, o.center[0] * GRID / w], np.float32)


def last_named_word(ids: list[int], pos: int, named: set[int], turn_start: set[int]) -> int | None:
    """Position of the question's last attribute word (colour, shape, size) before the answer position
    ``pos``, searching back to the turn's start (``USER`` or an image token); None if it names none."""
    for i in range(pos, -1, -1):
        if ids[i] in turn_start:
            return None
        if ids[i] in named:
            return i
    return None


def naming_targets(tok, scene, views: list[Keys], b: int):
    """At each visual token over an object the LM head should name its colour and shape (half each);
    over the tag plate, the character. Aligns the projected tokens with the answer words long before
    the decoder has learnt to answer (the earlier recipe without it needed 300 steps to read tags)."""
    colour_ids = np.array([tok.convert_tokens_to_ids(o.color) for o in scene.objects], np.int64)
    shape_ids = np.array([tok.convert_tokens_to_ids(o.shape) for o in scene.objects], np.int64)
    char_id = tok.convert_tokens_to_ids(scene.char.lower())
    k = len(scene.objects)
    where, words = [], []
    for keys in views:
        obj = keys.hit & (keys.cover >= 1) & (keys.cover <= k)
        tag = keys.hit & (keys.cover == k + 1)
        j = keys.cover[obj] - 1
        where += [keys.positions[obj], keys.positions[tag]]
        words += [np.stack([colour_ids[j], shape_ids[j]], 1), np.full((int(tag.sum()), 2), char_id, np.int64)]
    words = np.concatenate(words)
    return b, np.concatenate(where), words, np.full(words.shape, 0.5, np.float32)


def naming_loss(logits: torch.Tensor, targets: list[tuple]) -> torch.Tensor:
    """Soft-target cross-entropy of the LM head at the visual tokens (``logits``: (B, T, V))."""
    dev = logits.device
    b = torch.cat([torch.full((len(t[1]),), t[0]) for t in targets]).to(dev)
    pos = stacked(targets, 1, dev, np.concatenate)
    words = stacked(targets, 2, dev, np.concatenate)
    weights = stacked(targets, 3, dev, np.concatenate)
    logp = logits[b, pos].log_softmax(-1).gather(1, words)
    return -(weights * logp).sum(-1).mean()


class TaughtAttention:
    """Context manager that records the inputs of ``TAUGHT_LAYER``'s self-attention during a forward
    pass (a hook removed on exit), so the taught heads' attention rows at the answer positions can be
    recomputed exactly as Llama's attention does (RoPE, GQA, causal) without materialising every
    layer's full attention matrix (``output_attentions`` with eager attention: 3x slower on CPU)."""

    def __init__(self, model) -> None:
        self.attn = model.model.language_model.layers[TAUGHT_LAYER].self_attn
        self.inputs: dict = {}

    def __enter__(self) -> TaughtAttention:
        def grab(_module, _args, kwargs):
            self.inputs = {"hidden": kwargs["hidden_states"], "rope": kwargs["position_embeddings"]}

        self.handle = self.attn.register_forward_pre_hook(grab, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def rows(self, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention of heads 0 and 1 at (row ``b``, query position ``pos``) pairs: ``(N, 2, T)``."""
        a, h = self.attn, self.inputs["hidden"]
        cos, sin = (r.expand(h.shape[0], -1, -1) for r in self.inputs["rope"])  # (B, T, D)
        d = a.head_dim
        q = a.q_proj(h[b, pos]).view(len(b), -1, d)[:, :2]  # (N, 2, D)
        k = a.k_proj(h).view(h.shape[0], h.shape[1], -1, d)[b]  # (N, T, Hkv, D)
        groups = a.config.num_attention_heads // a.config.num_key_value_heads
        k = k[:, :, [0 // groups, 1 // groups]].transpose(1, 2)  # (N, 2, T, D)
        q = q * cos[b, pos][:, None] + rotate_half(q) * sin[b, pos][:, None]
        k = k * cos[b][:, None] + rotate_half(k) * sin[b][:, None]
        scores = (k.float() @ q.float()[..., None]).squeeze(-1) * a.scaling  # (N, 2, T), fp32 under autocast
        future = torch.arange(h.shape[1], device=h.device)[None, :] > pos[:, None]
        return scores.masked_fill(future[:, None], float("-inf")).softmax(-1)

    def heads(self, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Output of heads 0 and 1 (their attention-weighted values, before ``o_proj``) at the
        (row ``b``, query position ``pos``) pairs: ``(N, 2, head_dim)``."""
        a, h = self.attn, self.inputs["hidden"]
        d = a.head_dim
        groups = a.config.num_attention_heads // a.config.num_key_value_heads
        v = a.v_proj(h).view(h.shape[0], h.shape[1], -1, d)[b][:, :, [0 // groups, 1 // groups]]  # (N, T, 2, D)
        return (self.rows(b, pos)[..., None] * v.transpose(1, 2).float()).sum(2)


def attention_loss(taught: TaughtAttention, targets: list[Evidence]) -> torch.Tensor:
    """Cross-entropy between the taught heads' attention at the answer positions and the evidence
    targets (``TAUGHT_LAYER``, heads 0 and 1). Targets over fewer keys than the batch's longest are
    padded with BOS columns of target 0."""
    dev = taught.inputs["hidden"].device
    b = torch.tensor([t.b for t in targets], device=dev)
    pos = torch.tensor([t.pos for t in targets], device=dev)
    cols = pad_sequence([torch.from_numpy(t.cols) for t in targets], batch_first=True).to(dev)  # (N, n)
    tgt = pad_sequence([torch.from_numpy(t.target.T) for t in targets], batch_first=True).to(dev).transpose(1, 2)
    p = taught.rows(b, pos).gather(2, cols[:, None, :].expand(-1, 2, -1))
    return -(tgt * (p + 1e-6).log()).sum(-1).mean()


def looking_loss(taught: TaughtAttention, code: PositionCode, targets: list[tuple]) -> torch.Tensor:
    """Each taught head's output should tell where its evidence lies: a linear read-out of the head's
    output (``code.looking``, shared: heads 0 and 1 share their values under GQA) against the centroid
    (row, column scaled to [-1, 1]) of its target's patches, on the targets with no mass on BOS (a named
    object or the tag). A position question's answer is then a linear function of the two heads'
    outputs (their difference), which ``PositionCode.offset`` reads later in the same layer."""
    keep, where = looking_targets(targets)
    if not keep:
        return taught.inputs["hidden"].sum() * 0
    dev = taught.inputs["hidden"].device
    b = torch.tensor([t.b for t in keep], device=dev)
    pos = torch.tensor([t.pos for t in keep], device=dev)
    return F.mse_loss(code.looking(taught.heads(b, pos)), where.to(dev))


def looking_targets(targets: list[Evidence]) -> tuple[list[Evidence], torch.Tensor]:
    """The attention targets with no mass on BOS, and per taught head the centroid of its target's
    patches in the scene (their ``grid`` codes, row and column on the [-1, 1] scale): ``(N, 2, 2)``."""
    keep = [t for t in targets if t.target[:, 0].max() == 0]
    if not keep:
        return keep, torch.zeros(0, 2, 2)
    return keep, torch.from_numpy(np.stack([t.target[:, 1:] @ t.grid for t in keep]))  # targets sum to 1


# Position questions compare where two named objects lie. The tower's features hold each patch's row
# and column mostly as 24-way classes: a linear least-squares read-out explains R^2 = 0.27 / 0.31 of
# their variance from the feature layer, and 0.12 / 0.11 from the projector's output of the
# checkpoint of commit 5fcf35d (`python experiments/probe_tower.py --model <checkpoint>`). So the taught
# heads' values carry little linear position to subtract, and position accuracy stayed at its prior
# (0.50) through 1600 steps. With these losses (third run) the projector's output reached 0.38 / 0.44.
OFFSET_SCALE = 12.0  # offsets (in patches, up to +-23) are divided by this


class PositionCode(nn.Module):
    """Two training-only linear read-outs (not saved with the model) whose losses give the decoder a
    linear code of position, recorded by forward hooks removed on exit:

    * ``token``: every projected visual token ``(N_views, 576, d)`` should tell its own place in the
      scene, (row, column) on the [-1, 1] scale of ``scene_code`` (mean squared error; LLaVA-NeXT's
      crop tokens: their place in the whole scene, not in their crop; padding left out);
    * ``offset``: the residual stream after ``TAUGHT_LAYER`` at a ``position`` turn's answer should
      tell the (row, column) offset between the two named objects (the taught heads attend to one each:
      their values' difference is the offset), in patches / ``OFFSET_SCALE`` (mean squared error)."""

    def __init__(self, model) -> None:
        super().__init__()
        d = model.config.text_config.hidden_size
        self.token, self.offset = nn.Linear(d, 2), nn.Linear(d, 2)
        self.looking = nn.Linear(model.config.text_config.head_dim, 2)  # see looking_loss
        self.watched = {
            "tokens": model.model.multi_modal_projector,
            "layer": model.model.language_model.layers[TAUGHT_LAYER],
        }
        self.outputs: dict = {}

    def __enter__(self) -> PositionCode:
        def grab(name):
            def hook(_module, _args, out):
                self.outputs[name] = out[0] if isinstance(out, tuple) else out

            return hook

        self.handles = [m.register_forward_hook(grab(n)) for n, m in self.watched.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def loss(self, offsets: list[tuple], codes: torch.Tensor) -> torch.Tensor:
        """Token-position loss against ``codes`` ``(N_views, 576, 2)`` (the samples' ``sample_targets``
        codes, joined in batch order; NaN rows left out) plus (when the batch asks position questions)
        the offset loss."""
        tokens = self.outputs["tokens"].float()
        on = ~codes.isnan().any(-1)
        loss = F.mse_loss(self.token(tokens)[on], codes[on])
        if offsets:
            hidden = self.outputs["layer"]
            b = torch.tensor([o[0] for o in offsets], device=hidden.device)
            pos = torch.tensor([o[1] for o in offsets], device=hidden.device)
            loss = loss + F.mse_loss(self.offset(hidden[b, pos].float()), stacked(offsets, 2, hidden.device))
        return loss


def train_lm(args, model, processor, family: str, steps: int, batch: int, lr: float, logf: Path) -> None:
    """Train projector + decoder (+ image_newline) with the tower frozen, answers-only loss.

    At every validation point the whole training state (weights, position code, optimiser, scene seed
    and sampler state) is written to ``<work>/<family>-resume.pt``; a run started again with the same
    work folder and settings goes on from there, and the file is removed when the stage ends."""
    model.model.vision_tower.requires_grad_(False)
    code = PositionCode(model).to(args.device)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n] + list(code.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if family == "llava":
        size_of, tag, seed = (lambda s: (336, 336)), LLAVA_TAG, SPLIT_SEED["train"] + args.scene_offset
    else:
        size_of, tag, seed = (
            (lambda s: NEXT_SIZES[s % len(NEXT_SIZES)]),
            NEXT_TAG,
            SPLIT_SEED["train"] + 2_000_000 + args.scene_offset,
        )
    val = validation_set(processor, family, size_of, tag, args.val_n)
    pad = processor.tokenizer.pad_token_id
    rng = random.Random(args.seed + 1)
    resume_path = Path(args.work) / f"{family}-resume.pt"
    settings = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "types": args.types,
        "scene_offset": args.scene_offset,
        "next_evidence": args.next_evidence,
    }
    start = 0
    if resume_path.exists():
        saved = torch.load(resume_path, weights_only=False)
        if saved["settings"] != settings:
            raise SystemExit(
                f"{resume_path} was written with {saved['settings']}, not {settings}: "
                "start with the same settings or delete the file"
            )
        model.load_state_dict(saved["model"])
        code.load_state_dict(saved["code"])
        opt.load_state_dict(saved["optimiser"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        seed, start = saved["seed"], saved["step"] + 1
        log(logf, stage=family, resumed_at=start)
    model.train()
    model.model.vision_tower.eval()
    t0 = time.time()
    for step in range(start, steps):
        items, targets, names, offsets, codes = [], [], [], [], []
        while len(items) < batch:
            scene, turns = conversation(seed, size_of(seed), tag, args.types, rng)
            seed += 1
            if turns:
                item = encode(processor, family, scene.image, turns, train=True)
                attention, naming, offset, code_ = sample_targets(
                    model, processor, scene, turns, item, len(items), family, args.next_evidence
                )
                targets += attention
                names.append(naming)
                offsets += offset
                codes.append(code_)
                items.append(item)
        inputs, labels = collate(items, pad, args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        with TaughtAttention(model) as attention, code, autocast(args):
            logits = model(**inputs).logits.float()
            taught = attention_loss(attention, targets)
            codes_t = torch.from_numpy(np.concatenate(codes)).to(args.device)
            position = code.loss(offsets, codes_t) + LOOKING_WEIGHT * looking_loss(attention, code, targets)
        v = logits.shape[-1]
        answers = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
        naming = naming_loss(logits, names)
        loss = answers + ATTN_WEIGHT * taught + NAMING_WEIGHT * naming + POSITION_WEIGHT * position
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            log(
                logf,
                stage=family,
                step=step,
                loss=round(answers.item(), 4),
                attention_loss=round(taught.item(), 4),
                naming_loss=round(naming.item(), 4),
                position_loss=round(position.item(), 4),
                seconds=round(time.time() - t0),
            )
        if (step + 1) % args.val_every == 0 or step == steps - 1:
            log(
                logf,
                stage=family,
                step=step,
                val_acc=validate(model, val, pad, args.device),
                seconds=round(time.time() - t0),
            )
            state = {
                "settings": settings,
                "model": model.state_dict(),
                "code": code.state_dict(),
                "optimiser": opt.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "seed": seed,
                "step": step,
            }
            tmp = resume_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(resume_path)
    model.eval()
    resume_path.unlink(missing_ok=True)


def build(family: str, seed: int):
    model, processor = tiny_llava(family, seed=seed, words=vocabulary(), **ARCH)
    return model, processor


def save(model, processor, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/train-tiny", help="work folder: stage outputs and the log")
    ap.add_argument("--out", default="tokencomp/assets", help="where the two checkpoints are written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--init-from",
        help="a tiny-llava checkpoint folder to start from (e.g. tokencomp/assets/tiny-llava): its tower "
        "is kept (no stage 1) and stage 2 trains its projector and decoder further",
    )
    ap.add_argument(
        "--next-init-from",
        help="a tiny-llava-next checkpoint folder to start the NeXT stage from (e.g. tokencomp/assets/"
        "tiny-llava-next) instead of the LLaVA-1.5 weights; with --init-from and --llava-steps 0 only the "
        "NeXT model trains further",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default="bf16", help="decoder stages' autocast (tower: fp32)"
    )
    ap.add_argument("--tower-steps", type=int, default=2400)
    ap.add_argument("--tower-batch", type=int, default=32, help="whole views per full-view step")
    ap.add_argument("--window-batch", type=int, default=96, help="object windows per step")
    ap.add_argument("--tower-lr", type=float, default=2e-3)
    ap.add_argument(
        "--position-steps",
        type=int,
        help="stage 1c: a linear position code in the feature layer (0: skip; see train_tower_position); "
        "default 400 steps, 0 with --init-from (a trained tower is kept as it is)",
    )
    ap.add_argument(
        "--last-layer-steps",
        type=int,
        default=300,
        help="stage 1b: the tower's last layer (0: skip; see train_last_layer)",
    )
    ap.add_argument("--llava-steps", type=int, default=600)
    ap.add_argument("--llava-batch", type=int, default=16)
    ap.add_argument("--llava-lr", type=float, default=2e-3)
    ap.add_argument("--next-steps", type=int, default=80, help="0: stop after the LLaVA-1.5 model")
    ap.add_argument("--next-batch", type=int, default=8)
    ap.add_argument("--next-lr", type=float, default=5e-4)
    ap.add_argument(
        "--next-evidence",
        choices=NEXT_EVIDENCE,
        default="crops",
        help="which LLaVA-NeXT tokens the taught heads are taught on (see NEXT_EVIDENCE)",
    )
    ap.add_argument(
        "--scene-offset",
        type=int,
        default=0,
        help="stages 2 and 3 draw their training scenes from this far into their train seed ranges "
        "(a continuation given a new offset sees scenes the earlier runs did not; 0 to 999999)",
    )
    ap.add_argument(
        "--type-mix",
        default=TRAIN_MIX,
        help="how many turns of each question type a training scene asks, before repeats are dropped "
        f"(default {TRAIN_MIX})",
    )
    ap.add_argument("--val-n", type=int, default=200)
    ap.add_argument("--val-every", type=int, default=200)
    args = ap.parse_args()
    for flag, path in (("--init-from", args.init_from), ("--next-init-from", args.next_init_from)):
        if path and not (Path(path) / "model.safetensors").exists():
            raise SystemExit(f"{flag}: no model.safetensors in {path}")
    if not 0 <= args.scene_offset < 1_000_000:
        raise SystemExit(f"--scene-offset {args.scene_offset}: must lie in 0 to 999999 (the stages' seed ranges)")
    args.types = parse_mix(args.type_mix)
    if args.position_steps is None:
        args.position_steps = 0 if args.init_from else 400
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    logf = work / "log.jsonl"
    log(logf, stage="start", args=vars(args), arch=ARCH)

    tower_path = work / "tower.pt"
    model, processor = build("llava", args.seed)
    model.to(args.device)
    if args.init_from:  # continue from a trained checkpoint: its tower is kept, stage 1 skipped
        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(args.init_from).state_dict())
    elif tower_path.exists():
        model.model.vision_tower.load_state_dict(torch.load(tower_path))
    else:
        train_tower(args, model, logf)
        torch.save(model.model.vision_tower.state_dict(), tower_path)
    position_path = work / "tower-position.pt"
    if position_path.exists():
        model.model.vision_tower.load_state_dict(torch.load(position_path))
    elif args.position_steps:
        train_tower_position(args, model, logf, args.position_steps)
        torch.save(model.model.vision_tower.state_dict(), position_path)
    last_path = work / "last-layer.pt"
    last = last_layer(model.model.vision_tower)
    if last_path.exists():
        last.load_state_dict(torch.load(last_path))
    elif args.last_layer_steps:
        train_last_layer(args, model, logf, args.last_layer_steps)
        torch.save(last.state_dict(), last_path)

    llava_path = out / "tiny-llava"
    if not (llava_path / "model.safetensors").exists():
        if args.llava_steps:
            train_lm(args, model, processor, "llava", args.llava_steps, args.llava_batch, args.llava_lr, logf)
        save(model, processor, llava_path)
    state = LlavaForConditionalGeneration.from_pretrained(llava_path).state_dict()  # also when resuming

    next_path = out / "tiny-llava-next"
    # --next-steps 0: no NeXT model, unless --next-init-from (then it gets the tower of the model above)
    if (args.next_steps or args.next_init_from) and not (next_path / "model.safetensors").exists():
        nxt, nproc = build("llava-next", args.seed)
        if args.next_init_from:
            nxt.load_state_dict(LlavaNextForConditionalGeneration.from_pretrained(args.next_init_from).state_dict())
            tower = {k.removeprefix("model.vision_tower."): v for k, v in state.items() if "vision_tower." in k}
            nxt.model.vision_tower.load_state_dict(tower)  # (stage 1b may have changed its last layer)
        else:
            missing, unexpected = nxt.load_state_dict(state, strict=False)
            assert not unexpected and all("image_newline" in m for m in missing), (missing, unexpected)
        nxt.to(args.device)
        if args.next_steps:
            train_lm(args, nxt, nproc, "llava-next", args.next_steps, args.next_batch, args.next_lr, logf)
        save(nxt, nproc, next_path)
    log(logf, stage="done")


if __name__ == "__main__":
    main()
