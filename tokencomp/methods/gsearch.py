"""G-Search and P-Sigmoid (Zhao et al., "Accelerating Multimodal Large Language Models by Searching
Optimal Vision Token Reduction", arXiv 2412.00556, CVPR 2025): per-layer keep-rate schedules.

**Schedule execution** (``schedule``): before each decoder layer i the remaining visual tokens are
ranked by the attention they got at layer i - 1 (from the last token by default, ``query="text"``
averages all text tokens) and the top ``round(r_i * N)`` are kept, N the visual tokens that entered
the LLM; removed tokens stay removed (an effective rate is never above an earlier one). Text
tokens are never removed. Layers 0 and 1 stay unpruned in the searched schedules (paper: layers
1-2, 1-indexed).

**G-Search** (`gsearch`): greedy from shallow to deep. For layer i, starting from r_{i-1}, lower
the rate of layer i and of all deeper layers in steps of ``step`` while the calibration quality
stays within ``tolerance`` of the unreduced model; keep the last passing value. The paper's exact
tolerance, step and calibration data are not public, so they are parameters; quality is the mean
KL(reduced || unreduced) of the last-position next-token distribution (``metric="kl"``, tolerance
in nats) or the accuracy drop on answered samples (``metric="accuracy"``). A polishing pass then
lowers any single layer by one step while that still passes, so the result is a local minimum:
lowering any one layer by one more step breaks the tolerance.

**P-Sigmoid** (`psigmoid`): ``r(i) = b + (1 - b) / (1 + exp(k (i - alpha)))`` for i >= 2 (1 before);
``b`` is the largest value meeting a FLOPs budget (a fraction of the unreduced LLM prefill FLOPs
summed over the calibration prompts, by bisection), and (k, alpha) are tuned by Bayesian
optimisation (the `bayesian-optimization` library) for calibration quality. The paper's formula is not public; this is the documented form
the team's method spec (shared METHODS.md §4, not in this repository) accepts.

Schedules are plain data: `save_schedule` / `load_schedule` (JSON), and the published
LLaVA-1.5-7B G-Search schedule is the preset ``"llava-1.5-7b"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import tokencomp as tc
from tokencomp.metrics import exact_match
from tokencomp.profiler import prefill_flops_from_config
from tokencomp.strategy import check_int, check_ratio

# Published LLaVA-1.5-7B G-Search schedule (read off the paper's plot; 1-indexed layers 1..31 given,
# layer 32 takes layer 31's value).
_PUBLISHED = [
    1.0,
    1.0,
    0.65,
    0.64,
    0.62,
    0.62,
    0.62,
    0.5,
    0.5,
    0.5,
    0.5,
    0.49,
    0.235,
    0.235,
    0.235,
    0.235,
    0.18,
    0.18,
    0.18,
    0.075,
    0.075,
    0.075,
    0.07,
    0.07,
    0.07,
    0.06,
    0.04,
    0.04,
    0.04,
    0.03,
    0.03,
    0.03,
]
PRESETS = {"llava-1.5-7b": _PUBLISHED}


def save_schedule(schedule: dict, path: str | Path) -> Path:
    """Write a schedule dict (``keep``, ``query``, ``source``, ...) as JSON."""
    Path(path).write_text(json.dumps(schedule, indent=1))
    return Path(path)


def load_schedule(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise tc.TokencompError(f"schedule file {str(path)!r} does not exist")
    data = json.loads(path.read_text())
    if "keep" not in data:
        raise tc.TokencompError(f"{path} has no 'keep' list")
    return data


@tc.register("schedule")
class Schedule(tc.LayerStrategy):
    """A per-layer keep-rate schedule (G-Search / P-Sigmoid, arXiv 2412.00556): before each
    decoder layer keep the best-attended fraction of the visual tokens the schedule gives, from
    ``rates``, a named ``preset`` or a saved schedule file ``path``."""

    rates: tuple[float, ...] | None = None
    preset: str | None = None
    path: str | None = None
    query: str = "last"

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.rates, self.preset, self.path)) != 1:
            raise tc.TokencompError("give exactly one of rates=, preset= or path= to schedule")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise tc.TokencompError(f"unknown schedule preset {self.preset!r}; presets: {sorted(PRESETS)}")
            self.rates = tuple(PRESETS[self.preset])
        if self.path is not None:
            data = load_schedule(self.path)
            self.rates, self.query = tuple(data["keep"]), data.get("query", self.query)
        self.rates = tuple(float(r) for r in self.rates)
        for i, r in enumerate(self.rates):
            check_ratio(f"keep rate of layer {i}", r)
        if self.rates and self.rates[0] != 1.0:
            raise tc.BudgetError(
                f"keep rate of layer 0 must be 1.0 (nothing ranks tokens before it), got {self.rates[0]}"
            )
        if self.query not in ("last", "text"):
            raise tc.TokencompError(f"query must be 'last' or 'text', got {self.query!r}")

    def effective(self, num_layers: int) -> list[float]:
        """Rates as executed: removed tokens stay removed, so each is the minimum so far."""
        if len(self.rates) != num_layers:
            raise tc.UnsupportedModelError(
                f"schedule has {len(self.rates)} keep rates, the model has {num_layers} layers"
            )
        return [min(self.rates[: i + 1]) for i in range(num_layers)]

    def prune_layers(self, num_layers: int) -> list[int]:
        r = self.effective(num_layers)
        return [i for i in range(1, num_layers) if r[i] < r[i - 1]]

    def needs_for(self, num_layers: int) -> list[tc.Need]:
        return [tc.Need(f"decoder_attention_{self.query}", i - 1) for i in self.prune_layers(num_layers)]

    def keep(self, ctx: tc.LayerContext) -> torch.Tensor:
        rate = self.effective(ctx.num_layers)[ctx.layer]
        count = torch.round(rate * ctx.input_image_count.double()).long()
        return ctx.keep_top(ctx.attention(ctx.layer - 1, self.query), count)


# ------------------------------------------------------------------------------------------------
# search


class _Evaluator:
    """Calibration quality of a schedule relative to the unreduced model."""

    def __init__(self, model, batches, metric: str, answers=None, query: str = "last", max_new_tokens: int = 4):
        if metric not in ("kl", "accuracy"):
            raise tc.TokencompError(f"metric must be 'kl' or 'accuracy', got {metric!r}")
        if metric == "accuracy" and answers is None:
            raise tc.TokencompError("metric='accuracy' needs the reference answers of the calibration batches")
        self.model, self.batches, self.metric, self.answers, self.query = model, batches, metric, answers, query
        self.max_new_tokens = max_new_tokens
        self.evaluations = 0
        self.base = self._run(None)

    def _run(self, rates):
        strat = None if rates is None else Schedule(rates=tuple(rates), query=self.query)
        engine = tc.Engine(self.model, strat)
        out = []
        for i, batch in enumerate(self.batches):
            if self.metric == "kl":
                out.append(engine.prefill(batch).logits)
            else:
                tok = self.model.tokenizer
                tokens, _ = engine.generate(batch, self.max_new_tokens, tok.eos_token_id, tok.pad_token_id or 0)
                texts = [tok.decode(t, skip_special_tokens=True) for t in tokens]
                out += [exact_match(p, a) for p, a in zip(texts, self.answers[i])]
        return torch.cat(out) if self.metric == "kl" else sum(out) / len(out)

    def loss(self, rates) -> float:
        """Mean KL (nats) or accuracy drop against the unreduced model (lower is better)."""
        self.evaluations += 1
        got = self._run(rates)
        if self.metric == "kl":
            from tokencomp.methods.shortv import kl_divergence

            return float(kl_divergence(self.base, got, "code").mean())
        return float(self.base - got)


def gsearch(
    model: tc.Model,
    batches,
    tolerance: float = 0.05,
    step: float = 0.05,
    metric: str = "kl",
    answers=None,
    query: str = "last",
    first_pruned: int = 2,
    min_rate: float = 0.0,
    polish: bool = True,
) -> dict:
    """Greedy shallow-to-deep search of the smallest keep rates within ``tolerance``.

    Args:
        batches: calibration `tokencomp.Batch` objects.
        tolerance: allowed mean KL (nats, ``metric="kl"``) or accuracy drop (``"accuracy"``).
        step: rate decrement.
        answers: per batch, per sample reference answers (``metric="accuracy"``).
        first_pruned: the first layer that may be pruned (paper: the third layer, index 2).

    Returns:
        A schedule dict: ``keep`` (L rates), ``loss``, ``evaluations``, and the settings.
    """
    L = model.num_layers
    check_int("first_pruned (first layer that may be pruned)", first_pruned, 1, L - 1)
    ev = _Evaluator(model, batches, metric, answers, query)
    rates = [1.0] * L

    def ok(r):
        return ev.loss(r) <= tolerance

    for i in range(first_pruned, L):
        best = rates[i - 1]
        while best - step >= min_rate - 1e-9:
            cand = round(best - step, 6)
            if not ok(rates[:i] + [cand] * (L - i)):
                break
            best = cand
        rates[i:] = [best] * (L - i)
    while polish:  # single-layer lowering until none passes: a local minimum
        changed = False
        for i in range(first_pruned, L):
            cand = round(rates[i] - step, 6)
            if cand < min_rate - 1e-9:
                continue
            trial = rates[:i] + [cand] + [min(r, cand) for r in rates[i + 1 :]]
            if ok(trial):
                rates, changed = trial, True
        if not changed:
            break
    return {
        "keep": rates,
        "query": query,
        "source": "g-search",
        "model": model.name,
        "tolerance": tolerance,
        "step": step,
        "metric": metric,
        "loss": ev.loss(rates),
        "evaluations": ev.evaluations,
        "calibration_samples": sum(b.input_ids.shape[0] for b in batches),
    }


def psigmoid_rates(num_layers: int, k: float, alpha: float, b: float, first_pruned: int = 2) -> list[float]:
    """``r(i) = b + (1 - b) / (1 + exp(k (i - alpha)))`` for ``i >= first_pruned``, 1 before."""
    out = []
    for i in range(num_layers):
        if i < first_pruned:
            out.append(1.0)
        else:
            z = max(min(k * (i - alpha), 60.0), -60.0)
            out.append(b + (1 - b) / (1 + math.exp(z)))
    return out


def calibration_shapes(model: tc.Model, batches) -> list[tuple[int, int]]:
    """``(visual, text)`` prompt tokens of every sample of ``batches`` (image spans, newlines included)."""
    shapes = []
    for batch in batches:
        for i, spans in enumerate(tc.Engine(model).image_spans(batch)):
            n_visual = sum(c for _, c in spans)
            shapes.append((n_visual, int(batch.attention_mask[i].sum()) - n_visual))
    return shapes


def schedule_flops_ratio(
    model: tc.Model, rates, n_visual: int = 0, n_text: int = 0, shapes: list[tuple[int, int]] | None = None
) -> float:
    """LLM prefill FLOPs of ``rates`` over the unreduced prefill, with the engine's rounding, for one
    prompt of ``n_visual`` + ``n_text`` tokens, or summed over the ``(visual, text)`` prompts ``shapes``
    (`calibration_shapes`) before dividing."""
    cfg = model.hf.config.text_config
    kept = full = 0.0
    for nv, nt in shapes or [(n_visual, n_text)]:
        keep = [round(min(rates[: i + 1]) * nv) for i in range(len(rates))]
        kept += prefill_flops_from_config(cfg, nv, nt, keep=keep)
        full += prefill_flops_from_config(cfg, nv, nt)
    return kept / full


def psigmoid(
    model: tc.Model,
    batches,
    flops_ratio: float = 0.5,
    n_iter: int = 10,
    init_points: int = 4,
    k_bounds: tuple[float, float] = (0.1, 3.0),
    alpha_bounds: tuple[float, float] | None = None,
    metric: str = "kl",
    answers=None,
    query: str = "last",
    first_pruned: int = 2,
    seed: int = 0,
) -> dict:
    """Tune a P-Sigmoid schedule by Bayesian optimisation under a FLOPs budget (see module doc)."""
    from bayes_opt import BayesianOptimization

    check_ratio("flops_ratio", flops_ratio, 0.0, 1.0)
    L = model.num_layers
    check_int("first_pruned (first layer that may be pruned)", first_pruned, 1, L - 1)
    shapes = calibration_shapes(model, batches)
    alpha_bounds = alpha_bounds or (float(first_pruned), float(L - 1))

    def ratio(rates) -> float:
        return schedule_flops_ratio(model, rates, shapes=shapes)

    def solve_b(k: float, alpha: float) -> float:
        lo, hi = 0.0, 1.0
        if ratio(psigmoid_rates(L, k, alpha, 0.0, first_pruned)) > flops_ratio:
            return -1.0  # infeasible even with b = 0
        for _ in range(40):
            mid = (lo + hi) / 2
            if ratio(psigmoid_rates(L, k, alpha, mid, first_pruned)) <= flops_ratio:
                lo = mid
            else:
                hi = mid
        return lo

    ev = _Evaluator(model, batches, metric, answers, query)

    def objective(k: float, alpha: float) -> float:
        b = solve_b(k, alpha)
        if b < 0:  # over budget even at b = 0: penalised by how far over, so the search moves back
            over = ratio(psigmoid_rates(L, k, alpha, 0.0, first_pruned))
            return -1e3 * (1 + over - flops_ratio)
        return -ev.loss(psigmoid_rates(L, k, alpha, b, first_pruned))

    opt = BayesianOptimization(
        f=objective, pbounds={"k": k_bounds, "alpha": alpha_bounds}, random_state=seed, verbose=0
    )
    opt.probe(params={"k": k_bounds[1], "alpha": alpha_bounds[0]}, lazy=True)  # the steepest, earliest drop
    opt.maximize(init_points=init_points, n_iter=n_iter)
    best = opt.max["params"]
    b = solve_b(best["k"], best["alpha"])
    if b < 0:
        raise tc.BudgetError(f"flops_ratio={flops_ratio} cannot be met by any P-Sigmoid schedule in the search bounds")
    rates = psigmoid_rates(L, best["k"], best["alpha"], b, first_pruned)
    return {
        "keep": rates,
        "query": query,
        "source": "p-sigmoid",
        "model": model.name,
        "params": {"k": best["k"], "alpha": best["alpha"], "b": b},
        "flops_ratio_budget": flops_ratio,
        "flops_ratio": ratio(rates),
        "loss": -opt.max["target"],
        "evaluations": ev.evaluations,
    }


def rank_similarity(model: tc.Model, batches, query: str = "last"):
    """Kendall tau between the visual-token rankings (attention received) of every pair of decoder
    layers, averaged over samples. Returns an ``(L, L)`` numpy array."""
    import numpy as np
    from scipy.stats import kendalltau

    L = model.num_layers
    probe = _Probe(query=query, layers=L)
    total = np.zeros((L, L))
    n = 0
    for batch in batches:
        pre = tc.Engine(model, probe).prefill(batch)
        st = pre.input_state
        for b in range(batch.input_ids.shape[0]):
            vis = st.valid[b] & (st.kind[b] >= 2)
            rows = [
                pre.captures[tc.Need(f"decoder_attention_{query}", i)][b].mean(dim=(0, 1))[vis].float().cpu().numpy()
                for i in range(L)
            ]
            for i in range(L):
                for j in range(L):
                    total[i, j] += 1.0 if i == j else kendalltau(rows[i], rows[j]).statistic
            n += 1
    return total / n


def plot_rank_similarity(tau, path, title: str = "") -> Path:
    """Heatmap of the layer x layer Kendall tau table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(tau, cmap="viridis", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, label="Kendall tau")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("decoder layer")
    ax.set_title(title or "rank similarity of visual tokens between layers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def rank_similarity_table(tau) -> str:
    """The Kendall tau table as markdown."""
    n = len(tau)
    head = "| layer | " + " | ".join(str(j) for j in range(n)) + " |"
    rows = ["| " + str(i) + " | " + " | ".join(f"{tau[i][j]:.2f}" for j in range(n)) + " |" for i in range(n)]
    return "\n".join([head, "|---" * (n + 1) + "|", *rows])


@tc.register("_rank-probe")
class _Probe(tc.LayerStrategy):
    """Captures attention rows at every layer and prunes nothing (for `rank_similarity`)."""

    query: str = "last"
    layers: int = 0

    def needs(self):
        return [tc.Need(f"decoder_attention_{self.query}", i) for i in range(self.layers)]

    def prune_layers(self, num_layers):
        return []

    def keep(self, ctx):
        return ctx.valid
