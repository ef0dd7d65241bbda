"""The embedded default models: shipped checkpoints load by name and answer the benchmark.

Accuracy bars (issue: embedded default) on small fixed slices of the test split; the full-split
table is ``experiments/results/embedded/`` (made by ``tokencomp compare experiments/embedded.toml``).
"""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import tokencomp as tc
from tokencomp.benchmark import PRESETS, QUESTION_TYPES, generate_split, vocabulary
from tokencomp.data import JsonlDataset
from tokencomp.model import EMBEDDED_DIR

CHECKPOINTS = {"tiny-llava": LlavaForConditionalGeneration, "tiny-llava-next": LlavaNextForConditionalGeneration}


def test_checkpoints_are_small_safetensors():
    total = 0
    for name in CHECKPOINTS:
        files = list((EMBEDDED_DIR / name).iterdir())
        assert any(f.suffix == ".safetensors" for f in files) and not any(f.suffix == ".bin" for f in files)
        total += sum(f.stat().st_size for f in files)
    assert total < 40 * 2**20


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_load_by_name_is_the_transformers_checkpoint(name):
    model = tc.load_model(name)
    cls = CHECKPOINTS[name]
    assert type(model.hf) is cls and model.family == ("llava" if name == "tiny-llava" else "llava-next")
    hf = cls.from_pretrained(EMBEDDED_DIR / name)  # plain transformers loads it the same
    ref = dict(hf.named_parameters())
    assert all((p == ref[k]).all() for k, p in model.hf.named_parameters())
    cfg = model.hf.config
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.text_config.num_hidden_layers >= 8 and model.grid == (24, 24)
    if name == "tiny-llava-next":
        assert max(model.views_per_image(s) for s in PRESETS["tc-scenes-next"]["size"]) == 5  # thumbnail + 4 crops
    proc = AutoProcessor.from_pretrained(EMBEDDED_DIR / name)
    assert type(proc) is type(model.processor)


def test_tokenizer_round_trip():
    tok = tc.load_model("tiny-llava").tokenizer
    text = "USER: <image>\nwhat color is the small square ? ASSISTANT: red"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).split() == text.replace("<image>", "").replace(":", " :").split()
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for w in vocabulary())


# Floors of the shipped checkpoints on fixed test slices: the bars, 85% for tiny-llava and 80%
# for tiny-llava-next. With the checkpoints of 2026-11-24 (eighth session) the slices measured 0.92
# (100 samples) and 0.90 (40), the 300-question test splits 0.92 and 0.853: see
# experiments/results/embedded/.
FLOORS = {"tiny-llava": 0.85, "tiny-llava-next": 0.80}


@pytest.mark.parametrize(
    "name, preset, n", [("tiny-llava", "tc-scenes", 100), ("tiny-llava-next", "tc-scenes-next", 40)]
)
def test_answers_depend_on_the_visual_tokens(tmp_path, name, preset, n):
    data = JsonlDataset(generate_split(tmp_path, "test", n, **PRESETS[preset]))
    model = tc.load_model(name)
    full = tc.evaluate(model, data, batch_size=8)
    assert set(full.by_type) == set(QUESTION_TYPES)
    assert full.accuracy >= FLOORS[name], full.by_type
    blind = tc.evaluate(model, data, method=tc.method("random", budget=1), batch_size=8)  # one token per view left
    assert full.accuracy > blind.accuracy, (full.by_type, blind.by_type)
    # reading the one-patch tag needs that patch (and, for NeXT, a crop): it is what the models learnt best
    assert full.by_type["read"] >= 0.8 and full.by_type["read"] >= blind.by_type["read"] + 0.5
