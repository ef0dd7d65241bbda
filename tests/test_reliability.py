"""Reliability: every row checked before work, strict experiment files, run files that are
replaced whole and read with a clear message on damage, truncated cells recomputed, names that stay
inside the run directory, a partial report said to be partial."""

from __future__ import annotations

import fcntl
import json
import warnings

import numpy as np
import pytest

import tokencomp as tc
from tokencomp import runner
from tokencomp.benchmark import generate_split
from tokencomp.cli import main
from tokencomp.data import JsonlDataset, read_rows
from tokencomp.metrics import answer_score
from tokencomp.runner import load_experiment, run_experiment

ONE = """
[experiment]
name = "r"
batch_size = 2
max_new_tokens = 2
latency_repeats = 1

[[model]]
name = "m"
source = "tiny-random:llava"

[[dataset]]
name = "d"
{dataset}

[[method]]
name = "identity"
"""


def _experiment(tmp_path, dataset: str, extra: str = "") -> tuple:
    path = tmp_path / "exp.toml"
    path.write_text(ONE.format(dataset=dataset) + extra)
    return path


@pytest.fixture
def data(tmp_path):
    """A generated split of 8 samples (its JSONL file), to be damaged by each test."""
    return generate_split(tmp_path / "data", "val", 8, size=(84, 84))


def _rewrite_rows(path, edit):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_bad_row_is_listed_before_any_model_loads(tmp_path, data, monkeypatch):
    folder = data.parent
    (folder / "dir.png").mkdir()
    (folder / "text.png").write_text("not an image")
    good = folder / json.loads(data.read_text().splitlines()[0])["image"]
    (folder / "cut.png").write_bytes(good.read_bytes()[:200])  # a truncated PNG

    def damage(rows):
        rows[1]["image"] = "dir.png"
        rows[2]["image"] = "text.png"
        rows[3]["image"] = "cut.png"
        rows[4]["question"] = "<image> " + rows[4]["question"]
        rows[5]["answers"] = []
        rows[6]["answers"] = [1, None]
        rows[7]["id"] = rows[0]["id"]

    _rewrite_rows(data, damage)
    loads = []
    monkeypatch.setattr(runner, "_load_model", lambda *a: loads.append(a))
    exp = load_experiment(_experiment(tmp_path, f'path = "{data}"'), tmp_path / "run")
    with pytest.raises(tc.TokencompError) as e:
        run_experiment(exp, progress=False)
    text = str(e.value)
    assert "7 problem(s)" in text
    for line, what in [
        (2, "is not a file"),
        (3, "does not decode"),
        (4, "does not decode"),
        (5, "<image> placeholder"),
        (6, "answers must be a non-empty list"),
        (7, "answers must be a non-empty list"),
        (8, "repeats line 1"),
    ]:
        assert f"line {line} (id " in text and what in text.split(f"line {line} (id ")[1].split("\n")[0]
    assert loads == []  # no model was loaded, let alone run


def test_empty_and_non_utf8_datasets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(tc.TokencompError, match="holds no sample"):
        JsonlDataset(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"image": "x.png", "question": "caf\xe9", "answers": ["a"]}\n')
    with pytest.raises(tc.TokencompError, match="is not UTF-8"):
        JsonlDataset(latin)


