"""ShortV: layer contribution, calibration files, presets, frozen-layer FLOPs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import PROMPTS, make_images

import tokencomp as tc
from tokencomp.benchmark import generate_split
from tokencomp.data import JsonlDataset
from tokencomp.methods.shortv import (
    calibrate,
    kl_divergence,
    layer_contribution,
    lowest_layers,
    plot_layer_contribution,
)
from tokencomp.profiler import run_flops
from tokencomp.tiny import tiny_llava


def _batches(model, n=2):
    ims = make_images([(60, 100), (90, 90), (70, 50), (80, 80)][:n], seed=9)
    return [tc.prepare(model, ims, [PROMPTS[i % 3] for i in range(n)])]


def test_kl_direction_matches_kldivloss():
    a, b = torch.randn(3, 11), torch.randn(3, 11)
    code = torch.nn.KLDivLoss(reduction="batchmean")(a.log_softmax(-1), b.softmax(-1))
    assert kl_divergence(a, b, "code").mean() == pytest.approx(float(code), rel=1e-5)
    rev = torch.nn.KLDivLoss(reduction="batchmean")(b.log_softmax(-1), a.softmax(-1))
    assert kl_divergence(a, b, "reverse").mean() == pytest.approx(float(rev), rel=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_lc_zero_for_dead_layer_and_large_for_loud_layer(models, family):
    model = tc.Model(copy.deepcopy(models[family].hf), models[family].processor)
    dead, loud = 1, 2
    with torch.no_grad():
        lay = model.layers[dead]
        lay.self_attn.o_proj.weight.zero_()
        lay.mlp.down_proj.weight.zero_()  # the layer adds nothing to any token
        model.layers[loud].self_attn.o_proj.weight.mul_(30)
        model.layers[loud].mlp.down_proj.weight.mul_(30)
    lc = layer_contribution(model, _batches(model))
    assert lc["visual"][dead] < 1e-6 and lc["text"][dead] < 1e-6  # zero updates: nothing to remove
    # a layer made to matter: its text updates (the last token's own) dominate the output
    assert lc["text"][loud] == max(lc["text"]) and lc["text"][loud] > 1e3 * max(lc["text"][dead], 1e-9)
    # the last layer's visual updates cannot reach the last position: exactly zero
    assert lc["visual"][-1] == 0.0
    assert lc["visual"][0] > 1e3 * max(lc["visual"][dead], 1e-9)  # earlier visual updates do matter
    assert lc["samples"] == 2


def test_calibration_deterministic_file_and_selection(models, tmp_path):
    model = models["llava"]
    data = JsonlDataset(generate_split(tmp_path / "d", "val", 6, size=(84, 84)))
    a = calibrate(model, data, num_samples=3, seed=5, batch_size=2, path=tmp_path / "lc.json")
    b = calibrate(model, data, num_samples=3, seed=5, batch_size=2)
    assert a["visual"] == b["visual"] and a["ids"] == b["ids"]
    saved = json.loads((tmp_path / "lc.json").read_text())
    assert saved["visual"] == a["visual"] and saved["layers"] == model.num_layers
    chosen = lowest_layers(a, 2)
    assert sorted(chosen) == sorted(sorted(range(4), key=lambda i: a["visual"][i])[:2])
    strat = tc.method("shortv", calibration=str(tmp_path / "lc.json"), n=2)
    assert sorted(strat.frozen_layers(4)) == sorted(chosen)
    out = tc.generate(model, make_images()[:1], PROMPTS[:1], method=strat, max_new_tokens=2)
    assert out.record.frozen_layers == sorted(chosen)
    png = plot_layer_contribution(a, tmp_path / "lc.png", chosen)
    assert png.stat().st_size > 1000


def test_presets_and_errors(models):
    assert len(tc.method("shortv", preset="llava-1.5-7b").frozen_layers(32)) == 19
    assert len(tc.method("shortv", preset="llava-next-13b").frozen_layers(40)) == 24
    with pytest.raises(tc.UnsupportedModelError, match="is for a 32-layer decoder, the model has 4"):
        tc.generate(models["llava"], make_images()[:1], PROMPTS[:1], method=tc.method("shortv", preset="llava-1.5-7b"))
    with pytest.raises(tc.TokencompError, match="exactly one of"):
        tc.method("shortv")
    with pytest.raises(tc.TokencompError, match="unknown ShortV preset"):
        tc.method("shortv", preset="llava-2")
    from tokencomp.methods.shortv import preset_for

    hf, proc = tiny_llava("llava")
    assert preset_for(tc.Model(hf, proc, name="llava-hf/llava-1.5-7b-hf")) == "llava-1.5-7b"
    assert preset_for(tc.Model(hf, proc, name="llava-v1.6-vicuna-13b-hf")) == "llava-next-13b"


def test_shortv_flops_match_the_papers_formula():
    hf, proc = tiny_llava("llava", kv_heads=4)  # multi-head attention, as the ShortV formula assumes
    model = tc.Model(hf, proc)
    frozen = (0, 2)
    pre = tc.Engine(model, tc.method("shortv", layers=frozen)).prefill(
        tc.prepare(model, make_images()[:1], PROMPTS[:1])
    )
    rep = run_flops(model, pre.record)[0]
    cfg = hf.config.text_config
    h, m = cfg.hidden_size, cfg.intermediate_size
    v = pre.record.visual_per_layer[0][0]
    t = pre.record.tokens_per_layer[0][0] - v
    dense = 2 * (t + v) * (4 * h + 3 * m) * h + 4 * (t + v) ** 2 * h
    short = 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h
    for i, f in enumerate(rep.prefill_layers):
        assert f == pytest.approx(short if i in frozen else dense, rel=1e-12)
