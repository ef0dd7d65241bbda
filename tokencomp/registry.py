"""Registry of compression strategies: ``@tc.register("name")`` and ``tc.method("name", **params)``.

Method modules in the ``tokencomp.methods`` package register themselves on import; the registry imports
that package lazily the first time a name is looked up, so ``import tokencomp`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TypeVar

from .errors import TokencompError, UnknownMethodError

_REGISTRY: dict[str, type] = {}
_BUILTINS_LOADED = False
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: register a strategy class under ``name`` (made a dataclass if it is not).

    Example::

        @tc.register("keep-brightest")
        class KeepBrightest(tc.VisionStrategy):
            budget: int = 64
            def select(self, view):
                return view.features.norm(dim=-1).topk(self.budget, dim=-1).indices
    """

    def deco(cls: T) -> T:
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(cls)
        if name in _REGISTRY and _identity(_REGISTRY[name]) != _identity(cls):  # the same class again: a reload
            raise TokencompError(
                f"method name {name!r} is already registered by {_identity(_REGISTRY[name])}; choose another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _identity(cls: type) -> str:
    """Where a strategy class is defined: its module and qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def load_builtins() -> None:
    """Import the built-in methods (once): lazily on the first lookup, and before a plugin
    registers its own, so that a plugin reusing a built-in's name is refused rather than replaced
    or replacing."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("tokencomp.methods")


def available_methods() -> list[str]:
    """Names of every registered strategy, sorted."""
    load_builtins()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The strategy class registered under ``name``; `UnknownMethodError` lists the known names."""
    load_builtins()
    if name not in _REGISTRY:
        public = [n for n in sorted(_REGISTRY) if not n.startswith("_")]  # "_name": internal probes and tests
        raise UnknownMethodError(f"unknown method {name!r}; available methods: {', '.join(public)}")
    return _REGISTRY[name]


def method(name: str, **params):
    """Instantiate the strategy registered under ``name`` with ``params``.

    Unknown parameter names raise a `TokencompError` naming the accepted ones. Values that need
    no model (a ratio in [0, 1]) are checked here by the strategies that validate them in
    ``__post_init__``; values that depend on the model (budgets against its tokens, layers against
    its depth) are checked in the strategy's ``check(info)`` before the first forward pass.
    """
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(params) - fields)
    if bad:
        raise TokencompError(f"method {name!r} has no parameter(s) {bad}; accepted: {sorted(fields)}")
    return cls(**params)
