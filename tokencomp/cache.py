"""A per-layer KV cache in which every decoder layer may hold a different number of tokens."""

from __future__ import annotations

import torch


class LayerKVCache:
    """Keys and values per decoder layer, each with its own length and validity mask.

    The Hugging Face attention modules call ``update(key, value, layer_idx)``; nothing else of
    transformers' `Cache` interface is needed because the engine drives the layers itself.

    Decoding appends one position per step. Concatenating would copy a layer's whole cache every
    step (at batch 64 and 600 tokens, gigabytes per step at 7B shapes); instead the first append
    after prefill moves the layer into a buffer with ``reserve`` free positions, and later appends
    write into it. ``reserve=0`` grows by exactly what is appended, as concatenation does.

    Attributes:
        keys / values: per layer ``(B, kv_heads, n_l, d_head)`` tensors (None before prefill): the
            filled part of the layer's buffer once decoding has begun (a view, contiguous in
            ``d_head``).
        valid: per layer ``(B, n_l)`` bool, which cached entries are real tokens (not padding).
        positions: per layer ``(B, n_l)`` long, the position ids of the cached prompt entries; the
            decoded steps' are appended only where a sliding window counts in position ids
            (``EngineOptions(window="position")``).
        next_pos: per layer ``(B,)`` long, the position id the next decoded token gets there.
        reserve: positions a layer's buffer leaves free when it is (re)allocated; the engine sets it
            to the decoding steps still to come.
    """

    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers
        self.positions: list[torch.Tensor | None] = [None] * num_layers
        self.next_pos: list[torch.Tensor | None] = [None] * num_layers
        self.reserve = reserve
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``(B, kv_heads, n, d_head)`` keys/values to layer ``layer_idx``; return the full cache."""
        i = layer_idx
        if self.keys[i] is None:  # prefill: the layer's own tensors, no copy
            self.keys[i], self.values[i] = key_states, value_states
            return key_states, value_states
        have, n = self.keys[i].shape[2], key_states.shape[2]
        buf = self._buffers[i]
        # a new buffer when full, or when the layer's keys were replaced since (no longer its view)
        if (
            buf is None
            or buf[0].shape[2] < have + n
            or (self.keys[i].data_ptr(), self.values[i].data_ptr()) != (buf[0].data_ptr(), buf[1].data_ptr())
        ):
            buf = tuple(self._grown(t, have + n + self.reserve) for t in (self.keys[i], self.values[i]))
            self._buffers[i] = buf
        buf[0][:, :, have : have + n] = key_states
        buf[1][:, :, have : have + n] = value_states
        self.keys[i], self.values[i] = buf[0][:, :, : have + n], buf[1][:, :, : have + n]
        return self.keys[i], self.values[i]

    @staticmethod
    def _grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
        """A ``(B, H, capacity, d)`` buffer holding ``t`` in its first positions."""
        out = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
        out[:, :, : t.shape[2]] = t
        return out

    def lengths(self) -> list[int]:
        """Cached entries per layer (padded length, the same for every sample of the batch)."""
        return [0 if k is None else k.shape[2] for k in self.keys]

    def valid_lengths(self) -> torch.Tensor:
        """``(B, L)`` real cached tokens per sample and layer."""
        return torch.stack([v.sum(1) for v in self.valid], dim=1)

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (the filled positions; a buffer's free positions
        are not counted)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
