"""Frozen layers (ShortV): a layer in which the image (or text) tokens pass through unchanged but
still give keys and values, the other tokens computed as in the ordinary layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from ..cache import LayerKVCache
from ..layout import repack
from ..strategy import (
    TEXT,
    VISUAL,
)
from .sequence import SeqState


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


class FrozenStage:
    """Frozen decoder layers (a mixin of `tokencomp.Engine`)."""

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
