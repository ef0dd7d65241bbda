"""Decoder captures: attention rows and key norms computed from a layer's own norm output and key
projection, as the layer computes them (scale, soft-cap, window, rotary of its kind, per-head
norms, fused projections), a chunk of query rows at a time (no n x n map); and the hook helpers
the stages register for one call and always remove."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import attention, kernels
from ..layout import repack
from ..strategy import TEXT
from .sequence import SeqState

ROW_CHUNK = 256  # query rows per attention-rows call when scores average over many queries


class CaptureStage:
    """Decoder score captures (a mixin of `tokencomp.Engine`)."""

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
                allow = attention.allowed(state.valid, r, window, pos)
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


@contextmanager
def capture_outputs(module, names: list[str], extra: dict | None = None):
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
def no_capture():
    yield {}
