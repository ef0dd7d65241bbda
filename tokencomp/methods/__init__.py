"""Compression methods, one file per strategy, each registered by name on import."""

from . import (  # noqa: F401
    dart,
    divprune,
    downsample,
    fastv,
    freeze,
    globalcom2,
    gsearch,
    hired,
    identity,
    pdrop,
    pooling,
    prumerge,
    random_prune,
    shortv,
    sparsevlm,
    tome,
    visionzip,
    vispruner,
)
