"""tokencomp: visual-token compression for LLaVA-style models.

``import tokencomp as tc`` is the front door::

    model = tc.load_model("path/to/llava-checkpoint")       # or tc.Model(hf_model, processor)
    out = tc.generate(model, images, prompts, method=tc.method("fastv", k=2, ratio=0.5))
    print(out.text, out.record.tokens_per_layer)
"""

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
    ViewTokens,
    VisionStrategy,
    VisionView,
)

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
