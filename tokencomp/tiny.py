"""Tiny random-weight LLaVA models built from real transformers configs.

These are the same classes as the real checkpoints (``LlavaForConditionalGeneration`` with a
CLIP tower and a Llama decoder; ``LlavaNextForConditionalGeneration`` with AnyRes crops), at a
size that runs in milliseconds on a CPU. Tests, the README quick start and smoke runs use them;
they carry no trained meaning (their answers are random), which is what the equality tests need.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CONFIG_MAPPING,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from .families.llava_onevision import OnevisionInputs

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
TINY_WORDS = (
    "USER ASSISTANT : ? . , the a an is are what which where how many color shape of in on to "
    "left right above below red green blue yellow circle square triangle star yes no one two "
    "three four five describe image picture there any object big small"
).split()


def word_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (the `tokenizers` library) with LLaVA's special tokens.

    Args:
        words: vocabulary words after the special tokens; defaults to a small English set.

    Returns:
        A `PreTrainedTokenizerFast` that adds ``<s>`` in front of every text, pads on the left
        with ``<pad>`` (id 0) and knows ``<image>`` as a special token.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(words or TINY_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


def tiny_llava(
    family: str = "llava",
    seed: int = 0,
    image_size: int = 84,
    patch_size: int = 14,
    text_layers: int = 4,
    vision_layers: int = 3,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    vision_hidden: int | None = None,
    vision_mlp: int | None = None,
    mlp: int | None = None,
    words: list[str] | None = None,
    vision: str = "clip",
    decoder: str = "llama",
    decoder_config: dict | None = None,
):
    """Build a random-weight LLaVA-1.5 (``family="llava"``) or LLaVA-NeXT (``"llava-next"``) model.

    Args:
        family: ``"llava"`` or ``"llava-next"``.
        seed: seed of the random weights.
        image_size: vision tower input size in pixels (one view); the grid is ``image_size // patch_size``.
        patch_size: ViT patch size in pixels.
        text_layers: decoder layers.
        vision_layers: CLIP encoder layers (``vision_feature_layer=-2`` reads the second to last).
        hidden: decoder hidden size.
        heads: decoder attention heads; ``kv_heads`` < ``heads`` gives grouped-query attention.
        attn_implementation: ``"sdpa"`` or ``"eager"`` for the whole model.
        dtype: parameter dtype.
        vision_hidden: vision tower width (default ``hidden // 2``).
        vision_mlp: vision MLP width (default ``hidden``).
        mlp: decoder MLP width (default ``2 * hidden``).
        words: tokenizer vocabulary after the special tokens (default: a small English set).
        vision: ``"clip"`` (CLS token, ``vision_feature_select_strategy="default"``) or ``"siglip"``
            (no CLS, ``"full"``: every patch token reaches the projector); LLaVA-1.5 family only.
        decoder: the decoder's transformers ``model_type`` (``"llama"``, ``"mistral"``, ``"qwen2"``,
            ``"qwen3"``, ``"gemma"``, ``"gemma2"``, ``"gemma3_text"``, ``"phi3"``, ...).
        decoder_config: further decoder config fields (e.g. ``{"sliding_window": 8}``).

    Returns:
        ``(hf_model, processor)``: a transformers model in eval mode and its processor.
    """
    if family not in ("llava", "llava-next", "llava-onevision"):
        raise ValueError(f"family must be 'llava', 'llava-next' or 'llava-onevision', got {family!r}")
    if family == "llava-onevision":  # a SigLIP tower without CLS, every patch to the projector, last layer
        vision = "siglip"
    tokenizer = word_tokenizer(words)
    if vision not in ("clip", "siglip") or (vision == "siglip" and family == "llava-next"):
        raise ValueError(f"vision must be 'clip', or 'siglip' without family 'llava-next'; got {vision!r} ({family!r})")
    vision_hidden = vision_hidden or hidden // 2
    select = "default" if vision == "clip" else "full"
    vision_cls = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    vision = vision_cls(
        hidden_size=vision_hidden,
        intermediate_size=vision_mlp or hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    if decoder not in CONFIG_MAPPING:
        raise ValueError(f"decoder {decoder!r} is not a transformers model_type")
    text = CONFIG_MAPPING[decoder](
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp or hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,  # Gemma's configs default to 256
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **(decoder_config or {}),
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=select,
        tie_word_embeddings=False,
    )
    mean, std = [0.481, 0.458, 0.408], [0.269, 0.261, 0.276]
    crop = {"height": image_size, "width": image_size}
    torch.manual_seed(seed)
    if family == "llava-onevision":
        s = image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, 4 * s], [4 * s, 3 * s]]  # 3x4: anyres_max resizes
        common.update(vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
        common["image_token_index"] = common.pop("image_token_id")
        config = LlavaOnevisionConfig(**common)
        model = LlavaOnevisionForConditionalGeneration(config)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": s, "width": s},
            crop_size=crop,
            image_grid_pinpoints=pinpoints,
            image_mean=mean,
            image_std=std,
        )
        n = (s // patch_size) ** 2
        try:
            processor = LlavaOnevisionProcessor(
                image_processor=image_processor,
                tokenizer=tokenizer,
                num_image_tokens=n,
                vision_feature_select_strategy=select,
            )
        except (ImportError, AttributeError):  # it needs torchvision for its video processor
            processor = OnevisionInputs(image_processor, tokenizer, n, config.vision_aspect_ratio)
    elif family == "llava":
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size=crop, image_mean=mean, image_std=std
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=select,
            num_additional_image_tokens=1 if select == "default" else 0,
        )
    else:
        s = image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size=crop,
            image_grid_pinpoints=pinpoints,
            image_mean=mean,
            image_std=std,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    model.config._attn_implementation = attn_implementation
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
