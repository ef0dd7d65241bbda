"""Registry of compression strategies: ``@tc.register("name")`` and ``tc.method("name", **params)``.

Method modules in the ``tokencomp.methods`` package register themselves on import; the registry imports
that package lazily the first time a name is looked up, so ``import tokencomp`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable
from typing import TypeVar

from .errors import BudgetError, TokencompError, UnknownMethodError

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

    Unknown parameter names raise a `TokencompError` naming the accepted ones, and a value whose
    type does not fit the parameter's annotation (a string or a boolean for an integer budget) a
    `BudgetError`, before any model is loaded. Values that need
    no model (a ratio in [0, 1]) are checked here by the strategies that validate them in
    ``__post_init__``; values that depend on the model (budgets against its tokens, layers against
    its depth) are checked in the strategy's ``check(info)`` before the first forward pass.
    """
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(params) - fields)
    if bad:
        raise TokencompError(f"method {name!r} has no parameter(s) {bad}; accepted: {sorted(fields)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: its strategy checks its own values
        hints = {}
    for key, value in params.items():
        want = hints.get(key)
        if want is not None and not _fits(value, want):
            raise BudgetError(f"method {name!r}: {key}={value!r} ({type(value).__name__}) is not {_type_name(want)}")
    return cls(**params)


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _fits(value, want) -> bool:
    """Whether ``value`` fits a parameter's simple annotation (int, float, bool, str, a tuple,
    their unions with None); True for annotations this does not read (the strategy checks)."""
    if want in _SCALARS:
        if want is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if want is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, want)
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        readable = [a for a in args if a is type(None) or a in _SCALARS or typing.get_origin(a) is tuple]
        if len(readable) != len(args):
            return True
        return any(value is None if a is type(None) else _fits(value, a) for a in args)
    if origin is tuple:  # the container; its items are the strategy's to check (it names which)
        return isinstance(value, (tuple, list))
    return True


def _type_name(want) -> str:
    if want in _SCALARS:
        return _SCALARS[want]
    args = typing.get_args(want)
    if typing.get_origin(want) is tuple:
        return "a list"
    return " or ".join("none" if a is type(None) else _type_name(a) for a in args) or str(want)
