"""The per-layer KV cache: appends land in a reserved buffer and read back as concatenation would."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

import tokencomp as tc
from tokencomp.cache import LayerKVCache


@pytest.mark.parametrize("reserve", [0, 1, 3, 10])
def test_appends_equal_concatenation_and_reuse_the_buffer(reserve):
    g = torch.Generator().manual_seed(0)
    cache = LayerKVCache(2, reserve=reserve)
    prefill = [torch.randn(2, 3, n, 4, generator=g) for n in (7, 5)]  # layers of their own lengths
    for i, kv in enumerate(prefill):
        k, v = cache.update(kv, -kv, i)
        assert k is kv  # prefill keeps the layer's own tensors
    want = list(prefill)
    homes = []
    for step in range(6):
        new = torch.randn(2, 3, 1, 4, generator=g)
        k, v = cache.update(new, -new, 1)
        want[1] = torch.cat([want[1], new], dim=2)
        assert torch.equal(k, want[1]) and torch.equal(v, -want[1])
        assert k.stride(-1) == 1 and cache.lengths() == [7, 5 + step + 1]
        homes.append(k.untyped_storage().data_ptr())
    # a buffer holds 1 + reserve appends before it moves: reallocated on steps 0, 1 + reserve, ...
    moves = sum(a != b for a, b in zip(homes, homes[1:]))
    assert moves == len(range(1 + reserve, 6, 1 + reserve))
    assert cache.nbytes() == 2 * (7 + 11) * 2 * 3 * 4 * 4  # the filled positions of both layers
    assert torch.equal(cache.keys[0], prefill[0])  # the layer not appended to is untouched


def test_decoding_moves_each_layer_into_a_buffer_once(model, images, monkeypatch):
    """The engine reserves room for every decoding step: each layer's keys and values are moved
    into a buffer once, whatever the number of steps (concatenation would copy them every step),
    and decoding still matches the unmodified model's (`test_identity`)."""
    moved = []
    grown = LayerKVCache._grown
    monkeypatch.setattr(LayerKVCache, "_grown", staticmethod(lambda t, c: moved.append(c) or grown(t, c)))
    batch = tc.prepare(model, images[:2], PROMPTS[:2])
    engine = tc.Engine(model, tc.method("fastv", k=1, ratio=0.5))  # layers of two lengths
    for steps in (1, 2, 7):
        moved.clear()
        tokens, pre = engine.generate(batch, max_new_tokens=steps, eos_token_id=None)
        if steps > 1:  # each buffer exactly full at the end: prefill length + steps - 1
            assert sorted(moved) == sorted(2 * pre.cache.lengths())
        else:
            assert not moved


def test_keys_replaced_after_decoding_began_are_not_overwritten_by_the_buffer():
    """Code that replaces a layer's keys and values once decoding has begun (e.g. drops cached
    positions) gets them back with the next step appended, not the buffer's stale contents."""
    cache = LayerKVCache(1, reserve=8)
    k = torch.arange(6.0).view(1, 1, 6, 1)
    cache.update(k[:, :, :5], -k[:, :, :5], 0)
    cache.update(k[:, :, 5:], -k[:, :, 5:], 0)  # into a buffer with room to spare
    keep = torch.tensor([1, 3, 5])
    cache.keys[0], cache.values[0] = cache.keys[0][:, :, keep], cache.values[0][:, :, keep]
    new = torch.full((1, 1, 1, 1), 9.0)
    got, val = cache.update(new, -new, 0)
    assert got.flatten().tolist() == [1.0, 3.0, 5.0, 9.0] and torch.equal(val, -got)
