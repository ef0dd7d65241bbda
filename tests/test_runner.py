"""The compare runner: validation before work, resume without loss or duplicates, and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import tokencomp as tc
from tokencomp import runner
from tokencomp.cli import main
from tokencomp.provenance import file_digests
from tokencomp.report import PLOTS, make_report, pareto_front
from tokencomp.runner import load_experiment, remeasure_latency, run_experiment

EXPERIMENT = """
[experiment]
name = "t"
batch_size = 2
max_new_tokens = 2
latency_repeats = 1

[[model]]
name = "m"
source = "tiny-random:llava"

[[dataset]]
name = "scenes"
generator = "tc-scenes"
split = "val"
n = 5

[[method]]
name = "identity"

[[method]]
name = "_test-crashy"
budget = [20, 10]

[[method]]
name = "fastv"
ratio = 0.5
"""

VOLATILE = {
    "prefill_ms",
    "prefill_spread_ms",
    "decode_ms_per_token",
    "peak_memory_mb",
    "finished",
    "latency",
}  # timings


@tc.register("_test-crashy")
class Crashy(tc.VisionStrategy):
    """Random selection that raises once after a set number of calls (a simulated crash)."""

    budget: int = 10
    crash_after = None  # class-level switch set by the test
    calls = 0

    def select(self, view):
        cls = type(self)
        cls.calls += 1
        if cls.crash_after is not None and cls.calls > cls.crash_after:
            cls.crash_after = None
            raise KeyboardInterrupt("simulated interruption")
        return tc.method("random", budget=self.budget).select(view)


def _write(tmp_path, text=EXPERIMENT, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _stable(rows):
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows), key=lambda r: r["cell"])


def _readme_lists_the_columns(run: Path) -> None:
    """The README's Formats section names every column of results.jsonl and of a predictions file."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("import pandas as pd") :].split("```")[0]
    listed = set(
        re.findall(r"[a-z_0-9]+", " ".join(line.split("#", 1)[1] for line in block.splitlines() if "#" in line))
    )
    (row,) = _rows(run / "results.jsonl")[:1]
    pred = _rows(next((run / "predictions").glob("*.jsonl")))[0]
    assert not set(row) - listed, f"results columns missing from the README: {sorted(set(row) - listed)}"
    assert not set(pred) - listed, f"prediction columns missing from the README: {sorted(set(pred) - listed)}"


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    exp_file = _write(tmp_path)
    clean = run_experiment(load_experiment(exp_file, tmp_path / "clean"), progress=False)
    _readme_lists_the_columns(clean.parent)
    Crashy.crash_after = 2  # inside the first crashy cell, after its first batch (2 calls per batch... of views)
    Crashy.calls = 0
    broken_dir = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(exp_file, broken_dir), progress=False)
    partial = _rows(broken_dir / "results.jsonl")
    assert 0 < len(partial) < 4  # some cells finished, not all
    preds = list((broken_dir / "predictions").glob("_test-crashy-budget20-*.jsonl"))
    assert preds and 0 < len(_rows(preds[0])) < 5  # a cell stopped mid-way kept its finished samples
    with preds[0].open("a") as f:
        f.write('{"id": "torn')  # a crash in the middle of writing a line
    resumed = run_experiment(load_experiment(exp_file, broken_dir), progress=False)
    rows = _rows(resumed)
    assert len(rows) == len({r["cell"] for r in rows}) == 4  # no duplicate rows
    assert _stable(rows) == _stable(_rows(clean))
    for p in (broken_dir / "predictions").glob("*.jsonl"):
        ids = [r["id"] for r in _rows(p)]
        assert len(ids) == len(set(ids)) == 5  # every sample once


