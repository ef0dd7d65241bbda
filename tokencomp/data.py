"""Datasets for evaluation: a local JSONL format and prompt templates (the synthetic benchmark
that writes this format is `tokencomp.benchmark`).

JSONL format, one sample per line (paths relative to the file's folder or absolute)::

    {"id": "q0", "image": "images/0.png", "question": "what color is the circle?",
     "answers": ["red"], "type": "attribute"}

Every row is checked when the file is read (`JsonlDataset`): ``question`` a string without an
``<image>`` of its own (the template places the image), ``answers`` non-empty strings, ``id``
(default: the line number) unique, the image a file that decodes; all bad rows are reported at once.

``answers`` holds one or more reference answers (a VQA-style list of 10 human answers is scored
with the VQA soft metric, a shorter list by exact match against any); ``type`` names the question type (e.g. ``yes/no``, ``count``) for per-type scores. Real
benchmark exports on disk (GQA, POPE, TextVQA, MME) plug in by writing them in this format.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile

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
    # LLaVA-OneVision (Qwen2 chat format, as its processor's chat template writes a one-image turn)
    "llava-onevision": "<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n",
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
        """The image, decoded whole (`load_rgb`)."""
        return load_rgb(self.image)

    def try_image(self) -> tuple[Image.Image | None, str | None]:
        """``(image, None)``, or ``(None, what went wrong)`` for an image that does not load (a
        lazily validated dataset's: skipped and recorded, not fatal)."""
        try:
            return self.load_image(), None
        except Exception as e:  # PIL raises many kinds
            return None, f"image {str(self.image)!r} did not load: {type(e).__name__}: {e}"


def read_rows(path: str | Path, repair: bool = False) -> list[dict]:
    """The JSON lines of a results or predictions file (blank lines skipped; none if it is missing).

    A torn last line, what a run that crashed mid-write leaves, is left out; with ``repair`` the
    file is rewritten without it (and with a final newline), so that appending can resume. A bad
    line anywhere else is damage no crash makes: a `TokencompError` naming it, the file untouched.
    A run's rows must be JSON objects naming what they are of: a ``results.jsonl`` row its
    ``cell``, a row of a ``predictions/`` file its ``id``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokencompError(f"{path} is not UTF-8 text (damaged?): {e}") from e
    lines = [x for x in text.splitlines() if x.strip()]
    rows = []
    key = "cell" if path.name == "results.jsonl" else "id" if path.parent.name == "predictions" else None
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise TokencompError(
                    f"{path}:{i + 1} is not a JSON line: {e}; damage no crash makes: restore the file, or delete "
                    "the line (its sample or cell is recomputed)"
                ) from e
            lines.pop()
            continue
        if key is not None and not (isinstance(rows[-1], dict) and key in rows[-1]):
            raise TokencompError(
                f"{path}:{i + 1} is not a row of a run (a JSON object with its {key!r}): {line[:80]!r}"
            )
    if repair and (len(rows) != len(text.splitlines()) or (text and not text.endswith("\n"))):
        write_atomic(path, "".join(x + "\n" for x in lines))
    return rows


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Replace a file whole: written next to it, flushed to disk, then renamed over it, so that a
    crash at any instant leaves the old file or the new one, never a torn one."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with part.open("wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


MAX_LISTED = 20  # bad rows listed in one error


@contextmanager
def whole_images():
    """PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while a file decodes, restored after: a library
    imported beside tokencomp may turn it on for the process (lmms-eval's task module does), and a
    truncated file would then load with its missing rows filled in, silently."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def load_rgb(path: str | Path) -> Image.Image:
    """An image file decoded whole as RGB; a truncated or corrupt file raises (PIL's error)."""
    with whole_images(), Image.open(path) as im:
        return im.convert("RGB")


def check_image(path: Path, decode: bool = True) -> str | None:
    """What is wrong with an image file, or None: missing, a directory, not an image, or (with
    ``decode``, a full decode) truncated or corrupt."""
    if not path.exists():
        return f"image {str(path)!r} does not exist"
    if not path.is_file():
        return f"image {str(path)!r} is not a file"
    try:
        with whole_images(), Image.open(path) as im:
            if decode:
                im.load()
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
        return f"image {str(path)!r} does not decode: {type(e).__name__}: {e}"
    return None


def is_unmodified(row: dict) -> bool:
    """Whether a results row is the unmodified model's: the ``identity`` method alone, whatever its
    label (a row without a spec: by its label). The reference of paired differences and speed-ups."""
    spec = row.get("spec")
    if isinstance(spec, list):
        return [s.get("name") if isinstance(s, dict) else None for s in spec] == ["identity"]
    return row.get("method") == "identity"


class JsonlDataset:
    """Samples read from a JSONL file (see the module docstring), every row checked at once.

    Every row is checked before any work: it is a JSON object with ``image``, ``question`` (a
    string without ``<image>``: the template places the image) and ``answers`` (a non-empty list
    of non-empty strings, or one string), its ``id`` (default: its line number) is unique, and its
    image is a file that decodes in full. All bad rows are reported in one `TokencompError` (the
    first 20, by line and id). ``validate="lazy"`` checks the rows but not the images (for datasets
    too large to decode twice): an image that fails later is the runner's to skip and record.

    Args:
        path: the ``.jsonl`` file.
        limit: keep the first ``limit`` samples (None: all); only those are checked.
        name: label for records (default: the file stem).
        validate: ``"full"`` (default) or ``"lazy"``.

    Raises:
        TokencompError: missing or non-UTF-8 file, no sample, or bad rows (listed).
    """

    REQUIRED = ("image", "question", "answers")
    VALIDATE = ("full", "lazy")

    def __init__(self, path: str | Path, limit: int | None = None, name: str | None = None, validate: str = "full"):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokencompError(f"dataset file {str(self.path)!r} does not exist")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise TokencompError(f"dataset limit must be a positive integer, got {limit!r}")
        if validate not in self.VALIDATE:
            raise TokencompError(f"dataset validate must be one of {list(self.VALIDATE)}, got {validate!r}")
        self.name = name or self.path.stem
        self.validate = validate
        self.samples: list[Sample] = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise TokencompError(f"{self.path} is not UTF-8 text: {e}") from e
        bad: list[str] = []
        first_line: dict[str, int] = {}
        for i, line in enumerate(lines):
            if limit is not None and len(self.samples) >= limit:
                break
            if not line.strip():
                continue
            sample, problems = self._row(line, i)
            if sample is not None and sample.id in first_line:
                problems.append(f"id {sample.id!r} repeats line {first_line[sample.id]}")
            if problems:
                where = f"line {i + 1}" + (f" (id {sample.id!r})" if sample is not None else "")
                bad += [f"{where}: {p}" for p in problems]
                continue
            first_line[sample.id] = i + 1
            self.samples.append(sample)
        if bad:
            shown = "\n  ".join(bad[:MAX_LISTED])
            more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            raise TokencompError(f"{self.path}: {len(bad)} problem(s) in its rows:\n  {shown}{more}")
        if not self.samples:
            raise TokencompError(f"{self.path} holds no sample (one JSON object per line)")

    def _row(self, line: str, i: int) -> tuple[Sample | None, list[str]]:
        """Line ``i``'s sample (None if it has no usable id) and what is wrong with it."""
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return None, [f"not a JSON line: {e}"]
        if not isinstance(row, dict):
            return None, [f"not a JSON object: {line[:60]!r}"]
        ident = row.get("id", i)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            return None, [f"id must be a string or an integer, got {ident!r}"]
        problems = [f"lacks field {k!r}" for k in self.REQUIRED if k not in row]
        question, answers = row.get("question"), row.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        if "question" in row and (not isinstance(question, str) or not question.strip()):
            problems.append(f"question must be a non-empty string, got {question!r}")
        elif isinstance(question, str) and "<image>" in question:
            problems.append("the question holds an <image> placeholder; the prompt template places the image")
        if "answers" in row and (
            not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            problems.append(f"answers must be a non-empty list of non-empty strings, got {row['answers']!r}")
        if not isinstance(row.get("type", "open"), str):
            problems.append(f"type must be a string, got {row['type']!r}")
        image = None
        if "image" in row:
            if not isinstance(row["image"], str) or not row["image"]:
                problems.append(f"image must be a path string, got {row['image']!r}")
            else:
                image = Path(row["image"])
                image = image if image.is_absolute() else self.path.parent / image
                problem = check_image(image, decode=self.validate == "full")
                if problem and (self.validate == "full" or not image.is_file()):
                    problems.append(problem)
        sample = Sample(
            str(ident),
            image,
            question,
            list(answers) if isinstance(answers, list) else [],
            row.get("type", "open"),
            {k: v for k, v in row.items() if k not in (*self.REQUIRED, "id", "type")},
        )
        return sample, problems

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
