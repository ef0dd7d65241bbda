"""The embedded models' training recipe (experiments/train_tiny.py): its auxiliary targets and its
recomputation of the taught heads' attention, checked against transformers' own eager attention."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import train_tiny as T  # noqa: E402

from tokencomp.benchmark import NEXT_SIZES, label_map, vocabulary  # noqa: E402
from tokencomp.tiny import tiny_llava  # noqa: E402


def _samples(model, processor, n: int):
    rng, items, scenes, seed = random.Random(0), [], [], 0
    while len(items) < n:
        scene, turns = T.conversation(seed, (336, 336), T.LLAVA_TAG, T.parse_mix(T.TRAIN_MIX), rng)
        seed += 1
        if turns:
            turns = turns[: 2 + len(items)]  # samples of different lengths
            items.append(T.encode(processor, "llava", scene.image, turns, train=True))
            scenes.append((scene, turns))
    return items, scenes


def test_taught_attention_matches_eager_attention():
    torch.manual_seed(0)
    model, processor = tiny_llava(
        "llava",
        image_size=336,
        text_layers=T.TAUGHT_LAYER + 1,
        hidden=64,
        words=vocabulary(),
        attn_implementation="eager",
    )
    items, _ = _samples(model, processor, 3)  # different lengths: right padding in the batch
    inputs, _ = T.collate(items, processor.tokenizer.pad_token_id, "cpu")
    attn = model.model.language_model.layers[T.TAUGHT_LAYER].self_attn
    seen = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.update(heads=args[0]))
    with T.TaughtAttention(model) as taught:
        out = model(**inputs, output_attentions=True)
    hook.remove()
    b = torch.tensor([0, 1, 2, 2])
    pos = torch.tensor([items[0][3][0], items[1][3][1], items[2][3][0], items[2][3][-1]])
    reference = out.attentions[T.TAUGHT_LAYER][b, :, pos][:, :2]
    torch.testing.assert_close(taught.rows(b, pos), reference, atol=1e-6, rtol=1e-5)
    # the taught heads' outputs: what eager attention hands o_proj for heads 0 and 1
    heads = seen["heads"][b, pos].view(len(b), -1, attn.head_dim)[:, :2]
    torch.testing.assert_close(taught.heads(b, pos), heads, atol=1e-5, rtol=1e-4)


def test_evidence_targets_lie_on_the_evidence():
    model, processor = tiny_llava("llava", image_size=336, text_layers=2, hidden=32, words=vocabulary())
    items, scenes = _samples(model, processor, 3)
    checked = 0
    for row, (item, (scene, turns)) in enumerate(zip(items, scenes)):
        attention, naming, _, codes = T.sample_targets(model, processor, scene, turns, item, row, "llava")
        torch.testing.assert_close(torch.from_numpy(codes[0]), T.scaled_grid())
        patches = label_map(scene).reshape(24, 14, 24, 14).transpose(0, 2, 1, 3).reshape(576, -1)
        # the taught positions: every turn's answer position, and for attribute / count / exist turns
        # the question's last colour / shape / size word (the word's own query)
        tokens = processor.tokenizer.convert_ids_to_tokens(item[0])
        words = [tokens[t.pos] for t in attention if t.pos not in item[3]]
        expected = [
            [w for w in q.split() if w in T.ATTRIBUTE_WORDS][-1]
            for q, _, qt, _ in turns
            if qt in ("attribute", "count", "exist")
        ]
        assert words == expected and len(attention) == len(turns) + len(expected)
        for _, pos, cols, target, _ in attention:
            assert item[0][pos + 1] != model.config.image_token_id and np.allclose(target.sum(1), 1)
            assert all(item[0][c] == model.config.image_token_id for c in cols[1:])
            on = np.flatnonzero(target[0][1:])  # patches the first head should attend to
            assert all((patches[p] > 0).any() for p in on)  # an object or the tag under each
            checked += 1
        # naming: each named visual token lies over an object or the tag
        _, where, words, weights = naming
        assert len(where) and np.allclose(weights.sum(1), 1)
    assert checked >= 5


def test_position_code_targets_and_capture():
    """The offset target of each ``position`` turn points the way its answer says (from the reference
    object to the one asked about), sits at that turn's answer position, and ``PositionCode`` records
    the projector's output (the visual tokens) and the taught layer's output, hooks gone on exit."""
    torch.manual_seed(0)
    # one layer past the taught one: transformers' last hidden state is after the final norm
    model, processor = tiny_llava(
        "llava", image_size=336, text_layers=T.TAUGHT_LAYER + 2, hidden=32, words=vocabulary()
    )
    rng, seen, seed = random.Random(0), 0, 0
    while seen < 6:
        scene, turns = T.conversation(seed, (336, 336), T.LLAVA_TAG, ["position"] * 2 + ["count"], rng)
        seed += 1
        if not any(t[2] == "position" for t in turns):
            continue
        item = T.encode(processor, "llava", scene.image, turns, train=True)
        _, _, offsets, codes = T.sample_targets(model, processor, scene, turns, item, 0, "llava")
        asked = [(a, pos) for (_, a, qt, _), pos in zip(turns, item[3]) if qt == "position"]
        assert [o[1] for o in offsets] == [pos for _, pos in asked]
        for (answer, _), (_, _, (drow, dcol)) in zip(asked, offsets):
            axis, ahead = {"left": (dcol, -1), "right": (dcol, 1), "above": (drow, -1), "below": (drow, 1)}[answer]
            assert np.sign(axis) == ahead and abs(axis) >= max(abs(drow), abs(dcol))
            seen += 1
    code = T.PositionCode(model)
    # the looking targets: each head's centroid lies on its own object (the two differ the answer's way)
    attention, _, _, _ = T.sample_targets(model, processor, scene, turns, item, 0, "llava")
    keep, where = T.looking_targets(attention)
    at = {t.pos: w for t, w in zip(keep, where)}
    for answer, pos in asked:
        (drow, dcol) = (at[pos][0] - at[pos][1]).tolist()
        axis, ahead = {"left": (dcol, -1), "right": (dcol, 1), "above": (drow, -1), "below": (drow, 1)}[answer]
        assert np.sign(axis) == ahead
    inputs, _ = T.collate([item], processor.tokenizer.pad_token_id, "cpu")
    with torch.no_grad(), code:
        out = model(**inputs, output_hidden_states=True)
        loss = code.loss(offsets, torch.from_numpy(codes))
    tokens = model.get_image_features(pixel_values=inputs["pixel_values"])
    tokens = tokens.pooler_output if hasattr(tokens, "pooler_output") else tokens
    torch.testing.assert_close(code.outputs["tokens"].reshape(-1, 32), torch.cat(list(tokens)).reshape(-1, 32))
    torch.testing.assert_close(code.outputs["layer"], out.hidden_states[T.TAUGHT_LAYER + 1])
    assert loss.item() > 0
    for module in (model.model.multi_modal_projector, model.model.language_model.layers[T.TAUGHT_LAYER]):
        # (transformers keeps hooks of its own there, for output_hidden_states)
        assert not [h for h in module._forward_hooks.values() if "PositionCode" in h.__qualname__]


def test_next_crop_keys_are_the_tokens_llava_next_places_there():
    """For LLaVA-NeXT scenes of every ``NEXT_SIZES`` shape, each crop key (a scene patch of the
    unpadded crop grid) is the token transformers' LlavaNext puts in the sequence for those pixels:
    its input embedding equals the projected feature of the crop patch that ``crop_keys``' codes place
    there. The taught targets lie on the crop patches over the named object (or the tag)."""
    torch.manual_seed(0)
    model, processor = tiny_llava("llava-next", image_size=336, text_layers=2, hidden=32, words=vocabulary())
    seen = {}
    hooks = [
        model.model.language_model.register_forward_pre_hook(
            lambda _m, _a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True
        ),
        model.model.multi_modal_projector.register_forward_hook(lambda _m, _a, out: seen.update(views=out)),
    ]
    seed, checked = 0, 0
    for size in NEXT_SIZES:
        while True:
            scene, turns = T.conversation(seed, size, T.NEXT_TAG, ["attribute", "read"], random.Random(seed))
            seed += 1
            if len(turns) == 2:
                break
        item = T.encode(processor, "llava-next", scene.image, turns, train=True)
        inputs, _ = T.collate([item], processor.tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            model(**inputs)
        views = seen["views"]  # the projector's output (1 + crops, 576, d): thumbnail, then the crops
        attention, _, _, codes = T.sample_targets(model, processor, scene, turns, item, 0, "llava-next")
        image_pos = np.flatnonzero(np.array(item[0]) == model.config.image_token_id)
        keys, _ = T.crop_keys(model, scene, label_map(scene), image_pos)
        assert codes.shape == (len(views), 576, 2) and len(keys.positions) == size[0] * size[1] // 14**2
        place = {
            tuple(np.round(c, 4)): (v, i)
            for v in range(1, len(views))
            for i, c in enumerate(codes[v])
            if not np.isnan(c).any()
        }
        assert len(place) == len(keys.positions)  # unpadding keeps exactly the scene's patches
        embeds = seen["embeds"][0]
        for n in range(0, len(keys.positions), 37):
            v, i = place[tuple(np.round(keys.grid[n], 4))]
            torch.testing.assert_close(embeds[keys.positions[n]], views[v][i])
            checked += 1
        # the taught targets: over the crop keys, on the named object's / the tag's pixels
        patches = label_map(scene).reshape(size[0] // 14, 14, size[1] // 14, 14).transpose(0, 2, 1, 3)
        patches = patches.reshape(len(keys.positions), -1)
        for (_, _, qt, evidence), pos in zip(turns, item[3]):
            (t,) = [t for t in attention if t.pos == pos]
            assert list(t.cols[1:]) == list(keys.positions)
            label = len(scene.objects) + 1 if qt == "read" else evidence[0][0] + 1
            assert all((patches[p] == label).any() for p in np.flatnonzero(t.target[0][1:]))
    for h in hooks:
        h.remove()
    assert checked > 100


def test_next_position_turns_can_be_taught_on_the_thumbnail():
    """``evidence="position-thumbnail"``: a LLaVA-NeXT position turn's target lies over the thumbnail's
    576 tokens, on the thumbnail patches of the object each head is taught on, and the two heads'
    looking centroids differ the way the answer says; every other turn stays on the crop keys."""
    torch.manual_seed(0)
    model, processor = tiny_llava("llava-next", image_size=336, text_layers=2, hidden=32, words=vocabulary())
    rng, seed, seen = random.Random(0), 0, 0
    while seen < 4:
        size = NEXT_SIZES[seed % len(NEXT_SIZES)]
        scene, turns = T.conversation(seed, size, T.NEXT_TAG, ["position", "attribute", "read"], rng)
        seed += 1
        if not any(t[2] == "position" for t in turns):
            continue
        item = T.encode(processor, "llava-next", scene.image, turns, train=True)
        image_pos = np.flatnonzero(np.array(item[0]) == model.config.image_token_id)
        attention, _, _, _ = T.sample_targets(
            model, processor, scene, turns, item, 0, "llava-next", "position-thumbnail"
        )
        thumb = T.thumbnail_keys(scene, label_map(scene), image_pos)
        crops, _ = T.crop_keys(model, scene, label_map(scene), image_pos)
        keep, where = T.looking_targets([t for t in attention if len(t.cols) == 577])
        at = {t.pos: w for t, w in zip(keep, where)}
        for (_, answer, qt, evidence), pos in zip(turns, item[3]):
            (t,) = [t for t in attention if t.pos == pos]
            if qt != "position":
                assert list(t.cols[1:]) == list(crops.positions)
                continue
            assert list(t.cols[1:]) == list(image_pos[:576])
            for head, (obj,) in enumerate(evidence[:2]):  # head 0: the object asked about, 1: the reference
                on = np.flatnonzero(t.target[head][1:])
                assert len(on) and all(thumb.cover[on] == obj + 1)
            (drow, dcol) = (at[pos][0] - at[pos][1]).tolist()
            axis, ahead = {"left": (dcol, -1), "right": (dcol, 1), "above": (drow, -1), "below": (drow, 1)}[answer]
            assert np.sign(axis) == ahead
            seen += 1


def test_window_forward_is_the_view_without_the_other_patches():
    """``tower_features`` on a window equals the model's own forward on the whole view when every
    patch is in the window, and a window's pixels and targets are those of its patch positions."""
    torch.manual_seed(0)
    model, _ = tiny_llava("llava", image_size=336, text_layers=1, hidden=32, words=vocabulary())
    tower = model.model.vision_tower.eval()
    pix = torch.randn(2, 3, 336, 336)
    everything = torch.arange(576).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            T.tower_features(tower, pix, everything), T.tower_features(tower, pix), atol=1e-5, rtol=1e-5
        )
    rng = random.Random(0)
    (pixels, patch, *_), *_ = T.tower_views(random.Random(1), 3)
    windows = T.object_windows(pixels, patch, rng)
    assert len(windows) == int((patch[4] > 0).sum()) > 0
    for win, targets, index in windows:
        r0, c0 = divmod(int(index[0]), 24)
        assert index.tolist() == [(r0 + i) * 24 + c0 + j for i in range(T.WINDOW) for j in range(T.WINDOW)]
        assert np.array_equal(win, pixels[r0 * 14 : (r0 + T.WINDOW) * 14, c0 * 14 : (c0 + T.WINDOW) * 14])
        assert np.array_equal(targets, patch[:, index]) and (targets[4] > 0).any()  # the centre inside