def test_cli_interruption_says_how_to_resume(tmp_path, capsys):
    """Ctrl-C in `tokencomp compare` ends with exit code 130 and a line naming the run folder and
    how to resume (no traceback); the re-run says how many cells were already done."""
    exp_file = _write(tmp_path)
    out = tmp_path / "run"
    Crashy.crash_after, Crashy.calls = 2, 0
    assert main(["compare", str(exp_file), "--out", str(out), "--no-report"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted. Finished cells and their predictions are kept in {out}" in err and "again to resume" in err
    done = len(_rows(out / "results.jsonl"))
    assert main(["compare", str(exp_file), "--out", str(out), "--no-report"]) == 0
    assert f"resuming {out}: {done} of 4 cells already done" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda t: t.replace('name = "fastv"', 'name = "fastvv"'), "unknown method 'fastvv'"),
        (lambda t: t.replace("ratio = 0.5", "ratio = 1.5"), r"ratio=1.5 is outside the allowed range"),
        (
            lambda t: t + '\n[[method]]\nname = "random"\nbudget = [64, 0]\n',
            r"budget \(tokens kept per view\)=0 is outside the allowed range \[1, 576\]",
        ),
        (
            lambda t: t.replace('generator = "tc-scenes"\nsplit = "val"\nn = 5', 'path = "missing.jsonl"'),
            "missing.jsonl' does not exist",
        ),
        (lambda t: t.replace("batch_size = 2", "batch_size = 0"), "batch_size=0 must be an integer >= 1"),
        (lambda t: t.replace("[experiment]", "[experiment]\nbatchsize = 3"), "unknown key"),
        (lambda t: t + '\n[[method]]\nname = "globalcom2"\n', "GlobalCom² allocates tokens over LLaVA-NeXT crops"),
        (
            lambda t: t.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\ndatasets = ["gqa"]'),
            "unknown datasets",
        ),
        (lambda t: t.replace('split = "val"', 'split = "dev"'), "split must be one of"),
        (lambda t: t.replace('split = "val"', 'split = "val"\nscoring = "lmms"'), "scoring='lmms' must be one of"),
        (lambda t: t.replace('generator = "tc-scenes"', 'generator = "shapes"'), "generator = one of"),
        (lambda t: t.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\ndtype = "fp16"'), "dtype"),
        (lambda t: t.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\ndevice = "gpu"'), "device"),
        (lambda t: t.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\nsourse = "x"'), "unknown"),
        (
            lambda t: t.replace(
                'source = "tiny-random:llava"', 'source = "tiny-random:llava"\nattn_implementation = "x"'
            ),
            "attn_implementation",
        ),
    ],
)
def test_invalid_experiment_fails_before_any_cell(tmp_path, edit, pattern):
    exp_file = _write(tmp_path, edit(EXPERIMENT))
    with pytest.raises((tc.TokencompError, tc.BudgetError), match=pattern):
        run_experiment(load_experiment(exp_file, tmp_path / "out"), progress=False)
    results = tmp_path / "out" / "results.jsonl"
    assert not results.exists() or results.read_text() == ""


def test_model_datasets_restrict_the_grid(tmp_path):
    text = EXPERIMENT.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\ndatasets = ["scenes"]')
    text += '\n[[model]]\nname = "n"\nsource = "tiny-random:llava-next"\ndatasets = ["other"]\n'
    text += '\n[[dataset]]\nname = "other"\ngenerator = "tc-scenes-next"\nn = 2\n'
    exp = load_experiment(_write(tmp_path, text), tmp_path / "out")
    pairs = {(c.model, c.dataset) for c in exp.cells}
    assert pairs == {("m", "scenes"), ("n", "other")}
    assert len(exp.cells) == 8  # 4 method cells per model, each on its one dataset


def test_report_shows_memory_only_where_comparable_and_flags_noisy_latency(tmp_path):
    """A CPU run's peak memory (the process's resident set) is left out of the table, a CUDA run's
    allocator peak shown; the KV cache always; cells whose prefill times spread over half their
    median are named in a warning; every column of the table is defined."""
    from tokencomp.report import COLUMNS, make_report

    exp_file = _write(tmp_path)
    out = tmp_path / "run"
    assert main(["compare", str(exp_file), "--out", str(out), "--no-report"]) == 0
    rows = _rows(out / "results.jsonl")

    def table_header(md: str) -> str:
        return next(line for line in md.splitlines() if line.startswith("| method"))

    for r in rows:
        r["prefill_spread_ms"] = 0.1 * r["prefill_ms"]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = make_report(out).read_text()
    head = table_header(md)
    assert "peak_memory_mb" not in head and "kv_cache_mb" in head and "Noisy latency" not in md
    defined = " ".join(COLUMNS)
    for col in (c.strip() for c in head.strip("|").split("|")):
        if col not in ("method", "samples", "accuracy", "accuracy 95% CI") and not col.startswith("Δ"):
            assert f"`{col}`" in defined, col

    rows[0]["prefill_spread_ms"] = 2 * rows[0]["prefill_ms"]
    for r in rows:
        r["device"] = "cuda:0"
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = make_report(out).read_text()
    assert "peak_memory_mb" in table_header(md)
    assert f"**Noisy latency:** in 1 of {len(rows)} cells" in md and rows[0]["method"] in md.split("Noisy")[1][:300]
    assert "Noisy latency" in (out / "report.html").read_text()


def test_report_has_every_plot_and_table(tmp_path, capsys):
    exp_file = _write(tmp_path)
    out = tmp_path / "run"
    assert main(["compare", str(exp_file), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert md.startswith("# tokencomp report: t\n")  # the experiment's name, not the folder's ("run")
    for plot in PLOTS:
        files = list((out / "plots").glob(f"{plot}_*.png"))
        assert files, plot
        assert f"plots/{files[0].name}" in md
        assert f"alt='{plot}'" in page and "data:image/png;base64," in page
    for label in ("identity", "_test-crashy-budget20", "fastv"):
        assert label in md
    rows = _rows(out / "results.jsonl")
    ident = next(r for r in rows if r["method"] == "identity")
    fast = next(r for r in rows if r["method"].startswith("fastv"))
    assert fast["prefill_tflops"] < ident["prefill_tflops"]
    assert ident["visual_tokens_llm"] == ident["visual_tokens_mean"] == 576
    L = len(fast["tokens_per_layer"])  # FastV k=2, ratio 0.5: all 576 in layers 0-1, 288 after
    assert fast["visual_tokens_mean"] == pytest.approx((2 * 576 + (L - 2) * 288) / L)
    assert "visual_tokens_mean" in md
    for r in rows:  # the cost split is complete: vision, projector, LLM prefill, the method's own work
        parts = r["vision_tflops"] + r["projector_tflops"] + r["prefill_tflops"] + r["overhead_tflops"]
        assert r["projector_tflops"] > 0 and parts == pytest.approx(r["total_prefill_tflops"], rel=1e-9)
    # accuracy intervals; the paired difference to identity on the same questions
    assert ident["delta_vs_identity"] == [0.0, 0.0, 0.0]
    assert fast["delta_vs_identity"][0] == pytest.approx(fast["accuracy"] - ident["accuracy"])
    for r in rows:
        low, high = r["accuracy_ci95"]
        assert low <= r["accuracy"] <= high
    assert "accuracy 95% CI" in md and "Δ vs identity [95% CI]" in md
    # compare ends with the side-by-side timing of every cell, and the report says so
    assert all(r["latency"] == {**rows[0]["latency"], "taken": "interleaved", "cells": len(rows)} for r in rows)
    assert "timed side by side" in md
    assert main(["report", str(out)]) == 0
    # a copied run (results, plots, no predictions: what experiments/results keeps) still reports,
    # keeping the overlays it has and leaving out those it cannot draw
    import shutil

    shutil.rmtree(out / "predictions")
    assert main(["report", str(out)]) == 0
    assert "plots/overlays_" in (out / "report.md").read_text()
    for f in (out / "plots").glob("overlays_*.png"):
        f.unlink()
    assert main(["report", str(out)]) == 0
    assert "plots/overlays_" not in (out / "report.md").read_text()


def test_pareto_front():
    x = [1.0, 2.0, 3.0, 2.5, 0.5]
    y = [0.5, 0.7, 0.9, 0.6, 0.2]
    assert pareto_front(__import__("numpy").array(x), __import__("numpy").array(y)).tolist() == [4, 0, 1, 2]


def test_newline_less_last_row_is_not_lost(tmp_path):
    exp_file = _write(tmp_path)
    out = tmp_path / "run"
    Crashy.crash_after, Crashy.calls = 1, 0
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(exp_file, out), progress=False)
    pred = next((out / "predictions").glob("_test-crashy-budget20-*.jsonl"))
    text = pred.read_text()
    pred.write_text(text.rstrip("\n"))  # the crash hit between a row and its newline
    rows = _rows(run_experiment(load_experiment(exp_file, out), progress=False))
    assert len(rows) == 4 and all(r["samples"] == 5 for r in rows)


def test_failed_validation_does_not_lock_the_run_dir(tmp_path):
    """A file that fails validation leaves nothing a fixed file would reuse: not the run dir's lock,
    not its generated data (here the fixed file also asks for more samples), and no stub run dir
    where it made one."""
    bad = _write(tmp_path, EXPERIMENT.replace("ratio = 0.5", "ratio = 1.5").replace("n = 5", "n = 3"), "bad.toml")
    with pytest.raises(tc.BudgetError):
        run_experiment(load_experiment(bad, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()  # no stub run dir (generated data, models.json) is left
    (tmp_path / "out").mkdir()  # a dir the run did not create is left as it was
    (tmp_path / "out" / "mine.txt").write_text("x")
    with pytest.raises(tc.BudgetError):
        run_experiment(load_experiment(bad, tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "mine.txt").read_text() == "x"
    good = _write(tmp_path, EXPERIMENT, "good.toml")
    rows = _rows(run_experiment(load_experiment(good, tmp_path / "out"), progress=False))
    assert len(rows) == 4 and all(r["samples"] == 5 for r in rows)


def test_next_budgets_checked_against_every_image_size(tmp_path):
    """LLaVA-NeXT prompts differ in image tokens: a budget that only the first batch allows fails
    before any cell runs, not after some have finished."""
    from PIL import Image

    from tokencomp.runner import _dataset

    text = EXPERIMENT.replace("tiny-random:llava", "tiny-random:llava-next").replace('"tc-scenes"', '"tc-scenes-next"')
    text = text.replace("n = 5", "n = 8")
    exp = load_experiment(_write(tmp_path, text), tmp_path / "out")
    data = _dataset(exp.datasets["scenes"], tmp_path / "out")
    model = tc.Model(*__import__("tokencomp.tiny", fromlist=["x"]).tiny_llava("llava-next", image_size=336))
    counts = []
    for x in data.samples:
        with Image.open(x.image) as im:
            counts.append(model.image_token_count((im.size[1], im.size[0])))
    first, fewest = min(counts[:2]), min(counts)
    assert fewest < first, "the generated split should hold a smaller image after the first batch"
    text = text.replace("ratio = 0.5", f"budget = {fewest + 1}")
    with pytest.raises(tc.BudgetError, match=rf"budget \(image tokens kept\)={fewest + 1} is outside"):
        run_experiment(load_experiment(_write(tmp_path, text), tmp_path / "out2"), progress=False)
    assert not (tmp_path / "out2" / "results.jsonl").exists()


def test_cells_sharing_a_label_are_rejected(tmp_path):
    text = EXPERIMENT + '\n[[method]]\nname = "fastv"\nratio = 0.25\n'  # a second unlabelled "fastv"
    with pytest.raises(tc.TokencompError, match="both labelled 'fastv'.*distinct label"):
        load_experiment(_write(tmp_path, text), tmp_path / "out")


def test_report_skips_a_torn_last_line(tmp_path):
    out = tmp_path / "run"
    run_experiment(load_experiment(_write(tmp_path), out), progress=False)
    with (out / "results.jsonl").open("a") as f:
        f.write('{"cell": "x", "mod')
    assert main(["report", str(out)]) == 0
    assert "fastv" in (out / "report.md").read_text()


def test_duplicate_sample_ids_rejected(tmp_path):
    from tokencomp.benchmark import generate_split
    from tokencomp.data import JsonlDataset

    path = generate_split(tmp_path / "d", "val", 3)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(tc.TokencompError, match=r"id '.*' repeats line 1"):
        JsonlDataset(path)


def test_labelled_grid_keeps_cells_apart(tmp_path):
    text = EXPERIMENT + '\n[[method]]\nname = "random"\nlabel = "rnd"\nbudget = [20, 10]\n'
    exp = load_experiment(_write(tmp_path, text), tmp_path / "out")
    labels = [c.label for c in exp.cells]
    assert "rnd-budget20" in labels and "rnd-budget10" in labels and len(set(labels)) == len(labels)


def test_resume_refuses_a_changed_dataset_file(tmp_path):
    """A run continued on a dataset file whose contents changed would mix rows of two datasets."""
    from tokencomp.benchmark import generate_split

    data = generate_split(tmp_path / "d", "val", 3)
    text = EXPERIMENT.replace('generator = "tc-scenes"\nsplit = "val"\nn = 5', f'path = "{data}"')
    exp_file = _write(tmp_path, text)
    out = tmp_path / "run"
    Crashy.crash_after, Crashy.calls = 1, 0
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(exp_file, out), progress=False)
    data.write_text(data.read_text().replace('"type": "attribute"', '"type": "colour"'))
    with pytest.raises(tc.TokencompError, match=r"dataset file\(s\) of \['scenes'\] changed"):
        run_experiment(load_experiment(exp_file, out), progress=False)


def test_bad_lines_and_settings_are_clear_errors(tmp_path):
    from tokencomp.data import JsonlDataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "q", "answers": ["a"]}\n{"image": \n')
    with pytest.raises(
        tc.TokencompError,
        match=r"bad.jsonl: 2 problem\(s\).*\n  line 1 \(id '0'\): image .* does not exist\n  line 2: not a JSON line",
    ):
        JsonlDataset(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(tc.TokencompError, match=r"line 1: not a JSON object"):
        JsonlDataset(bad)
    bad.write_text('{"image": \n')
    with pytest.raises(tc.TokencompError, match=r"bad.jsonl: 1 problem\(s\) in its rows:\n  line 1: not a JSON line"):
        JsonlDataset(bad)
    with pytest.raises(tc.TokencompError, match=r"seed='0' must be an integer >= 0"):
        load_experiment(_write(tmp_path, EXPERIMENT.replace("[experiment]", "[experiment]\nseed = '0'")))


def test_jsonl_rows_drop_a_torn_tail_and_refuse_other_damage(tmp_path):
    from tokencomp.data import read_rows

    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b"')
    assert read_rows(p) == [{"a": 1}, {"a": 2}]
    assert p.read_text().endswith('"b"')  # reading alone changes nothing
    assert read_rows(p, repair=True) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'  # appending resumes on a clean line
    p.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(tc.TokencompError, match=r"rows.jsonl:2 is not a JSON line"):
        read_rows(p, repair=True)
    assert p.read_text() == '{"a": 1}\n{"a": \n{"a": 3}\n'  # damage is reported, not silently dropped
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_a_run_can_gain_methods_but_not_change(tmp_path):
    """Adding a [[method]] to the file of a finished run runs only the new cell; any other change
    to the file is refused before work starts."""
    out = tmp_path / "run"
    first = EXPERIMENT.replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n\n', "")
    Crashy.crash_after = None
    run_experiment(load_experiment(_write(tmp_path, first), out), progress=False)
    before = _rows(out / "results.jsonl")
    assert [r["method"] for r in before] == ["identity", "fastv"]
    # a new table between the old ones: run last, listed where the file puts it
    more = first.replace(
        '[[method]]\nname = "fastv"', '[[method]]\nname = "random"\nbudget = 9\n\n[[method]]\nname = "fastv"'
    )
    run_experiment(load_experiment(_write(tmp_path, more, "more.toml"), out), progress=False)
    after = _rows(out / "results.jsonl")
    old = [after[0], after[2]]
    assert _stable(old) == _stable(before)  # finished cells are not run again (only re-timed)
    assert [r["finished"] for r in old] == [r["finished"] for r in before]
    assert after[1]["finished"] >= before[-1]["finished"]  # run after them
    assert all(r["latency"]["cells"] == 3 for r in after)  # the new cell timed side by side with the old
    assert [r["method"] for r in after] == ["identity", "random-budget9", "fastv"]
    assert (out / "experiment.toml").read_text() == more
    for changed, why in ((more.replace("n = 5", "n = 4"), "outside the"), (first, "gone or changed")):
        with pytest.raises(tc.TokencompError, match=why):
            run_experiment(load_experiment(_write(tmp_path, changed, "changed.toml"), out), progress=False)
    # an experiment without a name (it defaults to the file's stem) extends under another file name
    unnamed = first.replace('name = "t"\n', "", 1)
    assert 'name = "t"' not in unnamed.split("[[model]]")[0]
    run_experiment(load_experiment(_write(tmp_path, unnamed, "a.toml"), tmp_path / "r2"), progress=False)
    grown = unnamed + '\n[[method]]\nname = "random"\nbudget = 9\n'
    run_experiment(load_experiment(_write(tmp_path, grown, "b.toml"), tmp_path / "r2"), progress=False)
    assert len(_rows(tmp_path / "r2" / "results.jsonl")) == 3


def test_remeasure_rewrites_only_the_latency_of_finished_cells(tmp_path):
    """`tokencomp remeasure` times the finished cells again side by side: latency fields change
    and say how they were taken; accuracy, FLOPs, counts and peak memory stay; unfinished cells
    are not touched; bad input fails before any work."""
    text = EXPERIMENT.replace('[[method]]\nname = "fastv"\nratio = 0.5\n', "")
    out = tmp_path / "run"
    run_experiment(load_experiment(_write(tmp_path, text), out), progress=False)
    before = _rows(out / "results.jsonl")
    before[-1]["prefill_ms"] = -1.0  # a value no timing gives: must be replaced
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in before))
    with pytest.raises(tc.TokencompError, match="repeats"):
        remeasure_latency(out, repeats=0, progress=False)
    with pytest.raises(tc.TokencompError, match="not a run directory"):
        remeasure_latency(tmp_path / "nowhere", progress=False)
    with runner._run_lock(out):  # another process working in the run dir (an flock of its own)
        with pytest.raises(tc.TokencompError, match="in use by another"):
            remeasure_latency(out, progress=False)
        grown = _write(tmp_path, text + '\n[[method]]\nname = "random"\nbudget = 9\n', "grown.toml")
        with pytest.raises(tc.TokencompError, match="in use by another"):
            run_experiment(load_experiment(grown, out), progress=False)
    assert _rows(out / "results.jsonl") == before  # refused before any work
    assert main(["remeasure", str(out), "--repeats", "2"]) == 0
    after = _rows(out / "results.jsonl")
    assert [r["cell"] for r in after] == [r["cell"] for r in before]
    assert _stable(after) == _stable(before)
    for r, b in zip(after, before):
        assert r["latency"]["taken"] == "interleaved" and r["latency"]["repeats"] == 2
        assert r["latency"]["cells"] == len(before)
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert r["peak_memory_mb"] == b["peak_memory_mb"]
    assert (out / "report.md").is_file() and not (out / "results.jsonl.part").exists()


@pytest.mark.skipif(runner.fcntl is None, reason="run-dir locks are POSIX only")
def test_run_lock_errors(tmp_path, monkeypatch):
    """A lock held elsewhere is refused also where flock reports it as EACCES (flock emulated by
    fcntl locks); a file system without locks (ENOLCK) runs unlocked; a lock taken on a file that
    was removed meanwhile is refused; a lock file that cannot be opened is a clear error, not a
    traceback."""
    import errno
    import os

    def flock_raising(code):
        def flock(f, op):
            if op != runner.fcntl.LOCK_UN:
                raise OSError(code, os.strerror(code))

        return flock

    real_flock = runner.fcntl.flock
    monkeypatch.setattr(runner.fcntl, "flock", flock_raising(errno.EACCES))
    with pytest.raises(tc.TokencompError, match="in use by another"), runner._run_lock(tmp_path):
        pass
    monkeypatch.setattr(runner.fcntl, "flock", flock_raising(errno.ENOLCK))
    ran = []
    with runner._run_lock(tmp_path):
        ran.append(1)
    assert ran == [1]

    def flock_after_removal(f, op):  # the run that made the dir removes it between our open and lock
        if op != runner.fcntl.LOCK_UN:
            os.remove(tmp_path / ".lock")
        real_flock(f, op)

    monkeypatch.setattr(runner.fcntl, "flock", flock_after_removal)
    with (
        pytest.raises(tc.TokencompError, match="was removed by the tokencomp run that made it"),
        runner._run_lock(tmp_path),
    ):
        pass
    monkeypatch.undo()
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / ".lock").mkdir()  # cannot be opened for writing, even by root
    with (
        pytest.raises(tc.TokencompError, match="cannot write in the run directory"),
        runner._run_lock(tmp_path / "blocked"),
    ):
        pass


def test_paired_deltas_pair_predictions_by_question(tmp_path):
    """The difference to identity pairs the two cells' predictions by question id (their files
    may list them in different orders), per model and dataset; cells without a reference or with
    other questions get none."""
    from types import SimpleNamespace

    from tokencomp.metrics import paired_difference_ci
    from tokencomp.runner import _paired_deltas

    (tmp_path / "predictions").mkdir()
    ids = [f"q{i}" for i in range(40)]
    base = [float(i % 3 != 0) for i in range(40)]
    other = [float(i % 4 != 0) for i in range(40)]
    cells = {
        "ref": ("m", "d", "identity", list(zip(ids, base))),
        "x": ("m", "d", "x", list(zip(ids, other))[::-1]),  # reversed file order
        "y": ("m", "e", "y", list(zip(ids, other))),  # no identity on dataset e
        "z": ("m", "d", "z", list(zip(ids[:30], other[:30]))),  # other questions
    }
    rows = []
    for cell, (model, dataset, method, preds) in cells.items():
        rows.append({"cell": cell, "model": model, "dataset": dataset, "method": method})
        text = "".join(json.dumps({"id": i, "score": s}) + "\n" for i, s in preds)
        (tmp_path / "predictions" / f"{cell}.jsonl").write_text(text)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _paired_deltas(SimpleNamespace(out=tmp_path))
    got = {r["cell"]: r.get("delta_vs_identity") for r in _rows(tmp_path / "results.jsonl")}
    order = sorted(range(40), key=lambda i: ids[i])  # pairs taken in question-id order
    assert got["x"] == list(paired_difference_ci([other[i] for i in order], [base[i] for i in order]))
    assert got["x"][0] == pytest.approx((sum(other) - sum(base)) / 40)
    assert got["ref"] == [0.0, 0.0, 0.0] and got["y"] is None and got["z"] is None


def test_side_by_side_pass_resumes_and_remeasure_reads_relative_paths(tmp_path):
    """Two datasets, one given by a path relative to the experiment file: a run whose latency
    pass never happened (or was cut short in one group) gets it on the next compare, for the
    stale group only; remeasure finds the relative dataset from the run directory; it refuses to
    regenerate a run's generated data."""
    from tokencomp.benchmark import generate_split

    generate_split(tmp_path / "files", "val", 3)
    text = EXPERIMENT.replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n\n', "")
    text += '\n[[dataset]]\nname = "local"\npath = "files/val.jsonl"\n'
    out = tmp_path / "run"
    exp_file = _write(tmp_path, text)
    run_experiment(load_experiment(exp_file, out), progress=False, side_by_side=False)
    assert not any("latency" in r for r in _rows(out / "results.jsonl"))
    run_experiment(load_experiment(exp_file, out), progress=False)  # nothing to run: only the pass
    rows = _rows(out / "results.jsonl")
    assert all(r["latency"]["taken"] == "interleaved" and r["latency"]["cells"] == 2 for r in rows)
    # a pass cut short: one group's rows still carry per-cell timings
    for r in rows:
        if r["dataset"] == "local":
            del r["latency"]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_experiment(load_experiment(exp_file, out), progress=False)
    again = _rows(out / "results.jsonl")
    assert [r for r in again if r["dataset"] == "scenes"] == [r for r in rows if r["dataset"] == "scenes"]
    assert all(r["latency"]["taken"] == "interleaved" for r in again)
    # remeasure from another working directory: the relative path is read where the file was
    import os

    here = os.getcwd()
    os.chdir(tmp_path / "files")
    try:
        remeasure_latency(out, repeats=1, progress=False)
    finally:
        os.chdir(here)
    spec = out / "data" / "scenes" / "val.spec.json"
    spec.write_text(spec.read_text().replace('"n": 5', '"n": 6'))
    data = (out / "data" / "scenes" / "val.jsonl").read_text()
    with pytest.raises(tc.TokencompError, match="other settings"):
        remeasure_latency(out, progress=False)
    assert (out / "data" / "scenes" / "val.jsonl").read_text() == data


def test_device_and_dtype_settings_load_the_model_so_and_a_run_keeps_them(tmp_path, monkeypatch):
    """[[model]] device / dtype (or `compare --device --dtype`) load the model so, the rows say the
    dtype, a run does not resume on other settings, and `remeasure` times on the run's own."""
    import torch

    from tokencomp.experiment import model_load_options
    from tokencomp.runner import _load_model

    if not torch.cuda.is_available():
        with pytest.raises(tc.TokencompError, match="CUDA is not available"):
            model_load_options({"name": "m"}, device="cuda")
    with pytest.raises(tc.TokencompError, match="flash_attention_2"):
        model_load_options({"name": "m", "attn_implementation": "flash_attention_2"})
    model = _load_model("tiny-random:llava", model_load_options({"name": "m", "dtype": "bfloat16"}))
    assert {p.dtype for p in model.hf.parameters()} == {torch.bfloat16}

    text = EXPERIMENT.replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n', "")
    exp_file, out = _write(tmp_path, text), tmp_path / "run"
    assert main(["compare", str(exp_file), "--out", str(out), "--dtype", "bfloat16", "--no-report"]) == 0
    rows = _rows(out / "results.jsonl")
    assert {r["dtype"] for r in rows} == {"bfloat16"} and {r["device"] for r in rows} == {"cpu"}
    assert json.loads((out / "models.json").read_text())["m"]["dtype"] == "bfloat16"
    with pytest.raises(tc.TokencompError, match="use another --out"):
        run_experiment(load_experiment(exp_file, out), progress=False)  # float32 now: refused
    run_experiment(load_experiment(exp_file, out, dtype="bfloat16"), progress=False)  # same settings: resumes
    assert len(_rows(out / "results.jsonl")) == len(rows)
    loaded = []
    monkeypatch.setattr(runner, "_load_model", lambda src, opts: loaded.append(opts) or _load_model(src, opts))
    remeasure_latency(out, repeats=1, progress=False)  # times on the run's settings, not the file's
    assert [o["dtype"] for o in loaded] == ["bfloat16"]
    # even where the file's own setting cannot load here (a GPU named, none present)
    if not torch.cuda.is_available():
        exp_file.write_text(
            text.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\ndevice = "cuda"')
        )
        (out / "experiment.toml").write_text(exp_file.read_text())
        made = json.loads((out / "models.json").read_text())
        remeasure_latency(out, repeats=1, progress=False)
        assert loaded[-1] == {k: made["m"][k] for k in loaded[-1]} and loaded[-1]["device"] == "cpu"


def test_device_names_of_one_device_compare_equal(tmp_path, monkeypatch):
    """`cuda` and `cuda:0` (the current device) are one load setting: a run resumes on either."""
    import types

    import torch

    from tokencomp import experiment, runner

    assert (
        experiment.canonical_device("cpu:0") == "cpu"
        and experiment.model_load_options({"name": "m"})["device"] == "cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert experiment.canonical_device("cuda") == "cuda:1" and experiment.canonical_device("cuda:0") == "cuda:0"
    assert experiment.model_load_options({"name": "m", "device": "cuda"})["device"] == "cuda:1"
    exp = types.SimpleNamespace(models={"m": "src"}, load={"m": {**experiment.DEFAULT_LOAD, "device": "cuda:1"}})
    (tmp_path / "models.json").write_text(
        json.dumps({"m": {"source": "src", **experiment.DEFAULT_LOAD, "device": "cuda"}})
    )
    runner._check_load(tmp_path, exp, started=True)  # recorded as "cuda" (the current device): the same
    exp.load["m"]["device"] = "cuda:0"
    with pytest.raises(tc.TokencompError, match="use another --out"):
        runner._check_load(tmp_path, exp, started=True)


def test_a_run_resumed_on_other_code_says_so_and_records_which_code_made_what(tmp_path, monkeypatch, capsys):
    """A run interrupted on one version of the code and resumed on another warns, each row and cell
    records its code (a cell cut mid-way gets both), and the report flags the mix; a run made on one
    version has no such note."""
    exp_file = _write(tmp_path)
    now = runner.code_version()
    old = "tokencomp 0.0.1+g0123456789ab"
    monkeypatch.setattr(runner, "code_version", lambda: old)
    Crashy.crash_after, Crashy.calls = 2, 0  # inside the crashy cell, after its first batch
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(exp_file, out), progress=False)
    monkeypatch.undo()
    capsys.readouterr()
    run_experiment(load_experiment(exp_file, out), progress=False)
    warned = capsys.readouterr().err
    assert "other code" in warned and old in warned and now in warned
    rows = {r["method"]: r for r in _rows(out / "results.jsonl")}
    crashy = "_test-crashy-budget20"
    here = file_digests([__file__])  # the crashy method is defined in this file: its digest joins its code
    assert rows["identity"]["code"] == [old]
    assert rows[crashy]["code"] == sorted([old + here, now + here])  # its first batch before, the rest after
    assert rows["_test-crashy-budget10"]["code"] == [now + here] and rows["fastv"]["code"] == [now]
    preds = _rows(out / "predictions" / f"{rows[crashy]['cell']}.jsonl")
    k = sum(p["code"] == old + here for p in preds)  # the samples done before the interruption
    assert 0 < k < 5 and [p["code"] for p in preds] == [old + here] * k + [now + here] * (5 - k)
    assert all(r["latency"]["code"] == now for r in rows.values())  # all re-timed side by side now
    report = make_report(out).read_text()
    assert "**Mixed code:**" in report and f"within {crashy}" in report and old in report
    # one version throughout: no note, and no warning on a resume with nothing left to do
    clean = tmp_path / "clean"
    run_experiment(load_experiment(exp_file, clean), progress=False)
    capsys.readouterr()
    run_experiment(load_experiment(exp_file, clean), progress=False)
    assert "other code" not in capsys.readouterr().err
    assert "Mixed code" not in make_report(clean).read_text()
    # re-timing: a warning where the cells were made with other code than times them now
    for run, warns in ((out, True), (clean, False)):
        remeasure_latency(run, repeats=1, progress=False)
        assert ("re-times them" in capsys.readouterr().err) == warns


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda t: t.replace('name = "fastv"', 'name = "fastvv"'), "method 'fastvv': unknown method 'fastvv'"),
        (lambda t: t.replace("ratio = 0.5", "ratioo = 0.5"), r"method 'fastv': .*no parameter\(s\) \['ratioo'\]"),
        (
            lambda t: t.replace('"tiny-random:llava"', '"/no/such/llava-7b"'),
            "model 'm': '/no/such/llava-7b' is neither",
        ),
        (lambda t: t.replace('"tiny-random:llava"', '"tiny-random:llava2"'), "tiny-random family 'llava2'"),
        (
            lambda t: t.replace("n = 5", "n = 5\nsamples = 4"),
            r"\[\[dataset\]\] 'scenes' has unknown key\(s\) 'samples'",
        ),
        (lambda t: t.replace("n = 5", "n = 5\nlimit = 0"), "limit=0 must be an integer >= 1"),
        (
            lambda t: t.replace('source = "tiny-random:llava"', 'source = "tiny-random:llava"\ndatasets = "scenes"'),
            "datasets must be a list of names",
        ),
        (lambda t: t.replace('name = "fastv"', 'name = "fastv"\nmodels = "m"'), "models must be a list of names"),
        (lambda t: t.replace("[experiment]", '[experiment]\nplugins = ["nowhere.py"]'), "nowhere.py' does not exist"),
        (lambda t: t.replace("[experiment]", '[experiment]\nplugins = "mine.py"'), "plugins must be a list"),
        (lambda t: t.replace("[experiment]", '[experiment]\nplugins = ["no_such_module_xyz"]'), "failed to import"),
    ],
)
def test_file_mistakes_fail_before_any_model_or_data_is_loaded(tmp_path, monkeypatch, edit, pattern):
    def never(*a, **k):
        raise AssertionError("loaded before the file was validated")

    monkeypatch.setattr(runner, "_load_model", never)
    monkeypatch.setattr(runner, "_dataset", never)
    with pytest.raises(tc.TokencompError, match=pattern):
        load_experiment(_write(tmp_path, edit(EXPERIMENT)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


PLUGIN = '''
import tokencomp as tc


@tc.register("_test-plugin-norm")
class KeepByNorm(tc.VisionStrategy):
    """Keep the patches with the largest feature norm (VERSION)."""

    budget: int = 12

    def select(self, view):
        score = view.features.norm(dim=-1).masked_fill(~view.valid, -1.0)
        return score.topk(self.budget, dim=1).indices.sort(dim=1).values
'''


def test_a_plugin_method_runs_in_compare_and_its_edits_change_the_code(tmp_path, capsys):
    """An experiment's ``plugins`` file registers a method of one's own: compare runs it, its
    digest is part of each row's code, remeasure re-imports it, and an edited plugin warns on resume."""
    (tmp_path / "policies").mkdir()
    plugin = tmp_path / "policies" / "mine.py"
    plugin.write_text(PLUGIN.replace("VERSION", "one"))
    text = (
        EXPERIMENT.replace("[experiment]", '[experiment]\nplugins = ["policies/mine.py"]')
        .replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n\n', "")
        .replace('[[method]]\nname = "fastv"\nratio = 0.5\n', '[[method]]\nname = "_test-plugin-norm"\n')
    )
    out = tmp_path / "run"
    exp = load_experiment(_write(tmp_path, text), out)
    assert exp.plugins == [plugin.resolve()]
    run_experiment(exp, progress=False)
    rows = {r["method"]: r for r in _rows(out / "results.jsonl")}
    assert rows["_test-plugin-norm"]["visual_tokens_llm"] == 12
    assert rows["_test-plugin-norm"]["code"][0].endswith("; mine.py@" + _digest(plugin))
    assert "mine.py" not in rows["identity"]["code"][0]  # a built-in method's cell: the package alone
    remeasure_latency(out, repeats=1, progress=False)  # imports it again from the saved file
    plugin.write_text(PLUGIN.replace("VERSION", "two"))
    capsys.readouterr()
    grown = text + '\n[[method]]\nname = "_test-plugin-norm"\nbudget = 8\n'
    run_experiment(load_experiment(_write(tmp_path, grown, "grown.toml"), out), progress=False)
    assert "other code" in capsys.readouterr().err
    assert "mine.py (2 versions)" in make_report(out).read_text()


def _digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_scatter_of_one_value_keeps_its_labels_on_the_figure():
    """Every method at accuracy 0 (a tiny random model): the plot gets a range around the value
    and its labels fit the figure (it used to squeeze the axis to nothing and push them off)."""
    import warnings

    import matplotlib.pyplot as plt
    import pandas as pd

    from tokencomp.report import _scatter

    df = pd.DataFrame(
        {"method": ["identity", "a-long-method-name", "b"], "tflops": [1e-3, 2e-5, 1e-5], "accuracy": [0.0] * 3}
    )
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _scatter(ax, df, "tflops", "accuracy", "x", "y", "t", front=True)
    assert ax.get_ylim()[1] - ax.get_ylim()[0] >= 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.tight_layout()
    plt.close(fig)


def test_plugins_import_siblings_may_join_a_started_run_and_cannot_take_a_builtin_name(tmp_path):
    out = tmp_path / "run"
    base = EXPERIMENT.replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n\n', "")
    run_experiment(load_experiment(_write(tmp_path, base), out), progress=False)
    # a plugin file importing a module beside it, and a module-name plugin found beside the experiment
    (tmp_path / "scoring.py").write_text("def score(view):\n    return view.features.norm(dim=-1)\n")
    (tmp_path / "mine.py").write_text(
        "from scoring import score as norm\n"
        + PLUGIN.replace("_test-plugin-norm", "_test-plugin-sibling").replace(
            "score = view.features.norm(dim=-1)", "score = norm(view)"
        )
    )
    (tmp_path / "mine_module.py").write_text(PLUGIN.replace("_test-plugin-norm", "_test-plugin-module"))
    grown = base.replace("[experiment]", '[experiment]\nplugins = ["mine.py", "mine_module"]')
    grown += '\n[[method]]\nname = "_test-plugin-sibling"\n\n[[method]]\nname = "_test-plugin-module"\n'
    run_experiment(load_experiment(_write(tmp_path, grown, "grown.toml"), out), progress=False)  # joins the run
    assert [r["method"] for r in _rows(out / "results.jsonl")][-2:] == ["_test-plugin-sibling", "_test-plugin-module"]
    # a built-in's name: refused, and the built-ins stay whole
    (tmp_path / "clash.py").write_text(PLUGIN.replace("_test-plugin-norm", "fastv"))
    clash = base.replace("[experiment]", '[experiment]\nplugins = ["clash.py"]')
    with pytest.raises(tc.TokencompError, match=r"'fastv' is already registered by tokencomp\.methods\.fastv"):
        load_experiment(_write(tmp_path, clash, "clash.toml"), tmp_path / "other")
    assert {"fastv", "visionzip", "pool"} <= set(tc.available_methods())
    (tmp_path / "quits.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(tc.TokencompError, match="plugin 'quits.py' failed to import: SystemExit"):
        load_experiment(_write(tmp_path, base.replace("[experiment]", '[experiment]\nplugins = ["quits.py"]')))


def test_every_configuration_is_validated_at_load_even_under_a_shared_label(tmp_path):
    text = EXPERIMENT + '\n[[method]]\nlabel = "x"\nname = "random"\nbudget = 9\nmodels = ["m"]\n'
    text += '\n[[method]]\nlabel = "x"\nname = "random"\nbudget = 9\nnosuch = 1\nmodels = ["n"]\n'
    text += '\n[[model]]\nname = "n"\nsource = "tiny-random:llava"\n'
    with pytest.raises(tc.TokencompError, match=r"method 'x': .*no parameter\(s\) \['nosuch'\]"):
        load_experiment(_write(tmp_path, text), tmp_path / "out")


def test_report_finds_the_run_images_from_another_folder_and_in_a_moved_run(tmp_path, monkeypatch):
    import shutil

    text = EXPERIMENT.replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n\n', "")
    out = tmp_path / "run"
    run_experiment(load_experiment(_write(tmp_path, text), out), progress=False)
    first = _rows(next((out / "predictions").glob("*.jsonl")))[0]
    assert first["image"].startswith("data/") and (out / first["image"]).is_file()  # relative to the run dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    for run in (out, moved):
        for png in (run / "plots").glob("overlays_*.png"):
            png.unlink()
        make_report(run)
        assert list((run / "plots").glob("overlays_*.png"))  # drawn: the images were found
    shutil.rmtree(moved / "data")  # without its images: the report is written, the overlays left out
    (next((moved / "plots").glob("overlays_*.png"))).unlink()
    assert "overlays" not in make_report(moved).read_text()


def test_evaluate_reports_what_compare_reports_for_the_same_cell(tmp_path):
    """`tc.evaluate` on a run's data, model and settings gives the accuracy, its interval and the
    yes/no metrics that the run's results row holds."""
    from tokencomp.data import JsonlDataset

    text = EXPERIMENT.replace('[[method]]\nname = "_test-crashy"\nbudget = [20, 10]\n\n', "")
    exp = load_experiment(_write(tmp_path, text), tmp_path / "run")
    run_experiment(exp, progress=False, side_by_side=False)
    row = next(r for r in _rows(tmp_path / "run" / "results.jsonl") if r["method"] == "fastv")
    model = runner._load_model(exp.models["m"], exp.load["m"])
    data = JsonlDataset(tmp_path / "run" / "data" / "scenes" / "val.jsonl")
    got = tc.evaluate(model, data, tc.method("fastv", ratio=0.5), batch_size=2, max_new_tokens=2)
    assert got.accuracy == pytest.approx(row["accuracy"])
    assert list(got.accuracy_ci95) == pytest.approx(row["accuracy_ci95"])
    assert row["yes_no"] is not None and got.yes_no == row["yes_no"]


def test_report_summary_styles_and_paired_plot(tmp_path):
    """The report opens with a summary (Pareto set, best per budget, significance), draws each
    method in its own colour and marker, and plots paired differences; on the committed demo run."""
    import shutil
    from pathlib import Path

    from tokencomp.report import make_report, method_styles

    run = tmp_path / "demo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "experiments" / "results" / "demo", run)
    md = make_report(run).read_text()
    summary = md.split("## Summary", 1)[1].split("\n\n", 2)[1]
    assert summary.count("- **") == 2 and "Pareto set" in summary and "Best at each `budget`" in summary
    assert "interval excludes 0" in summary
    # budgets in their units: the committed demo has per-view 64s and in-LLM (per-image) 64s apart
    assert "64 per view: `" in summary and "64 per image: `" in summary
    assert (run / "plots" / "paired_difference_tiny-llava_tc-scenes.png").is_file()
    html = (run / "report.html").read_text()
    assert "<h2>Summary</h2>" in html and "class='scroll'" in html
    styles = method_styles([f"m{i}" for i in range(30)] + ["identity"])
    looks = {
        (tuple(v["color"]) if not isinstance(v["color"], str) else v["color"], v["marker"]) for v in styles.values()
    }
    assert len(looks) == 31 and styles["identity"]["color"] == "black"


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(tmp_path):
    """The committed demo's report.html in a real browser (Debian's chromium, driven by playwright):
    it renders, every image loads, and nothing overflows the main column sideways (wide tables
    scroll inside their own box)."""
    import shutil
    from pathlib import Path

    from tokencomp.report import make_report

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (apt-get install chromium)")
    run = tmp_path / "demo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "experiments" / "results" / "demo", run)
    make_report(run)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((run / "report.html").as_uri())
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert len(images) >= 14 and all(done and width > 0 for done, width in images)
            body = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
            assert body[0] <= body[1], f"the page is {body[0]} px wide in a {body[1]} px window"
            boxes = page.eval_on_selector_all(".scroll", "els => els.map(e => e.getBoundingClientRect().right)")
            main = page.evaluate("() => document.body.getBoundingClientRect().right")
            assert boxes and all(right <= main + 1 for right in boxes)
            assert page.inner_text("h2") == "Summary"
        finally:
            browser.close()