def test_lazy_validation_skips_and_records_a_bad_image(tmp_path, data):
    folder = data.parent
    good = folder / json.loads(data.read_text().splitlines()[0])["image"]
    (folder / "cut.png").write_bytes(good.read_bytes()[:200])
    _rewrite_rows(data, lambda rows: rows[6].update(image="cut.png"))
    with pytest.raises(tc.TokencompError, match="does not decode"):
        JsonlDataset(data)
    exp = load_experiment(_experiment(tmp_path, f'path = "{data}"\nvalidate = "lazy"'), tmp_path / "run")
    run_experiment(exp, progress=False, side_by_side=False)
    (row,) = read_rows(tmp_path / "run" / "results.jsonl")
    assert row["samples"] == 7 and row["skipped"] == 1
    preds = read_rows(tmp_path / "run" / "predictions" / f"{row['cell']}.jsonl")
    assert row["scoring"] == "vqa"  # a file's answers are scored as lmms-eval scores them
    assert all(p["score"] == answer_score(p["prediction"], p["answers"], "vqa") for p in preds if "score" in p)
    skipped = [p for p in preds if "skipped" in p]
    assert len(preds) == 8 and len(skipped) == 1 and "did not load" in skipped[0]["skipped"]
    # tc.evaluate does as compare: the sample is skipped and recorded, the others scored
    from tokencomp.runner import _load_model

    model = _load_model("tiny-random:llava", {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"})
    out = tc.evaluate(model, JsonlDataset(data, validate="lazy"), batch_size=4, max_new_tokens=2)
    assert [p["id"] for p in out.predictions] == [p["id"] for p in sorted(preds, key=lambda p: p["id"])]
    assert [p.get("skipped", "")[:20] for p in out.predictions if "skipped" in p] == [skipped[0]["skipped"][:20]]
    assert out.accuracy == pytest.approx(row["accuracy"])


@pytest.mark.parametrize(
    "edit,message",
    [
        (("batch_size = 2", "batch_size = true"), r"batch_size=True must be an integer >= 1"),
        (("max_new_tokens = 2", "max_new_tokens = true"), r"max_new_tokens=True must be an integer >= 1"),
        (("n = 4", "n = true"), r"n=True must be an integer >= 1"),
        (("[experiment]", "[experiments]"), r"unknown top-level 'experiments' \(did you mean 'experiment'\?\)"),
        (("[experiment]", "[[experiment]]"), r"write \[experiment\] \(one table\)"),
        (("[[method]]", "[method]"), r"write \[\[method\]\] \(one table per method"),
        (("batch_size", "batchsize"), r"'batchsize' \(did you mean 'batch_size'\?\)"),
        (("n = 4", 'n = 4\npath = "x.jsonl"'), r"gives both path and generator"),
        (("n = 4", "n = 4\nlimit = 3"), r"\['limit'\] apply to a dataset file"),
        (('name = "identity"', 'name = "random"\nbudget = []'), r"budget = \[\] is an empty grid axis"),
        (('name = "d"', 'name = "../../x"'), r"use a plain name"),
        (('name = "r"', 'name = "a/b"'), r"use a plain name"),
        (("n = 4", "n = 4\nsize = [8, 8]"), r"size must be \[height, width\] in pixels, each at least 32"),
    ],
)
def test_strict_experiment_files(tmp_path, edit, message):
    text = ONE.format(dataset='generator = "tc-scenes"\nsplit = "val"\nn = 4').replace(*edit, 1)
    path = tmp_path / "exp.toml"
    path.write_text(text)
    with pytest.raises(tc.TokencompError, match=message):
        load_experiment(path, tmp_path / "run")


def test_non_utf8_experiment_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_bytes(b'[experiment]\nname = "caf\xe9"\n')
    with pytest.raises(tc.TokencompError, match="is not UTF-8"):
        load_experiment(path)


def _finished_run(tmp_path, n: int = 4):
    exp_file = _experiment(tmp_path, f'generator = "tc-scenes"\nsplit = "val"\nn = {n}')
    out = tmp_path / "run"
    run_experiment(load_experiment(exp_file, out), progress=False, side_by_side=False)
    return exp_file, out


@pytest.mark.parametrize(
    "name,damage,message",
    [
        (
            "experiment.toml",
            "[experiment\nname = ",
            r"experiment.toml \(the file the run was started with\) is damaged",
        ),
        ("models.json", '{"m": {"sou', r"models.json \(the load settings .*\) is damaged"),
        (
            "datasets.json",
            "\xff\xfe",
            r"datasets.json \(each dataset file's sha256\) is not UTF-8",
        ),
    ],
)
def test_damaged_run_files_are_named(tmp_path, name, damage, message):
    exp_file, out = _finished_run(tmp_path, 2)
    text = exp_file.read_text() + '\n[[method]]\nname = "fastv"\n'  # a changed file: the saved one is read
    exp_file.write_text(text)
    (out / name).write_text(damage) if name != "datasets.json" else (out / name).write_bytes(damage.encode("latin-1"))
    with pytest.raises(tc.TokencompError, match=message):
        run_experiment(load_experiment(exp_file, out), progress=False, side_by_side=False)


def test_a_truncated_finished_cell_is_recomputed(tmp_path, capsys):
    exp_file, out = _finished_run(tmp_path, 5)
    (row,) = read_rows(out / "results.jsonl")
    pred = out / "predictions" / f"{row['cell']}.jsonl"
    full = pred.read_text().splitlines()
    pred.write_text("\n".join(full[:3]) + "\n")  # 3 of 5 rows left
    assert main(["report", str(out)]) == 0
    assert "**Cut predictions**: identity on m / d (3 rows for 5 samples)" in (out / "report.md").read_text()
    run_experiment(load_experiment(exp_file, out), progress=False, side_by_side=False)
    assert "has 3 prediction rows for 5 samples: recomputing it" in capsys.readouterr().err
    (again,) = read_rows(out / "results.jsonl")
    assert again["samples"] == 5 and again["accuracy"] == row["accuracy"]
    rows = read_rows(pred)
    assert sorted(r["id"] for r in rows) == sorted(json.loads(x)["id"] for x in full)
    assert [r["prediction"] for r in sorted(rows, key=lambda r: r["id"])] == [
        json.loads(x)["prediction"] for x in sorted(full, key=lambda x: json.loads(x)["id"])
    ]


def test_report_on_a_working_run_says_partial(tmp_path, capsys):
    _, out = _finished_run(tmp_path, 2)
    with open(out / ".lock", "a") as held:  # as a compare working there holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["report", str(out)]) == 0
        fcntl.flock(held, fcntl.LOCK_UN)
    assert "this report is partial" in capsys.readouterr().err
    assert "**Partial report**" in (out / "report.md").read_text()
    assert main(["report", "--wait", str(out)]) == 0  # nothing holds it now
    assert "Partial report" not in (out / "report.md").read_text()


def test_api_images_and_long_prompts(model):
    prompt = "USER : <image> what ? ASSISTANT :"
    with pytest.raises(tc.InputMismatchError, match=r"shape \(30, 40\) \(a grey image"):
        tc.prepare(model, [np.zeros((30, 40))], [prompt])
    with pytest.raises(tc.InputMismatchError, match="is not a file"):
        tc.prepare(model, ["/"], [prompt])
    batch = tc.prepare(model, [np.zeros((30, 40, 3), dtype=np.uint8)], [prompt])
    limit = model.max_positions
    try:
        model.max_positions = 10
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tc.Engine(model).validate(batch)
        assert any("longer than the decoder's max_position_embeddings=10" in str(w.message) for w in seen)
    finally:
        model.max_positions = limit


KILLED = ONE.format(dataset='generator = "tc-scenes"\nsplit = "val"\nn = 6') + (
    '\n[[method]]\nname = "fastv"\nratio = [0.5, 0.75]\n'
)
VOLATILE = {"prefill_ms", "prefill_spread_ms", "decode_ms_per_token", "peak_memory_mb", "finished", "latency"}


def _compare(exp_file, out, kill_after: float | None = None) -> int | None:
    """``tokencomp compare`` in its own process; SIGKILLed after ``kill_after`` seconds if given.
    Returns its exit status, or None when it was killed."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokencomp.cli", "compare", str(exp_file), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.mark.slow
def test_kill_at_any_instant_loses_and_repeats_nothing(tmp_path):
    """SIGKILL at 24 random moments (start-up, cells, side-by-side timing, the report), each time
    started again until the run finishes, in as many fresh run directories as that takes; every
    finished run equals an uninterrupted one: every row once, the same predictions and results
    (timings aside), a complete report."""
    import random
    import time

    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(KILLED)
    start = time.perf_counter()
    assert _compare(exp_file, tmp_path / "clean") == 0
    duration = time.perf_counter() - start

    def results(run):
        return {r["cell"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in read_rows(run / "results.jsonl")}

    clean = results(tmp_path / "clean")

    def check(out):
        assert results(out) == clean and len(read_rows(out / "results.jsonl")) == len(clean)
        for cell in clean:
            a = sorted(read_rows(tmp_path / "clean" / "predictions" / f"{cell}.jsonl"), key=lambda r: r["id"])
            b = sorted(read_rows(out / "predictions" / f"{cell}.jsonl"), key=lambda r: r["id"])
            assert len({r["id"] for r in b}) == len(b)  # nothing twice
            assert a == b  # nothing lost, nothing changed
        assert (out / "report.md").is_file() and "Partial" not in (out / "report.md").read_text()

    rng = random.Random(0)
    kills, runs = 0, 0
    out = tmp_path / "killed0"
    for _ in range(100):  # a bound: each attempt either is killed or finishes a run
        status = _compare(exp_file, out, kill_after=rng.uniform(0.02, 1.0) * duration if kills < 24 else None)
        if status is None:
            kills += 1
            continue
        assert status == 0
        check(out)
        runs += 1
        if kills >= 24:
            break
        out = tmp_path / f"killed{runs}"
    assert kills >= 24 and runs >= 2


def test_lazy_validation_with_a_bad_image_in_the_first_batch(tmp_path, data):
    folder = data.parent
    good = folder / json.loads(data.read_text().splitlines()[0])["image"]
    (folder / "cut.png").write_bytes(good.read_bytes()[:200])
    _rewrite_rows(data, lambda rows: rows[0].update(image="cut.png"))  # the first batch, and the timed one
    exp = load_experiment(_experiment(tmp_path, f'path = "{data}"\nvalidate = "lazy"'), tmp_path / "run")
    run_experiment(exp, progress=False, side_by_side=False)
    (row,) = read_rows(tmp_path / "run" / "results.jsonl")
    assert row["samples"] == 7 and row["skipped"] == 1


def test_a_line_written_twice_in_a_finished_cell_is_recomputed(tmp_path, capsys):
    exp_file, out = _finished_run(tmp_path, 4)
    (row,) = read_rows(out / "results.jsonl")
    pred = out / "predictions" / f"{row['cell']}.jsonl"
    lines = pred.read_text().splitlines()
    pred.write_text("\n".join(lines + lines[1:2]) + "\n")
    run_experiment(load_experiment(exp_file, out), progress=False, side_by_side=False)
    assert "has 5 prediction rows for 4 samples: recomputing it" in capsys.readouterr().err
    (again,) = read_rows(out / "results.jsonl")
    assert again["samples"] == 4 and again["accuracy"] == row["accuracy"]
    assert sorted(pred.read_text().splitlines()) == sorted(lines)


@pytest.mark.parametrize(
    "method,message",
    [
        ('name = "visionzip"\nbudget = "64"', r"method 'visionzip': budget='64' \(str\) is not an integer"),
        ('name = "visionzip"\nbudget = true', r"budget=True \(bool\) is not an integer"),
        ('name = "fastv"\nk = 2.0', r"k=2.0 \(float\) is not an integer"),
        ('label = "x"\ncompose = [{name = "pool", budget = "64"}]', r"budget='64' \(str\) is not an integer"),
        ('name = "fastv"\nlabel = "a\\u0000b"', r"use a plain name"),
        (f'name = "fastv"\nlabel = "{"x" * 300}"', r"at most 200 bytes"),
        ('name = "fastv"\nmodels = []', r"models = \[\] names nothing"),
    ],
)
def test_method_values_checked_before_any_model_loads(tmp_path, method, message):
    text = ONE.format(dataset='generator = "tc-scenes"\nsplit = "val"\nn = 4') + f"\n[[method]]\n{method}\n"
    path = tmp_path / "exp.toml"
    path.write_text(text)
    with pytest.raises(tc.TokencompError, match=message):
        load_experiment(path, tmp_path / "run")


def test_run_rows_of_the_wrong_shape_and_a_bom(tmp_path):
    exp_file, out = _finished_run(tmp_path, 2)
    results = out / "results.jsonl"
    good = results.read_text()
    results.write_text(good + "{}\n" + good)
    with pytest.raises(
        tc.TokencompError, match=r"results.jsonl:2 is not a row of a run \(a JSON object with its 'cell'\)"
    ):
        run_experiment(load_experiment(exp_file, out), progress=False, side_by_side=False)
    results.write_text(good)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + exp_file.read_bytes())
    assert load_experiment(bom, out).name == "r"


def test_a_damaged_checkpoint_is_named(tmp_path):
    from tokencomp.tiny import tiny_llava

    hf, proc = tiny_llava("llava")
    hf.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(tc.TokencompError, match=r"the model did not load"):
        tc.load_model(tmp_path)


def test_a_method_labelled_identity_is_not_the_reference(tmp_path):
    """Paired differences and speed-ups are taken against the unmodified model (the identity
    method), not against whatever a label calls "identity"."""
    text = ONE.replace('name = "identity"', 'name = "fastv"\nlabel = "identity"').format(
        dataset='generator = "tc-scenes"\nsplit = "val"\nn = 2'
    )
    path = tmp_path / "exp.toml"
    path.write_text(text)
    run_experiment(load_experiment(path, tmp_path / "run"), progress=False, side_by_side=False)
    (row,) = read_rows(tmp_path / "run" / "results.jsonl")
    assert row["method"] == "identity" and "delta_vs_identity" not in row


def test_a_truncated_image_is_refused_whatever_pil_was_told(tmp_path, data, monkeypatch):
    """lmms-eval's task module turns PIL's LOAD_TRUNCATED_IMAGES on for the whole process (a test
    that imported it made the bad-rows test above pass a cut PNG); validation, loading and
    `tc.prepare` still refuse a truncated file, and leave the flag as they found it."""
    from PIL import ImageFile

    from tokencomp.data import check_image, load_rgb

    good = data.parent / json.loads(data.read_text().splitlines()[0])["image"]
    cut = data.parent / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "does not decode" in check_image(cut)
    with pytest.raises(OSError):
        load_rgb(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert load_rgb(good).mode == "RGB"
