"""The strategy API: four stages, each a small dataclass the engine applies.

* `TowerStrategy` (inside the vision tower): in chosen encoder layers, merges or drops tokens
  between the attention and the MLP, so that later layers run on fewer (ToMe).
* `VisionStrategy` (before the LLM): selects or merges the patch tokens of every view
  (the LLaVA-1.5 image; the LLaVA-NeXT thumbnail and each crop).
* `LayerStrategy` (inside the LLM): before chosen decoder layers, drops visual tokens, usually
  ranked by attention scores the engine captured at the previous layer.
* `FreezeStrategy` (inside the LLM): in chosen layers visual tokens get no query, attention output
  or MLP update (their hidden states pass through unchanged) but are still normed and projected to
  keys/values so text tokens attend to them.

A strategy declares what it needs captured through `needs()`: a list of `Need(kind, layer)`.
Vision kinds index the vision tower's encoder layers (negative counts from the end, as
``vision_feature_layer`` does); decoder kinds index decoder layers from 0.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import torch

from .errors import BudgetError

VISION_NEEDS = (
    "vision_cls_attention",
    "vision_cls_logits",
    "vision_keys",
    "vision_cls_query",
    "vision_keys_full",
    "vision_mean_attention",
    "vision_mean_logits",
)
CLS_NEEDS = ("vision_cls_attention", "vision_cls_logits", "vision_cls_query")  # towers with a CLS token only
# decoder attention rows of layer L, from the last token, averaged over the text tokens, over all
# tokens or over the rater tokens a layer strategy marks (`LayerStrategy.raters`, SparseVLM)
# (DECODER_QUERIES): "decoder_attention_*" while layer L runs (after any pruning before L);
# "decoder_preprune_attention_*" from layer L's own norm and q/k projections of the hidden states
# entering L, before the pruning at L (PyramidDrop)
DECODER_QUERIES = ("last", "text", "all", "raters")
PREPRUNE_NEEDS = tuple(f"decoder_preprune_attention_{q}" for q in DECODER_QUERIES)
DECODER_NEEDS = tuple(f"decoder_attention_{q}" for q in DECODER_QUERIES) + PREPRUNE_NEEDS
# per-token L1 norm of decoder layer L's keys (RoPE applied, every key/value head), taken while
# layer L runs (DART's pivot score)
KEY_NORM_NEEDS = ("decoder_key_norm",)

# token kinds in a sequence (`TokenLayout.kind`)
PAD, TEXT, VISUAL, NEWLINE = 0, 1, 2, 3


def _missing(need: Need, layer: int, have: list) -> str:
    """The message for a decoder capture a strategy reads but the engine does not hold."""
    if need.layer >= layer and not need.kind.startswith("decoder_preprune_"):
        early = need.kind.replace("decoder_", "decoder_preprune_", 1)
        instead = f", or {early} at {layer} (computed from the tokens entering it)" if early in DECODER_NEEDS else ""
        return (
            f"{need} is read before decoder layer {layer}, but a capture at layer {need.layer} is taken while "
            f"that layer runs, after this point: read a layer < {layer}{instead}"
        )
    return f"{need} was not captured; declare it in needs() (captured: {have})"


class Need(NamedTuple):
    """One capture request: ``kind`` is one of `VISION_NEEDS`, `DECODER_NEEDS` or `KEY_NORM_NEEDS`;
    ``layer`` a vision layer index (negative counts from the last, as in Hugging Face's
    ``hidden_states``: -2 is the penultimate layer) or a decoder layer in ``[0, L)``. A decoder
    capture at layer ``l`` is taken while layer ``l`` runs, so a strategy pruning before layer
    ``p`` reads captures of layers ``< p`` (or the ``decoder_preprune_*`` kinds at ``p``, computed
    from the tokens entering ``p``)."""

    kind: str
    layer: int


@dataclass(frozen=True)
class RunInfo:
    """What a strategy may check before any forward pass (all counts are tokens).

    Attributes:
        family: ``"llava"`` (LLaVA-1.5 style, one view per image), ``"llava-next"`` (thumbnail +
            crops) or ``"llava-onevision"`` (NeXT's, crop grids resized by anyres_max).
        num_layers: decoder layers L.
        vision_layers: vision encoder layers.
        patches_per_view: N, patch tokens of one view (576 for 336 px / patch 14).
        grid: ``(h, w)`` patch grid of one view.
        has_crops: whether images are split into AnyRes crops.
        visual_tokens: per sample, image-placeholder tokens in the uncompressed prompt (on
            LLaVA-NeXT its ``image_newline`` tokens included, as the processor expands them).
        views_valid: per sample, per view, patch tokens that survive LLaVA-NeXT unpadding.
        has_cls: whether the vision tower has a CLS token.
    """

    family: str
    num_layers: int
    vision_layers: int
    patches_per_view: int
    grid: tuple[int, int]
    has_crops: bool
    visual_tokens: tuple[int, ...]
    views_valid: tuple[tuple[int, ...], ...]
    has_cls: bool = True


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``, else raise `BudgetError` naming both."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BudgetError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        hi = "inf" if high is None else str(high)
        raise BudgetError(f"{name}={value} is outside the allowed range [{low}, {hi}]")
    return value


def scale_budget(budget: int, share: float, low: int = 0) -> int:
    """A per-view ``budget`` for a view whose tokens reach the LLM at ``share`` of their number
    (`VisionView.share`): ``budget`` itself at share 1, else ``budget * share`` rounded to the
    nearest integer (halves up), at least ``low``."""
    return budget if share == 1 else max(low, math.floor(budget * share + 0.5))


def check_image_budget(budget: int, info: RunInfo) -> int:
    """Check an in-LLM budget of image tokens kept against the sample with the fewest image tokens
    (text-only samples have nothing to prune and are left out); raises `BudgetError`."""
    with_images = [v for v in info.visual_tokens if v]
    if with_images:
        check_int("budget (image tokens kept)", budget, 1, min(with_images))
    return budget


def check_ratio(name: str, value: Any, low: float = 0.0, high: float = 1.0, *, open_high: bool = False) -> float:
    """Return ``value`` as float if ``low <= value <= high`` (``< high`` with ``open_high``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{name} must be a number, got {value!r}")
    ok = low <= value < high if open_high else low <= value <= high
    if not ok:
        bracket = ")" if open_high else "]"
        raise BudgetError(f"{name}={value} is outside the allowed range [{low}, {high}{bracket}")
    return float(value)


class Strategy:
    """Base of every strategy. Subclasses are dataclasses registered with `tokencomp.register`."""

    stage: ClassVar[str] = ""
    name: ClassVar[str] = "unnamed"

    def needs(self) -> list[Need]:
        """Scores the engine must capture for this strategy (default: none)."""
        return []

    def needs_for(self, num_layers: int) -> list[Need]:
        """`needs` for a decoder of ``num_layers`` layers; override when the needs depend on depth."""
        return self.needs()

    def needs_for_model(self, model) -> list[Need]:
        """`needs_for` the model's depth; override when the needs depend on other model facts
        (e.g. whether the vision tower has a CLS token). The engine calls this one."""
        return self.needs_for(model.num_layers)

    def check(self, info: RunInfo) -> None:
        """Raise a `TokencompError` if this strategy cannot serve ``info``; runs before any work."""

    def params(self) -> dict[str, Any]:
        """The strategy's parameters as plain data (for run records and result tables)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} if hasattr(self, "__dataclass_fields__") else {}

    @property
    def label(self) -> str:
        """The registered name, or the class name of an unregistered strategy."""
        return self.name if self.name != "unnamed" else type(self).__name__

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.label}({args})"


# ----------------------------------------------------------------------------------------------
# tower stage


@dataclass
class TowerContext:
    """The tokens of every view inside encoder layer ``layer``, after its attention (residual
    added), before its MLP: what a `TowerStrategy` reduces.

    Attributes:
        layer: the encoder layer (0-based).
        hidden: ``(V, n, d_v)`` hidden states (CLS first where the tower has one).
        keys: ``(V, n, d_head)`` this layer's key projections averaged over heads (ToMe's metric).
        size: ``(V, n)`` float32, how many patches (or the CLS token) each token stands for.
        has_cls: whether token 0 of each view is the CLS token (keep it: LLaVA drops it last).
        layers_left: the layers `TowerStrategy.reduce` runs in from this one on (this one included).
        backend: token-kernel backend of this run.
    """

    layer: int
    hidden: torch.Tensor
    keys: torch.Tensor
    size: torch.Tensor
    has_cls: bool
    layers_left: int = 1
    backend: str = "auto"


class TowerStrategy(Strategy):
    """Reduce the vision tower's tokens: its input (`resize`, a smaller image) or inside chosen
    encoder layers (between attention and MLP).

    Implement ``resize``, or ``reduce_layers(layers_run) -> list[int]`` (encoder layers, 0-based, below
    ``layers_run``, the layers the tower runs up to the projector's feature layer) and
    ``reduce(ctx) -> (hidden (V, n', d_v), size (V, n'))``, every view keeping the same ``n'``.
    The engine carries ``size`` on; with ``proportional = True`` (class attribute) every later
    attention adds ``log(size)`` of each key to its logits (ToMe's proportional attention). Merged
    tokens reaching the projector have no source patch: LLaVA-NeXT crops' tokens follow one
    another, crop by crop, without newline tokens; unmerged ones form the view's grid, laid out as
    the model lays out a grid (unpadded, newline tokens per row). A tower strategy does not compose with a vision
    strategy (which would see tokens that are no longer patches); layer and freeze strategies
    compose with it.
    """

    stage: ClassVar[str] = "tower"
    proportional: ClassVar[bool] = True
    newline: ClassVar[str] = "drop"  # merged tokens: none (a grid gets the model's newline tokens)
    unpad: ClassVar[bool] = False

    def resize(self, pixels: torch.Tensor, patch: int) -> torch.Tensor:
        """The views' pixels the tower runs on, ``(V, 3, H, W) -> (V, 3, H', W')`` with ``H'`` and
        ``W'`` multiples of ``patch`` (default: as given). Other sizes run with the position
        embeddings interpolated (Hugging Face's ``interpolate_pos_encoding``), and the tokens reach
        the projector as a ``H'/patch x W'/patch`` grid, laid out as a pooled grid is."""
        return pixels

    def reduce_layers(self, layers_run: int) -> list[int]:
        """Encoder layers inside which `reduce` runs, of the ``layers_run`` the tower runs
        (default: none)."""
        return []

    def reduce(self, ctx: TowerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (V, n', d_v), size (V, n'))``: the tokens after this layer's reduction."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# vision stage


@dataclass
class VisionView:
    """All views of a batch that share one patch grid, as a vision strategy sees them.

    Attributes:
        features: ``(V, N, d_v)`` patch features at the projector's input layer (CLS excluded).
        cls: ``(V, d_v)`` CLS feature at the same layer, or None for towers without CLS.
        grid: ``(h, w)`` patch grid of a view; ``N = h * w``, raster order.
        valid: ``(V, N)`` bool, patches that survive LLaVA-NeXT unpadding (all True otherwise).
        role: ``(V,)`` long: 0 for the LLaVA-1.5 image or the NeXT thumbnail, ``j >= 1`` for crop j
            (crops numbered from 1 in raster order of the crop grid).
        image: ``(V,)`` long, index of the view's image in the batch (images counted over samples).
        key: ``(V,)`` long, a per-sample stable id (image index within its sample * 1000 + role),
            for seeding randomness so that a sample gives the same result alone or in a batch.
        crop_grid: per image ``(rows, cols)`` of its crop grid, ``(0, 0)`` without crops. An image's
            views are consecutive: its base view (role 0), then its crops in raster order.
        crop_window: per image ``(r0, height, c0, width)``: the window ``[r0, r0 + height) x
            [c0, c0 + width)`` of its ``(rows * h, cols * w)`` combined crop token grid that survives
            LLaVA-NeXT unpadding (``valid``'s crop tokens, known on the host); ``(0, 0, 0, 0)``
            without crops. Empty when the view was built without it.
        captures: captured scores, keyed by `Need`; read them through the accessors below.
        backend: token-kernel backend of this run (pass it to `tokencomp.kernels` calls).
        pixels: ``(V, 3, H, W)`` the views' pixel values as the batch holds them: the processor's,
            before the cast to the model's dtype, on the host (CPU) for a batch from
            `tokencomp.prepare` whatever the model's device (see `content_key`).
        share: per view, the share of its tokens the uncompressed model feeds to the LLM after
            resampling: 1.0, except LLaVA-OneVision crops of an image whose crop grid anyres_max
            downsamples (its area factor, < 1). A per-view budget is scaled by it (`budget_for`).
            Empty: every view 1.0.
    """

    features: torch.Tensor
    cls: torch.Tensor | None
    grid: tuple[int, int]
    valid: torch.Tensor
    role: torch.Tensor
    image: torch.Tensor
    key: torch.Tensor
    crop_grid: list[tuple[int, int]]
    captures: dict[Need, torch.Tensor] = field(default_factory=dict)
    crop_window: list[tuple[int, int, int, int]] = field(default_factory=list)
    backend: str = "auto"
    pixels: torch.Tensor | None = None
    share: list[float] = field(default_factory=list)

    @property
    def num_views(self) -> int:
        """``V``: views in this call (images x views per image)."""
        return self.features.shape[0]

    def content_key(self) -> list[int]:
        """Per view, a 56-bit hash of its pixel values' bytes: an id that differs between images
        and is the same for an image alone or in a batch, and whatever the model's dtype (for
        seeding per-image randomness)."""
        if self.pixels is None:
            raise KeyError("this view carries no pixel values")
        raw = self.pixels.detach().cpu().contiguous().flatten(1).view(torch.uint8)  # any dtype's bytes
        return [int.from_bytes(hashlib.blake2b(r.numpy().tobytes(), digest_size=7).digest(), "little") for r in raw]

    def _get(self, kind: str, layer: int) -> torch.Tensor:
        for need, value in self.captures.items():
            if need.kind == kind and need.layer == layer:
                return value
        have = sorted(f"{n.kind}@{n.layer}" for n in self.captures)
        raise KeyError(
            f"{kind} at vision layer {layer} was not captured; declare Need({kind!r}, {layer}) in needs() (captured: {have})"
        )

    def cls_attention(self, layer: int = -2) -> torch.Tensor:
        """``(V, heads, 1 + N)`` softmax attention of the CLS query at encoder ``layer`` (column 0 = CLS)."""
        return self._get("vision_cls_attention", layer)

    def cls_logits(self, layer: int = -1) -> torch.Tensor:
        """``(V, heads, 1 + N)`` pre-softmax scaled logits q·k/sqrt(d_head) of the CLS query."""
        return self._get("vision_cls_logits", layer)

    def keys(self, layer: int = -2) -> torch.Tensor:
        """``(V, 1 + N, d_head)`` keys of encoder ``layer`` averaged over heads (row 0 = CLS;
        ``(V, N, d_head)`` for towers without CLS)."""
        return self._get("vision_keys", layer)

    def mean_attention(self, layer: int = -2) -> torch.Tensor:
        """``(V, heads, T)`` attention each token receives at encoder ``layer``, averaged over all
        ``T`` query rows (``T = 1 + N`` with CLS, ``N`` without); the score for towers without CLS."""
        return self._get("vision_mean_attention", layer)

    def mean_logits(self, layer: int = -1) -> torch.Tensor:
        """``(V, heads, T)`` pre-softmax scaled logits each token receives at encoder ``layer``,
        averaged over all ``T`` query rows (exactly the logits of the mean query, since they are
        linear in the query): the stand-in for `cls_logits` in towers without CLS."""
        return self._get("vision_mean_logits", layer)

    def budget_for(self, budget: int, low: int = 0) -> list[int]:
        """Per view, a per-view ``budget`` scaled by the view's `share` (`scale_budget`)."""
        return [scale_budget(budget, s, low) for s in self.share] if self.share else [budget] * self.num_views

    def cls_query(self, layer: int = -1) -> torch.Tensor:
        """``(V, d_v)`` raw CLS query projection (bias included, unscaled, heads not split)."""
        return self._get("vision_cls_query", layer)

    def keys_full(self, layer: int = -1) -> torch.Tensor:
        """``(V, 1 + N, d_v)`` raw key projections of encoder ``layer`` (heads not split; no CLS row
        for towers without CLS)."""
        return self._get("vision_keys_full", layer)


@dataclass
class ViewTokens:
    """What a vision strategy returns for a `VisionView`.

    Attributes:
        features: ``(V, k, d_v)`` output tokens in vision-feature space (before the projector).
        index: ``(V, k)`` long, the source patch index in ``[0, N)`` of each output token, or -1
            for a token with no single source (merged, pooled, CLS).
        count: ``(V,)`` long, how many of the k rows of each view are real (rest is padding).
        grid: ``(gh, gw)`` when every view's output is a full raster grid of that shape (pooling,
            identity); LLaVA-NeXT crops are then re-assembled, unpadded and given newline tokens
            exactly as the uncompressed model does.
        group: ``(V, k)`` optional int order key for LLaVA-NeXT crop tokens without a source patch:
            they follow the grid-placed tokens, sorted by (group, crop, position in the view).
    """

    features: torch.Tensor
    index: torch.Tensor
    count: torch.Tensor
    grid: tuple[int, int] | None = None
    group: torch.Tensor | None = None


class VisionStrategy(Strategy):
    """Compress each view's patch tokens before the projector.

    Write ``select(view) -> (V, k) indices`` (when views keep different counts: rows padded at the
    end with -1, or a list of V 1-D index tensors) for a pruning policy; the engine gathers the tokens and, with
    ``keep_order = True``, restores raster order. Override ``compress(view) -> ViewTokens`` for
    merging or pooling.

    Class attributes (override in a subclass or as a dataclass field):
        keep_order: sort selected indices into raster order (default True).
        newline: LLaVA-NeXT ``image_newline`` policy for selections placed back on the crop grid:
            ``"keep"`` one newline after every unpadded row (as the uncompressed model),
            ``"rows"`` only after rows that keep a token, ``"drop"`` none.
        unpad: drop selected crop tokens outside LLaVA-NeXT's unpadded window (default True, as
            the uncompressed model); False keeps the whole crop grid.
    """

    stage: ClassVar[str] = "vision"
    keep_order: ClassVar[bool] = True
    newline: ClassVar[str] = "keep"
    unpad: ClassVar[bool] = True

    def select(self, view: VisionView) -> torch.Tensor | list[torch.Tensor]:
        """Patch indices to keep per view: a ``(V, k)`` long tensor, or ``V`` 1-D index tensors.

        Views may keep different counts: return the list, or pad the tensor's rows at the end with
        -1 (a batched selection then needs no host read of the counts)."""
        raise NotImplementedError(f"{type(self).__name__} must implement select() or compress()")

    def compress(self, view: VisionView) -> ViewTokens:
        """Default: gather the tokens chosen by `select`."""
        from .kernels import gather_tokens

        idx = self.select(view)
        num_views, n = view.features.shape[:2]
        dev = view.features.device
        given = [idx] if isinstance(idx, torch.Tensor) else list(idx)
        for i in given:
            if i.dtype.is_floating_point or i.dtype.is_complex or i.dtype == torch.bool:
                raise ValueError(f"{self.name}.select must return integer indices, got {i.dtype}")
        if isinstance(idx, torch.Tensor):
            if idx.dim() != 2 or idx.shape[0] != num_views:
                raise ValueError(f"{self.name}.select must return (V={num_views}, k) indices, got {tuple(idx.shape)}")
            idx, fill = idx.long(), -1
        else:
            if len(idx) != num_views:
                raise ValueError(f"{self.name}.select returned {len(idx)} index lists for {num_views} views")
            fill = torch.iinfo(torch.long).min  # padded here: any negative index in a list is outside [0, N)
            idx = torch.nn.utils.rnn.pad_sequence([i.long().to(dev) for i in idx], batch_first=True, padding_value=fill)
        real = idx >= 0
        count = real.sum(1)
        # each row sorted, its padding given distinct values past n: a repeated index shows as a neighbour
        ordered = torch.where(real, idx, n + torch.arange(idx.shape[1], device=dev)).sort(dim=1).values
        if idx.numel():  # one read for the three checks
            outside = ((idx < 0) & (idx != fill)) | (idx >= n)
            gap = real[:, 1:] & ~real[:, :-1]
            repeated = ordered[:, 1:] == ordered[:, :-1]
            outside, gap, repeated = torch.stack([outside.any(), gap.any(), repeated.any()]).tolist()
            if outside:
                raise ValueError(f"{self.name}.select returned indices outside [0, {n})")
            if gap:
                raise ValueError(f"{self.name}.select padded a row with -1 before its last index (pad at the end)")
            if repeated:
                raise ValueError(f"{self.name}.select returned an index twice in one view (keep each token once)")
        idx = idx.clamp(min=0)
        if self.keep_order:  # real slots lead each row (checked): sorted, they stay ahead of the padding
            idx = ordered.masked_fill(~real, 0)
        feats = gather_tokens(view.features, idx, backend=view.backend)
        return ViewTokens(features=feats, index=idx, count=count)


# ----------------------------------------------------------------------------------------------
# layer stage


@dataclass
class LayerContext:
    """The packed batch as a `LayerStrategy` sees it just before decoder layer ``layer``.

    Attributes:
        layer: the decoder layer about to run.
        num_layers: L.
        hidden: ``(B, n, d)`` hidden states entering the layer (left padded).
        valid: ``(B, n)`` bool, real tokens.
        kind: ``(B, n)`` int8 token kinds (`PAD`, `TEXT`, `VISUAL`, `NEWLINE`).
        positions: ``(B, n)`` position ids.
        orig_index: ``(B, n)`` index of each token in the uncompressed prompt.
        scores: captured per-token decoder scores, keyed by `Need`; read with `attention` and
            `key_norm`.
        input_image_count: ``(B,)`` image-span tokens that entered the LLM (schedules count from it).
        final_norm: the decoder's final norm module (``model.norm``), for methods that compare
            hidden states in the space the LM head reads (DART).
        backend: token-kernel backend of this run (pass it to `tokencomp.kernels` calls).
        image: ``(B, n)`` long, the index within its sample of the image each image-span token
            belongs to (-1 for text), for methods that choose per image.
    """

    layer: int
    num_layers: int
    hidden: torch.Tensor
    valid: torch.Tensor
    kind: torch.Tensor
    positions: torch.Tensor
    orig_index: torch.Tensor
    scores: dict[Need, torch.Tensor]
    input_image_count: torch.Tensor | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    backend: str = "auto"
    image: torch.Tensor | None = None

    @property
    def image_mask(self) -> torch.Tensor:
        """``(B, n)`` bool: tokens of the image span (visual and newline) that may be dropped."""
        return self.valid & (self.kind >= VISUAL)

    @property
    def image_count(self) -> torch.Tensor:
        """``(B,)`` long: image-span tokens per sample."""
        return self.image_mask.sum(1)

    @property
    def text_after_image(self) -> torch.Tensor:
        """``(B, n)`` bool: text tokens after each sample's last image-span token (the question and
        the answer prompt in a LLaVA prompt); none for a sample without image tokens."""
        img = self.image_mask
        col = torch.arange(img.shape[1], device=img.device)
        last_image = torch.where(img, col, -1).amax(1, keepdim=True)
        return self.valid & (self.kind == TEXT) & (col > last_image) & (last_image >= 0)

    def attention(self, layer: int, query: str = "last", preprune: bool = False) -> torch.Tensor:
        """``(B, n)`` head-mean softmax attention at decoder ``layer`` from the last token
        (``query="last"``), averaged over the text tokens (``"text"``), over the rater tokens a
        strategy marked (``"raters"``) or over every token (``"all"``; causal, so a token
        receives from those after it), on this layer's tokens.
        ``preprune``: the ``decoder_preprune_attention_*`` capture (layer ``layer``'s attention
        computed before the pruning at that layer) instead of the one taken while it ran."""
        need = Need(f"decoder_{'preprune_' if preprune else ''}attention_{query}", layer)
        if need not in self.scores:
            raise KeyError(_missing(need, self.layer, sorted(self.scores)))
        return self.scores[need]

    def key_norm(self, layer: int) -> torch.Tensor:
        """``(B, n)`` float32 L1 norm of each token's key at decoder ``layer`` (RoPE applied, all
        key/value heads concatenated), on this layer's tokens (the ``decoder_key_norm`` capture)."""
        need = Need("decoder_key_norm", layer)
        if need not in self.scores:
            raise KeyError(_missing(need, self.layer, sorted(self.scores)))
        return self.scores[need]

    def keep_top(self, scores: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        """Keep mask ``(B, n)``: every non-image token, plus the ``count`` highest-scoring image
        tokens of each sample (``count`` an int or a ``(B,)`` tensor, clipped to what exists)."""
        img = self.image_mask
        return (self.valid & ~img) | top_mask(scores, img, count)


def top_mask(scores: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """``(B, n)`` bool: per row, the ``count`` highest ``scores`` among the ``allowed`` entries.

    ``count`` is an int or a ``(B,)`` tensor, clipped to ``[0, allowed.sum(1)]``; ties go to the
    lower index (stable sort).
    """
    b, n = allowed.shape
    count = torch.as_tensor(count, device=allowed.device).expand(b).clamp(min=0)
    count = torch.minimum(count, allowed.sum(1))
    order = scores.float().masked_fill(~allowed, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank_ok = torch.arange(n, device=allowed.device)[None] < count[:, None]
    return torch.zeros_like(allowed).scatter(1, order, rank_ok) & allowed


class LayerStrategy(Strategy):
    """Drop image tokens before chosen decoder layers.

    Implement ``prune_layers(num_layers) -> list[int]`` (layers before which ``keep`` runs) and
    ``keep(ctx) -> (B, n) bool``; text tokens are always kept whatever ``keep`` returns, and a
    dropped token stays dropped in every later layer and in the KV cache. A strategy whose
    ``llm_positions`` attribute is ``"contiguous"`` has the kept tokens renumbered 0..k-1 at its
    pruning (see `tokencomp.engine`); otherwise `EngineOptions.llm_positions` decides.

    Optional hooks:
        raters(ctx) -> (B, n) bool: called once on the sequence entering layer 0; marks the text
            tokens whose attention rows the ``decoder_attention_raters`` captures average.
        recycle_tokens(ctx, keep) -> (tokens (B, r, d), count (B,) long) or None: new tokens made from
            the dropped ones (merging), inserted after the last kept image-span token of each
            sample (after the last image, for several) as image tokens without a source; needs
            contiguous LLM positions. ``keep`` is this strategy's own mask (text and the last
            token forced in): a token another strategy drops at the same layer is dropped, not
            offered for merging.
    """

    stage: ClassVar[str] = "layer"
    # the earliest layer `keep` may run before: 1 where it scores with an earlier layer's captures,
    # 0 for a strategy that chooses from the LLM's input embeddings (DivPrune)
    first_prune_layer: ClassVar[int] = 1

    def prune_layers(self, num_layers: int) -> list[int]:
        """Decoder layers before which `keep` runs, for a decoder of ``num_layers`` layers."""
        raise NotImplementedError

    def keep(self, ctx: LayerContext) -> torch.Tensor:
        """``(B, n)`` bool: the tokens to keep before layer ``ctx.layer``."""
        raise NotImplementedError


class FreezeStrategy(Strategy):
    """Freeze image tokens in chosen decoder layers (they still serve as keys and values)."""

    stage: ClassVar[str] = "freeze"

    def frozen_layers(self, num_layers: int) -> list[int]:
        """Decoder layers in which image tokens pass through unchanged."""
        raise NotImplementedError
