"""FLOPs, latency and memory of a run.

**Convention**: every figure is in FLOPs = 2 x multiply-adds, counting the matrix products only
(linear layers, convolutions, attention's QK^T and AV over the full n x n square, as
`torch.utils.flop_counter` counts them); norms, softmax and element-wise work are not counted.
The LLaMA-style MLP has three matrices (gate, up, down: ``6 n d m``), grouped-query attention
shrinks the K/V projections, and head dims come from the real config. Published tables that
state "FLOPs" for LLaVA use this convention (e.g. LLaVA-1.5-7B, 576 visual + 64 text tokens:
8.5 TFLOPs prefill); the FastV paper's ``4nd² + 2n²d + 2ndm`` is the same per-layer count in
multiply-adds with a two-matrix MLP.

Per run and sample the profiler reports the vision tower (the layers the engine actually ran),
the projector, the LLM prefill layer by layer (each layer with its own token count; frozen-visual
layers at their reduced cost), the LM head, decoding per generated token (each layer with its own
KV length), and the method's own scoring work as ``overhead``.
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from .errors import TokencompError
from .record import RunRecord

UNIT = "FLOPs (2 x multiply-adds; matrix products only)"


@dataclass(frozen=True)
class DecoderShape:
    """Decoder sizes from a transformers text config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    gated: bool = True

    @classmethod
    def from_config(cls, cfg) -> DecoderShape:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            layers=cfg.num_hidden_layers,
            vocab=cfg.vocab_size,
        )

    def layer(self, n: int, text: int | None = None, kv_len: int | None = None) -> float:
        """FLOPs of one decoder layer.

        Args:
            n: tokens entering the layer (keys and values are computed for all of them).
            text: queries that get attention output and MLP (default all ``n``; fewer in a
                frozen-visual ShortV layer, where only text tokens are updated).
            kv_len: keys each query attends to (default ``n``; the cache length when decoding).
        """
        q = n if text is None else text
        kv = n if kv_len is None else kv_len
        d, hd = self.hidden, self.head_dim
        proj = 2 * q * d * self.heads * hd * 2 + 2 * n * d * self.kv_heads * hd * 2  # q, o ; k, v
        attn = 4 * q * kv * self.heads * hd  # QK^T and AV
        mlp = 2 * q * d * self.intermediate * (3 if self.gated else 2)
        return float(proj + attn + mlp)

    def lm_head(self, tokens: int = 1) -> float:
        return float(2 * tokens * self.hidden * self.vocab)


@dataclass(frozen=True)
class VisionShape:
    """CLIP vision tower sizes from a transformers vision config."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    image_size: int
    patch_size: int
    channels: int = 3
    cls_token: bool = True

    @classmethod
    def from_config(cls, cfg, cls_token: bool = True) -> VisionShape:
        """From a vision config; ``cls_token=False`` for towers without CLS (SigLIP)."""
        return cls(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_hidden_layers,
            cfg.image_size,
            cfg.patch_size,
            getattr(cfg, "num_channels", 3),
            cls_token,
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + int(self.cls_token)

    def qk_only(self, queries: int | None = None) -> float:
        """One layer's q and k projections alone, per view (a capture layer whose output feeds
        nothing): keys for every token, queries for ``queries`` rows (None: every token)."""
        q = self.tokens if queries is None else queries
        return float(2 * (q + self.tokens) * self.hidden * self.hidden)

    def tower(self, views: int, layers_run: int, layer_tokens: list[list[int]] | None = None) -> float:
        """Patch embedding plus ``layers_run`` encoder layers over ``views`` views; ``layer_tokens``:
        per layer, the tokens per view into its attention (q/k/v, output projection, the maps) and
        into its MLP, where a tower strategy ran (None or empty: every token of a full-size view;
        the first layer's count gives the patches a resized view embeds)."""
        d = self.hidden
        patches = layer_tokens[0][0] - int(self.cls_token) if layer_tokens else self.patches  # a resized view's
        conv = 2 * patches * self.channels * self.patch_size**2 * d
        counts = layer_tokens or [[self.tokens, self.tokens]] * layers_run
        layers = sum(2 * a * d * d * 4 + 4 * a * a * d + 2 * m * d * self.intermediate * 2 for a, m in counts)
        return float(views * (conv + layers))


@dataclass
class FlopsReport:
    """FLOPs of one sample of a run (see the module docstring for the convention).

    Attributes:
        vision: vision tower (patch embedding and the encoder layers that ran).
        projector: the multimodal projector over the tokens it projected.
        prefill_layers: per decoder layer.
        lm_head: the LM head at the last prefill position.
        decode: per generated token after the first (its layers at their KV lengths + LM head).
        overhead: the method's scoring work (captured attention rows, similarity matrices).
    """

    vision: float
    projector: float
    prefill_layers: list[float]
    lm_head: float
    decode: list[float] = field(default_factory=list)
    overhead: float = 0.0
    unit: str = UNIT

    @property
    def prefill(self) -> float:
        """LLM prefill: decoder layers + LM head (the figure papers compare)."""
        return sum(self.prefill_layers) + self.lm_head

    @property
    def total_prefill(self) -> float:
        """Everything up to the first token: vision, projector, LLM prefill, overhead."""
        return self.vision + self.projector + self.prefill + self.overhead

    @property
    def total(self) -> float:
        return self.total_prefill + sum(self.decode)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill=self.prefill, total_prefill=self.total_prefill, total=self.total)
        return d


