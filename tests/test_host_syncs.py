"""Host syncs (operations that wait for the GPU) counted on the CPU with `tokencomp.syncs`: the
decoder loop makes none per ordinary layer, consecutive frozen layers one in all, a pruning three
and a recycling insertion one whatever the batch; and the sync-free code equals simple loops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PROMPTS

import tokencomp as tc
from tokencomp.layout import pad_left, repack
from tokencomp.strategy import TEXT, VISUAL
from tokencomp.syncs import HostSyncs, host_tensors
from tokencomp.tiny import tiny_llava


def test_counter_sees_each_kind_of_sync_and_nothing_else():
    x = torch.arange(6.0).view(2, 3)
    m = x > 2
    with HostSyncs() as s:  # not syncs: device-side work whatever the data
        y = x.clone()
        y[:, 1] = 0
        x[torch.tensor([0, 1])]
        torch.where(m, x, 0.0)
        x.repeat_interleave(2)
        m.all()
        x.flatten().repeat_interleave(torch.tensor([1, 2, 3, 1, 1, 1]), output_size=9)
    assert s.total == 0
    with HostSyncs() as s:
        bool(m.all())
        int(x.sum())
        x.max().item()
        x.tolist()
        x.nonzero()
        x[m]
        y[m] = 1
        torch.where(m)
        torch.equal(x, y)
        x.flatten().repeat_interleave(torch.tensor([1, 2, 3, 1, 1, 1]))
        x[[1, 0]]  # a Python list: uploaded as an index tensor
        y[:, [0, 2]] = 0
    assert s.total == 12 and s.counts["__getitem__[bool]"] == 1 and s.counts["__setitem__[bool]"] == 1
    assert s.counts["__getitem__[list]"] == 1 and s.counts["__setitem__[list]"] == 1
    assert len(s.sites) == 12 and all(site.startswith("test_host_syncs.py:") for site in s.sites)  # one per line


def test_counter_lets_host_tensors_be():
    """Host copies, tensors made without a device and what is computed from them alone are free;
    the copy itself and work mixing in a device tensor are not."""
    x = torch.arange(6.0).view(2, 3)
    with HostSyncs() as s:
        h = x.cpu()  # the copy: one sync
        (h[h > 2] * torch.tensor([2.0])).tolist()  # host work: free
        made = torch.tensor([1, 0, 1], dtype=torch.bool)
        int(made.sum())  # made without naming a device: free
        x[:, made]  # a device tensor indexed: a sync
        int(torch.tensor([1, 2], device=x.device).sum())  # a device named: an upload and a read
        h.to(torch.float16).to(x.device)[0, 0].item()  # host work, then an upload and a read
        h.to(x.device, non_blocking=True)  # an upload that does not wait
    assert s.total == 6 and s.counts == {"cpu": 1, "__getitem__[bool]": 1, "__int__": 1, "upload": 2, "item": 1}


def test_prefill_syncs_outside_the_decoder_do_not_grow_with_the_batch(model, images):
    """Per image: only the upload of the batch, one read of the views' token counts, the mask's
    fast-path check and the final counts; nothing per sample or per image."""
    counts = []
    for n in (1, 3):
        batch = tc.prepare(model, images[:n], PROMPTS[:n])
        counts.append(_prefill_syncs(model, batch))
    assert counts[0] == counts[1]


def test_repack_equals_a_loop_with_one_sync():
    g = torch.Generator().manual_seed(0)
    for b, n in [(3, 7), (1, 1), (5, 13), (2, 40)]:
        for p in (0.0, 0.3, 0.8, 1.0):
            keep = torch.rand(b, n, generator=g) < p
            with HostSyncs() as s:
                index, valid = repack(keep)
            assert s.total == 1
            want, want_valid = pad_left([row.nonzero().flatten() for row in keep], 0)
            assert torch.equal(index, want) and torch.equal(valid, want_valid)


def _prefill_syncs(model, batch, method=None) -> int:
    engine = tc.Engine(model, method)
    with HostSyncs(host=host_tensors(batch)) as s:
        engine.prefill(batch)
    return s.total


def test_ordinary_decoder_layers_make_no_sync(images):
    """The same batch through 2- and 4-layer decoders: the same syncs (all before the decoder)."""
    counts = []
    for layers in (2, 4):
        hf, proc = tiny_llava("llava", seed=1, text_layers=layers)
        model = tc.Model(hf, proc)
        counts.append(_prefill_syncs(model, tc.prepare(model, images, PROMPTS)))
    assert counts[0] == counts[1]


def test_frozen_layers_one_sync_in_all_prunes_three(model, images):
    batch = tc.prepare(model, images, PROMPTS)  # different lengths: frozen layers have padding slots
    base = _prefill_syncs(model, batch)
    assert _prefill_syncs(model, batch, tc.method("freeze", layers=(1,))) == base + 1
    # every layer frozen: the plan's one sync, and no full-layer mask (whose fast path reads one)
    assert _prefill_syncs(model, batch, tc.method("freeze", layers=(0, 1, 2, 3))) == base
    # the width of the kept sequence, whether anything was dropped, its new mask's fast path
    assert _prefill_syncs(model, batch, tc.method("fastv", k=2, ratio=0.5)) == base + 3


def _insert_loop(state, keep, made):
    """The insertion as a loop over samples (the engine's before it was batched): kept tokens in
    order, the recycled ones after the last kept image-span token, never after the last token."""
    b, n = keep.shape
    col = torch.arange(n)
    span_end = torch.where(state.valid & (state.kind >= VISUAL), col, -1).amax(1)
    rows, new_rows = [], []
    for i in range(b):
        kept = keep[i].nonzero().flatten()
        mine = torch.cat([t[i, : int(c[i])] for t, c in made])
        cut = max(min(int((kept <= span_end[i]).sum()), len(kept) - 1), 0)
        rows.append(torch.cat([kept[:cut], kept.new_full((len(mine),), -1), kept[cut:]]))
        new_rows.append(mine)
    index, valid = pad_left(rows, 0)
    new = state.gather(index.clamp(min=0), valid)
    added = valid & (index < 0)
    new.hidden[added] = torch.cat(new_rows)
    new.kind = new.kind.masked_fill(added, VISUAL)
    new.orig_index = new.orig_index.masked_fill(added, -1)
    new.view = new.view.masked_fill(added, -1)
    new.patch = new.patch.masked_fill(added, -1)
    new.image = torch.where(added, state.image.gather(1, span_end.clamp(min=0)[:, None]).expand_as(added), new.image)
    new.rater &= ~added
    return new, index.masked_fill(~valid, 0)


def test_insert_equals_a_loop_with_one_sync(model, images):
    prompts = [*PROMPTS, "USER : say hi . ASSISTANT :", "USER : describe this <image>"]
    batch = tc.prepare(model, [*images, None, images[1]], prompts)  # a text-only sample, an image last
    engine = tc.Engine(model, None)
    spans = engine.validate(batch)
    state, _, _ = engine.build_sequence(batch, spans, engine.encode_images(batch, spans)[0])
    b, n, d = state.hidden.shape
    g = torch.Generator().manual_seed(0)
    state.rater = (torch.rand(b, n, generator=g) < 0.3) & state.valid
    has_image = (state.valid & (state.kind >= VISUAL)).any(1)
    for _ in range(40):
        keep = state.valid & ((torch.rand(b, n, generator=g) < torch.rand(1, generator=g)) | (state.kind == TEXT))
        keep[:, -1] |= state.valid[:, -1]
        made = []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):  # one or two recycling strategies
            r = int(torch.randint(0, 5, (1,), generator=g))
            made.append((torch.randn(b, r, d, generator=g), torch.randint(0, r + 1, (b,), generator=g) * has_image))
        with HostSyncs() as s:
            new, index = engine._insert(state, keep, made)
        assert s.total == 1
        want, want_index = _insert_loop(state, keep, made)
        assert torch.equal(index, want_index)
        for f in dataclasses.fields(want):
            assert torch.equal(getattr(new, f.name), getattr(want, f.name)), f.name


def test_insert_refuses_tokens_for_a_sample_without_image(model, images):
    batch = tc.prepare(model, [images[0], None], [PROMPTS[0], "USER : say hi . ASSISTANT :"])
    engine = tc.Engine(model, None)
    spans = engine.validate(batch)
    state, _, _ = engine.build_sequence(batch, spans, engine.encode_images(batch, spans)[0])
    made = [(torch.zeros(2, 1, state.hidden.shape[-1]), torch.tensor([1, 1]))]
    with pytest.raises(tc.TokencompError, match=r"samples \[1\], which have no image tokens"):
        engine._insert(state, state.valid, made)


class _ListSelect(tc.VisionStrategy):
    """Keeps a different number of tokens per view, returned as a list (valid tokens only)."""

    newline = "rows"

    def select(self, view):
        score = view.features.norm(dim=-1).masked_fill(~view.valid, -1)
        n = view.valid.shape[1]
        return [score[v].topk(min(3 + v % 4, n)).indices for v in range(view.num_views)]


class _Sourceless(tc.VisionStrategy):
    """Two placed tokens and two merged ones per view, with an order ``group`` (LLaVA-NeXT crops)."""

    def compress(self, view):
        x = view.features
        idx = torch.tensor([5, 2, -1, -1], device=x.device).expand(view.num_views, 4)
        feats = torch.stack([x[:, 5], x[:, 2], x.mean(1), x.amax(1)], 1)
        group = torch.tensor([0, 0, 1, 0], device=x.device).expand_as(idx)
        return tc.ViewTokens(features=feats, index=idx, count=torch.full_like(idx[:, 0], 4), group=group)


def _vision_methods(family: str) -> dict:
    methods = {
        "random": tc.method("random", budget=7),
        "random-fixed": tc.method("random", budget=30, draw="fixed"),
        "visionzip": tc.method("visionzip", budget=12),
        "pool": tc.method("pool", budget=9),
        "prumerge": tc.method("prumerge", k_neighbours=5),
        "prumerge+": tc.method("prumerge+", neighbours="pruned"),
        "list-select": _ListSelect(),
        "sourceless": _Sourceless(),
    }
    if family == "llava-next":
        methods["globalcom2"] = tc.method("globalcom2", ratio=0.3)
    return methods


def test_vision_stage_syncs_do_not_grow_with_the_batch(model, images):
    """Selection, merging and pooling: a few syncs for the whole batch, none per view or image
    (LLaVA-NeXT images of three crop grids place their crop tokens back with one read in all)."""
    one = tc.prepare(model, images[:1], PROMPTS[:1])
    three = tc.prepare(model, images, PROMPTS)
    base = _prefill_syncs(model, three)
    for name, method in _vision_methods(model.family).items():
        counts = [_prefill_syncs(model, batch, method) for batch in (one, three)]
        assert counts[0] == counts[1] <= base + 5, (name, counts, base)


def test_decode_steps_sync_only_to_look_for_eos(model, images):
    """Decoding without an EOS token (as latency is timed) makes no sync per step; with one, one
    read per step (has every sample finished?). Whatever the number of layers of the cache."""
    batch = tc.prepare(model, images, PROMPTS)
    engine = tc.Engine(model, tc.method("fastv", k=1, ratio=0.5))  # layers of different widths

    def syncs(steps: int, eos: int | None) -> int:
        with HostSyncs(host=host_tensors(batch)) as s:
            engine.generate(batch, max_new_tokens=steps, eos_token_id=eos)
        return s.total

    assert syncs(5, None) == syncs(2, None)
    assert syncs(5, -1) - syncs(2, -1) == 3  # an EOS id never generated: every step runs
