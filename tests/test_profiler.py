"""The analytic FLOPs model against torch's FlopCounterMode, and published figures from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_images
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

import tokencomp as tc
from tokencomp.profiler import DecoderShape, _rss_bytes, measure, prefill_flops_from_config, run_flops
from tokencomp.tiny import tiny_llava


@pytest.fixture(scope="module")
def eager_models():
    # eager attention: FlopCounterMode counts its matmuls (CPU SDPA kernels with a mask are not counted)
    return {
        fam: tc.Model(*tiny_llava(fam, seed=4, attn_implementation="eager", text_layers=4))
        for fam in ("llava", "llava-next")
    }


METHODS = {
    "identity": lambda: None,
    "random": lambda: tc.method("random", budget=9),
    "pool": lambda: tc.method("pool", budget=9),
    "fastv": lambda: tc.method("fastv", k=2, ratio=0.5),
    "fastv-text": lambda: tc.method("fastv", k=1, ratio=0.7, query="text"),
    "fastv-all": lambda: tc.method("fastv", k=2, ratio=0.5, query="all"),
    "pdrop": lambda: tc.method("pdrop"),  # scores before each drop: extra keys of the tokens entering
    "pdrop-text": lambda: tc.method("pdrop", query="text", layers=(1, 3)),
    "freeze": lambda: tc.method("freeze", layers=(0, 2, 3)),
    "visionzip": lambda: tc.method("visionzip", dominant=8, contextual=4),
    "prumerge+": lambda: tc.method("prumerge+"),
    "globalcom2": lambda: tc.method("globalcom2", ratio=0.4),
    "dart": lambda: tc.method("dart", budget=12, pivot_image=2, pivot_text=2),
    "divprune": lambda: tc.method("divprune", budget=9),  # its cosine matrix per image, before layer 0
    "vispruner": lambda: tc.method("vispruner", budget=11, important_ratio=0.3),  # removal rounds' cosines
    "sparsevlm": lambda: tc.method("sparsevlm", counts=(20, 8), layers=(0, 2)),
    "hired": lambda: tc.method("hired", ratio=0.3),  # CLS rows at two layers, charged by the profiler
    "tome": lambda: [tc.method("tome", budget=9), tc.method("fastv", k=1)],  # the tower runs fewer tokens
    "downsample": lambda: tc.method("downsample", budget=16),  # a smaller image through the tower
    "compose": lambda: [tc.method("visionzip", budget=12), tc.method("fastv", k=1), tc.method("freeze", layers=(3,))],
}


def rope_table_flops(counter: FlopCounterMode) -> int:
    """FLOPs the counter saw in rotary-embedding modules: transformers before 5.2x builds the RoPE
    cos/sin table with a matmul of the inverse frequencies and the positions (5.17, on the GPU
    image, does; 5.24 does not). The analytic model leaves RoPE out, as element-wise work."""
    counts = counter.get_flop_counts()
    rope = [name for name in counts if "rotary" in name.lower()]
    outer = [n for n in rope if not any(n.startswith(f"{m}.") for m in rope)]  # nested names are included
    return sum(sum(counts[n].values()) for n in outer)


@pytest.mark.parametrize("family", ["llava", "llava-next"])
@pytest.mark.parametrize("name", list(METHODS))
def test_analytic_flops_match_flop_counter(eager_models, family, name):
    if name == "globalcom2" and family == "llava":
        pytest.skip("GlobalCom² serves LLaVA-NeXT only")
    model = eager_models[family]
    strat = METHODS[name]()
    engine = tc.Engine(model, strat)
    for i, im in enumerate(make_images([(60, 100), (90, 90)], seed=3)):
        batch = tc.prepare(model, [im], [PROMPTS[i]])
        with FlopCounterMode(display=False) as counter:
            tokens, pre = engine.generate(batch, max_new_tokens=4, eos_token_id=None)
        counted = counter.get_total_flops() - rope_table_flops(counter)
        report = run_flops(model, pre.record, engine.strategies)[0]
        assert len(report.decode) == 3
        # exact: overheads are tiny shares of the total, so a loose tolerance would hide a missing one.
        # SparseVLM's DPC-KNN distances (cdist) are counted analytically but invisible to the counter,
        # and its raters' V T^T bound counts the text before the image too
        rel = 0.02 if name == "sparsevlm" else 1e-9
        assert report.total == pytest.approx(counted, rel=rel), (report.to_dict(), counted)
        assert (pre.record.prefill_flops[0], pre.record.total_flops[0]) == (report.prefill, report.total)


def test_analytic_flops_match_flop_counter_without_cls():
    """A tower without CLS (SigLIP-style): VisionZip ranks by the attention every query row pays,
    scored in chunks by the engine; the analytic count includes those rows and equals the counter."""
    model = tc.Model(*tiny_llava("llava", seed=3, vision="siglip", attn_implementation="eager", text_layers=4))
    assert not model.has_cls
    engine = tc.Engine(model, tc.method("visionzip", dominant=8, contextual=4))
    batch = tc.prepare(model, make_images([(60, 100)], seed=3), PROMPTS[:1])
    with FlopCounterMode(display=False) as counter:
        _, pre = engine.generate(batch, max_new_tokens=4, eos_token_id=None)
    report = run_flops(model, pre.record, engine.strategies)[0]
    n, d = model.patches_per_view, model.hf.config.vision_config.hidden_size
    assert report.overhead > 2 * n * n * d  # every query row's logits, not the one row a CLS would need
    assert report.total == pytest.approx(counter.get_total_flops() - rope_table_flops(counter), rel=1e-9)


def test_prefill_layers_follow_token_counts(eager_models, images):
    model = eager_models["llava"]
    pre = tc.Engine(model, tc.method("fastv", k=2, budget=4)).prefill(tc.prepare(model, images[:1], PROMPTS[:1]))
    rep = run_flops(model, pre.record)[0]
    assert rep.prefill_layers[0] == rep.prefill_layers[1] > rep.prefill_layers[2] == rep.prefill_layers[3]
    assert rep.unit.startswith("FLOPs")


VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32, vocab_size=32000
)
VICUNA_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40, vocab_size=32000
)
SHORTV_7B = [31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19]


def test_published_llava15_7b_prefill():
    cfg = LlamaConfig(**VICUNA_7B)
    dense = prefill_flops_from_config(cfg, visual=576, text=64)
    assert dense / 1e12 == pytest.approx(8.5, rel=0.01)  # ShortV's dense baseline, METHODS.md §3
    shortv = prefill_flops_from_config(cfg, visual=576, text=64, frozen_layers=SHORTV_7B)
    assert shortv / 1e12 == pytest.approx(4.7, rel=0.01)
    # ShortV's own per-layer formula, independently
    t, v, h, m = 64, 576, 4096, 11008
    dense_layer = 2 * (t + v) * (4 * h + 3 * m) * h + 4 * (t + v) ** 2 * h
    short_layer = 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h
    assert shortv == pytest.approx(13 * dense_layer + 19 * short_layer, rel=1e-9)
    # FastV's multiply-add convention (4nd^2 + 2n^2 d + 2ndm) with a 3-matrix gated MLP, times 2
    n = t + v
    assert dense == pytest.approx(2 * 32 * (4 * n * h * h + 2 * n * n * h + 3 * n * h * m), rel=1e-9)


def test_published_llava_next_7b_prefill_2880_tokens():
    cfg = LlamaConfig(**VICUNA_7B)
    assert prefill_flops_from_config(cfg, visual=2880, text=0) / 1e12 == pytest.approx(41.7, rel=0.01)
    # GlobalCom² at R=25% (720 tokens) and 10% (288): 9.6 and 3.8 TFLOPs in its table
    assert prefill_flops_from_config(cfg, visual=720, text=0) / 1e12 == pytest.approx(9.6, rel=0.02)
    assert prefill_flops_from_config(cfg, visual=288, text=0) / 1e12 == pytest.approx(3.8, rel=0.02)


def test_gqa_shrinks_kv_projections():
    full = DecoderShape.from_config(LlamaConfig(**VICUNA_7B))
    gqa = DecoderShape.from_config(LlamaConfig(**{**VICUNA_7B, "num_key_value_heads": 8}))
    diff = full.layer(100) - gqa.layer(100)
    assert diff == pytest.approx(2 * 100 * 4096 * (32 - 8) * 128 * 2)


def test_measure_reports_timings(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images[:2], PROMPTS[:2])
    t = measure(tc.Engine(model, tc.method("fastv")), batch, repeats=2, new_tokens=3)
    assert t.prefill_median > 0 and t.decode_per_token_median > 0 and t.prefill_spread >= 0
    assert t.kv_cache_bytes > 0 and t.peak_memory_bytes > 0 and t.device == "cpu"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_cpu_peak_memory_covers_the_timed_runs_only(models, images):
    model = models["llava"]
    batch = tc.prepare(model, images[:1], PROMPTS[:1])
    resident = _rss_bytes("VmRSS")  # the model and everything else now held: the timed runs' floor
    # 1 GiB resident before the measurement, then freed (was 256 MiB with a 128 MiB margin, which a
    # timed run's own transient allocations once filled in a full-suite run)
    spike = torch.ones(2**30, dtype=torch.uint8)
    del spike
    lifetime_peak = _rss_bytes()
    assert lifetime_peak >= resident + 2**30 - 2**26  # the spike did raise the peak mark
    t = measure(tc.Engine(model, tc.method("identity")), batch, repeats=1, new_tokens=2)
    assert resident * 0.9 < t.peak_memory_bytes < lifetime_peak - 2**29  # the spike is not in it


@pytest.mark.parametrize(
    "make",
    [
        lambda: tc.method("sparsevlm", counts=(20, 10, 4), layers=(0, 1, 2)),  # the raters' rows
        lambda: tc.method("fastv", k=2, ratio=0.5),  # the last token's row
    ],
)
def test_decoder_capture_overhead_equals_torch_flop_count(models, images, make):
    """The profiler's cost of the engine's attention-row captures is what torch's FLOP counter sees
    in them (one sample: no padding rows)."""
    model = models["llava"]
    engine = tc.Engine(model, make())
    rows, measured = engine._decoder_rows, []

    def counted(*a, **k):
        with FlopCounterMode(display=False) as counter:  # a counter restarts at each entry: one per call
            out = rows(*a, **k)
        measured.append(counter.get_total_flops())
        return out

    engine._decoder_rows = counted
    pre = engine.prefill(tc.prepare(model, images[:1], PROMPTS[:1]))
    assert len(measured) == len(pre.record.decoder_captures) and all(measured)
    assert run_flops(model, pre.record, [])[0].overhead == sum(measured)


def test_measure_interleaved_rotates_the_order_and_takes_medians():
    """Each round times every engine once, starting one later each round; the medians are of
    each engine's own timed runs (warm-up runs left out)."""
    from types import SimpleNamespace

    from tokencomp.profiler import measure_interleaved

    calls = []

    class Fake:
        def __init__(self, name, times):
            self.name, self.times, self.model = name, iter(times), SimpleNamespace(device=torch.device("cpu"))

        def generate(self, batch, max_new_tokens, eos_token_id=None):
            calls.append((self.name, max_new_tokens))
            if max_new_tokens == 2:  # warm-up
                return [[0, 0]], None
            t = next(self.times)
            record = SimpleNamespace(prefill_s=t, decode_s=3 * t, kv_cache_bytes=7)
            return [[0] * max_new_tokens], SimpleNamespace(record=record)

    engines = {"a": Fake("a", [5.0, 1.0, 3.0]), "b": Fake("b", [2.0, 9.0, 4.0]), "c": Fake("c", [1.0, 1.0, 8.0])}
    timing = measure_interleaved(engines, batch=None, repeats=3, warmup=1, new_tokens=4)
    assert [c[0] for c in calls[:3]] == ["a", "b", "c"] and all(c[1] == 2 for c in calls[:3])
    assert [c[0] for c in calls[3:]] == list("abc" + "bca" + "cab")
    assert {k: t.prefill_median for k, t in timing.items()} == {"a": 3.0, "b": 4.0, "c": 1.0}
    assert timing["b"].prefill_spread == 7.0 and timing["b"].decode_per_token_median == 4.0  # 3 t / 3 steps
    assert all(t.repeats == 3 and t.peak_memory_bytes == 0 and t.kv_cache_bytes == 7 for t in timing.values())


