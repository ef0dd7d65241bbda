"""Train the embedded default models ``tiny-llava`` and ``tiny-llava-next`` on tc-scenes.

One script, fixed seed, three stages (each resumes: a stage whose output exists is skipped):

1. **tower**: a CLIP vision tower (336 px, patch 14, 576 patches + CLS) trained from scratch on
   scene views with dense targets. The CLS token of the feature layer (``vision_feature_layer=-2``)
   predicts which (colour, shape) pairs are present, how many objects of each shape there are and
   the tag's character, so CLS attention carries trained global meaning (VisionZip, GlobalCom² and
   PruMerge read it); every patch predicts the colour, shape and size of the object over it, the
   tag character over the tag plate, and whether an object's centre lies in it. Views: 336 px
   LLaVA-1.5 scenes, and thumbnails and 336 px crops of larger LLaVA-NeXT scenes.
2. **llava**: LLaVA-1.5 stage with the tower frozen: a two-layer MLP projector and a Llama decoder
   trained from scratch on answers only (multi-turn: every scene asks several questions, the first
   turn being the harness's single-turn prompt). A from-scratch decoder facing 576 mostly-background
   tokens stays at the answer prior for hundreds of steps (measured: validation accuracy at chance
   after 260 steps of batch 16), so the stage starts with a curriculum: sequences that keep the
   tokens over objects and the tag plus a growing random share of the background (2% -> 30%), then
   trains on all 576 tokens.
3. **next**: ``LlavaNextForConditionalGeneration`` initialised from stage 2 (same tower, projector and
   decoder, new ``image_newline``) and fine-tuned on larger images (AnyRes: thumbnail + up to 4 crops)
   whose small tags are readable only in the crops.

Stages 2 and 3 log training loss and validation accuracy (greedy first answer token, which is the
whole answer: every answer is one word) per question type. Usage::

    python experiments/train_tiny.py --work runs/train-tiny --out tokencomp/assets

Runs on 2 CPU cores in about an hour with the defaults; ``--device cuda`` uses a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import LlavaForConditionalGeneration

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
TRAIN_TYPES = ["attribute"] * 3 + ["count"] * 3 + ["position"] * 2 + ["exist"] * 2 + ["read"] * 2
MEAN = np.array([0.481, 0.458, 0.408], dtype=np.float32)
STD = np.array([0.269, 0.261, 0.276], dtype=np.float32)
GRID, PATCH = 24, 14
AUX_WEIGHT = 0.3  # curriculum: weight of naming what lies under each visual token (see subset_step)


def log(path: Path, **row) -> None:
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


# ----------------------------------------------------------------------------------------------
# Stage 1: the vision tower
# ----------------------------------------------------------------------------------------------

N_PATCH_OUT = (1 + len(COLORS)) + (1 + len(SHAPES)) + (1 + len(SIZES)) + (1 + len(CHARACTERS)) + (1 + len(SHAPES))
N_PAIRS = len(COLORS) * len(SHAPES)
N_CLS_OUT = N_PAIRS + len(SHAPES) * 5 + (1 + len(CHARACTERS))


def view_targets(scene, labels: np.ndarray, region: tuple[int, int, int, int]):
    """Targets of one 336 px view = ``region`` (x0, y0, x1, y1) of the scene, resized to 336."""
    x0, y0, x1, y1 = region
    lab = Image.fromarray(labels[y0:y1, x0:x1].astype(np.uint8)).resize((336, 336), Image.NEAREST)
    lab = np.asarray(lab).astype(np.int64)
    k = len(scene.objects)
    frac = np.stack([(lab == j + 1).reshape(GRID, PATCH, GRID, PATCH).mean((1, 3)) for j in range(k + 1)])
    cover = frac.argmax(0)
    hit = frac.max(0) > 0.2
    colour = np.zeros((GRID, GRID), np.int64)
    shape = np.zeros((GRID, GRID), np.int64)
    size = np.zeros((GRID, GRID), np.int64)
    char = np.zeros((GRID, GRID), np.int64)
    centre = np.zeros((GRID, GRID), np.int64)
    pairs = np.zeros(N_PAIRS, np.float32)
    counts = np.zeros(len(SHAPES), np.int64)
    sx, sy = 336 / (x1 - x0), 336 / (y1 - y0)
    for j, o in enumerate(scene.objects):
        m = hit & (cover == j)
        colour[m] = 1 + list(COLORS).index(o.color)
        shape[m] = 1 + SHAPES.index(o.shape)
        size[m] = 1 + SIZES.index(o.size)
        cx, cy = o.center
        if x0 <= cx < x1 and y0 <= cy < y1:
            r, c = min(GRID - 1, int((cy - y0) * sy / PATCH)), min(GRID - 1, int((cx - x0) * sx / PATCH))
            centre[r, c] = 1 + SHAPES.index(o.shape)
            pairs[list(COLORS).index(o.color) * len(SHAPES) + SHAPES.index(o.shape)] = 1
            counts[SHAPES.index(o.shape)] += 1
    m = hit & (cover == k)
    char[m] = 1 + CHARACTERS.index(scene.char)
    tag_visible = bool(m.any())
    tag = 1 + CHARACTERS.index(scene.char) if tag_visible else 0
    patch = np.stack([colour, shape, size, char, centre]).reshape(5, -1)
    return lab, patch, pairs, np.minimum(counts, 4), tag


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
        out.append((pix, *view_targets(scene, labels, reg)[1:]))
    return out


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


def tower_loss(heads: TowerHeads, feats, patch_t, pairs_t, counts_t, tag_t):
    cls_out, patch_out = heads(feats)
    sizes = [1 + len(COLORS), 1 + len(SHAPES), 1 + len(SIZES), 1 + len(CHARACTERS), 1 + len(SHAPES)]
    loss, start = 0.0, 0
    for i, n in enumerate(sizes):
        logits = patch_out[..., start : start + n].reshape(-1, n)
        tgt = patch_t[:, i].reshape(-1)
        if i == 3:  # the character: a 26-way read-out on the tag patches only (a handful per view)
            on_tag = tgt > 0
            if on_tag.any():
                loss = loss + F.cross_entropy(logits[on_tag], tgt[on_tag])
        else:
            w = torch.where(tgt > 0, 5.0, 1.0)  # object patches are rare
            loss = loss + (F.cross_entropy(logits, tgt, reduction="none") * w).sum() / w.sum()
        start += n
    loss = loss + F.binary_cross_entropy_with_logits(cls_out[:, :N_PAIRS], pairs_t)
    counts = cls_out[:, N_PAIRS : N_PAIRS + len(SHAPES) * 5].reshape(-1, len(SHAPES), 5)
    loss = loss + F.cross_entropy(counts.reshape(-1, 5), counts_t.reshape(-1))
    loss = loss + F.cross_entropy(cls_out[:, N_PAIRS + len(SHAPES) * 5 :], tag_t)
    return loss, cls_out, patch_out


def train_tower(args, model, logf: Path) -> None:
    tower = model.model.vision_tower
    heads = TowerHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.tower_lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    seed = SPLIT_SEED["train"] + 5_000_000  # tower scenes: a train-range block of their own
    tower.train()
    buf: list = []
    t0 = time.time()
    for step in range(args.tower_steps):
        while len(buf) < args.tower_batch:
            buf.extend(tower_views(rng, seed))
            seed += 1
        batch, buf = buf[: args.tower_batch], buf[args.tower_batch :]
        pix = torch.from_numpy(((np.stack([b[0] for b in batch]) / 255.0 - MEAN) / STD).astype(np.float32))
        pix = pix.permute(0, 3, 1, 2).to(args.device)
        patch_t = torch.from_numpy(np.stack([b[1] for b in batch])).to(args.device)
        pairs_t = torch.from_numpy(np.stack([b[2] for b in batch])).to(args.device)
        counts_t = torch.from_numpy(np.stack([b[3] for b in batch])).to(args.device)
        tag_t = torch.tensor([b[4] for b in batch], device=args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.tower_steps, args.tower_lr)
        feats = tower(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
        loss, cls_out, patch_out = tower_loss(heads, feats, patch_t, pairs_t, counts_t, tag_t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.tower_steps - 1:
            with torch.no_grad():
                obj = patch_t[:, 0] > 0
                colour_acc = (patch_out[..., : 1 + len(COLORS)].argmax(-1) == patch_t[:, 0])[obj].float().mean()
                c0 = (1 + len(COLORS)) + (1 + len(SHAPES)) + (1 + len(SIZES))
                tag = patch_t[:, 3] > 0
                char_acc = (
                    (patch_out[..., c0 : c0 + 1 + len(CHARACTERS)].argmax(-1) == patch_t[:, 3])[tag].float().mean()
                )
                tag_pred = cls_out[:, N_PAIRS + len(SHAPES) * 5 :].argmax(-1)
                cls_tag_acc = (tag_pred == tag_t).float().mean()
            log(
                logf,
                stage="tower",
                step=step,
                loss=round(loss.item(), 4),
                object_patch_colour_acc=round(colour_acc.item(), 3),
                tag_patch_char_acc=round(char_acc.item(), 3),
                cls_tag_acc=round(cls_tag_acc.item(), 3),
                seconds=round(time.time() - t0),
            )
    tower.eval()


# ----------------------------------------------------------------------------------------------
# Stages 2 and 3: the multimodal model
# ----------------------------------------------------------------------------------------------


def conversation(seed: int, size, tag: dict, types: list[str], rng: random.Random):
    """(scene, [(question, answer, type), ...]) for one scene; the first turn's type is random."""
    scene = make_scene(seed, size, **tag)
    if not scene.objects:
        return scene, []
    types = types[:]
    rng.shuffle(types)
    turns = []
    for i, qt in enumerate(types):
        qa = make_question(np.random.default_rng(seed * 31 + i), scene.objects, scene.char, qt)
        if qa is not None:
            turns.append((qa[0], qa[1], qt))
    return scene, turns


