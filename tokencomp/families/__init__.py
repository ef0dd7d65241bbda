"""Model families: how each LLaVA family lays out an image's views and places their tokens in the
sequence, one small class per family, registered like the methods.

A family's layout answers, for an image of a given size: how many views the vision tower encodes
(the base view, crops), their patch validity after unpadding, how many placeholder tokens the
prompt holds for it, and how a vision strategy's selection of each view's tokens is placed back
(raster order on the crop grid, newline tokens, unpadding). The engine asks the layout and never
the family's name. To add a family: a subclass of `Layout` registered with `register_family` for
its Hugging Face class, and the conformance tests of the others (identity vs Hugging Face, batch
equal to each sample alone) run on it.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .llava import Layout
from .llava_next import LlavaNextLayout
from .llava_onevision import ImageSize, OnevisionLayout

# Hugging Face model class -> layout, most specific first (a subclass before its base)
FAMILIES: list[tuple[type, type[Layout]]] = []


def register_family(hf_class: type):
    """Class decorator: the `Layout` subclass serves models of ``hf_class``."""

    def wrap(layout: type[Layout]) -> type[Layout]:
        FAMILIES.insert(0, (hf_class, layout))
        return layout

    return wrap


def layout_class(hf) -> type[Layout]:
    """The layout of a Hugging Face model instance, or `UnsupportedModelError` naming the classes served."""
    for cls, layout in FAMILIES:
        if isinstance(hf, cls):
            return layout
    served = ", ".join(cls.__name__ for cls, _ in reversed(FAMILIES))
    raise UnsupportedModelError(f"tokencomp drives {served}, got {type(hf).__name__}")


def _register_builtins() -> None:
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    register_family(LlavaForConditionalGeneration)(Layout)
    register_family(LlavaNextForConditionalGeneration)(LlavaNextLayout)
    register_family(LlavaOnevisionForConditionalGeneration)(OnevisionLayout)


_register_builtins()

__all__ = ["FAMILIES", "ImageSize", "Layout", "LlavaNextLayout", "OnevisionLayout", "layout_class", "register_family"]
