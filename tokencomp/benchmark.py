"""The project's synthetic visual-QA benchmark ("tc-scenes"), deterministic by seed.

Scenes hold a few small objects (shape, colour, size) on a large textured, cluttered background,
so most patches carry little; one small object carries a digit or letter drawn in a tiny font
(fine detail that needs LLaVA-NeXT's high-resolution crops to read). Question types, each with
several phrasings and one-word or number answers:

* ``attribute``: colour or shape of a named object ("what color is the small square?"),
* ``count``: how many objects of a shape,
* ``position``: left/right or above/below between two named objects,
* ``exist``: yes/no about an object, balanced between present and absent (POPE-like),
* ``read``: the character written on the tag.

Splits draw from disjoint seed ranges (train, val, test), so no scene repeats across splits.
Output: ``<out>/<split>.jsonl`` in the harness's JSONL format plus PNG images.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import TokencompError

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "big")
CHARACTERS = tuple("0123456789ABCDEFHKLMNPRTXY")
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
SPLIT_SEED = {"train": 0, "val": 10_000_000, "test": 20_000_000}
QUESTION_TYPES = ("attribute", "count", "position", "exist", "read")
# Accuracy of the best image-blind answer per question type (answer priors, measured on 600 test
# scenes: "count" answers "zero" 43% of the time; a position question names its axis, so 50%).
CHANCE = {"attribute": 0.25, "count": 0.45, "position": 0.5, "exist": 0.52, "read": 1 / len(CHARACTERS)}
# LLaVA-NeXT-style image sizes (height, width): several aspect ratios, unpadding included
# (sizes LLaVA-NeXT's AnyRes crops without resampling, so a grid-aligned tag stays aligned in its crop)
NEXT_SIZES = [(672, 672), (672, 504), (504, 672), (336, 672), (672, 336)]
PRESETS = {
    # the embedded tiny-llava's benchmark: 336 px; the tag is one 14 px plate on the patch grid
    # (the tiny tower trained on free-floating 12-20 px characters never read them above chance)
    "tc-scenes": {"size": (336, 336), "tag_px": 12, "tag_grid": 14},
    # the embedded tiny-llava-next's: larger images whose tag is readable in the 336 px crops but
    # not in the 2x-downscaled thumbnail (6 px there)
    "tc-scenes-next": {"size": NEXT_SIZES, "tag_px": 12, "tag_grid": 14},
}

PHRASES = {
    "color": ["what color is the {obj} ?", "which color does the {obj} have ?", "the {obj} is what color ?"],
    "shape": ["what shape is the {obj} ?", "which shape is the {obj} ?"],
    "count": ["how many {shape}s are there ?", "count the {shape}s .", "what is the number of {shape}s ?"],
    "leftright": ["is the {a} left or right of the {b} ?", "where is the {a} , left or right of the {b} ?"],
    "abovebelow": ["is the {a} above or below the {b} ?", "where is the {a} , above or below the {b} ?"],
    "exist": ["is there a {obj} in the image ?", "do you see a {obj} ?", "is there any {obj} ?"],
    "read": ["what is written on the tag ?", "which character is on the tag ?", "read the tag ."],
}


def vocabulary() -> list[str]:
    """Every word the questions and answers use (for a word-level tokenizer)."""
    words = set("USER ASSISTANT : ? . , yes no left right above below".split())
    for phrases in PHRASES.values():
        for p in phrases:
            words.update(re.sub(r"\{\w+\}", " ", p).split())
    words.update(["object"])
    words.update(COLORS)
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    words.update(SIZES)
    words.update(NUMBERS)
    words.update(c.lower() for c in CHARACTERS)
    return sorted(words)


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    def name(self, with_size: bool = True) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    base = rng.integers(70, 150, 3)
    noise = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3))
    tex = np.kron(noise, np.ones((8, 8, 1)))[:h, :w]
    img = np.clip(base + tex + rng.normal(0, 6, (h, w, 3)), 0, 255).astype("uint8")
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(20, 40))):  # clutter: faint strokes that are not objects
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        c = tuple(int(v) for v in np.clip(base + rng.integers(-30, 30, 3), 0, 255))
        d.line([(x, y), (x + int(rng.integers(-25, 25)), y + int(rng.integers(-25, 25)))], fill=c, width=1)
    return im


class Scene(NamedTuple):
    """A generated scene: the image, its objects, the tag's character and the tag plate's box."""

    image: Image.Image
    objects: list[Obj]
    char: str
    tag_box: tuple[int, int, int, int]


def _draw(d: ImageDraw.ImageDraw, o: Obj, fill=None) -> None:
    x0, y0, x1, y1 = o.box
    c = COLORS[o.color] if fill is None else fill
    if o.shape == "circle":
        d.ellipse(o.box, fill=c)
    elif o.shape == "square":
        d.rectangle(o.box, fill=c)
    elif o.shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=c)
    else:
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        d.polygon(pts, fill=c)


def _free(box, taken, gap: int) -> bool:
    """True if ``box`` keeps more than ``gap`` pixels from every box in ``taken``."""
    return all(box[2] + gap < t[0] or t[2] + gap < box[0] or box[3] + gap < t[1] or t[3] + gap < box[1] for t in taken)


def _place(rng, h, w, size_px, taken) -> tuple[int, int, int, int] | None:
    for _ in range(50):
        x, y = int(rng.integers(4, w - size_px - 4)), int(rng.integers(4, h - size_px - 4))
        box = (x, y, x + size_px, y + size_px)
        if _free(box, taken, 6):
            return box
    return None


def make_scene(seed: int, size: tuple[int, int] = (336, 336), tag_px: int = 7, tag_grid: int | None = None) -> Scene:
    """One scene of ``size`` = (height, width) pixels; object sizes scale with the image, the tag's
    font is ``tag_px`` pixels whatever the image size. ``tag_grid``: the tag plate is one
    ``tag_grid`` px cell of that grid (e.g. the ViT patch grid) instead of a free 1.8 x font plate."""
    rng = np.random.default_rng(seed)
    h, w = size
    im = _background(rng, h, w)
    d = ImageDraw.Draw(im)
    scale = min(h, w) / 336
    objs: list[Obj] = []
    taken: list[tuple] = []
    for _ in range(int(rng.integers(2, 5))):
        sz = SIZES[int(rng.integers(2))]
        px = int((rng.integers(18, 26) if sz == "small" else rng.integers(40, 56)) * scale)
        box = _place(rng, h, w, px, taken)
        if box is None:
            continue
        o = Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))], sz, box)
        _draw(d, o)
        objs.append(o)
        taken.append(box)
    # the tag: a small white plate with one character in a tiny font
    char = CHARACTERS[int(rng.integers(len(CHARACTERS)))]
    if tag_grid:
        box = None
        for _ in range(100):
            r, c = int(rng.integers(0, h // tag_grid)), int(rng.integers(0, w // tag_grid))
            cand = (c * tag_grid, r * tag_grid, (c + 1) * tag_grid, (r + 1) * tag_grid)
            if _free(cand, taken, 2):
                box = cand
                break
        box = box or (0, 0, tag_grid, tag_grid)
        box = (box[0], box[1], box[2] - 1, box[3] - 1)  # PIL rectangles include their end pixel
    else:
        plate = int(tag_px * 1.8)
        box = _place(rng, h, w, plate, taken) or (4, 4, 4 + plate, 4 + plate)
    d.rectangle(box, fill=(250, 250, 250))
    font = ImageFont.load_default(size=tag_px) if hasattr(ImageFont, "load_default") else None
    d.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), char, fill=(0, 0, 0), font=font, anchor="mm")
    return Scene(im, objs, char, box)


def label_map(scene: Scene) -> np.ndarray:
    """``(H, W)`` int map of what covers each pixel: 0 background, ``j + 1`` object ``j``,
    ``len(objects) + 1`` the tag plate (training targets for the vision tower)."""
    w, h = scene.image.size
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    for j, o in enumerate(scene.objects):
        _draw(d, o, fill=j + 1)
    d.rectangle(scene.tag_box, fill=len(scene.objects) + 1)
    return np.asarray(im).astype(np.int64)


def _unique(objs: list[Obj], o: Obj) -> str | None:
    """The shortest name that singles out ``o`` among ``objs`` (None if none does)."""
    for name in (o.shape, f"{o.color} {o.shape}", o.name()):
        matches = [p for p in objs if name in (p.shape, f"{p.color} {p.shape}", p.name())]
        if len(matches) == 1:
            return name
    return None


class QA(NamedTuple):
    """A question about a scene, its one-word answer, and its visual evidence: groups of indices into
    the scene's objects (``len(objects)`` stands for the tag plate), one group per thing the question
    names (``position``: the object asked about, then the reference object; ``count`` and ``exist``:
    every matching object, possibly none)."""

    question: str
    answer: str
    evidence: tuple[tuple[int, ...], ...]


def make_question(rng: np.random.Generator, objs: list[Obj], char: str, qtype: str) -> QA | None:
    """A :class:`QA` of ``qtype`` about a scene, or None when the scene cannot ask it."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if qtype == "attribute":  # name the object without the asked attribute
        opts = []
        for j, o in enumerate(objs):
            for name, same in (
                (o.shape, lambda p, o=o: p.shape == o.shape),
                (f"{o.size} {o.shape}", lambda p, o=o: p.shape == o.shape and p.size == o.size),
            ):
                if sum(map(same, objs)) == 1:
                    opts.append(QA(pick(PHRASES["color"]).format(obj=name), o.color, ((j,),)))
                    break
            for name, same in (
                (f"{o.color} object", lambda p, o=o: p.color == o.color),
                (f"{o.size} {o.color} object", lambda p, o=o: p.color == o.color and p.size == o.size),
            ):
                if sum(map(same, objs)) == 1:
                    opts.append(QA(pick(PHRASES["shape"]).format(obj=name), o.shape, ((j,),)))
                    break
        return pick(opts) if opts else None
    if qtype == "count":
        shape = pick(SHAPES)
        match = tuple(j for j, o in enumerate(objs) if o.shape == shape)
        return QA(pick(PHRASES["count"]).format(shape=shape), NUMBERS[len(match)], (match,))
    if qtype == "position":
        named = [(j, _unique(objs, o)) for j, o in enumerate(objs)]
        named = [(j, n) for j, n in named if n]
        pairs = [(a, b) for a in named for b in named if a[0] != b[0]]
        if not pairs:
            return None
        (a, na), (b, nb) = pick(pairs)
        dx, dy = objs[a].center[0] - objs[b].center[0], objs[a].center[1] - objs[b].center[1]
        if abs(dx) >= abs(dy):
            return QA(pick(PHRASES["leftright"]).format(a=na, b=nb), "left" if dx < 0 else "right", ((a,), (b,)))
        return QA(pick(PHRASES["abovebelow"]).format(a=na, b=nb), "above" if dy < 0 else "below", ((a,), (b,)))
    if qtype == "exist":
        present = rng.random() < 0.5
        if present:
            o = pick(objs)
            match = tuple(j for j, p in enumerate(objs) if (p.color, p.shape) == (o.color, o.shape))
            return QA(pick(PHRASES["exist"]).format(obj=f"{o.color} {o.shape}"), "yes", (match,))
        for _ in range(30):
            color, shape = pick(list(COLORS)), pick(SHAPES)
            if not any(o.color == color and o.shape == shape for o in objs):
                return QA(pick(PHRASES["exist"]).format(obj=f"{color} {shape}"), "no", ((),))
        return None
    if qtype == "read":
        return QA(pick(PHRASES["read"]), char.lower(), ((len(objs),),))
    raise TokencompError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