def run_flops(model, record: RunRecord, strategies=()) -> list[FlopsReport]:
    """Analytic FLOPs per sample of a finished run, from the model config and the run record.

    Args:
        model: the `tokencomp.Model` that ran.
        record: its `RunRecord`.
        strategies: the strategies of the run; each may add its own scoring cost through an
            ``overhead_flops(model, record, sample) -> float`` method. The captures the engine makes
            for them (vision attention rows, decoder attention rows and keys) are charged here;
            a method adds only the work it does itself.
    """
    cfg = model.hf.config
    dec = DecoderShape.from_config(cfg.text_config)
    vis = VisionShape.from_config(cfg.vision_config, model.has_cls)
    proj_in = vis.hidden * len(model.feature_layers)
    reports = []
    frozen = set(record.frozen_layers)
    frozen_text = set(record.frozen_text_layers)
    for b in range(len(record.tokens_per_layer)):
        views = sum(len(v) for v in record.tokens_per_view[b])
        projected = (
            record.projected_tokens[b] if record.projected_tokens else sum(sum(v) for v in record.tokens_per_view[b])
        )
        layers = []
        for i, (n, v) in enumerate(zip(record.tokens_per_layer[b], record.visual_per_layer[b])):
            active = n - v if i in frozen else v if i in frozen_text else None  # tokens that get updates
            layers.append(dec.layer(n, text=active))
        # captured vision attention, q . K of the scored rows: the CLS row, or every row for a mean
        scored_rows = record.vision_cls_layers + record.vision_mean_layers * vis.tokens
        overhead = views * scored_rows * 2 * vis.tokens * vis.hidden
        for layer, query, *preprune in record.decoder_captures:
            early = bool(preprune and preprune[0])  # before the pruning at `layer`: the tokens leaving layer - 1
            at = layer - 1 if early and layer > 0 else layer
            n = record.tokens_per_layer[b][at]
            text = n - record.visual_per_layer[b][at]
            raters = record.rater_tokens[b] if record.rater_tokens else text  # older records: an upper bound
            rows = {"last": 1, "text": text, "raters": raters}.get(query, n)  # "all": every row
            overhead += 2 * rows * dec.hidden * dec.heads * dec.head_dim + 2 * rows * n * dec.heads * dec.head_dim
            if early:  # keys of every token, which the layer itself computes only for the kept ones
                overhead += 2 * n * dec.hidden * dec.kv_heads * dec.head_dim
        for s in strategies:
            if hasattr(s, "overhead_flops"):
                own = s.overhead_flops(model, record, b)
                if isinstance(own, bool) or not isinstance(own, numbers.Real) or not 0 <= own < math.inf:
                    raise TokencompError(f"{s}.overhead_flops must return a FLOP count >= 0, got {own!r}")
                overhead += own
        decode = []
        if record.kv_cache_lengths and record.new_tokens:
            final = record.kv_cache_lengths[b]
            steps = record.new_tokens[b] - 1
            for step in range(steps):  # the step-th decoded token sees (final - steps + step + 1) keys
                kv = [length - steps + step + 1 for length in final]
                decode.append(sum(dec.layer(1, kv_len=k) for k in kv) + dec.lm_head())
        reports.append(
            FlopsReport(
                vision=vis.tower(views, record.vision_layers_run, record.vision_layer_tokens)
                + views * record.vision_qk_layers * vis.qk_only(record.vision_qk_queries),
                projector=float(2 * projected * (proj_in * dec.hidden + dec.hidden * dec.hidden)),
                prefill_layers=layers,
                lm_head=dec.lm_head(),
                decode=decode,
                overhead=float(overhead),
            )
        )
    return reports


