"""What each decoder layer attends to: the per-layer attention kinds a decoder config gives
(full causal, sliding window) as masks built from transformers' own ``masking_utils``.

A window counts, like Hugging Face's, in **sequence positions**: a query sees the keys less than
``window`` places before it in the sequence the layer holds (``kv > q - window``). Once tokens are
pruned that sequence is the kept tokens in order, so a window reaches further back in the original
prompt than it did before (what a pruned prompt fed to the unmodified model gets). The other
defensible reading, `EngineOptions(window="position")`, counts in the tokens' position ids instead
(with the default ``llm_positions="original"``: distance in the uncompressed prompt, so a window
covers the same stretch of the prompt whatever was pruned inside it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask, sliding_window_overlay

FULL = "full_attention"
SLIDING = "sliding_attention"
KINDS = (FULL, SLIDING)
WINDOW_COUNTS = ("sequence", "position")


def _remapped(mask_function: Callable, query_map: torch.Tensor, key_map: torch.Tensor | None) -> Callable:
    """``mask_function`` over coordinates: query row ``q`` of sample ``b`` stands at
    ``query_map[b, q]``, key ``kv`` at ``key_map[b, kv]`` (its own index when None)."""

    def inner(b, h, q, kv):
        return mask_function(b, h, query_map[b, q], kv if key_map is None else key_map[b, kv])

    return inner


def allowed(
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    window: int | None = None,
    key_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query row may attend: ``(B, q, n)`` bool.

    Causal over sequence index, padding keys hidden (transformers' causal and padding mask
    functions), and with ``window`` its sliding-window overlay.

    Args:
        key_valid: ``(B, n)`` bool, the real keys.
        query_index: ``(B, q)`` long, each query row's index in the key sequence.
        window: sliding window in tokens, or None for full causal attention.
        key_pos: ``(B, n)`` long coordinates the window counts in (position ids; a query row's are
            its key's); None: sequence indices (``query_index`` and each key's own index).
    """
    b, n = key_valid.shape
    q = query_index.shape[1]
    fn = _remapped(causal_mask_function, query_index, None)
    if window is not None:
        coords = query_index if key_pos is None else key_pos.gather(1, query_index)
        fn = and_masks(fn, _remapped(sliding_window_overlay(window), coords, key_pos))
    mask = sdpa_mask(
        batch_size=b,
        q_length=q,
        kv_length=n,
        mask_function=fn,
        attention_mask=key_valid,
        allow_is_causal_skip=False,
        device=key_valid.device,
    )
    return mask[:, 0]


def additive(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, q, n)`` bool -> ``(B, 1, q, n)`` additive float mask (0 where allowed, the dtype's
    minimum elsewhere). A row with no visible key (a padding row) sees every key instead, so that
    no softmax runs over nothing; its output is never read."""
    allow = allow | ~allow.any(-1, keepdim=True)
    mask = torch.zeros(allow.shape, dtype=dtype, device=allow.device)
    mask.masked_fill_(~allow, torch.finfo(dtype).min)
    return mask[:, None]
