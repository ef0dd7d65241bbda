"""Model adapters: a LLaVA-1.5 or LLaVA-NeXT Hugging Face model plus its processor, with the parts
the engine drives exposed by name (vision tower layers, projector, decoder layers, rotary
embedding, final norm, LM head) and the view layout of an image (thumbnail, crop grid, unpadding).

Nothing here patches transformers: the engine calls these modules directly.
"""

from __future__ import annotations

import inspect
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import FULL, KINDS, SLIDING
from .errors import TokencompError, UnsupportedModelError
from .families import layout_class

# Embedded default models, shipped inside the package (recipe: experiments/train_tiny.py; accuracy: README "Embedded default models").
EMBEDDED_DIR = Path(__file__).parent / "assets"
EMBEDDED = {"tiny-llava": "tiny-llava", "tiny-llava-next": "tiny-llava-next"}

# The decoders (``text_config.model_type``) whose layers the engine drives: each is a row of the
# conformance matrix (tests/test_conformance.py: identity, generation, batching, FastV and a frozen
# layer equal to Hugging Face on LLaVA-1.5 and LLaVA-NeXT). Others are refused when the model is
# wrapped, before any forward pass: a decoder may scale its input embeddings in its own forward
# (Granite), run layers that are not attention (hybrids), or lay its projections out otherwise.
SUPPORTED_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# decoders whose every layer slides when the config sets sliding_window (others: `layer_types`, or
# never: Llama and Gemma ignore a sliding_window key)
WINDOW_ON_EVERY_LAYER = ("mistral", "phi3")
# attention implementations that apply Gemma2's logit soft-cap (SDPA has none: transformers raises)
SOFTCAP_ATTENTION = ("eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class Model:
    """A LLaVA-family model the engine can drive.

    Args:
        hf: a ``LlavaForConditionalGeneration`` (LLaVA-1.5) or ``LlavaNextForConditionalGeneration``;
            it is switched to eval mode (``hf.eval()``: dropout off), which the caller undoes to train it.
        processor: its processor (tokenizer + image processor); needed by `tokencomp.generate`.
        name: a label for records.

    Attributes:
        family: ``"llava"``, ``"llava-next"`` or ``"llava-onevision"``; ``layout`` the family's `tokencomp.families.Layout`
            (its views per image, unpadding, newline tokens, how a selection is placed back).
        vision_model: the CLIP ``vision_model`` (embeddings, pre-norm, encoder layers).
        projector: the multimodal projector (vision features -> LM embeddings).
        image_newline: ``(d,)`` LLaVA-NeXT row-end embedding, or None.
        layers: decoder layers; ``rotary_emb``, ``norm``, ``embed_tokens``, ``lm_head`` as named.
        grid: ``(h, w)`` patch grid of one view; ``patches_per_view = h * w``.
        feature_layers: vision layer outputs fed to the projector (``vision_feature_layer``).
        layer_kinds: per decoder layer, ``"full_attention"`` or ``"sliding_attention"``;
            ``sliding_window`` the window in tokens (None without sliding layers).
        fused_qkv / qk_norm / softcap / sandwich_norms: the decoder's attention layout (Phi-3's one
            projection, Qwen3 / Gemma3's per-head norms, Gemma2's logit cap, Gemma2 / 3's norms around
            the attention and MLP outputs), which the engine's own attention code follows.

    Raises:
        UnsupportedModelError: a decoder outside `SUPPORTED_DECODERS`, an attention kind other
            than full or sliding, LLaVA-NeXT pinpoints that are not multiples of the view size, a
            vision tower or feature selection the engine does not drive.
    """

    def __init__(self, hf: nn.Module, processor=None, name: str | None = None) -> None:
        layout = layout_class(hf)  # the family: its views and how their tokens are placed
        self.family = layout.family
        self.hf = hf.eval()
        self.processor = processor
        self.name = name or getattr(hf.config, "_name_or_path", "") or self.family
        cfg = hf.config
        tower = hf.model.vision_tower
        vm = getattr(tower, "vision_model", tower)  # transformers 5 dropped the wrapper
        if not hasattr(vm, "encoder") or not hasattr(vm, "embeddings"):
            raise UnsupportedModelError(f"vision tower {type(tower).__name__} is not a CLIP-style vision model")
        self.vision_model = vm
        self.vision_layers_list = self.vision_model.encoder.layers
        self.has_cls = hasattr(self.vision_model.embeddings, "class_embedding")
        # 'default' drops CLS (CLIP); 'full' keeps every token, supported for towers without CLS (SigLIP)
        select = cfg.vision_feature_select_strategy
        if (select, self.has_cls) not in (("default", True), ("full", False)):
            raise UnsupportedModelError(
                "supported: vision_feature_select_strategy='default' with a CLS tower (CLIP) or 'full' with a "
                f"tower without CLS (SigLIP); got {select!r} (has CLS: {self.has_cls})"
            )
        fl = cfg.vision_feature_layer
        self.feature_layers = [fl] if isinstance(fl, int) else list(fl)
        self.projector = hf.model.multi_modal_projector
        self.execution_device = _execution_device(hf)  # one, weights offloaded or not (accelerate's device_map)
        self.image_newline = _weight(hf.model, "image_newline", self.execution_device)
        lm = hf.model.language_model
        self.language_model = lm
        self.layers = lm.layers
        self.rotary_emb = lm.rotary_emb
        self.norm = lm.norm
        self.embed_tokens = lm.embed_tokens
        self.lm_head = hf.lm_head
        self._read_decoder(cfg.text_config)
        # the decoder layers' KV-cache keyword: ``cache`` since transformers 5.24, ``past_key_values``
        # before (5.24 still accepts the old name, with a warning, until 5.40)
        params = inspect.signature(type(self.layers[0]).forward).parameters
        self.cache_kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
        if self.cache_kwarg is None:
            raise UnsupportedModelError(f"decoder layer {type(self.layers[0]).__name__} takes no KV cache keyword")
        vc = cfg.vision_config
        self.view_size = vc.image_size
        self.grid = (vc.image_size // vc.patch_size, vc.image_size // vc.patch_size)
        self.patches_per_view = self.grid[0] * self.grid[1]
        self.image_token_id = cfg.image_token_id
        self.pinpoints = getattr(cfg, "image_grid_pinpoints", None)
        self.layout = layout(self)
        self._check_processor()
        self.num_layers = len(self.layers)
        self.max_positions = getattr(cfg.text_config, "max_position_embeddings", None)
        self.vision_num_layers = len(self.vision_layers_list)
        self.attn_implementation = cfg.text_config._attn_implementation or "eager"

    def _check_processor(self) -> None:
        """The processor cuts images as the model reads them: the same view size and, for
        LLaVA-NeXT, the same pinpoints (another order reads 2x1 crops as 1x2 with no error)."""
        images = getattr(self.processor, "image_processor", None)
        if images is None:
            return
        crop = getattr(images, "crop_size", None) or {}
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (None, None)
        if None not in crop and crop != (self.view_size, self.view_size):
            raise UnsupportedModelError(
                f"the processor cuts {crop[0]}x{crop[1]} px views, the vision tower reads {self.view_size} px"
            )
        theirs = getattr(images, "image_grid_pinpoints", None)
        same = theirs is None or [list(p) for p in theirs] == [list(p) for p in self.pinpoints or []]
        if self.layout.has_crops and not same:
            raise UnsupportedModelError(
                f"the processor's image_grid_pinpoints {theirs} differ from the model's {self.pinpoints}: "
                "its crops would be read in another layout"
            )

    def _read_decoder(self, text_config) -> None:
        """Read the decoder's attention layout, or refuse it (`UnsupportedModelError`): the attention
        kind of each layer and the window, the rotary embedding per kind, where queries, keys and
        values are projected (separate or fused), their per-head norms, the logit soft-cap and
        the residual structure of a layer."""
        name = text_config.model_type
        _check_decoder(name)
        if getattr(text_config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"decoder {name!r} with use_bidirectional_attention=True: causal decoders only")
        n_layers = len(self.layers)
        window = getattr(text_config, "sliding_window", None)
        # as the decoders dispatch their masks: `layer_types` where the config has them (Qwen2, Qwen3,
        # Gemma2, Gemma3), else every layer sliding when a window is set (Mistral, Phi-3), else full
        every = window is not None and name in WINDOW_ON_EVERY_LAYER
        kinds = getattr(text_config, "layer_types", None) or [SLIDING if every else FULL] * n_layers
        if len(kinds) != n_layers:
            raise UnsupportedModelError(f"layer_types has {len(kinds)} entries for {n_layers} decoder layers")
        for i, kind in enumerate(kinds):
            if kind not in KINDS:
                raise UnsupportedModelError(f"decoder layer {i} has attention kind {kind!r}; supported: {list(KINDS)}")
        if SLIDING in kinds and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise UnsupportedModelError(f"sliding-window layers need sliding_window >= 1, got {window!r}")
        self.layer_kinds: list[str] = list(kinds)
        self.sliding_window: int | None = window if SLIDING in kinds else None
        for i, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            fused = hasattr(attn, "qkv_proj")
            parts = ["input_layernorm", "post_attention_layernorm", "mlp", "self_attn"]
            parts += [f"self_attn.{p}" for p in (("qkv_proj",) if fused else ("q_proj", "k_proj", "v_proj"))]
            for part in parts + ["self_attn.o_proj"]:
                owner, _, leaf = part.rpartition(".")
                if not hasattr(getattr(layer, owner) if owner else layer, leaf):
                    raise UnsupportedModelError(f"decoder layer {i} ({type(layer).__name__}) has no {part}")
        attn = self.layers[0].self_attn
        self.fused_qkv = hasattr(attn, "qkv_proj")  # Phi-3: one projection, queries | keys | values
        self.qk_norm = hasattr(attn, "q_norm")  # Qwen3, Gemma3: a norm over each head's queries and keys
        if self.qk_norm and attn.q_norm.weight.shape[-1] != attn.head_dim:
            raise UnsupportedModelError(f"{type(attn).__name__}: a query norm over more than one head is not supported")
        # Gemma2 / Gemma3: the attention and MLP outputs are normed before each residual add
        self.sandwich_norms = all(
            hasattr(self.layers[0], n) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        )
        self.softcap = getattr(attn, "attn_logit_softcapping", None)  # Gemma2: cap * tanh(logits / cap)
        impl = text_config._attn_implementation or "eager"
        if self.softcap is not None and impl not in SOFTCAP_ATTENTION:
            raise UnsupportedModelError(
                f"{name} caps its attention logits (attn_logit_softcapping={self.softcap}), which "
                f"attn_implementation {impl!r} cannot do; load it with attn_implementation='eager'"
            )
        tc = text_config
        hd = attn.head_dim
        self._qkv_split = (tc.num_attention_heads * hd, tc.num_key_value_heads * hd)
        self._rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if self._rope is None:
            raise UnsupportedModelError(f"cannot find apply_rotary_pos_emb for {type(attn).__name__}")
        # Gemma3's rotary embedding takes the layer kind (local / global bases)
        self.rope_by_kind = "layer_type" in inspect.signature(type(self.rotary_emb).forward).parameters

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        device_map: str | dict | None = None,
        offload_folder: str | Path | None = None,
    ) -> Model:
        """Load any LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision checkpoint and its processor from a local directory.

        ``device_map`` (instead of ``device``) loads through accelerate's big-model dispatch
        (``pip install accelerate``): a model larger than its device runs with the weights that do
        not fit offloaded to the CPU (``"cpu"``) or to files in ``offload_folder`` (``"disk"``),
        brought to the device layer by layer, e.g. ``device_map={"": "cuda:0",
        "model.language_model.layers.20": "cpu", ...}`` or ``"auto"`` with transformers'
        ``max_memory``. The engine drives one computing device; a map over several GPUs is refused
        (run data-parallel instead).

        Nothing in the folder is executed: ``config.json`` is read as plain JSON and its model
        type (and the decoder's) checked before transformers builds anything, and every
        transformers call runs with ``trust_remote_code=False`` and ``local_files_only=True`` (a
        folder's ``auto_map`` code is never imported, nothing is downloaded).

        Raises:
            TokencompError: no ``config.json``, a config that is not JSON, no weights file, no
                processor, or weights transformers cannot load (named with the folder).
            UnsupportedModelError: a model type other than ``llava`` / ``llava_next`` / ``llava_onevision``, or a
                decoder outside `SUPPORTED_DECODERS`.
        """
        path = Path(path)
        where = str(path)
        raw = _read_config(path)
        classes = {
            "llava": LlavaForConditionalGeneration,
            "llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration,
        }
        kind = raw.get("model_type")
        if kind not in classes:
            raise UnsupportedModelError(f"{where}: model_type {kind!r} is not one of {sorted(classes)}")
        text = raw.get("text_config") or {}
        _check_decoder(text.get("model_type", "llama") if isinstance(text, dict) else None, f"{where}: ")
        weights = [
            p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
        ]
        if not weights:
            raise TokencompError(f"{where}: no weights (model*.safetensors or pytorch_model*.bin) in the folder")
        safe = {"trust_remote_code": False, "local_files_only": True}
        dispatch = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        try:
            hf = classes[kind].from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, **dispatch, **safe
            )
        except Exception as e:  # transformers, safetensors and config validation raise many kinds
            raise TokencompError(f"{where}: the model did not load: {type(e).__name__}: {e}") from e
        try:
            processor = _processor(path, kind, hf.config, safe)
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad tokenizer.json
            raise TokencompError(
                f"{where}: no usable processor (tokenizer + image processor files, as save_pretrained writes "
                f"them): {type(e).__name__}: {e}"
            ) from e
        return cls(hf if device_map is not None else hf.to(device), processor, name=path.name)

    @classmethod
    def from_config(cls, config, processor=None, dtype: torch.dtype = torch.float32) -> Model:
        """Build a random-weight model from a ``LlavaConfig`` or ``LlavaNextConfig`` (no weights read)."""
        classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
        if getattr(config, "model_type", None) not in classes:
            raise UnsupportedModelError(f"config model_type must be one of {sorted(classes)}, got {config!r:.80}")
        return cls(classes[config.model_type](config).to(dtype), processor)

    @property
    def device(self) -> torch.device:
        """Where the model computes: its weights' device, or, for a model dispatched with
        accelerate's ``device_map`` whose weights are offloaded to the CPU or disk, the device
        they are brought to layer by layer."""
        weight = self.lm_head.weight
        return self.execution_device if weight.is_meta else weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's weight dtype."""
        return self.lm_head.weight.dtype

    @property
    def tokenizer(self):
        """The processor's tokenizer (a `TokencompError` if the model has no processor)."""
        if self.processor is None:
            raise TokencompError("this model has no processor; pass one to tokencomp.Model(hf, processor)")
        return getattr(self.processor, "tokenizer", self.processor)

    # -- view layout (the family's `tokencomp.families.Layout`) ---------------------------------
    def crop_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of crops for an image of ``(height, width)`` pixels; ``(0, 0)`` without crops."""
        return self.layout.crop_grid(image_size)

    def views_per_image(self, image_size: tuple[int, int]) -> int:
        """Views the vision tower encodes for one image (1, or thumbnail + crops)."""
        return self.layout.views_per_image(image_size)

    def crop_region(self, image_size: tuple[int, int], grid: tuple[int, int] | None = None):
        """The unpadded region of the crop grid (families with crops): see `LlavaNextLayout.crop_region`."""
        return self.layout.crop_region(image_size, grid)

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Visual tokens of one image in the uncompressed prompt (newline tokens included)."""
        return self.layout.image_token_count(image_size)

    def crop_valid(self, image_size: tuple[int, int]) -> torch.Tensor:
        """``(rows*cols, N)`` bool: crop patches that survive unpadding (crops in raster order)."""
        return self.layout.crop_valid(image_size)

    # -- attention helpers ----------------------------------------------------------------------
    def rope(self, hidden: torch.Tensor, positions: torch.Tensor, kind: str = FULL):
        """``(cos, sin)`` ``(B, n, d_rot)`` of ``positions`` ``(B, n)`` for the layers of attention
        ``kind`` (one rotary embedding for all kinds except Gemma3's local / global pair)."""
        if self.rope_by_kind:
            return self.rotary_emb(hidden, positions, kind)
        return self.rotary_emb(hidden, positions)

    def apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x`` ``(B, heads, n, d_head)`` with ``cos/sin`` ``(B, n, d_rot)``
        (the decoder's own function: a partial rotary leaves the rest of each head as it is)."""
        return self._rope(x, x, cos, sin)[0]

    def key_source(self, attn: nn.Module) -> nn.Module:
        """The module whose output holds a layer's keys: ``k_proj``, or the fused ``qkv_proj``."""
        return attn.qkv_proj if self.fused_qkv else attn.k_proj

    def _heads(self, attn: nn.Module, y: torch.Tensor, part: str) -> torch.Tensor:
        """``(B, n, heads * d_head) -> (B, heads, n, d_head)``, through the per-head norm of
        queries or keys where the decoder has one."""
        y = y.view(*y.shape[:-1], -1, attn.head_dim).transpose(1, 2)
        return getattr(attn, f"{part}_norm")(y) if self.qk_norm and part != "v" else y

    def keys(self, attn: nn.Module, source_out: torch.Tensor) -> torch.Tensor:
        """A layer's keys ``(B, H_kv, n, d_head)`` before RoPE, from the output ``(B, n, *)`` of its
        `key_source`."""
        if self.fused_qkv:
            q, k = self._qkv_split
            source_out = source_out[..., q : q + k]
        return self._heads(attn, source_out, "k")

    def project(self, attn: nn.Module, x: torch.Tensor, part: str) -> torch.Tensor:
        """A layer's queries (``part="q"``), keys (``"k"``) or values (``"v"``) ``(B, heads, n, d_head)``
        of its normed input ``x`` ``(B, n, d)``, before RoPE: only that part of a fused projection
        is computed."""
        if not self.fused_qkv:
            return self._heads(attn, getattr(attn, f"{part}_proj")(x), part)
        q, k = self._qkv_split
        rows = {"q": slice(0, q), "k": slice(q, q + k), "v": slice(q + k, None)}[part]
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        if w.is_meta:  # offloaded (accelerate): the module's hook brings its weights for a call of it
            return self._heads(attn, attn.qkv_proj(x)[..., rows], part)
        return self._heads(attn, nn.functional.linear(x, w[rows], None if b is None else b[rows]), part)

    def attention_function(self, attn: nn.Module) -> Callable:
        """The transformers attention function the model is configured with (SDPA, eager, ...)."""
        from transformers.models.llama.modeling_llama import eager_attention_forward

        impl = attn.config._attn_implementation
        module = sys.modules[type(attn).__module__]
        eager = getattr(module, "eager_attention_forward", eager_attention_forward)
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.family}, layers={self.num_layers}, "
            f"grid={self.grid}, attn={self.attn_implementation})"
        )


