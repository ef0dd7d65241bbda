"""The engine: vision tower -> vision strategy -> projector -> sequence build -> decoder layer loop
(with layer and freeze strategies) -> greedy decoding over a per-layer KV cache.

The engine drives the Hugging Face modules itself (the CLIP encoder layers, the decoder layers),
so each decoder layer sees its own token set, mask and positions. Scores are captured with forward
hooks on projection/norm modules, registered for the duration of one layer and removed in
``finally``; the model keeps its configured attention (SDPA by default) and no N x N attention
map is ever built.

Position-id policy (one per stage, both switchable in `EngineOptions`):
* ``vision_positions="contiguous"`` (default): a prompt compressed before the LLM is numbered
  0..n-1 as a shorter prompt (as VisionZip's LLM sees it). ``"original"``: each kept token keeps
  the position it had in the uncompressed prompt; tokens with no single source (merged, pooled)
  are spread evenly over their image's span.
* ``llm_positions="original"`` (default): tokens dropped inside the LLM leave gaps; kept tokens
  keep their position ids (as FastV does). ``"contiguous"``: the kept tokens are renumbered
  0..k-1 from the pruned layer on (earlier layers keep their numbering in the KV cache). A layer
  strategy with ``llm_positions = "contiguous"`` (PyramidDrop, as its authors' code) renumbers at
  its own pruning whatever the option says.
Decoded tokens continue, in each layer, from that layer's last position + 1.

Each decoder layer attends as its config says (`tokencomp.attention`): full causal, or a sliding
window (Mistral, Qwen2 / Qwen3 with ``use_sliding_window``, Gemma2 / Gemma3 ``layer_types``), its
mask built with transformers' masking utilities, its rotary embedding of its own kind (Gemma3).
``window="sequence"`` (default, as Hugging Face counts): a window spans the tokens the layer holds,
in order; ``"position"``: it spans position ids (see `tokencomp.attention`).

A layer strategy may also insert tokens inside the LLM (`LayerStrategy.recycle_tokens`, SparseVLM's
merged tokens): they go right after each sample's kept image tokens, have no source position and
so need contiguous LLM positions, and get score 0 in the captures taken before they existed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import attention, kernels
from .cache import LayerKVCache
from .errors import InputMismatchError, TokencompError, UnsupportedModelError, renamed
from .model import Model
from .stages.captures import CaptureStage
from .stages.decoder import DecoderStage, PrefillOutput
from .stages.decoding import DecodingStage
from .stages.frozen import FrozenPlan, FrozenStage
from .stages.sequence import SeqState, SequenceStage
from .stages.vision import VisionStage
from .strategy import (
    CLS_NEEDS,
    DECODER_NEEDS,
    KEY_NORM_NEEDS,
    PREPRUNE_NEEDS,
    VISION_NEEDS,
    FreezeStrategy,
    LayerStrategy,
    Need,
    RunInfo,
    Strategy,
    TowerStrategy,
    VisionStrategy,
    check_int,
)

__all__ = ["Batch", "Engine", "EngineOptions", "FrozenPlan", "LayerKVCache", "PrefillOutput", "SeqState"]


@dataclass
class EngineOptions:
    """Run options: position-id policies (module docstring), what a sliding window counts in
    (``window``: ``"sequence"``, the tokens a layer holds, as Hugging Face; ``"position"``, position
    ids; see `tokencomp.attention`) and the token-kernel backend (``"auto"``: Triton on CUDA tensors,
    PyTorch reference otherwise; ``"torch"``; ``"triton"``)."""

    vision_positions: str = "contiguous"
    llm_positions: str = "original"
    kernel_backend: str = "auto"
    window: str = "sequence"

    def __post_init__(self) -> None:
        kernels.backend(None, self.kernel_backend)  # validates the name
        for name in ("vision_positions", "llm_positions"):
            if getattr(self, name) not in ("contiguous", "original"):
                raise TokencompError(f"{name} must be 'contiguous' or 'original', got {getattr(self, name)!r}")
        if self.window not in attention.WINDOW_COUNTS:
            raise TokencompError(f"window must be one of {list(attention.WINDOW_COUNTS)}, got {self.window!r}")


@dataclass
class Batch:
    """Processor output the engine consumes.

    Attributes:
        input_ids: ``(B, T)`` with every image expanded to its placeholder tokens, left padded.
        attention_mask: ``(B, T)`` 1 for real tokens.
        pixel_values: LLaVA-1.5 ``(images, 3, S, S)``; LLaVA-NeXT ``(images, max_views, 3, S, S)``.
        image_sizes: ``(images, 2)`` original ``(height, width)`` (LLaVA-NeXT, OneVision), else None.
        batch_num_images: ``(B,)`` images per prompt (OneVision's processor), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    batch_num_images: torch.Tensor | None = None

    @classmethod
    def from_processor(cls, out) -> Batch:
        """A batch from a Hugging Face processor's output (``input_ids``, ``attention_mask``,
        ``pixel_values`` and, for LLaVA-NeXT, ``image_sizes``)."""
        return cls(
            input_ids=out["input_ids"],
            attention_mask=out.get("attention_mask", torch.ones_like(out["input_ids"])),
            pixel_values=out.get("pixel_values"),
            image_sizes=out.get("image_sizes"),
            batch_num_images=out.get("batch_num_images"),
        )


def split_strategies(
    strategies,
) -> tuple[TowerStrategy | None, VisionStrategy | None, list[LayerStrategy], list[FreezeStrategy]]:
    """Normalise ``None``, one strategy or a list into (tower, vision, layer list, freeze list)."""
    if strategies is None:
        strategies = []
    elif isinstance(strategies, (Strategy, str, type, dict)):
        strategies = [strategies]
    tower, vision, layer, freeze = [], [], [], []
    for s in strategies:
        if not isinstance(s, Strategy):
            hint = ""
            if isinstance(s, str):
                hint = f"; build one by name with tc.method({s!r}, ...)"
            elif isinstance(s, type):
                hint = f"; {s.__name__} is a class: pass an instance, e.g. {s.__name__}(...)"
            raise TokencompError(f"expected a tokencomp strategy, got {type(s).__name__}: {s!r}{hint}")
        stages = {"tower": tower, "vision": vision, "layer": layer, "freeze": freeze}
        if s.stage not in stages:
            raise TokencompError(f"strategy {s} has unknown stage {s.stage!r}; expected one of {sorted(stages)}")
        stages[s.stage].append(s)
    if len(vision) > 1:
        raise TokencompError(f"at most one vision strategy per run, got {[str(v) for v in vision]}")
    if len(tower) > 1:
        raise TokencompError(f"at most one tower strategy per run, got {[str(t) for t in tower]}")
    if tower and vision:
        raise TokencompError(
            f"{tower[0]} reduces the tokens inside the vision tower, so {vision[0]} would see tokens that "
            "are no longer patches: compose a tower strategy with layer and freeze strategies only"
        )
    return (tower[0] if tower else None), (vision[0] if vision else None), layer, freeze


class Engine(VisionStage, SequenceStage, DecoderStage, CaptureStage, FrozenStage, DecodingStage):
    """Runs a `Model` with a composition of strategies.

    The engine holds the run's plan (the strategies by stage, the captures they need, the layers
    pruned and frozen) and validates a batch against it; its stages, one module each under
    `tokencomp.stages`, do the work along the data path: `encode_images` (vision tower, vision
    strategy, projector, the family's layout), `build_sequence`, `prefill` (the decoder layer loop)
    and `generate` (decoding).

    Args:
        model: the adapter.
        strategies: None (the unmodified model), one strategy, or a list with at most one vision
            strategy, any number of layer strategies and freeze strategies.
        options: `EngineOptions` (position-id policies, what a window counts in, the kernel backend).
    """

    def __init__(self, model: Model, strategies=None, options: EngineOptions | None = None) -> None:
        self.model = model
        self.options = options or EngineOptions()
        self.tower, self.vision, self.layer_strategies, self.freeze = split_strategies(strategies)
        front = [s for s in (self.tower, self.vision) if s is not None]
        self.strategies = front + self.layer_strategies + self.freeze
        L = model.num_layers
        # the layers a user names first (FastV's k): a capture layer derived from one would be a worse message
        self.prune_at: dict[int, list[LayerStrategy]] = {}
        for s in self.layer_strategies:
            for lay in s.prune_layers(L):
                check_int(f"{s}: prune before layer", lay, s.first_prune_layer, L - 1)
                self.prune_at.setdefault(lay, []).append(s)
            contiguous = "contiguous" in (self.options.llm_positions, getattr(s, "llm_positions", None))
            if hasattr(s, "recycle_tokens") and not contiguous:
                raise TokencompError(
                    f"{s} inserts merged tokens, which have no position of their own: use contiguous LLM positions"
                )
        flash = model.attn_implementation.startswith("flash")
        if flash and self.options.window == "position" and attention.SLIDING in model.layer_kinds:
            raise TokencompError(
                "FlashAttention counts a sliding window in sequence positions; window='position' needs 'sdpa' "
                "or 'eager' attention"
            )
        self.needs: set[Need] = set()
        for s in self.strategies:
            for need in s.needs_for_model(model):
                need = Need(*need)
                if need.kind in VISION_NEEDS:
                    nv = model.vision_num_layers
                    check_int(f"{s}: vision capture layer", need.layer, -nv, nv - 1)
                    if need.kind in CLS_NEEDS and not model.has_cls:
                        raise UnsupportedModelError(f"{s} needs {need.kind}, but the vision tower has no CLS token")
                elif need.kind in DECODER_NEEDS + KEY_NORM_NEEDS:
                    check_int(f"{s}: decoder capture layer", need.layer, 0, L - 1)
                else:
                    known = VISION_NEEDS + DECODER_NEEDS + KEY_NORM_NEEDS
                    raise TokencompError(f"{s}: unknown need {need.kind!r}; known: {known}")
                self.needs.add(need)
        self.raters = [s for s in self.layer_strategies if hasattr(s, "raters")]
        if any(n.kind.endswith("_raters") for n in self.needs) and not self.raters:
            raise TokencompError("a decoder_attention_raters capture needs a layer strategy with a raters() method")
        nl = model.vision_num_layers
        self.feature_hidden = [f % (nl + 1) for f in model.feature_layers]  # hidden_states index: 0 = embeddings
        self.vision_capture_layers = sorted({n.layer % nl for n in self.needs if n.kind in VISION_NEEDS})
        # the layers whose CLS row, and those whose every row, is scored (`_vision_scores`): FLOPs
        one_row = (*CLS_NEEDS, "vision_mean_logits")  # the CLS query row, or the mean query's
        self.vision_cls_layers = len({(n.kind in CLS_NEEDS, n.layer % nl) for n in self.needs if n.kind in one_row})
        self.vision_mean_layers = len({n.layer % nl for n in self.needs if n.kind == "vision_mean_attention"})
        self.vision_layers_run = max([f for f in self.feature_hidden] + [c + 1 for c in self.vision_capture_layers])
        # a capture layer past the last feature layer (PruMerge's, GlobalCom2's layer -1 under LLaVA's
        # feature layer -2): its output feeds nothing, so only its norm and q/k projections run
        self.vision_qk_layers = int(self.vision_layers_run > max(self.feature_hidden))
        # that layer projects queries only for the rows its scores read: every row for a mean over
        # all queries (or the mean query), the CLS row for CLS scores, none for keys alone
        at_qk = {n.kind for n in self.needs if n.kind in VISION_NEEDS and n.layer % nl == self.vision_layers_run - 1}
        if not self.vision_qk_layers or at_qk & {"vision_mean_attention", "vision_mean_logits"}:
            self.vision_qk_queries = None
        else:
            self.vision_qk_queries = 1 if at_qk & set(CLS_NEEDS) else 0
        self.tower_layers: list[int] = []  # encoder layers inside which the tower strategy reduces
        if self.tower is not None:
            if len(self.feature_hidden) > 1:
                raise UnsupportedModelError(
                    f"{self.tower} reduces tokens inside the tower, but this model concatenates the features of "
                    f"{len(self.feature_hidden)} layers, which would then differ in length"
                )
            if self.vision_capture_layers:
                raise TokencompError(f"{self.tower} declares vision captures, which a tower strategy does not get")
            self.tower_layers = sorted(set(self.tower.reduce_layers(self.vision_layers_run)))
            for lay in self.tower_layers:
                check_int(f"{self.tower}: reduce inside encoder layer", lay, 0, self.vision_layers_run - 1)
            if self.tower_layers and model.attn_implementation.startswith("flash"):
                raise UnsupportedModelError(
                    f"{self.tower} reduces tokens inside the tower, whose attention then takes a log(size) bias, "
                    "which FlashAttention cannot add: load the model with attn_implementation 'sdpa' or 'eager'"
                )
        self.decoder_captures = sorted(
            {
                (n.layer, n.kind.rsplit("_", 1)[1], n.kind in PREPRUNE_NEEDS)
                for n in self.needs
                if n.kind in DECODER_NEEDS
            }
        )
        self.frozen: dict[int, str] = {}  # layer -> the token type that passes through unchanged
        for s in self.freeze:
            kind = getattr(s, "frozen_tokens", "visual")
            if kind not in ("visual", "text"):
                raise TokencompError(f"{s}: frozen_tokens must be 'visual' or 'text', got {kind!r}")
            for lay in s.frozen_layers(L):
                check_int(f"{s}: frozen layer", lay, 0, L - 1)
                if self.frozen.get(lay, kind) != kind:
                    raise TokencompError(f"layer {lay} is frozen for both visual and text tokens")
                self.frozen[lay] = kind

    # ------------------------------------------------------------------------------------------
    # validation
    def image_spans(self, batch: Batch) -> list[list[tuple[int, int]]]:
        """Per sample, ``(start, length)`` of each image's placeholder run in the unpadded row.

        Raises `InputMismatchError` when the placeholders do not match the images.
        """
        m = self.model
        ids, mask = batch.input_ids, batch.attention_mask.bool()
        n_images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        sizes = self._image_sizes(batch, n_images)
        spans, img = [], 0
        for b in range(ids.shape[0]):
            row = ids[b][mask[b]]
            where = (row == m.image_token_id).nonzero().flatten().tolist()
            sample, pos = [], 0
            while pos < len(where):
                if img >= n_images:
                    raise InputMismatchError(
                        f"prompt {b} has more image placeholders than the {n_images} image(s) given"
                    )
                count = m.image_token_count(sizes[img])
                start = where[pos]
                run = where[pos : pos + count]
                if len(run) != count or run[-1] - start != count - 1:
                    raise InputMismatchError(
                        f"prompt {b}: image {img} needs {count} contiguous placeholder tokens at index {start}, "
                        f"found {len(run)}"
                    )
                sample.append((start, count))
                pos += count
                img += 1
            spans.append(sample)
        if img != n_images:
            raise InputMismatchError(f"{n_images} image(s) given but the prompts hold placeholders for {img}")
        return spans

    def _image_sizes(self, batch: Batch, n_images: int) -> list[tuple[int, int]]:
        return self.model.layout.image_sizes(batch, n_images)

    def run_info(self, batch: Batch, spans) -> RunInfo:
        """What the strategies' ``check`` sees of ``batch`` (token counts per sample and view),
        from its image ``spans`` (`validate`'s output)."""
        m = self.model
        n_images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        sizes = self._image_sizes(batch, n_images)
        views, img = [], 0
        for sample in spans:
            counts = []
            for _ in sample:
                counts += m.layout.view_valid(sizes[img]).sum(1).tolist()
                img += 1
            views.append(tuple(counts))
        return RunInfo(
            family=m.family,
            num_layers=m.num_layers,
            vision_layers=m.vision_num_layers,
            patches_per_view=m.patches_per_view,
            grid=m.grid,
            has_crops=m.layout.has_crops,
            visual_tokens=tuple(sum(c for _, c in s) for s in spans),
            views_valid=tuple(views),
            has_cls=m.has_cls,
        )

    def validate(self, batch: Batch) -> list[list[tuple[int, int]]]:
        """Check the batch and every strategy before any forward pass; returns the image spans."""
        if batch.input_ids.dim() != 2 or batch.attention_mask.shape != batch.input_ids.shape:
            raise InputMismatchError("input_ids and attention_mask must both be (batch, length)")
        if bool((batch.attention_mask[:, -1] == 0).any()) or bool((batch.attention_mask.long().diff(dim=1) < 0).any()):
            raise InputMismatchError("the batch must be left padded (each row: padding, then its tokens to the end)")
        self.model.layout.check_engine(self)
        self.model.layout.check_views(batch)
        spans = self.image_spans(batch)
        longest = int(batch.attention_mask.sum(1).max()) if batch.attention_mask.numel() else 0
        limit = self.model.max_positions
        if limit is not None and longest > limit:  # RoPE decoders run past it, as Hugging Face's do
            warnings.warn(
                f"a prompt of {longest} tokens (image tokens included) is longer than the decoder's "
                f"max_position_embeddings={limit}; the model was not trained on such positions",
                stacklevel=3,
            )
        info = self.run_info(batch, spans)
        for s in self.strategies:
            try:
                s.check(info)
            except TokencompError as e:  # name the method: a grid or a composition holds several
                if str(e).startswith(s.label):
                    raise
                raise renamed(e, f"{s.label}: {e}") from e
        flash = self.model.attn_implementation.startswith("flash")
        if flash and (bool((batch.attention_mask == 0).any()) or self.frozen or self.prune_at):
            raise TokencompError(
                "with attn_implementation 'flash_attention_*' only unpadded batches without in-LLM pruning or "
                "frozen layers are supported (their masks are not wired yet); load the model with 'sdpa'"
            )
        return spans