def test_conversations_do_not_repeat_a_question():
    """A multi-turn training sample never asks the same thing twice (its answer could be copied from the
    earlier turn): one ``read`` turn, one count per shape, and every turn's evidence and named attributes
    differ; the types every scene can ask are still asked."""
    rng = random.Random(0)
    for seed in range(40):
        scene, turns = T.conversation(seed, (336, 336), T.LLAVA_TAG, T.parse_mix(T.TRAIN_MIX), rng)
        if not turns:
            continue
        kinds = [t[2] for t in turns]
        assert kinds.count("read") == 1
        counted = [frozenset(q.split()) & T.ATTRIBUTE_WORDS for q, _, qt, _ in turns if qt == "count"]
        assert len(counted) == len(set(counted)) >= 1
        keys = [(qt, frozenset(q.split()) & T.ATTRIBUTE_WORDS, ev) for q, _, qt, ev in turns]
        assert len(keys) == len(set(keys))
        assert {"count", "exist", "read"} <= set(kinds)  # (attribute, position need uniquely named objects)


def test_last_layer_stage_trains_only_the_last_layer():
    """Stage 1b changes the tower's last layer and post-layernorm and nothing the projector reads:
    the feature layer's output (``hidden_states[-2]``) is bit-identical before and after."""
    torch.manual_seed(0)
    model, _ = tiny_llava("llava", image_size=336, vision_layers=2, text_layers=1, hidden=32, words=vocabulary())
    tower = model.model.vision_tower.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pix = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        feats = T.tower_features(tower, pix)
    args = SimpleNamespace(device="cpu", tower_lr=1e-2, tower_batch=4, seed=0)
    T.train_last_layer(args, model, Path(os.devnull), steps=2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    last = {k for k in before if "encoder.layers.1." in k or "post_layernorm" in k}
    assert changed and changed <= last and any("self_attn" in k for k in changed)
    with torch.no_grad():
        assert torch.equal(T.tower_features(tower, pix), feats)
    assert not any(p.requires_grad for p in tower.parameters())


def _position_r2(tower, pix: torch.Tensor) -> float:
    """R^2 of a least-squares linear read-out of every patch's (row, column) from the feature layer."""
    with torch.no_grad():
        feats = T.tower_features(tower, pix)[:, 1:].flatten(0, 1).double()
    row, col = np.indices((T.GRID, T.GRID))
    y = torch.from_numpy(np.stack([row, col], -1).reshape(-1, 2)).double().repeat(len(pix), 1)
    x = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    err = ((x @ torch.linalg.lstsq(x, y).solution - y) ** 2).sum(0)
    return (1 - err / ((y - y.mean(0)) ** 2).sum(0)).mean().item()


def test_position_stage_codes_position_and_keeps_the_last_layer():
    """Stage 1c raises the feature layer's linear code of position (R^2 of a least-squares read-out,
    measured on views it did not train on) and leaves the last layer and post-layernorm untouched."""
    torch.manual_seed(0)
    model, _ = tiny_llava("llava", image_size=336, vision_layers=2, text_layers=1, hidden=32, words=vocabulary())
    tower = model.model.vision_tower.eval()
    rng = random.Random(5)
    pix = T._pixels([v for s in range(3) for v in T.tower_views(rng, 10**8 + s)][:6])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r2 = _position_r2(tower, pix)
    args = SimpleNamespace(device="cpu", tower_lr=2e-2, tower_batch=4, seed=0)
    T.train_tower_position(args, model, Path(os.devnull), steps=25)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    last = {k for k in before if "encoder.layers.1." in k or "post_layernorm" in k}
    assert changed and not changed & last and any("position_embedding" in k for k in changed)
    assert _position_r2(tower, pix) > r2 + 0.1, r2
    assert not any(p.requires_grad for p in tower.parameters())
