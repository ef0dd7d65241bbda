"""A per-layer KV cache in which every decoder layer may hold a different number of tokens."""

from __future__ import annotations

import torch


class LayerKVCache:
    """Keys and values per decoder layer, each with its own length and validity mask.

    The Hugging Face attention modules call ``update(key, value, layer_idx)``; nothing else of
    transformers' `Cache` interface is needed because the engine drives the layers itself.

    Attributes:
        keys / values: per layer ``(B, kv_heads, n_l, d_head)`` tensors (None before prefill).
        valid: per layer ``(B, n_l)`` bool, which cached entries are real tokens (not padding).
        next_pos: per layer ``(B,)`` long, the position id the next decoded token gets there.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * num_layers
        self.next_pos: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``(B, kv_heads, n, d_head)`` keys/values to layer ``layer_idx``; return the full cache."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def lengths(self) -> list[int]:
        """Cached entries per layer (padded length, the same for every sample of the batch)."""
        return [0 if k is None else k.shape[2] for k in self.keys]

    def valid_lengths(self) -> torch.Tensor:
        """``(B, L)`` real cached tokens per sample and layer."""
        return torch.stack([v.sum(1) for v in self.valid], dim=1)

    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
