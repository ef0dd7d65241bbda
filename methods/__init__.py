"""Compression methods, one file per strategy, each registered by name on import."""

from . import fastv, freeze, globalcom2, identity, pooling, prumerge, random_prune, shortv, visionzip  # noqa: F401
