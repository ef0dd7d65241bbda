"""Freeze visual tokens in a given list of decoder layers (the mechanics of ShortV).

In a frozen layer image tokens get no query, no attention output and no MLP update (their
residual stream passes through unchanged) but are still normed and projected to keys and values,
so text tokens attend to them as usual. During decoding the layer is an ordinary layer.
ShortV (arXiv 2504.00502) chooses the layers by layer contribution; here they are given.
``tokens="text"`` freezes the text tokens instead (the probe behind ShortV's text-type layer
contribution; it has no use as a compression method).
"""

from __future__ import annotations

import tokencomp as tc


@tc.register("freeze")
class FreezeLayers(tc.FreezeStrategy):
    """Freeze the visual (or text, ``tokens``) tokens in the decoder ``layers`` listed: they pass
    through those layers unchanged while the other tokens attend to them (ShortV's mechanics)."""

    layers: tuple[int, ...] = ()
    tokens: str = "visual"

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if self.tokens not in ("visual", "text"):
            raise tc.TokencompError(f"tokens must be 'visual' or 'text', got {self.tokens!r}")

    @property
    def frozen_tokens(self) -> str:
        return self.tokens

    def frozen_layers(self, num_layers: int) -> list[int]:
        return list(self.layers)