def encode(processor, family: str, image, turns, train: bool):
    """Token ids (image placeholders expanded by the processor), labels and pixels of one sample."""
    prompt = TEMPLATES[family].format(question=turns[0][0])
    enc = processor(images=image, text=prompt, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    for i, (q, a, _) in enumerate(turns):
        if i > 0:
            more = tok(f" USER: {q} ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += more
            labels += [-100] * len(more)
        if not train:
            break
        ans = tok(f" {a}", add_special_tokens=False)["input_ids"] + [eos]
        ids += ans
        labels += ans
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return ids, labels, extra


def collate(items, pad_id: int, device: str):
    """Right-padded batch (training and teacher-forced validation only)."""
    n = max(len(i[0]) for i in items)
    ids = torch.full((len(items), n), pad_id)
    labels = torch.full((len(items), n), -100)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for b, (i, lab, _) in enumerate(items):
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
            ids, _, extra = encode(processor, family, scene.image, turns, train=False)
            answer = processor.tokenizer(f" {turns[0][1]}", add_special_tokens=False)["input_ids"][0]
            items.append((ids, [-100] * len(ids), extra, answer, qt))
    return items


@torch.no_grad()
def validate(model, items, pad_id: int, device: str, batch: int = 8) -> dict:
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
    model.train()
    per = {t: round(float(np.mean(v)), 3) for t, v in sorted(hits.items())}
    per["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 3)
    return per


def subset_step(model, processor, scenes_turns, bg_fraction: float, rng: random.Random, device: str):
    """Curriculum loss (LLaVA-1.5 stage only): each sequence keeps the visual tokens over objects and
    the tag plate plus a random ``bg_fraction`` of the background ones, at their original positions
    or renumbered contiguously (half of the sequences each), so the decoder finds the informative
    tokens among few before it meets all 576.

    Auxiliary loss (weight ``AUX_WEIGHT``): at each kept visual token the LM head names what
    lies under it (the colour word over an object, the character over the tag), which aligns the
    projected tokens with the answer words before the decoder has learnt where to look.
    Returns the loss."""
    image_id = model.config.image_token_id
    tok = processor.tokenizer
    colour_ids = np.array([tok.convert_tokens_to_ids(c) for c in COLORS])
    char_ids = np.array([tok.convert_tokens_to_ids(c.lower()) for c in CHARACTERS])
    items = [encode(processor, "llava", sc.image, turns, train=True) for sc, turns in scenes_turns]
    pix = torch.cat([it[2]["pixel_values"] for it in items]).to(device)
    with torch.no_grad():
        feats = model.model.vision_tower(pixel_values=pix, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = model.model.multi_modal_projector(feats)  # (B, 576, d)
    embed = model.get_input_embeddings()
    rows, labs, poss, auxs = [], [], [], []
    for b, ((scene, _), (ids, labels, _)) in enumerate(zip(scenes_turns, items)):
        lab = label_map(scene)
        patch = view_targets(scene, lab, (0, 0, 336, 336))[1]
        aux = np.full(GRID * GRID, -100)
        aux[patch[0] > 0] = colour_ids[patch[0][patch[0] > 0] - 1]
        aux[patch[3] > 0] = char_ids[patch[3][patch[3] > 0] - 1]
        informative = (lab.reshape(GRID, PATCH, GRID, PATCH) > 0).any(axis=(1, 3)).reshape(-1)
        keep_patch = informative | (np.array([rng.random() for _ in range(GRID * GRID)]) < bg_fraction)
        ids_t = torch.tensor(ids, device=device)
        emb = embed(ids_t).clone()
        img = (ids_t == image_id).nonzero().squeeze(1)
        emb[img] = feats[b]
        keep = torch.ones(len(ids), dtype=torch.bool, device=device)
        keep[img[~torch.from_numpy(keep_patch).to(device)]] = False
        pos = keep.nonzero().squeeze(1) if rng.random() < 0.5 else torch.arange(int(keep.sum()), device=device)
        rows.append(emb[keep])
        labs.append(torch.tensor(labels, device=device)[keep])
        poss.append(pos)
        aux_seq = torch.full((len(ids),), -100, device=device)
        aux_seq[img] = torch.from_numpy(aux).to(device)
        auxs.append(aux_seq[keep])
    n = max(len(r) for r in rows)
    d = rows[0].shape[-1]
    x = torch.zeros((len(rows), n, d), device=device)
    y = torch.full((len(rows), n), -100, device=device)
    ya = torch.full((len(rows), n), -100, device=device)
    pos = torch.zeros((len(rows), n), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), n), dtype=torch.long, device=device)
    for b, (r, lab, p, a) in enumerate(zip(rows, labs, poss, auxs)):
        x[b, : len(r)], y[b, : len(r)], pos[b, : len(r)], mask[b, : len(r)], ya[b, : len(r)] = r, lab, p, 1, a
    hidden = model.model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
    logits = model.lm_head(hidden)
    v = logits.shape[-1]
    answers = F.cross_entropy(logits[:, :-1].reshape(-1, v), y[:, 1:].reshape(-1), ignore_index=-100)
    return answers + AUX_WEIGHT * F.cross_entropy(logits.reshape(-1, v), ya.reshape(-1), ignore_index=-100)


def train_lm(args, model, processor, family: str, steps: int, batch: int, lr: float, logf: Path) -> None:
    """Train projector + decoder (+ image_newline) with the tower frozen, answers-only loss."""
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if family == "llava":
        size_of, tag, seed = (lambda s: (336, 336)), LLAVA_TAG, SPLIT_SEED["train"]
    else:
        size_of, tag, seed = (
            (lambda s: NEXT_SIZES[s % len(NEXT_SIZES)]),
            NEXT_TAG,
            SPLIT_SEED["train"] + 2_000_000,
        )
    val = validation_set(processor, family, size_of, tag, args.val_n)
    pad = processor.tokenizer.pad_token_id
    rng = random.Random(args.seed + 1)
    model.train()
    model.model.vision_tower.eval()
    t0 = time.time()
    curriculum = args.curriculum_steps if family == "llava" else 0
    for step in range(curriculum):
        scenes_turns = []
        while len(scenes_turns) < args.curriculum_batch:
            scene, turns = conversation(seed, size_of(seed), tag, TRAIN_TYPES, rng)
            seed += 1
            if turns:
                scenes_turns.append((scene, turns))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, curriculum, args.curriculum_lr)
        frac = 0.02 + 0.28 * step / max(1, curriculum - 1)
        loss = subset_step(model, processor, scenes_turns, frac, rng, args.device)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            log(
                logf,
                stage="llava-curriculum",
                step=step,
                bg_fraction=round(frac, 3),
                loss=round(loss.item(), 4),
                seconds=round(time.time() - t0),
            )
        if (step + 1) % args.val_every == 0 or step == curriculum - 1:
            log(
                logf,
                stage="llava-curriculum",
                step=step,
                val_acc=validate(model, val, pad, args.device),
                seconds=round(time.time() - t0),
            )
    for step in range(steps):
        items = []
        while len(items) < batch:
            scene, turns = conversation(seed, size_of(seed), tag, TRAIN_TYPES, rng)
            seed += 1
            if turns:
                items.append(encode(processor, family, scene.image, turns, train=True))
        inputs, labels = collate(items, pad, args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        logits = model(**inputs).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            log(logf, stage=family, step=step, loss=round(loss.item(), 4), seconds=round(time.time() - t0))
        if (step + 1) % args.val_every == 0 or step == steps - 1:
            log(
                logf,
                stage=family,
                step=step,
                val_acc=validate(model, val, pad, args.device),
                seconds=round(time.time() - t0),
            )
    model.eval()


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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tower-steps", type=int, default=500)
    ap.add_argument("--tower-batch", type=int, default=32)
    ap.add_argument("--tower-lr", type=float, default=2e-3)
    ap.add_argument("--curriculum-steps", type=int, default=600, help="LLaVA-1.5 steps on token subsets first")
    ap.add_argument("--curriculum-batch", type=int, default=32)
    ap.add_argument("--curriculum-lr", type=float, default=3e-3)
    ap.add_argument("--llava-steps", type=int, default=300)
    ap.add_argument("--llava-batch", type=int, default=16)
    ap.add_argument("--llava-lr", type=float, default=1e-3)
    ap.add_argument("--next-steps", type=int, default=150)
    ap.add_argument("--next-batch", type=int, default=8)
    ap.add_argument("--next-lr", type=float, default=5e-4)
    ap.add_argument("--val-n", type=int, default=200)
    ap.add_argument("--val-every", type=int, default=200)
    args = ap.parse_args()
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
    if tower_path.exists():
        model.model.vision_tower.load_state_dict(torch.load(tower_path))
    else:
        train_tower(args, model, logf)
        torch.save(model.model.vision_tower.state_dict(), tower_path)

    llava_path = out / "tiny-llava"
    if not (llava_path / "model.safetensors").exists():
        train_lm(args, model, processor, "llava", args.llava_steps, args.llava_batch, args.llava_lr, logf)
        save(model, processor, llava_path)
    state = LlavaForConditionalGeneration.from_pretrained(llava_path).state_dict()  # also when resuming

    next_path = out / "tiny-llava-next"
    if not (next_path / "model.safetensors").exists():
        nxt, nproc = build("llava-next", args.seed)
        missing, unexpected = nxt.load_state_dict(state, strict=False)
        assert not unexpected and all("image_newline" in m for m in missing), (missing, unexpected)
        nxt.to(args.device)
        train_lm(args, nxt, nproc, "llava-next", args.next_steps, args.next_batch, args.next_lr, logf)
        save(nxt, nproc, next_path)
    log(logf, stage="done")


if __name__ == "__main__":
    main()