def prefill_flops_from_config(text_config, visual: int, text: int, frozen_layers=(), keep=None) -> float:
    """LLM prefill FLOPs (decoder layers only) of a checkpoint's decoder, from its config alone.

    Args:
        text_config: a transformers text config (e.g. ``LlamaConfig`` of LLaVA-1.5-7B).
        visual / text: token counts entering the LLM.
        frozen_layers: ShortV-style layers where only text tokens are updated.
        keep: optional per-layer visual token counts (in-LLM pruning schedules), length L.
    """
    dec = DecoderShape.from_config(text_config)
    total = 0.0
    for i in range(dec.layers):
        v = visual if keep is None else keep[i]
        total += dec.layer(v + text, text=text if i in frozen_layers else None)
    return total


# ------------------------------------------------------------------------------------------------
# latency and memory


@dataclass
class Timing:
    """Wall-clock measurement of one configuration (seconds)."""

    prefill_median: float
    prefill_spread: float  # max - min over repeats
    decode_per_token_median: float
    peak_memory_bytes: int
    kv_cache_bytes: int
    repeats: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak resident set size in bytes (``field="VmRSS"``: the current one); 0 where
    ``/proc`` has no such line."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_rss_peak() -> None:
    """Reset this process's peak-RSS mark (Linux ``clear_refs``; left as it is where unsupported)."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(engine, batch, repeats: int = 5, warmup: int = 1, new_tokens: int = 8) -> Timing:
    """Prefill (time to first token) and per-token decode time of ``engine`` on ``batch``.

    Warm-up runs first; then ``repeats`` timed greedy generations of ``new_tokens`` tokens, each
    timing its prefill and its decode steps apart (a monotonic clock, device-synchronised). The
    prefill is time to first token from the batch as the processor made it, on the host: copying
    it to the device is part of it, as in serving. Peak memory is CUDA max-allocated on GPU; on
    CPU the process's peak RSS over the timed runs (Linux: the high-water mark is reset before
    them; where it cannot be, the mark covers the whole process, so compare it within one run
    only). It includes the model's weights and the Python runtime, not just activations.
    """
    device = engine.model.device
    cuda = device.type == "cuda"
    for _ in range(warmup):
        engine.generate(batch, max_new_tokens=2)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_rss_peak()
    runs = [_timed_generation(engine, batch, new_tokens) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_bytes()
    return _timing(runs, int(peak), str(device))


def measure_interleaved(
    engines: dict, batch, repeats: int = 5, warmup: int = 1, new_tokens: int = 8, progress: bool = False
) -> dict[str, Timing]:
    """`measure` for several engines on one batch, side by side: each of ``repeats`` rounds times
    every engine once, the engine it starts with moved on each round (spread evenly over the
    rounds), so a change in the machine's speed (another job, clocks) falls on all of them alike
    and their ratios stay fair. Medians over the rounds. Peak memory cannot be told apart when interleaved: ``peak_memory_bytes`` is 0.

    Args:
        engines: name -> `tokencomp.Engine`.
        batch: one `tokencomp.Batch` all engines run on.
    Returns: name -> `Timing` (seconds).
    """
    names = list(engines)
    for name in names:
        for _ in range(warmup):
            engines[name].generate(batch, max_new_tokens=2)
    runs: dict[str, list] = {name: [] for name in names}
    for r in tqdm(range(repeats), desc="interleaved timing", unit="round", leave=False, disable=not progress):
        shift = (r * len(names)) // repeats  # start positions spread evenly over the rounds
        for name in names[shift:] + names[:shift]:
            runs[name].append(_timed_generation(engines[name], batch, new_tokens))
    return {name: _timing(runs[name], 0, str(engines[name].model.device)) for name in names}


def _timed_generation(engine, batch, new_tokens: int) -> tuple[float, float, int]:
    """One greedy generation; its record times the prefill and the decode steps apart:
    ``(prefill seconds, decode seconds per token, KV-cache bytes)``."""
    tokens, pre = engine.generate(batch, max_new_tokens=new_tokens, eos_token_id=None)
    return pre.record.prefill_s, pre.record.decode_s / max(len(tokens[0]) - 1, 1), pre.record.kv_cache_bytes


def _timing(runs: list[tuple[float, float, int]], peak: int, device: str) -> Timing:
    prefill = [r[0] for r in runs]
    return Timing(
        prefill_median=statistics.median(prefill),
        prefill_spread=max(prefill) - min(prefill),
        decode_per_token_median=statistics.median(r[1] for r in runs),
        peak_memory_bytes=peak,
        kv_cache_bytes=int(runs[-1][2]),
        repeats=len(runs),
        device=device,
    )
