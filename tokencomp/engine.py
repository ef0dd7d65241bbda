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

import dataclasses
import itertools
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import attention, kernels
from .cache import LayerKVCache
from .errors import InputMismatchError, TokencompError, UnsupportedModelError, renamed
from .layout import filled_slots, pad_left, place_columns, repack
from .model import Model
from .profiler import FlopsReport, run_flops
from .record import RunRecord
from .strategy import (
    CLS_NEEDS,
    DECODER_NEEDS,
    KEY_NORM_NEEDS,
    NEWLINE,
    PAD,
    PREPRUNE_NEEDS,
    TEXT,
    VISION_NEEDS,
    VISUAL,
    FreezeStrategy,
    LayerContext,
    LayerStrategy,
    Need,
    RunInfo,
    Strategy,
    ViewTokens,
    VisionStrategy,
    VisionView,
    check_int,
)

ROW_CHUNK = 256  # query rows per attention-rows call when scores average over many queries


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
        image_sizes: ``(images, 2)`` original ``(height, width)`` (LLaVA-NeXT), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    @classmethod
    def from_processor(cls, out) -> Batch:
        """A batch from a Hugging Face processor's output (``input_ids``, ``attention_mask``,
        ``pixel_values`` and, for LLaVA-NeXT, ``image_sizes``)."""
        return cls(
            input_ids=out["input_ids"],
            attention_mask=out.get("attention_mask", torch.ones_like(out["input_ids"])),
            pixel_values=out.get("pixel_values"),
            image_sizes=out.get("image_sizes"),
        )


@dataclass
class SeqState:
    """The packed, left-padded token sequence of a batch between decoder layers."""

    hidden: torch.Tensor  # (B, n, d)
    valid: torch.Tensor  # (B, n) bool
    kind: torch.Tensor  # (B, n) int8
    positions: torch.Tensor  # (B, n) long
    orig_index: torch.Tensor  # (B, n) long, -1 unknown
    image: torch.Tensor  # (B, n) long, image index within the sample, -1 for text
    view: torch.Tensor  # (B, n) long, 0 = base image / thumbnail, j = crop j, -1 text and newlines
    patch: torch.Tensor  # (B, n) long, source patch index in its view, -1 unknown
    rater: torch.Tensor | None = None  # (B, n) bool, rater tokens a layer strategy marked (or None)

    def layout(self, b: int) -> dict[str, torch.Tensor]:
        """Sample ``b``'s token record without padding: ``kind``, ``positions``, ``orig_index``,
        ``image``, ``view`` and ``patch``, each ``(n_b,)``."""
        v = self.valid[b]
        return {
            name: getattr(self, name)[b][v] for name in ("kind", "positions", "orig_index", "image", "view", "patch")
        }

    def gather(self, index: torch.Tensor, valid: torch.Tensor, backend: str = "auto") -> SeqState:
        def g(t: torch.Tensor) -> torch.Tensor:
            return torch.gather(t, 1, index)

        return SeqState(
            hidden=kernels.gather_tokens(self.hidden, index, backend=backend),
            valid=valid,
            kind=g(self.kind).masked_fill(~valid, PAD),
            positions=g(self.positions),
            orig_index=g(self.orig_index),
            image=g(self.image),
            view=g(self.view),
            patch=g(self.patch),
            rater=None if self.rater is None else g(self.rater) & valid,
        )


@dataclass
class FrozenPlan:
    """The tokens a frozen layer still computes (see `Engine._frozen_plan`).

    Attributes:
        index: ``(B, t)`` long, their columns, left padded; a padding slot holds a column that no
            real slot holds.
        ok: ``(B, t)`` bool, the real slots.
        masks: per attention kind, the ``(B, 1, t, n)`` additive mask of their query rows (filled
            by `Engine._frozen_layer` when a layer of that kind first needs it).
    """

    index: torch.Tensor
    ok: torch.Tensor
    masks: dict = field(default_factory=dict)


@dataclass
class PrefillOutput:
    """Result of `Engine.prefill`.

    Attributes:
        logits: ``(B, V)`` next-token logits at the last position, or ``(B, n, V)`` over the final
            layer's tokens with ``all_logits=True``.
        state: the final layer's token sequence (tokens, kinds, positions, original indices).
        input_state: the sequence entering the first decoder layer.
        cache: the per-layer KV cache.
        record: counts per layer and sample.
        captures: raw captured scores: vision ``Need -> (V, heads, 1+N)`` / keys, decoder
            ``Need -> (B, heads, 1, n)`` per-head attention rows (query-averaged), key norms
            ``Need -> (B, n)``.
        flops: per sample, the run's `FlopsReport` (filled by `Engine.generate`, empty after
            `prefill` alone).
    """

    logits: torch.Tensor
    state: SeqState
    input_state: SeqState
    cache: LayerKVCache
    record: RunRecord
    captures: dict = field(default_factory=dict)
    flops: list[FlopsReport] = field(default_factory=list)


def split_strategies(strategies) -> tuple[VisionStrategy | None, list[LayerStrategy], list[FreezeStrategy]]:
    """Normalise ``None``, one strategy or a list into (vision, layer list, freeze list)."""
    if strategies is None:
        strategies = []
    elif isinstance(strategies, (Strategy, str, type, dict)):
        strategies = [strategies]
    vision, layer, freeze = [], [], []
    for s in strategies:
        if not isinstance(s, Strategy):
            hint = ""
            if isinstance(s, str):
                hint = f"; build one by name with tc.method({s!r}, ...)"
            elif isinstance(s, type):
                hint = f"; {s.__name__} is a class: pass an instance, e.g. {s.__name__}(...)"
            raise TokencompError(f"expected a tokencomp strategy, got {type(s).__name__}: {s!r}{hint}")
        stages = {"vision": vision, "layer": layer, "freeze": freeze}
        if s.stage not in stages:
            raise TokencompError(f"strategy {s} has unknown stage {s.stage!r}; expected one of {sorted(stages)}")
        stages[s.stage].append(s)
    if len(vision) > 1:
        raise TokencompError(f"at most one vision strategy per run, got {[str(v) for v in vision]}")
    return (vision[0] if vision else None), layer, freeze


