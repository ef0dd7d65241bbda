"""Data-parallel `compare` on an existing launcher (torchrun, gloo on CPU): each process takes every
N-th batch, process 0 merges and times; the run equals a single process's field for field
(timings aside) and resumes after a process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokencomp import runner
from tokencomp.data import read_rows
from tokencomp.distributed import Processes
from tokencomp.runner import load_experiment, run_experiment

EXPERIMENT = """
[experiment]
name = "dp"
batch_size = 2
max_new_tokens = 3
latency_repeats = 1

[[model]]
name = "tiny-llava"

[[dataset]]
name = "scenes"
generator = "tc-scenes"
n = {n}

[[method]]
name = "identity"

[[method]]
name = "visionzip"
budget = 16

[[method]]
name = "fastv"
k = 2
"""
# measured, not computed: they differ between any two runs
TIMINGS = {"prefill_ms", "prefill_spread_ms", "decode_ms_per_token", "latency", "finished", "peak_memory_mb"}


def _experiment(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT.format(n=n))
    return path


def _same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same results (timings aside) and byte-identical predictions."""
    ra, rb = read_rows(a / "results.jsonl"), read_rows(b / "results.jsonl")
    assert [r["cell"] for r in ra] == [r["cell"] for r in rb]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMINGS} == {k: v for k, v in y.items() if k not in TIMINGS}
    names = sorted(p.name for p in (a / "predictions").iterdir())
    assert names == sorted(p.name for p in (b / "predictions").iterdir())
    for name in names:
        assert (a / "predictions" / name).read_bytes() == (b / "predictions" / name).read_bytes(), name


def test_batches_are_dealt_round_robin():
    procs = [Processes(rank, 3) for rank in range(3)]
    dealt = [[j for j in range(8) if p.takes(j)] for p in procs]
    assert dealt == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Processes().takes(5) and Processes().main
    assert Processes(1, 2, local_rank=1).device("cuda") == Processes(1, 2, local_rank=1).device("cuda:0") == "cuda:1"
    assert Processes(1, 2, local_rank=1).device("cpu") == "cpu"


def test_a_single_process_folds_rows_left_by_a_data_parallel_run(tmp_path, monkeypatch):
    """A data-parallel run killed mid-cell leaves each process's rows in ``<cell>.rank<r>.part``:
    a later run (here one process) skips those samples and merges them in dataset order."""
    exp = load_experiment(_experiment(tmp_path, 6), tmp_path / "whole")
    run_experiment(exp, progress=False)
    cut = load_experiment(_experiment(tmp_path, 6), tmp_path / "cut")
    run_experiment(cut, progress=False)
    cell = read_rows(cut.out / "results.jsonl")[1]["cell"]
    pred = cut.out / "predictions" / f"{cell}.jsonl"
    rows = read_rows(pred)
    # as two processes leave them: batches 0 and 2 (rank 0), batch 1 cut after its first row (rank 1)
    (pred.parent / f"{cell}.rank0.part").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[4:]))
    (pred.parent / f"{cell}.rank1.part").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[3])[:40])
    pred.unlink()
    results = read_rows(cut.out / "results.jsonl")
    (cut.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results if r["cell"] != cell))
    computed = []
    original = runner._predict

    def spy(exp, model, data, engine, path, code, done, procs, bar):
        computed.append(sorted(x.id for x in data.samples if x.id not in done))
        return original(exp, model, data, engine, path, code, done, procs, bar)

    monkeypatch.setattr(runner, "_predict", spy)
    run_experiment(cut, progress=False)
    assert computed == [[rows[3]["id"]]]  # only the torn row's sample ran again
    assert not list(pred.parent.glob("*.part"))
    _same_run(exp.out, cut.out)


def _torchrun(experiment: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tokencomp.cli", "compare", str(experiment), "--out", str(out), "--no-report"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the launcher's worker of ``rank`` (its environment says RANK=rank)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_two_processes_equal_one_and_resume_after_one_is_killed(tmp_path):
    exp = _experiment(tmp_path, 24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "tokencomp.cli", "compare", str(exp), "--out", str(one), "--no-report"],
        env=env,
        check=True,
        capture_output=True,
    )
    two = tmp_path / "two"
    done = _torchrun(exp, two)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    _same_run(one, two)
    # kill rank 1 once it has written rows of the second cell; the launcher stops rank 0 too
    three = tmp_path / "three"
    launch = _torchrun(exp, three)
    deadline = time.time() + 300
    while time.time() < deadline and launch.poll() is None:
        parts = list((three / "predictions").glob("visionzip*.rank1.part")) if (three / "predictions").is_dir() else []
        if parts and parts[0].stat().st_size:
            pid = _rank_pid(launch.pid, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    else:
        pytest.fail("rank 1 never wrote a row of the second cell")
    out, _ = launch.communicate(timeout=300)
    assert launch.returncode != 0, out
    assert len(read_rows(three / "results.jsonl")) == 1  # the first cell finished, the second did not
    again = _torchrun(exp, three)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    _same_run(one, three)


@pytest.mark.slow
def test_accelerate_launch_equals_one_process(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m tokencomp.cli compare`` makes the run a
    single process makes. (accelerate starts the processes through torchrun's agent; on a CPU
    machine it needs ``--multi_gpu`` to start more than one: with ``--cpu`` it starts one.)"""
    pytest.importorskip("accelerate")
    exp = _experiment(tmp_path, 8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in [
        ("one", []),
        ("two", ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]),
    ]:
        runs[name] = tmp_path / name
        cmd = [sys.executable, *launcher, "-m", "tokencomp.cli", "compare", str(exp), "--out", str(runs[name])]
        done = subprocess.run([*cmd, "--no-report"], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("data-parallel: 2 processes" in done.stderr) == (name == "two"), done.stderr
    _same_run(runs["one"], runs["two"])


def test_parts_are_found_for_any_label(tmp_path):
    """A cell label may hold glob characters ([, *, ?): its parts are found by name, not pattern."""
    (tmp_path / "predictions").mkdir()
    for name in ("zip[64]-ab12.rank0.part", "zip[64]-ab12.rank1.part", "zip6-ab12.rank0.part"):
        (tmp_path / "predictions" / name).write_text("")
    assert [p.name for p in runner._parts(tmp_path, "zip[64]-ab12")] == [
        "zip[64]-ab12.rank0.part",
        "zip[64]-ab12.rank1.part",
    ]
    assert {runner._part_cell(p) for p in runner._parts(tmp_path)} == {"zip[64]-ab12", "zip6-ab12"}
