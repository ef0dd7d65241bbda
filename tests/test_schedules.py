"""G-Search, P-Sigmoid, schedule execution, PyramidDrop, rank similarity and compositions."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images

import tokencomp as tc
from tokencomp.methods.gsearch import (
    _Evaluator,
    gsearch,
    load_schedule,
    psigmoid,
    psigmoid_rates,
    rank_similarity,
    save_schedule,
    schedule_flops_ratio,
)
from tokencomp.profiler import run_flops
from tokencomp.tiny import tiny_llava


@pytest.fixture(scope="module")
def deep():
    """A 6-layer tiny LLaVA-1.5 so schedules have room."""
    return tc.Model(*tiny_llava("llava", seed=11, text_layers=6))


@pytest.fixture(scope="module")
def calib(deep):
    ims = make_images([(60, 100), (90, 90), (70, 50), (80, 80)], seed=12)
    return [tc.prepare(deep, ims[:2], PROMPTS[:2]), tc.prepare(deep, ims[2:], PROMPTS[1:3])]


def test_schedule_execution_counts_and_equivalence_to_fastv(deep, calib):
    rates = (1.0, 1.0, 0.5, 0.5, 0.25, 0.25)
    pre = tc.Engine(deep, tc.method("schedule", rates=rates)).prefill(calib[0])
    n = pre.record.visual_per_layer[0][0]
    assert pre.record.visual_per_layer[0] == [n, n, round(0.5 * n), round(0.5 * n), round(0.25 * n), round(0.25 * n)]
    # a one-step schedule is FastV with the same k and ratio
    a = tc.Engine(deep, tc.method("schedule", rates=(1.0, 1.0, 0.5, 0.5, 0.5, 0.5))).prefill(calib[0])
    b = tc.Engine(deep, tc.method("fastv", k=2, ratio=0.5)).prefill(calib[0])
    torch.testing.assert_close(a.logits, b.logits)
    assert a.state.orig_index.tolist() == b.state.orig_index.tolist()


def test_schedule_validation_and_files(tmp_path, deep):
    with pytest.raises(tc.BudgetError, match="keep rate of layer 0 must be 1.0"):
        tc.method("schedule", rates=(0.5, 0.5))
    with pytest.raises(tc.BudgetError, match=r"keep rate of layer 2=1.5 is outside"):
        tc.method("schedule", rates=(1.0, 1.0, 1.5))
    with pytest.raises(tc.UnsupportedModelError, match="32 keep rates, the model has 6"):
        tc.Engine(deep, tc.method("schedule", preset="llava-1.5-7b"))
    assert len(tc.method("schedule", preset="llava-1.5-7b").rates) == 32
    path = save_schedule({"keep": [1.0, 1.0, 0.6, 0.5, 0.5, 0.2], "query": "text"}, tmp_path / "s.json")
    s = tc.method("schedule", path=str(path))
    assert s.rates == (1.0, 1.0, 0.6, 0.5, 0.5, 0.2) and s.query == "text"
    assert load_schedule(path)["keep"][2] == 0.6


def test_gsearch_monotone_meets_tolerance_and_is_a_local_minimum(deep, calib):
    tol, step = 0.02, 0.125
    sched = gsearch(deep, calib, tolerance=tol, step=step)
    r = sched["keep"]
    assert r[:2] == [1.0, 1.0]
    assert all(a >= b for a, b in zip(r, r[1:]))  # non-increasing
    ev = _Evaluator(deep, calib, "kl")
    assert ev.loss(r) <= tol  # meets the tolerance on the calibration set
    assert min(r) < 1.0, "the search should prune something at this tolerance"
    for i in range(2, len(r)):  # lowering any single layer by one step breaks it
        if r[i] - step < 0:
            continue
        lowered = r[:i] + [r[i] - step] + [min(x, r[i] - step) for x in r[i + 1 :]]
        assert ev.loss(lowered) > tol, f"layer {i} could go lower"


def test_psigmoid_meets_flops_budget(deep, calib):
    budget = 0.6
    sched = psigmoid(deep, calib, flops_ratio=budget, n_iter=3, init_points=3)
    r = sched["keep"]
    assert sched["flops_ratio"] <= budget + 1e-9
    assert r == pytest.approx(psigmoid_rates(6, **sched["params"]))
    # measured by the profiler on real runs of the schedule over the whole calibration set: within
    # the budget, and equal to the closed form the search used
    kept = full = 0.0
    for batch in calib:
        pre = tc.Engine(deep, tc.method("schedule", rates=tuple(r))).prefill(batch)
        ref = tc.Engine(deep).prefill(batch)
        kept += sum(sum(f.prefill_layers) for f in run_flops(deep, pre.record))
        full += sum(sum(f.prefill_layers) for f in run_flops(deep, ref.record))
    assert kept / full <= budget + 1e-9
    assert kept / full == pytest.approx(sched["flops_ratio"])
    spans = tc.Engine(deep).image_spans(calib[0])
    n_vis = spans[0][0][1]
    one = schedule_flops_ratio(deep, r, n_vis, int(calib[0].attention_mask[0].sum()) - n_vis)
    pre = tc.Engine(deep, tc.method("schedule", rates=tuple(r))).prefill(calib[0])
    ref = tc.Engine(deep).prefill(calib[0])
    assert one == pytest.approx(
        sum(run_flops(deep, pre.record)[0].prefill_layers) / sum(run_flops(deep, ref.record)[0].prefill_layers)
    )


def test_pdrop_stages(deep, calib):
    pre = tc.Engine(deep, tc.method("pdrop")).prefill(calib[0])
    n = pre.record.visual_per_layer[0][0]
    # 6 layers: quarter points 2 (1.5 rounds to 2), 3, 4 (4.5 rounds to 4)
    assert tc.method("pdrop").boundaries(6) == [2, 3, 4]
    assert tc.method("pdrop").boundaries(32) == [8, 16, 24]
    expect = [n, n, n // 2, n // 4, n // 8, n // 8]
    assert pre.record.visual_per_layer[0] == expect


def test_rank_similarity_table(deep, calib, tmp_path):
    from tokencomp.methods.gsearch import plot_rank_similarity, rank_similarity_table

    tau = rank_similarity(deep, calib[:1])
    assert plot_rank_similarity(tau, tmp_path / "tau.png").stat().st_size > 1000
    table = rank_similarity_table(tau)
    assert table.count("\n") == 7 and "| 0 | 1.00 |" in table
    assert tau.shape == (6, 6)
    assert (abs(tau - tau.T) < 1e-9).all() and (tau.diagonal() == 1).all()
    assert (tau <= 1 + 1e-9).all() and (tau >= -1 - 1e-9).all()


@pytest.mark.parametrize(
    "combo",
    [
        lambda: [tc.method("shortv", layers=(3, 4)), tc.method("fastv", k=2, ratio=0.5)],
        lambda: [tc.method("visionzip", budget=12), tc.method("shortv", layers=(1, 5))],
        lambda: [tc.method("visionzip", budget=16), tc.method("schedule", rates=(1, 1, 0.5, 0.5, 0.25, 0.25))],
    ],
)
def test_compositions(deep, calib, combo):
    strategies = combo()
    pre = tc.Engine(deep, strategies).prefill(calib[0])
    rec = pre.record
    names = [s.name for s in strategies]
    if "shortv" in names:
        assert rec.frozen_layers == sorted(strategies[names.index("shortv")].frozen_layers(6))
    if "visionzip" in names:
        assert rec.visual_tokens_llm[0] == strategies[0].budget
    if "schedule" in names:
        assert rec.visual_per_layer[0][-1] == round(0.25 * rec.visual_tokens_llm[0])
    if "fastv" in names:
        assert rec.visual_per_layer[0][2] == rec.visual_per_layer[0][0] // 2
    # batch == alone for compositions too
    for b in range(2):
        one = tc.Batch(
            calib[0].input_ids[b : b + 1], calib[0].attention_mask[b : b + 1], calib[0].pixel_values[b : b + 1]
        )
        keep = one.attention_mask[0].bool()
        one = tc.Batch(one.input_ids[:, keep], one.attention_mask[:, keep], one.pixel_values)
        alone = tc.Engine(deep, combo()).prefill(one)
        torch.testing.assert_close(alone.logits[0], pre.logits[b], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scoring", ["preprune", "previous"])
def test_pdrop_matches_the_authors_rule(model, images, scoring):
    """PyramidDrop against a reference from the unmodified HF modules (tests/reference.py): layer b's
    own attention before the drop, kept tokens renumbered, decoding included. The FastV-style
    ``scoring="previous"`` must pick a different set on some sample (else the test shows nothing)."""
    from conftest import hf_inputs
    from reference import pdrop_reference

    L = model.num_layers
    method = tc.method("pdrop", scoring=scoring)
    bounds = method.boundaries(L)
    differs = False
    for i in range(3):
        batch = tc.prepare(model, [images[i]], [PROMPTS[i]])
        kept, ref_logits, ref_tokens = pdrop_reference(
            model.hf, hf_inputs(batch), model.image_token_id, bounds, 0.5, steps=4
        )
        tokens, pre = tc.Engine(model, method).generate(batch, max_new_tokens=4, eos_token_id=None)
        same = pre.state.orig_index[0].tolist() == kept.tolist()
        if scoring == "preprune":
            assert same
            assert pre.state.positions[0].tolist() == list(range(len(kept)))
            torch.testing.assert_close(pre.logits[0], ref_logits[0], rtol=1e-4, atol=1e-4)
            assert tokens[0] == ref_tokens
        differs |= not same
    if scoring == "previous":
        assert differs