@tc.register("_test-mean-attention")
class MeanAttentionTopK(tc.VisionStrategy):
    """A custom policy with no ``overhead_flops`` of its own: the tokens that receive the most
    attention, averaged over every query row and head, with the CLS row's ranking as a tie-break
    (both captures at one layer)."""

    budget: int = 9
    alias: bool = False  # also name the layer from the front (scored once all the same)

    def needs_for_model(self, model):
        cls = [tc.Need("vision_cls_attention", -2)] if model.has_cls else []
        alias = [tc.Need("vision_mean_attention", model.vision_num_layers - 2)] if self.alias else []
        return [tc.Need("vision_mean_attention", -2), *cls, *alias]

    def select(self, view):
        score = view.mean_attention(-2).sum(dim=1)  # (V, N)
        if view.cls is not None:
            score = score[:, 1:] + 1e-6 * view.cls_attention(-2)[:, :, 1:].sum(dim=1)
        return score.topk(self.budget, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("alias", [False, True])
@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_captured_vision_attention_is_charged_by_the_profiler(vision, alias):
    """The profiler charges every query row a custom strategy's captures score (every row for a
    mean, plus the CLS row where it is scored too), without the strategy counting them itself."""
    model = tc.Model(*tiny_llava("llava", seed=3, vision=vision, attn_implementation="eager", text_layers=4))
    engine = tc.Engine(model, tc.method("_test-mean-attention", alias=alias))
    batch = tc.prepare(model, make_images([(60, 100)], seed=3), PROMPTS[:1])
    with FlopCounterMode(display=False) as counter:
        _, pre = engine.generate(batch, max_new_tokens=2, eos_token_id=None)
    report = run_flops(model, pre.record, engine.strategies)[0]
    assert report.total == pytest.approx(counter.get_total_flops() - rope_table_flops(counter), rel=1e-9)
