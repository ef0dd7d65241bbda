"""Datasets for evaluation: a local JSONL format and prompt templates (the synthetic benchmark
that writes this format is `tokencomp.benchmark`).

JSONL format, one sample per line (paths relative to the file's folder or absolute)::

    {"id": "q0", "image": "images/0.png", "question": "what color is the circle?",
     "answers": ["red"], "type": "attribute"}

``answers`` holds one or more reference answers (a VQA-style list of 10 human answers is scored
with the VQA soft metric, a shorter list by exact match against any); ``type`` names the question type (e.g. ``yes/no``, ``count``) for per-type scores. Real
benchmark exports on disk (GQA, POPE, TextVQA, MME) plug in by writing them in this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import TokencompError

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = {
    # LLaVA-1.5 / LLaVA-NeXT (Vicuna) conversation format; the tiny models use the same words
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "llava-next": "USER: <image>\n{question} ASSISTANT:",
    # the published LLaVA-1.5 evaluations (conv_mode vicuna_v1): the system prompt in front, so the
    # image starts 35 tokens in; the benchmarks' own question files add any answer-format line
    # ("Answer the question using a single word or phrase."). Index-dependent choices (DART's
    # pivot order) match the authors' runs only with it.
    "vicuna_v1": VICUNA_SYSTEM + " USER: <image>\n{question} ASSISTANT:",
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


def read_rows(path: str | Path, repair: bool = False) -> list[dict]:
    """The JSON lines of a results or predictions file (blank lines skipped; none if it is missing).

    A torn last line, what a run that crashed mid-write leaves, is left out; with ``repair`` the
    file is rewritten without it (and with a final newline), so that appending can resume. A bad
    line anywhere else is damage no crash makes: a `TokencompError` naming it, the file untouched.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = [x for x in text.splitlines() if x.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise TokencompError(f"{path}:{i + 1} is not a JSON line: {e}") from e
            lines.pop()
    if repair and (len(rows) != len(text.splitlines()) or (text and not text.endswith("\n"))):
        path.write_text("".join(x + "\n" for x in lines))
    return rows


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
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TokencompError(f"{self.path}:{i + 1} is not a JSON line: {e}") from e
                if not isinstance(row, dict):
                    raise TokencompError(f"{self.path}:{i + 1} is not a JSON object")
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
    return fill_template(template, sample.question)


def fill_template(template: str, question: str, images: int = 1, image_token: str = "<image>") -> str:
    """``question`` in a conversation template (a key of `TEMPLATES` or a format string with
    ``{question}``), its ``<image>`` repeated once per image as ``image_token``."""
    fmt = TEMPLATES.get(template, template)
    if "{question}" not in fmt or "<image>" not in fmt:
        raise TokencompError(
            f"template {template!r} is neither a known name {sorted(TEMPLATES)} nor a format string with "
            "{question} and <image>"
        )
    head, tail = fmt.split("<image>", 1)  # the template's own <image>, not one the question may hold
    try:
        return head.format(question=question) + " ".join([image_token] * images) + tail.format(question=question)
    except (KeyError, IndexError, ValueError) as e:
        raise TokencompError(f"template {template!r} is not a format string with only {{question}}: {e}") from e
