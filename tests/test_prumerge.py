"""LLaVA-PruMerge / PruMerge+ against a loop reference of the released code."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PROMPTS, eager_copy, make_images
from vision_reference import prumerge_view, tower_views

import tokencomp as tc
from tokencomp.strategy import VISUAL


def _view(seed: int, n: int = 64, d: int = 8, dk: int = 16, views: int = 2) -> tc.VisionView:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(views, dk, generator=g)
    keys = torch.randn(views, n + 1, dk, generator=g)
    hot = torch.randint(1, n + 1, (views, 5), generator=g)
    for v in range(views):  # a few keys aligned with the query: attention outliers
        keys[v, hot[v]] = q[v] * 3 + 0.1 * torch.randn(5, dk, generator=g)
    return tc.VisionView(
        features=torch.randn(views, n, d, generator=g),
        cls=torch.randn(views, d, generator=g),
        grid=(8, 8),
        valid=torch.ones(views, n, dtype=torch.bool),
        role=torch.zeros(views, dtype=torch.long),
        image=torch.arange(views),
        key=torch.zeros(views, dtype=torch.long),
        crop_grid=[(0, 0)] * views,
        captures={tc.Need("vision_cls_query", -1): q, tc.Need("vision_keys_full", -1): keys},
    )


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
@pytest.mark.parametrize(
    "opts", [{}, {"neighbours": "pruned"}, {"order": "raster", "extra_token": False}, {"k_neighbours": 3}]
)
def test_prumerge_matches_loop_reference(name, opts):
    for seed in range(3):
        view = _view(seed)
        out = tc.method(name, **opts).compress(view)
        for v in range(2):
            kw = {k: opts[k] for k in ("k_neighbours", "neighbours", "order") if k in opts}
            ref, keep = prumerge_view(
                view.features[v],
                view.cls_query(-1)[v],
                view.keys_full(-1)[v],
                plus=name == "prumerge+",
                extra=opts.get("extra_token", True),
                **kw,
            )
            c = int(out.count[v])
            assert c == len(ref)
            assert out.index[v, : len(keep)].tolist() == keep
            assert len(keep) >= 1  # the planted outliers are found
            torch.testing.assert_close(out.features[v, :c], ref, rtol=1e-5, atol=1e-5)


def test_prumerge_end_to_end_uses_last_layer_projections(model, images):
    """Engine capture (SDPA tower) vs the eager tower's own last-layer q/k projections."""
    batch = tc.prepare(model, images, PROMPTS)
    pre = tc.Engine(model, tc.method("prumerge")).prefill(batch)
    hf = eager_copy(model)
    tower = hf.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    pix = tower_views(model, batch)
    with torch.no_grad():
        hs = tower(pix, output_hidden_states=True).hidden_states
        last = vm.encoder.layers[-1]
        x_in = last.layer_norm1(hs[-2])
        q, k = last.self_attn.q_proj(x_in), last.self_attn.k_proj(x_in)
        v = 0
        for b in range(len(images)):
            ref, keep = prumerge_view(hs[-2][v, 1:], q[v, 0], k[v])
            lay = pre.input_state.layout(b)
            base = (lay["view"] == 0) & (lay["kind"] == VISUAL)
            got = pre.input_state.hidden[b][pre.input_state.valid[b]][base]
            torch.testing.assert_close(got, model.projector(ref), rtol=1e-4, atol=1e-5)
            assert lay["patch"][base].tolist() == keep + [-1]
            v += model.views_per_image((images[b].size[1], images[b].size[0]))


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
@pytest.mark.parametrize("opts", [{}, {"neighbours": "pruned", "k_neighbours": 60}, {"order": "raster"}])
def test_prumerge_batch_equals_each_view_alone(name, opts):
    """Views of one call keep different counts (one has no outlier at all: uniform attention, so
    only the extra token): each view's tokens are those it gets alone, padding zero."""
    view = _view(4, views=3)
    view.captures[tc.Need("vision_keys_full", -1)][1] = 1.0  # view 1: equal keys, no outlier
    method = tc.method(name, **opts)
    out = method.compress(view)
    counts = out.count.tolist()
    assert len(set(counts)) > 1 and 1 in counts  # widths differ; the view without outlier: extra only
    for v in range(3):
        alone = method.compress(_one_view(view, v))
        c = int(alone.count[0])
        assert int(out.count[v]) == c and torch.equal(out.index[v, :c], alone.index[0])
        torch.testing.assert_close(out.features[v, :c], alone.features[0], rtol=1e-6, atol=1e-6)
        assert not out.features[v, c:].any() and bool((out.index[v, c:] == -1).all())


def _one_view(view: tc.VisionView, v: int) -> tc.VisionView:
    """View ``v`` of a `VisionView` alone."""
    one = {f: getattr(view, f)[v : v + 1] for f in ("features", "cls", "valid", "role", "image", "key")}
    captures = {need: t[v : v + 1] for need, t in view.captures.items()}
    return dataclasses.replace(view, **one, captures=captures, pixels=None)


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
def test_prumerge_overhead_equals_torch_flop_count(models, name):
    """The analytic overhead is what torch's FLOP counter sees in the method's own scoring, on
    LLaVA-NeXT too, where unpadding drops kept crop tokens after the selection (a wide image)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = make_images([(20, 120)])
    for model in models.values():
        method = tc.method(name)
        counter = FlopCounterMode(display=False)
        original = method.compress

        def counted(view, original=original, counter=counter):
            with counter:
                return original(view)

        method.compress = counted
        pre = tc.Engine(model, method).prefill(tc.prepare(model, images[:1], PROMPTS[:1]))
        assert counter.get_total_flops() > 0
        assert method.overhead_flops(model, pre.record, 0) == counter.get_total_flops()
        if model.family == "llava-next" and name == "prumerge+":  # the case the unpadded count got wrong
            assert pre.record.projected_tokens[0] > sum(sum(v) for v in pre.record.tokens_per_view[0])
