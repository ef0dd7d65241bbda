"""The run record: what a run did, per sample and per layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunRecord:
    """Counts and timings of one engine run (lists are per sample unless said otherwise).

    Attributes:
        method: the strategies applied, as strings.
        visual_tokens_in: image-placeholder tokens of the uncompressed prompt.
        visual_tokens_llm: visual tokens entering the LLM (after the vision stage; newline tokens not counted).
        tokens_per_view: ``[sample][image][view]`` visual tokens each view contributes (view 0 = the
            LLaVA-1.5 image or the NeXT thumbnail, then crops in raster order; newlines not counted).
        view_shares: ``[sample][image][view]`` the share of its tokens each view gives the
            uncompressed prompt (`tokencomp.VisionView.share`: below 1 for LLaVA-OneVision crops
            that anyres_max resizes); a sample's list is empty when every view's share is 1.
        projected_tokens: per sample, tokens the projector ran on (before NeXT unpadding drops any).
        tokens_per_layer: ``[sample][layer]`` tokens each decoder layer processed (text + image span).
        visual_per_layer: ``[sample][layer]`` image-span tokens present in each layer (frozen ones
            and LLaVA-NeXT newlines included: what the layer's FLOPs see).
        image_per_layer: ``[sample][layer]`` visual tokens present in each layer, newlines not
            counted (comparable with ``visual_tokens_llm``).
        span_tokens: ``[sample][image]`` each image's span entering the decoder: its visual and
            newline tokens after any vision-stage method.
        frozen_layers: decoder layers in which image tokens were frozen.
        frozen_text_layers: decoder layers in which text tokens were frozen (layer-contribution probes).
        vision_layers_run: vision encoder layers the engine ran whole (it stops at the last one needed).
        vision_layer_tokens: per encoder layer run, ``[into its attention, into its MLP]`` tokens per
            view, where a tower strategy ran (a smaller image, merges; empty: every layer ran on
            every token of a full-size view).
        vision_qk_layers: vision layers after those of which only the norm and the q/k projections
            ran (a capture layer past the last feature layer).
        vision_qk_queries: query rows per view that such a layer projected (1: the CLS row's alone,
            0: none, keys only); None: every token.
        vision_capture_layers: vision layers whose CLS row / keys were captured.
        vision_cls_layers: those of them whose CLS query row (or, ``vision_mean_logits``, the mean
            query row) was scored against the keys (a layer scoring both counts twice).
        vision_mean_layers: those of them whose every query row was scored against the keys
            (``vision_mean_attention``: the mean attention each token receives).
        decoder_captures: ``[layer, query, preprune]`` decoder attention rows captured (query "last",
            "text", "all" or "raters"; ``preprune``: computed from the tokens entering ``layer`` before its pruning).
        kernel_backend: which token-kernel backend ran (``"torch"`` reference or ``"triton"``).
        kv_cache_bytes: bytes of the keys and values cached at the end of the run (a decoding
            buffer's positions left free by an early end of sequence are not counted).
        kv_cache_lengths: ``[sample][layer]`` cached tokens at the end of the run.
        rater_tokens: per sample, the text tokens marked as raters (``decoder_attention_raters``
            captures; empty when no strategy marks any).
        prefill_s / decode_s: wall seconds (device-synchronised) of prefill and of decoding.
        new_tokens: generated tokens per sample (EOS included).
        prefill_flops / total_flops: per sample, LLM prefill FLOPs (decoder layers + LM head, the
            figure papers compare) and everything (vision, projector, prefill, the method's own
            scoring, decoding), from `tokencomp.profiler.run_flops` (filled by `Engine.generate`).
    """

    method: list[str]
    visual_tokens_in: list[int]
    visual_tokens_llm: list[int]
    tokens_per_layer: list[list[int]]
    visual_per_layer: list[list[int]]
    tokens_per_view: list[list[list[int]]] = field(default_factory=list)
    projected_tokens: list[int] = field(default_factory=list)
    view_shares: list[list[list[float]]] = field(default_factory=list)
    image_per_layer: list[list[int]] = field(default_factory=list)
    span_tokens: list[list[int]] = field(default_factory=list)
    frozen_layers: list[int] = field(default_factory=list)
    frozen_text_layers: list[int] = field(default_factory=list)
    vision_layers_run: int = 0
    vision_layer_tokens: list[list[int]] = field(default_factory=list)
    vision_capture_layers: int = 0
    vision_cls_layers: int = 0
    vision_mean_layers: int = 0
    vision_qk_layers: int = 0
    vision_qk_queries: int | None = None
    decoder_captures: list[list] = field(default_factory=list)
    kernel_backend: str = "torch"
    kv_cache_bytes: int = 0
    kv_cache_lengths: list[list[int]] = field(default_factory=list)
    rater_tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: list[int] = field(default_factory=list)
    prefill_flops: list[float] = field(default_factory=list)
    total_flops: list[float] = field(default_factory=list)

    def shares(self, sample: int) -> list[float]:
        """Sample ``sample``'s views' shares, flat in view order (`view_shares`; 1.0 each where its
        list is empty)."""
        if self.view_shares and self.view_shares[sample]:
            return [s for image in self.view_shares[sample] for s in image]
        return [1.0] * sum(len(image) for image in self.tokens_per_view[sample])

    def to_dict(self) -> dict:
        """Plain-data copy (JSON serialisable)."""
        return asdict(self)