def split_sample(
    seed: int,
    qtype: str,
    size: tuple[int, int] | list[tuple[int, int]] = (336, 336),
    tag_px: int = 7,
    tag_grid: int | None = None,
) -> tuple[Scene, QA | None]:
    """The scene of ``seed`` and its ``qtype`` question (None when the scene cannot ask it), exactly as
    :func:`generate_split` makes them: ``size`` is one (height, width) or a list chosen from by the
    seed; the other arguments as for :func:`make_scene`. Lets analyses regenerate a written sample's
    objects from its id (``<split>-<seed>``)."""
    sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]
    scene = make_scene(seed, sizes[seed % len(sizes)], tag_px, tag_grid)
    if not scene.objects:
        return scene, None
    return scene, make_question(np.random.default_rng(seed + 7_777_777), scene.objects, scene.char, qtype)


def generate_split(
    out_dir: str | Path,
    split: str,
    n: int,
    size: tuple[int, int] | list[tuple[int, int]] = (336, 336),
    types: tuple[str, ...] = QUESTION_TYPES,
    tag_px: int = PRESETS["tc-scenes"]["tag_px"],
    tag_grid: int | None = PRESETS["tc-scenes"]["tag_grid"],
) -> Path:
    """Write ``n`` samples of ``split`` (train / val / test) as ``out_dir/<split>.jsonl`` + images.

    Question types cycle through ``types`` so each is equally frequent; a scene that cannot ask
    a type (e.g. no uniquely named pair for ``position``) is replaced by the next seed. ``size`` is
    one (height, width) or a list of them, chosen per scene by its seed (varied aspect ratios).
    The defaults are the ``"tc-scenes"`` preset, the embedded LLaVA-1.5 model's benchmark
    (``tag_grid=None`` draws the tag on a free plate instead of one grid cell).
    """
    if split not in SPLIT_SEED:
        raise TokencompError(f"split must be one of {sorted(SPLIT_SEED)}, got {split!r}")
    out = Path(out_dir)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    lines, seed = [], SPLIT_SEED[split]
    while len(lines) < n:
        qtype = types[len(lines) % len(types)]
        scene, qa = split_sample(seed, qtype, size, tag_px, tag_grid)
        if qa is not None:
            name = f"images/{split}/{seed:08d}.png"
            scene.image.save(out / name)
            lines.append(
                json.dumps(
                    {"id": f"{split}-{seed}", "image": name, "question": qa[0], "answers": [qa[1]], "type": qtype}
                )
            )
        seed += 1
    path = out / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
