"""ShortV (Yuan et al., "ShortV: Efficient Multimodal Large Language Models by Freezing Visual Tokens
in Ineffective Layers", arXiv 2504.00502), as the authors' released code does it.

**Layer Contribution** LC(i, X) of decoder layer i for token type X (visual or text): the KL
divergence between the model's next-token distribution at the last position with layer i intact
and with layer i's attention and MLP updates zeroed for tokens of type X only (they pass through
the layer unchanged while the other tokens still attend to them). The released code computes
``KLDivLoss(batchmean)(log_softmax(original), softmax(modified))`` = KL(modified || original)
(``direction="code"``; ``"reverse"`` gives KL(original || modified)). LC is averaged over a
calibration set (40 samples in the paper); the N layers with the lowest visual LC are ineffective.

**A ShortV layer**: visual tokens get no query, attention output or MLP (their residual stream is
unchanged) but are still normed and projected to keys/values; text tokens are computed normally;
during decoding it is an ordinary layer. Layers come from a preset (the published lists, chosen
by checkpoint), a calibration file (``calibration=path``, the ``n`` lowest), or a given list.
Calibration is explicit (`calibrate`), saved as JSON, and never recomputed silently.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import tokencomp as tc
from tokencomp.data import prompt as fill_prompt
from tokencomp.strategy import check_int

# Published replaced layers (0-indexed), from the ShortV paper and code (the team's shared METHODS.md §3).
PRESETS = {
    "llava-1.5-7b": (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19),
    "llava-1.5-13b": (39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17),
    "llava-next-7b": (31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2),
    "llava-next-13b": (39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35, 34, 24, 38, 21, 20, 18, 1, 17),
}
PRESET_LAYERS = {"llava-1.5-7b": 32, "llava-1.5-13b": 40, "llava-next-7b": 32, "llava-next-13b": 40}
# substrings of checkpoint names that identify a preset
CHECKPOINT_NAMES = {
    "llava-1.5-7b": ("llava-1.5-7b", "llava-v1.5-7b"),
    "llava-1.5-13b": ("llava-1.5-13b", "llava-v1.5-13b"),
    "llava-next-7b": ("llava-v1.6-vicuna-7b", "llava-next-7b"),
    "llava-next-13b": ("llava-v1.6-vicuna-13b", "llava-next-13b"),
}


def preset_for(model: tc.Model) -> str:
    """The published preset matching ``model``'s checkpoint name; `TokencompError` if none does."""
    name = model.name.lower()
    for preset, keys in CHECKPOINT_NAMES.items():
        if any(k in name for k in keys):
            return preset
    raise tc.TokencompError(
        f"no published ShortV preset for checkpoint {model.name!r}; calibrate one (shortv.calibrate)"
    )


def kl_divergence(original: torch.Tensor, modified: torch.Tensor, direction: str = "code") -> torch.Tensor:
    """Per-sample KL between next-token distributions from logits ``(B, V)``.

    ``"code"``: KL(modified || original), what ``KLDivLoss(log_softmax(original), softmax(modified))``
    computes; ``"reverse"``: KL(original || modified).
    """
    lo, lm = original.float().log_softmax(-1), modified.float().log_softmax(-1)
    if direction == "code":
        return (lm.exp() * (lm - lo)).sum(-1)
    if direction == "reverse":
        return (lo.exp() * (lo - lm)).sum(-1)
    raise tc.TokencompError(f"direction must be 'code' or 'reverse', got {direction!r}")


def layer_contribution(model: tc.Model, batches, direction: str = "code", progress: bool = False) -> dict:
    """LC per layer for visual and text tokens, averaged over the samples of ``batches``.

    Args:
        batches: `tokencomp.Batch` objects (processor output).
    Returns:
        ``{"visual": [L floats], "text": [L floats], "samples": n, "direction": ...}``.
    """
    from tqdm import tqdm

    L = model.num_layers
    sums = {"visual": torch.zeros(L, dtype=torch.float64), "text": torch.zeros(L, dtype=torch.float64)}
    n = 0
    for batch in tqdm(batches, desc="ShortV layer contribution", disable=not progress):
        base = tc.Engine(model).prefill(batch).logits
        for i in range(L):
            for kind in ("visual", "text"):
                mod = tc.Engine(model, tc.method("freeze", layers=(i,), tokens=kind)).prefill(batch).logits
                sums[kind][i] += kl_divergence(base, mod, direction).double().sum().item()
        n += base.shape[0]
    return {
        "visual": (sums["visual"] / n).tolist(),
        "text": (sums["text"] / n).tolist(),
        "samples": n,
        "direction": direction,
    }