class Engine:
    """Runs a `Model` with a composition of strategies.

    Args:
        model: the adapter.
        strategies: None (the unmodified model), one strategy, or a list with at most one vision
            strategy, any number of layer strategies and freeze strategies.
        options: position-id policies.
    """

    def __init__(self, model: Model, strategies=None, options: EngineOptions | None = None) -> None:
        self.model = model
        self.options = options or EngineOptions()
        self.vision, self.layer_strategies, self.freeze = split_strategies(strategies)
        self.strategies = ([self.vision] if self.vision else []) + self.layer_strategies + self.freeze
        L = model.num_layers
        # the layers a user names first (FastV's k): a capture layer derived from one would be a worse message
        self.prune_at: dict[int, list[LayerStrategy]] = {}
        for s in self.layer_strategies:
            for lay in s.prune_layers(L):
                check_int(f"{s}: prune before layer", lay, 1, L - 1)
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
        self.vision_cls_layers = len({n.layer % nl for n in self.needs if n.kind in CLS_NEEDS})
        self.vision_mean_layers = len({n.layer % nl for n in self.needs if n.kind == "vision_mean_attention"})
        self.vision_layers_run = max([f for f in self.feature_hidden] + [c + 1 for c in self.vision_capture_layers])
        # a capture layer past the last feature layer (PruMerge's, GlobalCom2's layer -1 under LLaVA's
        # feature layer -2): its output feeds nothing, so only its norm and q/k projections run
        self.vision_qk_layers = int(self.vision_layers_run > max(self.feature_hidden))
        # that layer projects queries only for the rows its scores read: every row for a mean over
        # all queries, the CLS row for CLS scores, none for keys alone
        at_qk = {n.kind for n in self.needs if n.kind in VISION_NEEDS and n.layer % nl == self.vision_layers_run - 1}
        if not self.vision_qk_layers or "vision_mean_attention" in at_qk:
            self.vision_qk_queries = None
        else:
            self.vision_qk_queries = 1 if at_qk & set(CLS_NEEDS) else 0
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
        if self.model.family == "llava" or n_images == 0:
            return [(self.model.view_size, self.model.view_size)] * n_images
        if batch.image_sizes is None or batch.image_sizes.shape[0] != n_images:
            raise InputMismatchError("LLaVA-NeXT needs image_sizes with one (height, width) row per image")
        return [tuple(int(x) for x in s) for s in batch.image_sizes.tolist()]

    def _check_views(self, batch: Batch) -> None:
        """LLaVA-NeXT: each image's views in ``pixel_values`` are the thumbnail and crops its size
        gives (`Model.views_per_image`), the rest zero padding up to the batch's most views; a
        processor whose crops disagree (pinpoints read otherwise) is named before any work."""
        m = self.model
        if m.family != "llava-next" or batch.pixel_values is None:
            return
        pix = batch.pixel_values
        sizes = self._image_sizes(batch, pix.shape[0])
        counts = [m.views_per_image(s) for s in sizes]
        extra = [i for i, c in enumerate(counts) if c < pix.shape[1] and bool(pix[i, c:].ne(0).any())]
        short = [i for i, c in enumerate(counts) if pix.dim() != 5 or c > pix.shape[1]]
        if extra or short:
            i = (short + extra)[0]
            given = "fewer" if i in short else "more"
            raise InputMismatchError(
                f"image {i} ({sizes[i][0]}x{sizes[i][1]} px): the processor gave {given} views than the model's "
                f"{counts[i]} (thumbnail + {m.crop_grid(sizes[i])[0]}x{m.crop_grid(sizes[i])[1]} crops of "
                f"{m.view_size} px from image_grid_pinpoints {m.pinpoints}); the processor and the model must "
                "share the pinpoints and the view size"
            )

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
                counts.append(m.patches_per_view)
                if m.family == "llava-next":
                    counts += m.crop_valid(sizes[img]).sum(1).tolist()
                img += 1
            views.append(tuple(counts))
        return RunInfo(
            family=m.family,
            num_layers=m.num_layers,
            vision_layers=m.vision_num_layers,
            patches_per_view=m.patches_per_view,
            grid=m.grid,
            has_crops=m.family == "llava-next",
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
        self._check_views(batch)
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

    # ------------------------------------------------------------------------------------------
    # vision stage
    @torch.no_grad()
    def encode_images(self, batch: Batch, spans) -> tuple[list[dict], dict]:
        """Run the vision tower, the vision strategy and the projector.

        Returns a per-image list of assembled tokens (``feats (m, d)``, ``kind``, ``patch``,
        ``offset`` (position in the uncompressed image span, -1 unknown)) and the raw captures.
        """
        m = self.model
        if batch.pixel_values is None:
            return [], {}
        n_images = batch.pixel_values.shape[0]
        sizes = self._image_sizes(batch, n_images)
        pix, role, image, key, crop_grid, crop_window, valid = [], [], [], [], [], [], []
        img = 0
        for sample in spans:
            for local in range(len(sample)):
                nv = m.views_per_image(sizes[img])
                p = batch.pixel_values[img]
                pix.append(p[None] if p.dim() == 3 else p[:nv])  # as `_check_views` checked
                role += list(range(nv))
                image += [img] * nv
                key += [local * 1000 + r for r in range(nv)]
                crop_grid.append(m.crop_grid(sizes[img]))
                crop_window.append(tuple(m.crop_region(sizes[img])[2:]) if nv > 1 else (0, 0, 0, 0))
                v = torch.ones(nv, m.patches_per_view, dtype=torch.bool)
                if nv > 1:
                    v[1:] = m.crop_valid(sizes[img])
                valid.append(v)
                img += 1
        dev = m.device
        given = torch.cat(pix)  # as the processor made them (float32, on the host)
        pixel = given.to(dev, m.vision_model.embeddings.patch_embedding.weight.dtype)
        feats, captures = self._vision_tower(pixel)
        # the views' bookkeeping in one upload (each upload waits for the copy)
        meta = torch.cat([torch.tensor([role, image, key]).flatten(), torch.cat(valid).flatten().long()]).to(dev)
        nv = len(role)
        view = VisionView(
            features=feats[:, 1:] if m.has_cls else feats,
            cls=feats[:, 0] if m.has_cls else None,
            grid=m.grid,
            valid=meta[3 * nv :].view(nv, m.patches_per_view).bool(),
            role=meta[:nv],
            image=meta[nv : 2 * nv],
            key=meta[2 * nv : 3 * nv],
            crop_grid=crop_grid,
            crop_window=crop_window,
            captures=captures,
            backend=self.options.kernel_backend,
            pixels=given,
        )
        if self.vision is None:
            n = m.patches_per_view
            out = ViewTokens(
                features=view.features,
                index=torch.arange(n, device=dev).expand(nv, n),
                count=torch.full((nv,), n, device=dev),
                grid=m.grid,
            )
            counts = [n] * nv
        else:
            out = self.vision.compress(view)
            counts = out.count.tolist()  # tokens per view: one read for all images
        projected = self._project(out, counts)
        images, first, views_of = [], 0, Counter(image)
        for i in range(n_images):  # image i's views are consecutive, its base view first
            rows = range(first, first + views_of[i])
            images.append(self._assemble(out, projected, rows, counts, sizes[i], crop_grid[i]))
            first = rows.stop
        pending = [tok for tok in images if "trim" in tok]
        if pending:  # crop tokens placed back on the grid: one read of how many each image keeps
            kept = torch.stack([tok["trim"][2] for tok in pending]).tolist()
            for tok, (main, extra) in zip(pending, kept):
                self._trim(tok, main, extra)
        return images, captures

    @staticmethod
    def _trim(tok: dict, main: int, extra: int) -> None:
        """Keep an image's base-view tokens, the first ``main`` of its sorted crop candidates and
        the first ``extra`` of its sorted sourceless crop tokens (`_crops_placed`)."""
        base, sorted_len, _ = tok.pop("trim")
        cut = base + sorted_len
        for name in ("feats", "kind", "patch", "view", "offset"):
            t = tok[name]
            tok[name] = torch.cat([t[: base + main], t[cut : cut + extra]])

    def _vision_tower(self, pixel: torch.Tensor) -> tuple[torch.Tensor, dict]:
        m = self.model
        vm = m.vision_model
        cap_layers = set(self.vision_capture_layers)
        h = vm.embeddings(pixel)
        h = vm.pre_layrnorm(h) if hasattr(vm, "pre_layrnorm") else h
        hidden = {0: h}
        captures = {}
        for i in range(self.vision_layers_run):
            layer = m.vision_layers_list[i]
            if i >= self.vision_layers_run - self.vision_qk_layers:  # q/k of a layer whose output feeds nothing
                x = layer.layer_norm1(h)
                rows = self.vision_qk_queries
                got = {
                    "q_proj": layer.self_attn.q_proj(x if rows is None else x[:, :rows]),
                    "k_proj": layer.self_attn.k_proj(x),
                }
                self._vision_scores(layer.self_attn, got, i, captures)
                continue
            if i in cap_layers:
                with _capture(layer.self_attn, ["q_proj", "k_proj"]) as got:
                    h = layer(h, None)
                self._vision_scores(layer.self_attn, got, i, captures)
            else:
                h = layer(h, None)
            hidden[i + 1] = h
        feats = torch.cat([hidden[f] for f in self.feature_hidden], dim=-1)
        return feats, captures

    def _vision_scores(self, attn, got, layer: int, captures: dict) -> None:
        nl = self.model.vision_num_layers
        q, k = got["q_proj"], got["k_proj"]
        v, n, _ = k.shape
        heads = attn.num_heads
        kh = k.view(v, n, heads, -1).transpose(1, 2)  # (V, H, n, hd)
        be = self.options.kernel_backend
        mine = [need for need in self.needs if need.kind in VISION_NEEDS and need.layer % nl == layer]
        if any(need.kind in CLS_NEEDS for need in mine):
            qh = q[:, :1].view(v, 1, heads, -1).transpose(1, 2)  # (V, H, 1, hd): the CLS query only
            logits, probs = kernels.attention_rows(qh, kh, attn.scale, backend=be)
            logits, probs = logits.squeeze(2), probs.squeeze(2)  # (V, H, n)
        mean = None  # once per layer, however its needs name it (-2 and nl - 2)
        for need in mine:
            if need.kind == "vision_mean_attention":  # all query rows, a chunk at a time (no n x n map kept)
                if mean is None:
                    qa = q.view(v, n, heads, -1).transpose(1, 2)
                    mean = kh.new_zeros((v, heads, n), dtype=torch.float32)
                    for s in range(0, n, 256):
                        _, p = kernels.attention_rows(qa[:, :, s : s + 256].contiguous(), kh, attn.scale, backend=be)
                        mean += p.float().sum(2)
                    mean /= n
                captures[need] = mean
                continue
            if need.kind == "vision_cls_logits":
                captures[need] = logits
            elif need.kind == "vision_cls_attention":
                captures[need] = probs
            elif need.kind == "vision_cls_query":
                captures[need] = q[:, 0]
            elif need.kind == "vision_keys_full":
                captures[need] = k
            else:
                captures[need] = kh.float().mean(1)  # (V, n, hd) head-mean keys

    def _project(self, out: ViewTokens, counts: list[int]) -> torch.Tensor:
        """``(V, k, d_v) -> (V, k, d)``: the projector on the real rows only (``counts`` per view),
        padding rows zero."""
        nv, k = out.index.shape
        x = out.features.flatten(0, 1)
        if sum(counts) == nv * k:  # no padding
            flat = self.model.projector(x)
            return flat.view(nv, k, flat.shape[-1])
        rows = filled_slots(out.count, k, sum(counts))
        flat = self.model.projector(kernels.gather_tokens(x[None], rows[None], backend=self.options.kernel_backend)[0])
        return flat.new_zeros(nv * k, flat.shape[-1]).index_copy_(0, rows, flat).view(nv, k, flat.shape[-1])

    def _assemble(self, out: ViewTokens, proj: torch.Tensor, rows: range, counts: list[int], size, crop_grid) -> dict:
        """Lay out one image's tokens: base view first, then the crops (LLaVA-NeXT). ``rows``: the
        image's views; ``counts``: tokens per view (all views')."""
        m = self.model
        dev = proj.device
        n = m.patches_per_view
        r0 = rows.start
        c0 = counts[r0]
        idx0 = out.index[r0, :c0]
        parts = {
            "feats": [proj[r0, :c0]],
            "kind": [torch.full((c0,), VISUAL, device=dev, dtype=torch.int8)],
            "patch": [idx0],
            "view": [torch.zeros_like(idx0)],
            "offset": [idx0 if out.grid in (None, m.grid) else torch.full_like(idx0, -1)],
        }
        if len(rows) > 1:
            crop_rows = range(rows.start + 1, rows.stop)
            newline = m.image_newline.to(proj.dtype)
            policy = getattr(self.vision, "newline", "keep") if self.vision else "keep"
            if out.grid is not None:
                crop = self._crops_on_grid(out, proj, crop_rows, size, crop_grid, newline, policy)
            else:
                unpad = getattr(self.vision, "unpad", True)
                crop = self._crops_placed(out, proj, crop_rows, counts, size, newline, policy, unpad)
            for name in parts:
                value = crop[name]
                if name == "offset":
                    value = torch.where(value >= 0, value + n, value)
                parts[name].append(value)
        out = {name: torch.cat(v) for name, v in parts.items()}
        if len(rows) > 1 and "kept" in crop:
            out["trim"] = (c0, crop["sorted"], crop["kept"])
        out["num_views"] = len(rows)
        out["projected"] = sum(counts[r] for r in rows)  # tokens the projector ran on, before unpadding drops any
        return out

    def _crops_on_grid(self, out, proj, crop_rows, size, crop_grid, newline, policy) -> dict:
        m = self.model
        gh, gw = out.grid
        rows, cols = crop_grid
        dev = proj.device
        crop_rows = slice(crop_rows.start, crop_rows.stop)
        f = proj[crop_rows, : gh * gw]
        d = f.shape[-1]
        f = f.view(rows, cols, gh, gw, d).permute(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, d)
        _, _, r0, height, c0, width = m.crop_region(size, (gh, gw))
        f = f[r0 : r0 + height, c0 : c0 + width]
        same = (gh, gw) == m.grid
        src = out.index[crop_rows, : gh * gw] if same else torch.full((rows * cols, gh * gw), -1, device=dev)
        src = (
            src.view(rows, cols, gh, gw)
            .permute(0, 2, 1, 3)
            .reshape(rows * gh, cols * gw)[r0 : r0 + height, c0 : c0 + width]
        )
        vid = torch.arange(1, rows * cols + 1, device=dev).view(rows, cols, 1, 1).expand(rows, cols, gh, gw)
        vid = vid.permute(0, 2, 1, 3).reshape(rows * gh, cols * gw)[r0 : r0 + height, c0 : c0 + width]
        kind = torch.full((height, width), VISUAL, dtype=torch.int8, device=dev)
        offset = torch.arange(height * (width + 1), device=dev).view(height, width + 1)[:, :width]
        if not same:
            offset = torch.full_like(offset, -1)
        if policy != "drop":
            f = torch.cat([f, newline.expand(height, 1, d)], dim=1)
            src = torch.cat([src, src.new_full((height, 1), -1)], dim=1)
            vid = torch.cat([vid, vid.new_full((height, 1), -1)], dim=1)
            kind = torch.cat([kind, kind.new_full((height, 1), NEWLINE)], dim=1)
            nl_off = torch.arange(height, device=dev)[:, None] * (width + 1) + width
            offset = torch.cat([offset, nl_off if same else torch.full_like(nl_off, -1)], dim=1)
        return {
            "feats": f.reshape(-1, d),
            "kind": kind.flatten(),
            "patch": src.flatten(),
            "view": vid.flatten(),
            "offset": offset.flatten(),
        }

    def _crops_placed(self, out, proj, crop_rows: range, counts: list[int], size, newline, policy, unpad) -> dict:
        """Crop tokens with a source patch go back to the combined crop grid in raster order (inside
        the unpadded window when ``unpad``), each row closed by a newline per ``policy``; tokens with
        no source (index -1: CLS, merged) follow, ordered by (``group``, crop, their order).

        Returns every candidate, sorted so that the kept ones lead (grid tokens and newlines, then
        sourceless tokens), with ``kept`` their two counts on the device: `encode_images` reads the
        counts of all images at once and trims (`_trim`).
        """
        m = self.model
        gh, gw = m.grid
        rows, cols, r0, height, c0, width = m.crop_region(size)
        dev = proj.device
        k = out.index.shape[1]
        real = filled_slots(out.count[crop_rows.start : crop_rows.stop], k, sum(counts[r] for r in crop_rows))
        crop_id, slot = real // k, real % k  # every real token of the crops, crop by crop
        at = (crop_rows.start + crop_id, slot)
        idx = out.index[at]
        be = self.options.kernel_backend
        feats = kernels.gather_tokens(proj.flatten(0, 1)[None], (crop_rows.start * k + real)[None], backend=be)[0]
        group = out.group[at].long() if out.group is not None else torch.zeros_like(idx)
        placed = idx >= 0
        r = (crop_id // cols) * gh + idx // gw
        c = (crop_id % cols) * gw + idx % gw
        inside = (r >= r0) & (r < r0 + height) & (c >= c0) & (c < c0 + width)
        if unpad:
            ok = placed & inside
            top, left, n_rows, n_cols = r0, c0, height, width
        else:
            ok = placed
            top, left, n_rows, n_cols = 0, 0, rows * gh, cols * gw
        # grid tokens, then one newline candidate per row: sorted by raster key, the unkept last
        pr = torch.where(ok, r - top, n_rows)  # row n_rows: a spill row for the tokens not kept
        key = pr * (n_cols + 1) + (c - left)
        offset = torch.where(inside, (r - r0) * (width + 1) + (c - c0), -1)
        line = torch.arange(n_rows, device=dev)
        if policy == "keep":
            line_kept = torch.ones(n_rows, dtype=torch.bool, device=dev)
        elif policy == "rows":  # only rows that keep a token
            line_kept = torch.zeros(n_rows + 1, dtype=torch.bool, device=dev).scatter_(0, pr, True)[:n_rows]
        else:
            line_kept = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        nl_abs = line + top
        nl_off = torch.where((nl_abs >= r0) & (nl_abs < r0 + height), (nl_abs - r0) * (width + 1) + width, -1)
        spill = (n_rows + 1) * (n_cols + 1)
        key = torch.cat([torch.where(ok, key, spill), torch.where(line_kept, line * (n_cols + 1) + n_cols, spill)])
        # sourceless tokens: by (group, crop, slot); the placed ones last
        extra_key = group * (len(crop_rows) + 1) * (k + 1) + crop_id * (k + 1) + slot
        extra_key = extra_key.masked_fill(placed, torch.iinfo(torch.long).max)
        order, extra = key.argsort(), extra_key.argsort()
        minus = idx.new_full((n_rows,), -1)
        kinds = torch.cat(
            [torch.full_like(idx, VISUAL, dtype=torch.int8), torch.full_like(line, NEWLINE, dtype=torch.int8)]
        )
        return {
            "feats": kernels.gather_tokens(
                torch.cat([feats, newline.expand(n_rows, -1)])[None], torch.cat([order, extra])[None], backend=be
            )[0],
            "kind": torch.cat([kinds[order], torch.full_like(extra, VISUAL, dtype=torch.int8)]),
            "patch": torch.cat([torch.cat([idx, minus])[order], idx[extra]]),
            "view": torch.cat([torch.cat([crop_id + 1, minus])[order], crop_id[extra] + 1]),
            "offset": torch.cat([torch.cat([offset, nl_off])[order], torch.full_like(extra, -1)]),
            # the kept ones lead each sorted part: trimmed after one read for all images (_trim)
            "sorted": len(order),
            "kept": torch.stack([ok.sum() + line_kept.sum(), (~placed).sum()]),
        }

    # ------------------------------------------------------------------------------------------
    # sequence build
    def build_sequence(self, batch: Batch, spans, images: list[dict]) -> tuple[SeqState, torch.Tensor, list]:
        """Per sample: text embeddings with each image span replaced by its assembled tokens.

        Returns the packed state, ``(B,)`` visual tokens entering the LLM per sample, and
        ``(tokens per sample, image and view; tokens the projector ran on per sample)``.
        """
        m = self.model
        dev = m.device
        ids = batch.input_ids.to(dev)
        lengths = batch.attention_mask.sum(1).tolist()  # left padded (validate): row b is ids[b, -length:]
        # counts stay on the device until one read at the end (a read per image would wait each time)
        samples, n_visual, view_counts, projected, img = [], [], [], [], 0
        for b, sample in enumerate(spans):
            row = ids[b, ids.shape[1] - lengths[b] :]
            emb = m.embed_tokens(row)
            pieces = {k: [] for k in ("hidden", "kind", "orig", "image", "view", "patch", "pos")}
            cursor, vis, views, proj_tokens = 0, torch.zeros((), dtype=torch.long, device=dev), [], 0
            for local, (start, length) in enumerate(sample + [(len(row), 0)]):
                t = torch.arange(cursor, start, device=dev)
                pieces["hidden"].append(emb[cursor:start])
                pieces["kind"].append(torch.full((len(t),), TEXT, dtype=torch.int8, device=dev))
                pieces["orig"].append(t)
                pieces["image"].append(torch.full_like(t, -1))
                pieces["patch"].append(torch.full_like(t, -1))
                pieces["view"].append(torch.full_like(t, -1))
                pieces["pos"].append(t)
                if length == 0:
                    break
                tok = images[img]
                k = tok["feats"].shape[0]
                is_vis = tok["kind"] == VISUAL
                vis = vis + is_vis.sum()
                proj_tokens += tok["projected"]
                nv = tok["num_views"]  # visual tokens per view, a last bin for the rest
                bins = torch.where(is_vis & (tok["view"] >= 0), tok["view"], nv)
                views.append(
                    torch.zeros(nv + 1, dtype=torch.long, device=dev).index_add_(0, bins, torch.ones_like(bins))[:nv]
                )
                off = tok["offset"]
                orig = torch.where(off >= 0, start + off, off)
                # tokens with a source keep their place; those without (merged, pooled) are spread
                # evenly over the image's span: the i-th of c at i * length // c
                none = off < 0
                spread = (none.long().cumsum(0) - 1) * length // none.sum().clamp(min=1)
                pos = start + torch.where(none, spread, off)
                pieces["hidden"].append(tok["feats"].to(emb.dtype))
                pieces["kind"].append(tok["kind"])
                pieces["orig"].append(orig)
                pieces["image"].append(torch.full((k,), local, device=dev))
                pieces["patch"].append(tok["patch"])
                pieces["view"].append(tok["view"])
                pieces["pos"].append(pos)
                cursor = start + length
                img += 1
            s = {k: torch.cat(v) for k, v in pieces.items()}
            if self.options.vision_positions == "contiguous":
                s["pos"] = torch.arange(len(s["kind"]), device=dev)
            samples.append(s)
            n_visual.append(vis)
            view_counts.append(views)
            projected.append(proj_tokens)
        flat = iter(torch.cat([torch.stack(n_visual), *(v for views in view_counts for v in views)]).tolist())
        n_visual = list(itertools.islice(flat, len(samples)))
        per_view = [[list(itertools.islice(flat, len(v))) for v in views] for views in view_counts]
        hidden, valid = pad_left([s["hidden"] for s in samples])
        state = SeqState(
            hidden=hidden,
            valid=valid,
            kind=pad_left([s["kind"] for s in samples], PAD)[0],
            positions=pad_left([s["pos"] for s in samples], 0)[0],
            orig_index=pad_left([s["orig"] for s in samples], -1)[0],
            image=pad_left([s["image"] for s in samples], -1)[0],
            view=pad_left([s["view"] for s in samples], -1)[0],
            patch=pad_left([s["patch"] for s in samples], -1)[0],
        )
        return state, torch.tensor(n_visual), (per_view, projected)

    # ------------------------------------------------------------------------------------------
    # decoder
    def _mask(
        self,
        key_valid: torch.Tensor,
        query_index: torch.Tensor | None,
        dtype,
        kind: str = attention.FULL,
        positions: torch.Tensor | None = None,
        all_valid: bool | None = None,
        decoding: bool = False,
    ) -> torch.Tensor | None:
        """Additive mask ``(B, 1, q, n)`` of a layer of attention ``kind``: causal over sequence
        index, padding keys hidden, and a sliding layer's window (`tokencomp.attention`).

        ``query_index`` ``(B, q)`` gives each query row's index in the key sequence (None: the
        square prefill case; ``decoding``: one row, the last key). ``positions`` ``(B, n)``: the
        keys' position ids, which the window counts in under ``window="position"`` (the queries'
        are those of their keys). Rows with no visible key (padding rows) see everything instead.
        None where no mask is needed (prefill or decoding, every key real, full causal or a window
        longer than the sequence): ``all_valid`` says whether every key is real when the caller
        knows it (one host read saved).
        """
        b, n = key_valid.shape
        impl = self.model.attn_implementation
        window = self.model.sliding_window if kind == attention.SLIDING else None
        by_position = window is not None and self.options.window == "position"
        if window is not None and not by_position and n <= window:
            window = None  # the window reaches every key: the layer attends as a full one
        if impl.startswith("flash") and not by_position:
            window = None  # FlashAttention applies the layer's window itself, in sequence positions
        plain = window is None and (impl == "sdpa" or impl.startswith("flash")) and (query_index is None or decoding)
        if plain and (all_valid if all_valid is not None else bool(key_valid.all())):
            return None  # plain causal: SDPA's fast path, FlashAttention's causal kernel
        if query_index is None:
            query_index = torch.arange(n, device=key_valid.device).expand(b, n)
        if impl.startswith("flash"):  # it would read a (B, 1, q, n) mask as a 2-D padding mask
            raise TokencompError(
                f"attn_implementation {impl!r} cannot run samples of different lengths (per-sample keep "
                "counts, or a sample that stopped decoding before the others), nor sliding windows whose "
                "counting differs from its own; load the model with 'sdpa'"
            )
        query_pos = None if not by_position else positions.gather(1, query_index)
        allow = attention.allowed(key_valid, query_index, window, positions if by_position else None, query_pos)
        return attention.additive(allow, dtype)

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``kind -> (cos, sin)`` of ``positions`` for each attention kind the decoder's layers have."""
        return {kind: self.model.rope(hidden, positions, kind) for kind in dict.fromkeys(self.model.layer_kinds)}

    @torch.no_grad()
    def prefill(self, batch: Batch, all_logits: bool = False) -> PrefillOutput:
        """Everything up to the first generated token. Validates before any forward pass."""
        m = self.model
        spans = self.validate(batch)
        images, captures = self.encode_images(batch, spans)
        state, n_visual, (per_view, projected) = self.build_sequence(batch, spans, images)
        input_images = (state.valid & (state.kind >= VISUAL)).sum(1)
        scores: dict[Need, torch.Tensor] = {}
        if self.raters:  # rater tokens, marked once on the sequence entering the decoder
            ctx = self._context(state, 0, scores, input_images)
            state.rater = torch.zeros_like(state.valid)
            for s in self.raters:
                state.rater |= s.raters(ctx)
            state.rater &= state.valid & (state.kind == TEXT)
        input_state = dataclasses.replace(state)  # the loop below rebinds state.hidden
        L = m.num_layers
        cache = LayerKVCache(L)
        bsz = state.hidden.shape[0]
        tokens = torch.zeros(bsz, L, dtype=torch.long, device=state.hidden.device)  # read once at the end:
        visual = torch.zeros_like(tokens)  # no host sync per layer
        image = torch.zeros_like(tokens)
        cos_sin = self._rope(state.hidden, state.positions)  # per attention kind
        masks: dict[str, torch.Tensor | None] = {}  # per attention kind, built when a layer first needs it
        frozen_plans: dict[str, FrozenPlan] = {}  # per frozen kind, while the packing stays
        for i, layer in enumerate(m.layers):
            kind = m.layer_kinds[i]
            early = [n for n in self.needs if n.kind in PREPRUNE_NEEDS and n.layer == i]
            if early:  # layer i's own norm and q/k on the tokens entering it, before its pruning
                normed = layer.input_layernorm(state.hidden)
                got = {"input_layernorm": normed, "keys": m.key_source(layer.self_attn)(normed)}
                self._score_rows(layer, i, got, state, cos_sin[kind], early, captures, scores)
            if i in self.prune_at:
                state, changed = self._prune(state, i, scores, input_images)
                if changed:
                    cos_sin = self._rope(state.hidden, state.positions)
                    masks, frozen_plans = {}, {}
            wanted = [
                n for n in self.needs if n.kind in DECODER_NEEDS and n.kind not in PREPRUNE_NEEDS and n.layer == i
            ]
            key_norms = [n for n in self.needs if n.kind in KEY_NORM_NEEDS and n.layer == i]
            hooks = (
                _capture(layer, ["input_layernorm"] if wanted else [], {"keys": m.key_source(layer.self_attn)})
                if wanted or key_norms
                else _nothing()
            )
            with hooks as got:
                if i in self.frozen:
                    frozen = self.frozen[i]
                    if frozen not in frozen_plans:
                        frozen_plans[frozen] = self._frozen_plan(state, frozen)
                    state.hidden = self._frozen_layer(layer, i, state, cos_sin[kind], cache, frozen_plans[frozen])
                else:
                    if kind not in masks:
                        masks[kind] = self._mask(state.valid, None, state.hidden.dtype, kind, state.positions)
                    state.hidden = layer(
                        state.hidden,
                        attention_mask=masks[kind],
                        position_ids=state.positions,
                        **{self.model.cache_kwarg: cache},
                        use_cache=True,
                        position_embeddings=cos_sin[kind],
                    )
            self._score_rows(layer, i, got, state, cos_sin[kind], wanted, captures, scores)
            for need in key_norms:  # the RoPE'd keys _score_rows kept in `got`
                keys = self._rope_keys(layer, got, cos_sin[kind])
                captures[need] = scores[need] = keys.float().abs().sum(dim=(1, 3))
            cache.valid[i] = state.valid
            cache.positions[i] = state.positions
            # after the highest position (not the last column's: a merged token without a source can sit
            # anywhere in its image's span when a prompt ends on its image)
            cache.next_pos[i] = state.positions.masked_fill(~state.valid, -1).amax(1) + 1
            tokens[:, i] = state.valid.sum(1)
            visual[:, i] = (state.valid & (state.kind >= VISUAL)).sum(1)
            image[:, i] = (state.valid & (state.kind == VISUAL)).sum(1)
        h = m.norm(state.hidden if all_logits else state.hidden[:, -1])
        logits = m.lm_head(h).float()
        per_layer = torch.stack([tokens, visual, image]).tolist()  # one read, once everything is queued
        record = RunRecord(
            method=[str(s) for s in self.strategies] or ["identity"],
            visual_tokens_in=[sum(c for _, c in s) for s in spans],
            visual_tokens_llm=n_visual.tolist(),
            tokens_per_view=per_view,
            projected_tokens=projected,
            tokens_per_layer=per_layer[0],
            visual_per_layer=per_layer[1],
            image_per_layer=per_layer[2],
            frozen_layers=sorted(k for k, v in self.frozen.items() if v == "visual"),
            frozen_text_layers=sorted(k for k, v in self.frozen.items() if v == "text"),
            vision_layers_run=self.vision_layers_run - self.vision_qk_layers,
            vision_qk_layers=self.vision_qk_layers,
            vision_qk_queries=self.vision_qk_queries,
            vision_capture_layers=len(self.vision_capture_layers),
            vision_cls_layers=self.vision_cls_layers,
            vision_mean_layers=self.vision_mean_layers,
            decoder_captures=[list(c) for c in self.decoder_captures],
            kernel_backend=kernels.backend(state.hidden, self.options.kernel_backend),
            kv_cache_bytes=cache.nbytes(),
            rater_tokens=[] if input_state.rater is None else input_state.rater.sum(1).tolist(),
        )
        return PrefillOutput(logits, state, input_state, cache, record, captures)

    def _context(self, state: SeqState, layer: int, scores, input_images: torch.Tensor) -> LayerContext:
        return LayerContext(
            layer=layer,
            num_layers=self.model.num_layers,
            hidden=state.hidden,
            valid=state.valid,
            kind=state.kind,
            positions=state.positions,
            orig_index=state.orig_index,
            scores=scores,
            input_image_count=input_images,
            final_norm=self.model.norm,
            backend=self.options.kernel_backend,
        )

    def _prune(self, state: SeqState, layer: int, scores, input_images: torch.Tensor) -> tuple[SeqState, bool]:
        ctx = self._context(state, layer, scores, input_images)
        forced = state.valid & (state.kind == TEXT)  # text tokens are never dropped
        forced[:, -1] |= state.valid[:, -1]  # nor the last token (left padding: the last column)
        keep = state.valid.clone()
        own = []
        for s in self.prune_at[layer]:
            k = s.keep(ctx)
            if k.shape != keep.shape or k.dtype != torch.bool:
                raise TokencompError(f"{s}.keep must return a (B, n) bool mask, got {tuple(k.shape)} {k.dtype}")
            own.append((s, (k & state.valid) | forced))
            keep &= k
        keep |= forced
        # each merging strategy recycles what it drops itself; what another one drops is gone
        made = [r for s, k in own if hasattr(s, "recycle_tokens") for r in [s.recycle_tokens(ctx, k)] if r is not None]
        wants = {getattr(s, "llm_positions", None) for s in self.prune_at[layer]}
        contiguous = self.options.llm_positions == "contiguous" or "contiguous" in wants
        dropped = bool(made) or not bool((keep == state.valid).all())
        if made:
            new, index = self._insert(state, keep, made)
        elif dropped:
            index, valid = repack(keep)
            new = state.gather(index, valid, self.options.kernel_backend)
        else:  # nothing dropped; contiguous numbering still applies here, whatever the batchmates drop
            new, index = dataclasses.replace(state), None
        if index is not None:
            for need in scores:  # scores captured earlier follow their tokens into the new packing
                scores[need] = torch.gather(scores[need], 1, index.clamp(min=0)).masked_fill(index < 0, 0)
        if contiguous:
            new.positions = (new.valid.long().cumsum(1) - 1).clamp(min=0)
        if dropped or not torch.equal(new.positions[new.valid], state.positions[state.valid]):
            return new, True
        return state, False

    def _insert(self, state: SeqState, keep: torch.Tensor, made: list[tuple[torch.Tensor, torch.Tensor]]):
        """The kept tokens with recycled ones inserted after each sample's last kept image-span
        token. ``made``: per recycling strategy, ``tokens (B, r, d)`` and ``count (B,)`` (the first
        ``count[b]`` rows are sample b's). Returns the new state and ``(B, n')`` source indices
        (-1 for an inserted token)."""
        n = keep.shape[1]
        dev = keep.device
        col = torch.arange(n, device=dev)
        span_end = torch.where(state.valid & (state.kind >= VISUAL), col, -1).amax(1)
        kept = keep.sum(1)
        added_n = sum(c for _, c in made)  # (B,) inserted tokens per sample
        length = kept + added_n
        orphans = (added_n > 0) & (span_end < 0)  # recycled tokens but no image span to put them after
        width, any_orphan = torch.stack([length.max(), orphans.sum()]).tolist()  # one host sync
        if any_orphan:
            bad = orphans.nonzero().flatten().tolist()
            raise TokencompError(f"recycle_tokens returned tokens for samples {bad}, which have no image tokens")
        # after the kept image span, but never after the last token (whose logits are read)
        cut = torch.minimum((keep & (col <= span_end[:, None])).sum(1), kept - 1).clamp(min=0)
        pad = width - length  # (B,) left padding
        start = pad + cut  # (B,) first inserted slot
        rank = keep.long().cumsum(1) - 1
        dest = pad[:, None] + rank + torch.where(rank >= cut[:, None], added_n[:, None], 0)
        index = place_columns(keep, dest, width)
        slot = torch.arange(width, device=dev)[None]
        valid = slot >= pad[:, None]
        added = (slot >= start[:, None]) & (slot < (start + added_n)[:, None])
        index = index.masked_fill(added, -1)
        # slot -> row of the strategies' tokens side by side (B, sum r, d): strategy by strategy, in order
        source = torch.zeros_like(index)
        j, first, offset = slot - start[:, None], torch.zeros_like(kept), 0
        for tokens, count in made:
            mine = (j >= first[:, None]) & (j < (first + count)[:, None])
            source = torch.where(mine, offset + j - first[:, None], source)
            first, offset = first + count, offset + tokens.shape[1]
        new = state.gather(index.clamp(min=0), valid, self.options.kernel_backend)
        if offset:
            side = torch.cat([t for t, _ in made], dim=1).to(new.hidden.dtype)
            new.hidden = torch.where(added[..., None], self._gather(side, source), new.hidden)
        new.kind = new.kind.masked_fill(added, VISUAL)
        new.orig_index = new.orig_index.masked_fill(added, -1)
        new.view = new.view.masked_fill(added, -1)
        new.patch = new.patch.masked_fill(added, -1)
        last_image = state.image.gather(1, span_end.clamp(min=0)[:, None])
        new.image = torch.where(added, last_image.expand_as(new.image), new.image)
        if new.rater is not None:
            new.rater &= ~added
        return new, index.masked_fill(~valid, 0)

    def _score_rows(self, layer, i: int, got, state: SeqState, cos_sin, needs, captures: dict, scores: dict) -> None:
        """Each decoder need's per-head rows into ``captures`` and their head-mean, query-mean
        ``(B, n)`` into ``scores``, from layer ``i``'s norm output and key projection in ``got``."""
        for need in needs:
            captures[need] = self._decoder_rows(layer, i, got, state, cos_sin, need.kind.rsplit("_", 1)[1])
            scores[need] = captures[need].mean(dim=(1, 2))

    def _rope_keys(self, layer, got: dict, cos_sin) -> torch.Tensor:
        """The layer's keys as its attention uses them (per-head norm and RoPE applied),
        ``(B, H_kv, n, d_head)``, from the captured output of its key projection (`Model.key_source`);
        computed once per layer and kept in ``got`` (a layer with both an attention-row and a
        key-norm capture uses them twice)."""
        if "k_rope" not in got:
            cos, sin = cos_sin
            got["k_rope"] = self.model.apply_rope(self.model.keys(layer.self_attn, got["keys"]), cos, sin)
        return got["k_rope"]

    def _decoder_rows(self, layer, i: int, got, state: SeqState, cos_sin, query: str) -> torch.Tensor:
        """Per-head softmax attention rows from the captured norm output and keys: ``(B, heads, 1, n)``,
        the last token's row (``query="last"``) or the mean row over the text tokens (``"text"``),
        the rater tokens (``"raters"``) or all tokens (``"all"``), computed ``ROW_CHUNK`` query rows at
        a time (no n x n map kept). As layer ``i`` computes them: its scale, logit soft-cap and window."""
        m = self.model
        attn = layer.self_attn
        x = got["input_layernorm"]
        b, n, _ = x.shape
        cos, sin = cos_sin
        window = m.sliding_window if m.layer_kinds[i] == attention.SLIDING else None
        by_position = self.options.window == "position"
        if query == "last":
            rows = torch.full((b, 1), n - 1, device=x.device)
            row_ok = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        else:
            marked = {"text": state.kind == TEXT, "raters": state.rater}.get(query)
            rows, row_ok = repack(state.valid if marked is None else state.valid & marked)
        gather = self._gather
        kh = self._rope_keys(layer, got, cos_sin)  # (B, H_kv, n, hd)
        total = None
        for s in range(0, rows.shape[1], ROW_CHUNK):
            r, ok = rows[:, s : s + ROW_CHUNK], row_ok[:, s : s + ROW_CHUNK]
            q = m.apply_rope(m.project(attn, gather(x, r), "q"), gather(cos, r), gather(sin, r))
            allow = None
            if window is not None and (by_position or n > window):
                pos = state.positions if by_position else None
                allow = attention.allowed(state.valid, r, window, pos, None if pos is None else pos.gather(1, r))
            _, probs = kernels.attention_rows(
                q,
                kh,
                attn.scaling,
                state.valid,
                r,
                backend=self.options.kernel_backend,
                softcap=m.softcap,
                allowed=allow,
            )  # (B, H, chunk, n)
            part = probs.masked_fill(~ok[:, None, :, None], 0.0).sum(2, keepdim=True)
            total = part if total is None else total + part
        if total is None:  # no query rows at all
            return x.new_zeros((b, attn.config.num_attention_heads, 1, n), dtype=torch.float32)
        return total / row_ok.sum(1).clamp(min=1)[:, None, None, None]

    def _frozen_plan(self, state: SeqState, frozen: str) -> FrozenPlan:
        """The packing of a frozen layer's active tokens: text tokens when image tokens are frozen
        (``frozen="visual"``, ShortV), image-span tokens when text tokens are (``"text"``, for
        ShortV's text-type layer contribution). Shared by consecutive frozen layers of one kind
        while no pruning changes the sequence, so they cost one host sync in all."""
        active = state.valid & ((state.kind == TEXT) if frozen == "visual" else (state.kind >= VISUAL))
        index, ok = repack(active)
        # padding slots point at a token no real slot updates and write its own value back, so the
        # write-back is one scatter without a data-dependent shape; such a token exists in every
        # sample with padding slots, as it has fewer active tokens than the packed width <= n
        spare = (~active).long().argmax(1, keepdim=True)
        index = torch.where(ok, index, spare)
        return FrozenPlan(index, ok)

    def _frozen_layer(self, layer, idx: int, state: SeqState, cos_sin, cache: LayerKVCache, plan: FrozenPlan):
        """A layer in which the tokens outside ``plan`` (image tokens for ShortV) pass through
        unchanged but still give keys and values; the tokens in it are computed as in the
        ordinary layer (its attention kind, scale and soft-cap; Gemma2 / Gemma3's norms around
        the attention and MLP outputs). Returns the new hidden states ``(B, n, d)``."""
        m = self.model
        attn = layer.self_attn
        h = state.hidden
        b, n, d = h.shape
        cos, sin = cos_sin
        rows = plan.index
        t = rows.shape[1]
        gather = self._gather
        kind = m.layer_kinds[idx]
        if kind not in plan.masks:
            plan.masks[kind] = self._mask(state.valid, rows, h.dtype, kind, state.positions)
        x = layer.input_layernorm(h)
        q = m.apply_rope(m.project(attn, gather(x, rows), "q"), gather(cos, rows), gather(sin, rows))
        k = m.apply_rope(m.project(attn, x, "k"), cos, sin)
        k, v = cache.update(k, m.project(attn, x, "v"), idx)
        capped = {} if m.softcap is None else {"softcap": m.softcap}
        out, _ = m.attention_function(attn)(
            attn, q, k, v, plan.masks[kind], dropout=0.0, scaling=attn.scaling, **capped
        )
        out = attn.o_proj(out.reshape(b, t, -1))
        h_rows = gather(h, rows)
        if m.sandwich_norms:
            ht = h_rows + layer.post_attention_layernorm(out)
            ht = ht + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(ht)))
        else:
            ht = h_rows + out
            ht = ht + layer.mlp(layer.post_attention_layernorm(ht))
        ht = torch.where(plan.ok[..., None], ht, h_rows)  # padding slots rewrite their spare token as it was
        return h.clone().scatter_(1, rows[..., None].expand(b, t, d), ht)

    def _gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(B, n, d), (B, k) -> (B, k, d)`` through the token-gather kernel of this run's backend."""
        return kernels.gather_tokens(x, index, backend=self.options.kernel_backend)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 32, eos_token_id: int | None = None, pad_token_id: int = 0):
        """Greedy decoding. Returns ``(tokens per sample (lists, EOS included), PrefillOutput)``."""
        if max_new_tokens < 1:
            raise TokencompError(f"max_new_tokens={max_new_tokens} is outside the allowed range [1, inf]")
        m = self.model
        sync = (lambda: torch.cuda.synchronize(m.device)) if m.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        pre = self.prefill(batch)
        sync()
        t1 = time.perf_counter()
        cache = pre.cache
        cache.reserve = max(max_new_tokens - 2, 0)  # the first decoding step's append makes room for the rest
        nxt = pre.logits.argmax(-1)
        steps = [nxt]
        done = nxt == eos_token_id if eos_token_id is not None else torch.zeros_like(nxt, dtype=torch.bool)
        # per layer: no padding key (one read for all layers)
        full = torch.stack([v.all() for v in cache.valid]).tolist() if max_new_tokens > 1 else []
        # FlashAttention takes no mask: a finished sample keeps attending to its own padding steps,
        # which changes only its own (discarded) outputs
        flash = m.attn_implementation.startswith("flash")
        # every layer's position for the next token (layers may number differently: llm_positions)
        next_pos = torch.stack(cache.next_pos)[..., None]  # (L, B, 1)
        n_layers, nb = next_pos.shape[:2]
        flat_pos = next_pos.view(n_layers * nb, 1)
        for _ in range(max_new_tokens - 1):
            # without an EOS no sample finishes: nothing to read (timed runs); else one read per step
            finished = done.tolist() if eos_token_id is not None else [False]
            if all(finished):
                break
            all_live = not any(finished) or flash
            x = m.embed_tokens(nxt[:, None])
            live = ~done[:, None]  # a finished sample's padding steps leave no valid key behind
            # RoPE of all layers at once (one call per attention kind)
            rope = {k: [t.view(n_layers, nb, *t.shape[1:]) for t in cs] for k, cs in self._rope(x, flat_pos).items()}
            # layers that share a validity mask (no pruning between them) share its key mask
            masks: dict[tuple, tuple] = {}
            for i, layer in enumerate(m.layers):
                kind = m.layer_kinds[i]
                pos = next_pos[i]
                prev, prev_pos = cache.valid[i], cache.positions[i]
                key = (id(prev), id(prev_pos))  # (both are kept in the entry, so their ids are not reused)
                if key not in masks:
                    key_valid = torch.cat([prev, live], dim=1)
                    key_pos = torch.cat([prev_pos, pos], dim=1)  # a window may count in them
                    masks[key] = (prev, prev_pos, key_valid, key_pos, full[i] and all_live, {})
                _, _, key_valid, key_pos, full[i], by_kind = masks[key]
                if kind not in by_kind:
                    last = torch.full_like(pos, key_valid.shape[1] - 1)
                    by_kind[kind] = self._mask(key_valid, last, x.dtype, kind, key_pos, full[i], decoding=True)
                cos, sin = rope[kind]
                x = layer(
                    x,
                    attention_mask=by_kind[kind],
                    position_ids=pos,
                    **{self.model.cache_kwarg: cache},
                    use_cache=True,
                    position_embeddings=(cos[i], sin[i]),
                )
                cache.valid[i], cache.positions[i] = key_valid, key_pos
            next_pos = next_pos + 1
            flat_pos = next_pos.view(n_layers * nb, 1)
            logits = m.lm_head(m.norm(x[:, -1])).float()
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), logits.argmax(-1))
            steps.append(nxt)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
        sync()
        t2 = time.perf_counter()
        cache.next_pos = list(next_pos[..., 0])
        gen = torch.stack(steps, dim=1).tolist()
        out = []
        for row in gen:
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            out.append(row)
        pre.record.prefill_s = t1 - t0
        pre.record.decode_s = t2 - t1
        pre.record.new_tokens = [len(r) for r in out]
        pre.record.kv_cache_bytes = cache.nbytes()
        pre.record.kv_cache_lengths = cache.valid_lengths().tolist()
        pre.flops = run_flops(m, pre.record, self.strategies)
        pre.record.prefill_flops = [f.prefill for f in pre.flops]
        pre.record.total_flops = [f.total for f in pre.flops]
        return out, pre


@contextmanager
def _capture(module, names: list[str], extra: dict | None = None):
    """Forward hooks that store the outputs of ``module.<name>`` (and ``extra`` modules) for one call.

    Yields a dict name -> output; the hooks are always removed on exit.
    """
    got: dict[str, torch.Tensor] = {}
    handles = []
    targets = {name: getattr(module, name) for name in names}
    targets.update(extra or {})
    try:
        for name, mod in targets.items():
            handles.append(mod.register_forward_hook(lambda _m, _i, out, name=name: got.__setitem__(name, out)))
        yield got
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _nothing():
    yield {}
