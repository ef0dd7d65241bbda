"""Input downsampling against Hugging Face's own tower on the resized pixels (position embeddings
interpolated by HF), its grid laid out by HF's unpad_image, run by a fresh HF decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, batch_and_alone, make_images
from reference import greedy_from_embeds, image_span_replaced
from vision_reference import tower_views

import tokencomp as tc
from tokencomp.strategy import NEWLINE, VISUAL


def _image_tokens(model, batch, b: int, side: int, mode: str) -> torch.Tensor:
    """Image ``b``'s tokens as LLaVA lays out a ``side x side`` grid per view."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    patch = model.hf.config.vision_config.patch_size
    pix = tower_views(model, batch)
    smooth = {"antialias": True, "align_corners": False} if mode != "area" else {}
    small = F.interpolate(pix, size=(side * patch, side * patch), mode=mode, **smooth)
    with torch.no_grad():
        hidden = model.hf.model.vision_tower(small, output_hidden_states=True, interpolate_pos_encoding=True)
        feats = model.projector(hidden.hidden_states[model.hf.config.vision_feature_layer][:, 1:])
    if feats.shape[0] == 1:
        return feats[0]
    size = batch.image_sizes[b].tolist()
    rows, cols = model.crop_grid(tuple(size))
    d = feats.shape[-1]
    grid = feats[1:].view(rows, cols, side, side, d).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, torch.tensor(size))
    newline = model.hf.model.image_newline[:, None, None].expand(d, grid.shape[1], 1)
    grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).T
    return torch.cat([feats[0], grid])


@pytest.mark.parametrize(
    "budget,side,mode", [(9, 3, "bicubic"), (16, 4, "bilinear"), (20, 4, "area"), (2, 1, "bicubic")]
)
def test_downsample_matches_hugging_face_on_the_smaller_image(model, images, budget, side, mode):
    for i, text in enumerate(PROMPTS):
        batch = tc.prepare(model, [images[i]], [text])
        tokens, pre = tc.Engine(model, tc.method("downsample", budget=budget, mode=mode)).generate(
            batch, 3, eos_token_id=None
        )
        ref = _image_tokens(model, batch, 0, side, mode)
        lay = pre.input_state.layout(0)
        span = (lay["kind"] == VISUAL) | (lay["kind"] == NEWLINE)
        got = pre.input_state.hidden[0][pre.input_state.valid[0]][span]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        x = image_span_replaced(model.hf, batch.input_ids[0], model.image_token_id, ref)
        first, steps = greedy_from_embeds(model.hf, x, 3)
        torch.testing.assert_close(pre.logits[0], first[0], rtol=1e-4, atol=1e-4)
        assert tokens[0] == steps


def test_downsample_is_batch_independent_and_the_tower_runs_fewer_tokens(model, images):
    engine = tc.Engine(model, tc.method("downsample", budget=16))
    pre, _ = batch_and_alone(engine, model, images, PROMPTS)
    assert pre.record.vision_layer_tokens == [[17, 17]] * pre.record.vision_layers_run  # 4 x 4 patches + CLS


def test_downsample_rejects_bad_parameters(models):
    with pytest.raises(tc.TokencompError, match="mode must be one of"):
        tc.method("downsample", mode="nearest")
    model = models["llava"]
    with pytest.raises(tc.BudgetError, match=r"budget \(tokens per view\)=37 is outside the allowed range \[1, 36\]"):
        tc.Engine(model, tc.method("downsample", budget=37)).prefill(
            tc.prepare(model, make_images([(60, 100)]), PROMPTS[:1])
        )
