"""Exceptions raised before any work starts, each naming the bad value and what is allowed."""

from __future__ import annotations


class TokencompError(ValueError):
    """Base class of tokencomp's input errors (a `ValueError`, so callers may catch either)."""


class UnknownMethodError(TokencompError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class BudgetError(TokencompError):
    """A budget, ratio or layer index outside its allowed range."""


class UnsupportedModelError(TokencompError):
    """A method asked to run on a model it cannot serve (e.g. crops needed, none present)."""


def renamed(error: Exception, message: str) -> Exception:
    """``error``'s type with another message (a `TokencompError` where that type takes other
    arguments, e.g. a strategy's own subclass)."""
    try:
        return type(error)(message)
    except Exception:
        return TokencompError(message)


class InputMismatchError(TokencompError):
    """Images and prompts that do not fit together (image count vs placeholders, batch sizes)."""