def calibrate(
    model: tc.Model,
    dataset,
    num_samples: int = 40,
    seed: int = 0,
    batch_size: int = 4,
    direction: str = "code",
    template: str | None = None,
    path: str | Path | None = None,
) -> dict:
    """Compute ShortV's layer contributions on ``num_samples`` samples drawn (seeded) from a
    harness dataset; save them as JSON to ``path`` when given. Costs 2L + 1 prefills per sample."""
    from tokencomp.api import prepare  # (the engine and transformers: not needed to list methods)

    samples = list(dataset)
    check_int("num_samples", num_samples, 1, len(samples))
    chosen = random.Random(seed).sample(samples, num_samples)
    template = template or model.family
    batches = [
        prepare(
            model,
            [s.load_image() for s in chosen[i : i + batch_size]],
            [fill_prompt(s, template) for s in chosen[i : i + batch_size]],
        )
        for i in range(0, num_samples, batch_size)
    ]
    result = layer_contribution(model, batches, direction)
    result.update(model=model.name, layers=model.num_layers, seed=seed, ids=[s.id for s in chosen])
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=1))
    return result


def lowest_layers(calibration: dict, n: int) -> tuple[int, ...]:
    """The ``n`` layers with the lowest visual LC (ties by layer index)."""
    lc = calibration["visual"]
    check_int("n (layers to freeze)", n, 0, len(lc))
    return tuple(sorted(range(len(lc)), key=lambda i: (lc[i], i))[:n])


def plot_layer_contribution(calibration: dict, path: str | Path, chosen=()) -> Path:
    """Plot LC per layer (visual vs text, log scale), marking the chosen layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(calibration["visual"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(range(L), calibration["visual"], "o-", label="visual tokens")
    ax.plot(range(L), calibration["text"], "s-", label="text tokens")
    for i in chosen:
        ax.axvspan(i - 0.4, i + 0.4, color="grey", alpha=0.2)
    ax.set_yscale("log")
    # a contribution of exactly 0 (e.g. visual tokens at the last layer: nothing after it reads
    # them) has no place on a log axis: drawn at the axis floor, hollow
    for values, marker in ((calibration["visual"], "o"), (calibration["text"], "s")):
        zero = [i for i, v in enumerate(values) if v <= 0]
        if zero:
            floor = min((v for v in values if v > 0), default=1e-12) / 10
            ax.plot(zero, [floor] * len(zero), marker, mfc="none", color="0.3", label=f"0 ({marker} at floor)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("layer contribution (KL, nats)")
    ax.set_title(
        f"ShortV layer contribution: {calibration.get('model', '')} ({calibration['samples']} samples; shaded = frozen)",
        fontsize=9,
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@tc.register("shortv")
class ShortV(tc.FreezeStrategy):
    """ShortV (arXiv 2504.00502): freeze the visual tokens in the decoder layers where they
    contribute least (a published ``preset``, a ``calibration`` file's ``n`` lowest, or ``layers``)."""

    layers: tuple[int, ...] | None = None
    preset: str | None = None
    calibration: str | None = None
    n: int | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.layers, self.preset, self.calibration)]
        if sum(given) != 1:
            raise tc.TokencompError("give exactly one of layers=, preset= or calibration= to shortv")
        if self.n is not None and self.calibration is None:
            raise tc.TokencompError("n= (how many layers to freeze) applies to calibration= only")
        if self.preset is not None and self.preset not in PRESETS:
            raise tc.TokencompError(f"unknown ShortV preset {self.preset!r}; presets: {sorted(PRESETS)}")
        if self.calibration is not None:
            path = Path(self.calibration)
            if not path.is_file():
                raise tc.TokencompError(f"ShortV calibration file {str(path)!r} does not exist")
            self._calib = json.loads(path.read_text())
        if self.layers is not None:
            self.layers = tuple(self.layers)

    def resolved(self) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        if self.preset is not None:
            return PRESETS[self.preset]
        L = len(self._calib["visual"])
        return lowest_layers(self._calib, self.n if self.n is not None else round(19 / 32 * L))

    def frozen_layers(self, num_layers: int) -> list[int]:
        if self.preset is not None and PRESET_LAYERS[self.preset] != num_layers:
            raise tc.UnsupportedModelError(
                f"ShortV preset {self.preset!r} is for a {PRESET_LAYERS[self.preset]}-layer decoder, the model has {num_layers}"
            )
        if self.calibration is not None and len(self._calib["visual"]) != num_layers:
            raise tc.UnsupportedModelError(
                f"calibration {self.calibration!r} has {len(self._calib['visual'])} layers, the model has {num_layers}"
            )
        return list(self.resolved())