def _check_decoder(name, where: str = "") -> None:
    """`UnsupportedModelError` for a decoder ``model_type`` outside `SUPPORTED_DECODERS`."""
    if name not in SUPPORTED_DECODERS:
        raise UnsupportedModelError(
            f"{where}decoder model_type {name!r} is not supported; supported decoders: {', '.join(SUPPORTED_DECODERS)}"
        )


def _processor(path: Path, kind: str, config, safe: dict):
    """The checkpoint's processor. OneVision's needs torchvision (for its video processor); without
    it, its image processor and tokenizer serve through `tokencomp.families.OnevisionInputs`."""
    try:
        return AutoProcessor.from_pretrained(path, **safe)
    except (ImportError, AttributeError, ModuleNotFoundError):
        if kind != "llava_onevision":
            raise
    from transformers import AutoImageProcessor, AutoTokenizer

    from .families.llava_onevision import OnevisionInputs

    vision = config.vision_config
    return OnevisionInputs(
        AutoImageProcessor.from_pretrained(path, **safe),
        AutoTokenizer.from_pretrained(path, **safe),
        (vision.image_size // vision.patch_size) ** 2,
        getattr(config, "vision_aspect_ratio", "anyres_max_9"),
    )


def _read_config(path: Path) -> dict:
    """A checkpoint folder's ``config.json`` as plain JSON (read without transformers, so that no
    code it names runs), or a `TokencompError` saying what is wrong with it."""
    file = path / "config.json"
    if not file.is_file():
        raise TokencompError(f"{str(path)!r} is not a model directory (no config.json)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokencompError(f"{file} is not a JSON config: {e}") from e
    if not isinstance(raw, dict):
        raise TokencompError(f"{file} is not a JSON object")
    return raw


def model_path(name_or_path: str | Path) -> Path:
    """The checkpoint directory of an embedded name (``"tiny-llava"``, ``"tiny-llava-next"``) or a
    local path; a `TokencompError` if there is none (checked before anything is loaded)."""
    key = str(name_or_path)
    if key in EMBEDDED:
        path = EMBEDDED_DIR / EMBEDDED[key]
        if not (path / "config.json").is_file():
            raise TokencompError(
                f"embedded model {key!r} is not shipped in this build ({path} is missing); "
                "pass a local checkpoint directory instead"
            )
        return path
    path = Path(name_or_path)
    if not path.exists():
        raise TokencompError(f"{key!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor an existing local path")
    return path


def load_model(name_or_path: str | Path, **kwargs) -> Model:
    """Load a model by embedded name (``"tiny-llava"``, ``"tiny-llava-next"``) or local path.

    Keyword arguments go to `Model.from_pretrained` (``dtype``, ``device``, ``attn_implementation``,
    ``device_map``, ``offload_folder``).
    No hub download is ever attempted.
    """
    return Model.from_pretrained(model_path(name_or_path), **kwargs)


def _execution_device(hf: nn.Module) -> torch.device:
    """The one device ``hf`` computes on: its weights' or, dispatched with accelerate's
    ``device_map``, its hooks' execution device (weights offloaded to the CPU or disk are
    meta tensors, brought there by the hooks); `UnsupportedModelError` for several."""
    devices = {p.device for p in itertools.chain(hf.parameters(), hf.buffers()) if not p.is_meta}
    for module in hf.modules():
        where = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if where is not None:
            devices.add(torch.device("cuda", where) if isinstance(where, int) else torch.device(where))
    devices = {torch.device("cuda", torch.cuda.current_device()) if d == torch.device("cuda") else d for d in devices}
    if not devices:  # built on the meta device (shapes only: FLOPs at a checkpoint's size)
        return torch.device("meta")
    if len(devices) != 1:
        raise UnsupportedModelError(
            f"the model computes on {sorted(map(str, devices))}: tokencomp drives a model on one "
            "device, whose weights may be offloaded to the CPU or disk (accelerate's device_map with one GPU); "
            "for several GPUs run data-parallel (torchrun ... -m tokencomp.cli compare)"
        )
    return devices.pop()


def _weight(module: nn.Module, name: str, device: torch.device) -> torch.Tensor | None:
    """A parameter the engine reads directly (not through its module's forward): offloaded by
    accelerate (a meta tensor), it is read from the module's hook's weights map, once."""
    value = getattr(module, name, None)
    if value is None or not value.is_meta or device.type == "meta":  # (a model of shapes only)
        return value
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is None or name not in weights:
        raise UnsupportedModelError(
            f"{type(module).__name__}.{name} is offloaded with no hook to bring it back (Hugging Face's own forward "
            "could not read it either): keep it on the computing device in the device_map"
        )
    return weights[name].to(device)
