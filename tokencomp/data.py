"""Datasets for evaluation: a local JSONL format, prompt templates, and a small synthetic generator.

JSONL format, one sample per line (paths relative to the file's folder or absolute)::

    {"id": "q0", "image": "images/0.png", "question": "what color is the circle?",
     "answers": ["red"], "type": "attribute"}

``answers`` holds one or more reference answers (VQA-style lists of 10 work with the VQA soft
metric); ``type`` names the question type (e.g. ``yes/no``, ``count``) for per-type scores. Real
benchmark exports on disk (GQA, POPE, TextVQA, MME) plug in by writing them in this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import TokencompError

TEMPLATES = {
    # LLaVA-1.5 / LLaVA-NeXT (Vicuna) conversation format; the tiny models use the same words
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "llava-next": "USER: <image>\n{question} ASSISTANT:",
    "mistral": "[INST] <image>\n{question} [/INST]",
    "plain": "<image>\n{question}",
}


@dataclass
class Sample:
    """One evaluation item."""

    id: str
    image: Path
    question: str
    answers: list[str]
    type: str = "open"
    extra: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        return Image.open(self.image).convert("RGB")


class JsonlDataset:
    """Samples read from a JSONL file (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
        limit: keep the first ``limit`` samples (None: all).
        name: label for records (default: the file stem).

    Raises:
        TokencompError: missing file, a line without the required fields, or a missing image.
    """

    REQUIRED = ("image", "question", "answers")

    def __init__(self, path: str | Path, limit: int | None = None, name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TokencompError(f"dataset file {str(self.path)!r} does not exist")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise TokencompError(f"dataset limit must be a positive integer, got {limit!r}")
        self.name = name or self.path.stem
        self.samples: list[Sample] = []
        with self.path.open() as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in self.REQUIRED if k not in row]
                if missing:
                    raise TokencompError(f"{self.path}:{i + 1} lacks field(s) {missing}")
                image = Path(row["image"])
                image = image if image.is_absolute() else self.path.parent / image
                if not image.is_file():
                    raise TokencompError(f"{self.path}:{i + 1}: image {str(image)!r} does not exist")
                answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
                extra = {k: v for k, v in row.items() if k not in (*self.REQUIRED, "id", "type")}
                self.samples.append(
                    Sample(
                        str(row.get("id", i)),
                        image,
                        row["question"],
                        [str(a) for a in answers],
                        row.get("type", "open"),
                        extra,
                    )
                )
                if limit is not None and len(self.samples) >= limit:
                    break
        ids = [s.id for s in self.samples]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise TokencompError(f"{self.path}: sample ids must be unique; repeated: {dup}")

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)


def prompt(sample: Sample, template: str) -> str:
    """Fill a template (a key of `TEMPLATES` or a format string with ``{question}``)."""
    fmt = TEMPLATES.get(template, template)
    if "{question}" not in fmt:
        raise TokencompError(
            f"template {template!r} is neither a known name {sorted(TEMPLATES)} nor contains {{question}}"
        )
    return fmt.format(question=sample.question)


# ------------------------------------------------------------------------------------------------
# a small synthetic scene generator (deterministic by seed)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def make_shapes_dataset(out_dir: str | Path, n: int = 32, seed: int = 0, size: tuple[int, int] = (336, 336)) -> Path:
    """Write ``n`` scenes of a few small shapes on a textured background, with questions about
    colour, count and existence, as ``out_dir/data.jsonl`` + PNG images. Returns the JSONL path.

    Deterministic in ``seed``; used by the demo experiment and the runner tests.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        h, w = size
        bg = (rng.random((h, w, 3)) * 40 + 100 + rng.integers(-20, 20, 3)).clip(0, 255).astype("uint8")
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        k = int(rng.integers(1, 4))
        objects = []
        for _ in range(k):
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            s = int(rng.integers(h // 10, h // 5))
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            _draw(draw, shape, (x, y, x + s, y + s), COLORS[color])
            objects.append((shape, color))
        name = f"images/{i:04d}.png"
        img.save(out / name)
        kind = i % 3
        if kind == 0:
            shape, color = objects[0]
            q, a, t = f"what color is the {shape} ?", color, "attribute"
        elif kind == 1:
            shape = objects[0][0]
            count = sum(1 for o in objects if o[0] == shape)
            q, a, t = f"how many {shape} are there ?", NUMBER_WORDS[count], "count"
        else:
            shape = SHAPES[rng.integers(len(SHAPES))]
            present = any(o[0] == shape for o in objects)
            q, a, t = f"is there a {shape} ?", "yes" if present else "no", "yes/no"
        lines.append(json.dumps({"id": f"{seed}-{i}", "image": name, "question": q, "answers": [a], "type": t}))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
