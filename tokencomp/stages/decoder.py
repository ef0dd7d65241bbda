"""Stage 3, the decoder layer loop: each layer with the mask of its attention kind and the rotary
embedding of its kind, in-LLM pruning before the layers strategies name (tokens gathered out of the
packed batch, or recycled tokens inserted), decoder captures, frozen layers, the KV cache filled
layer by layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import attention, kernels
from ..cache import LayerKVCache
from ..errors import TokencompError
from ..layout import place_columns, repack
from ..profiler import FlopsReport
from ..record import RunRecord
from ..strategy import (
    DECODER_NEEDS,
    KEY_NORM_NEEDS,
    PREPRUNE_NEEDS,
    TEXT,
    VISUAL,
    LayerContext,
    Need,
)
from .captures import capture_outputs, no_capture
from .frozen import FrozenPlan
from .sequence import SeqState

if TYPE_CHECKING:
    from ..engine import Batch


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


class DecoderStage:
    """The prefill through the decoder layers (a mixin of `tokencomp.Engine`: reads its ``model``,
    ``options``, ``needs``, ``prune_at``, ``frozen`` and ``raters``)."""

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
        allow = attention.allowed(key_valid, query_index, window, positions if by_position else None)
        return attention.additive(allow, dtype)

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``kind -> (cos, sin)`` of ``positions`` for each attention kind the decoder's layers have
        (one table shared by every kind unless the rotary embedding depends on it: Gemma3)."""
        kinds = dict.fromkeys(self.model.layer_kinds)
        if not self.model.rope_by_kind:
            table = self.model.rope(hidden, positions)
            return dict.fromkeys(kinds, table)
        return {kind: self.model.rope(hidden, positions, kind) for kind in kinds}

    @torch.no_grad()
    def prefill(self, batch: Batch, all_logits: bool = False) -> PrefillOutput:
        """Everything up to the first generated token. Validates before any forward pass."""
        m = self.model
        spans = self.validate(batch)
        images, captures = self.encode_images(batch, spans)
        state, n_visual, (per_view, projected, shares) = self.build_sequence(batch, spans, images)
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
                capture_outputs(layer, ["input_layernorm"] if wanted else [], {"keys": m.key_source(layer.self_attn)})
                if wanted or key_norms
                else no_capture()
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
        # per image, its image-span tokens entering the decoder
        most = max(1, max((len(s) for s in spans), default=0))
        entered = input_state.valid & (input_state.kind >= VISUAL)
        per_image = tokens.new_zeros(bsz, most).scatter_add_(1, input_state.image.clamp(min=0), entered.long())
        read = torch.cat([torch.stack([tokens, visual, image]).flatten(), per_image.flatten()]).tolist()  # one read
        per_layer = [[read[(k * bsz + b) * L : (k * bsz + b + 1) * L] for b in range(bsz)] for k in range(3)]
        per_image = read[3 * bsz * L :]
        record = RunRecord(
            method=[str(s) for s in self.strategies] or ["identity"],
            visual_tokens_in=[sum(c for _, c in s) for s in spans],
            visual_tokens_llm=n_visual.tolist(),
            tokens_per_view=per_view,
            projected_tokens=projected,
            view_shares=shares,
            tokens_per_layer=per_layer[0],
            visual_per_layer=per_layer[1],
            image_per_layer=per_layer[2],
            span_tokens=[per_image[b * most : b * most + len(spans[b])] for b in range(bsz)],
            frozen_layers=sorted(k for k, v in self.frozen.items() if v == "visual"),
            frozen_text_layers=sorted(k for k, v in self.frozen.items() if v == "text"),
            vision_layers_run=self.vision_layers_run - self.vision_qk_layers,
            vision_layer_tokens=images[0]["layer_tokens"] if images else [],
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
            image=state.image,
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
