"""tokencomp: visual-token compression for LLaVA-style models.

``import tokencomp as tc`` is the front door::

    model = tc.load_model("path/to/llava-checkpoint")       # or tc.Model(hf_model, processor)
    out = tc.generate(model, images, prompts, method=tc.method("fastv", k=2, ratio=0.5))
    print(out.text, out.record.tokens_per_layer)
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use at run time
    from .api import EvalResult, GenerationOutput, evaluate, generate, prepare
    from .engine import Batch, Engine, EngineOptions, PrefillOutput
    from .errors import BudgetError, InputMismatchError, TokencompError, UnknownMethodError, UnsupportedModelError
    from .model import Model, load_model
    from .record import RunRecord
    from .registry import available_methods, method, method_class, register
    from .strategy import (
        FreezeStrategy,
        LayerContext,
        LayerStrategy,
        Need,
        RunInfo,
        Strategy,
        TowerContext,
        TowerStrategy,
        ViewTokens,
        VisionStrategy,
        VisionView,
    )

# each public name's module: imported when the name is first used, so that `import tokencomp` (and
# the command line's --help) does not load torch and transformers
_WHERE = {
    **dict.fromkeys(["EvalResult", "GenerationOutput", "evaluate", "generate", "prepare"], "api"),
    **dict.fromkeys(["Batch", "Engine", "EngineOptions", "PrefillOutput"], "engine"),
    **dict.fromkeys(
        ["BudgetError", "InputMismatchError", "TokencompError", "UnknownMethodError", "UnsupportedModelError"], "errors"
    ),
    **dict.fromkeys(["Model", "load_model"], "model"),
    "RunRecord": "record",
    **dict.fromkeys(["available_methods", "method", "method_class", "register"], "registry"),
    **dict.fromkeys(
        [
            "FreezeStrategy",
            "LayerContext",
            "LayerStrategy",
            "Need",
            "RunInfo",
            "Strategy",
            "TowerContext",
            "TowerStrategy",
            "ViewTokens",
            "VisionStrategy",
            "VisionView",
        ],
        "strategy",
    ),
}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f".{name}", __name__)  # a submodule: tc.data, tc.strategy, ...
    raise AttributeError(f"module 'tokencomp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BudgetError",
    "Engine",
    "EngineOptions",
    "EvalResult",
    "FreezeStrategy",
    "GenerationOutput",
    "InputMismatchError",
    "LayerContext",
    "LayerStrategy",
    "Model",
    "Need",
    "PrefillOutput",
    "RunInfo",
    "RunRecord",
    "Strategy",
    "TokencompError",
    "TowerContext",
    "TowerStrategy",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VisionStrategy",
    "VisionView",
    "ViewTokens",
    "available_methods",
    "evaluate",
    "generate",
    "load_model",
    "method",
    "method_class",
    "prepare",
    "register",
]
