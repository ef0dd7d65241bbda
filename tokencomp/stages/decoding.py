"""Stage 4, decoding: greedy steps over the per-layer KV cache, each layer with its own length,
position and mask; then the run record's timings and FLOPs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .. import attention
from ..errors import TokencompError
from ..profiler import run_flops

if TYPE_CHECKING:
    from ..engine import Batch


class DecodingStage:
    """Greedy decoding after the prefill (a mixin of `tokencomp.Engine`)."""

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
        # a window counted in position ids needs each layer's key positions, the decoded steps' too
        track = self.options.window == "position" and attention.SLIDING in m.layer_kinds
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
                prev, prev_pos = cache.valid[i], cache.positions[i] if track else None
                key = (id(prev), id(prev_pos))  # (both are kept in the entry, so their ids are not reused)
                if key not in masks:
                    key_valid = torch.cat([prev, live], dim=1)
                    key_pos = torch.cat([prev_pos, pos], dim=1) if track else None
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
                cache.valid[i] = key_valid
                if track:
                    cache.positions[i] = key_pos
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
