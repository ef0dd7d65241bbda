"""The compare-methods runner: ``tokencomp compare EXPERIMENT.toml`` (the file: `tokencomp.experiment`).

Every finished sample is appended to
``predictions/<cell>.jsonl`` and every finished cell to ``results.jsonl``; a crashed or
interrupted run started again skips finished cells and samples, so nothing is lost or repeated.
Generated splits live in ``data/<dataset>/`` with the settings they were made from
(``<split>.spec.json``); ``datasets.json`` holds each dataset file's sha256, and a run is not
resumed on changed data; ``experiment.base`` the folder the file's relative dataset paths point
from. The file a run directory was started with may later gain cells (a new
[[method]] table or grid value; only the new cells run); a change outside the [[method]] tables,
or to a cell already started, is refused before work starts; so is resuming on another device,
dtype or attention implementation than the run began with (``models.json`` records them).
A data-parallel launch (``torchrun ... -m tokencomp.cli compare``) shares each cell's batches among
its processes (`tokencomp.distributed`). One run at a time works in a run directory: a second
``compare`` or ``remeasure`` on it while one runs is refused (``.lock``, an advisory lock the system releases when its process ends, so a
crash leaves none behind; POSIX systems only).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import kernels
from ._compat import tomllib
from .api import prepare
from .benchmark import PRESETS, generate_split
from .data import JsonlDataset, check_image, is_unmodified, prompt, read_rows, write_atomic
from .distributed import Processes
from .engine import Engine
from .errors import TokencompError
from .experiment import (
    DEFAULT_LOAD,
    DISPATCH_KEYS,
    DTYPES,
    Cell,
    Experiment,
    canonical_device,
    dataset_scoring,
    load_experiment,
    read_text,
)
from .metrics import answer_score, mean_ci, paired_difference_ci, scores_by_type, yes_no_scores
from .model import Model, load_model
from .profiler import Timing, measure, measure_interleaved
from .provenance import code_version, codes_of, file_digests, split_code, strategy_files
from .strategy import check_int

try:
    import fcntl  # the run directory's lock (POSIX)
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _load_model(source: str, opts: dict, procs: Processes | None = None) -> Model:
    """The model of a [[model]] source, loaded as ``opts`` (`model_load_options`) say (on this
    process's own GPU in a data-parallel run, `Processes.device`)."""
    if procs is not None:
        opts = {**opts, "device": procs.device(opts["device"])}
    dtype = DTYPES[opts["dtype"]]
    dispatch = {k: opts[k] for k in DISPATCH_KEYS if k in opts}
    if source.startswith("tiny-random:"):
        from .tiny import tiny_llava

        family = source.split(":", 1)[1]
        hf, proc = tiny_llava(family, image_size=336, text_layers=8, vision_layers=4, hidden=64, seed=0)
        hf.set_attn_implementation(opts["attn_implementation"])
        return Model(hf.to(device=opts["device"], dtype=dtype), proc, name=source)
    return load_model(
        source, dtype=dtype, device=opts["device"], attn_implementation=opts["attn_implementation"], **dispatch
    )


def _check_load(out: Path, exp: Experiment, started: bool) -> None:
    """Refuse to resume a run on other load settings than it began with; record them in ``models.json``."""
    path = out / "models.json"
    now = {name: {"source": exp.models[name], **exp.load[name]} for name in exp.models}
    if started:
        before = _read_json(path, "the load settings each model was run with") if path.is_file() else {}
        if not isinstance(before, dict) or not all(isinstance(v, dict) for v in before.values()):
            raise TokencompError(f"{path} is damaged (not a table of models); restore it, or use another out directory")
        for name, opts in now.items():
            # a run from before models.json was loaded with the defaults
            was = before.get(name, {"source": exp.models[name], **DEFAULT_LOAD})
            was = {**was, "device": canonical_device(was.get("device", DEFAULT_LOAD["device"]))}  # as given before
            if was != opts:
                raise TokencompError(
                    f"{out} was run with model {name!r} loaded as {was}; this run asks for {opts}. "
                    "Mixing the two would mix their results: pass the settings it began with "
                    "(--device / --dtype), or use another --out"
                )
    write_atomic(path, json.dumps(now, indent=1))


def _dataset(spec: dict, out: Path, regenerate: bool = True) -> JsonlDataset:
    """The dataset of a [[dataset]] table; a generated split is (re)written under ``out/data`` unless
    the files there were generated from the same settings (``<split>.spec.json`` records them);
    with ``regenerate=False`` that is a `TokencompError` instead (the run's data is left alone)."""
    if "generator" in spec:
        folder = out / "data" / spec["name"]
        split = spec.get("split", "test")
        path = folder / f"{split}.jsonl"
        opts = dict(PRESETS[spec["generator"]])
        opts.update({k: spec[k] for k in ("size", "tag_px") if k in spec})
        settings = json.dumps({"generator": spec["generator"], "n": spec.get("n", 32), **opts}, sort_keys=True)
        record = folder / f"{split}.spec.json"
        if not (path.is_file() and record.is_file() and record.read_bytes() == settings.encode()):
            if not regenerate:
                raise TokencompError(
                    f"{path} is missing or was generated with other settings than {spec['generator']!r} gives now"
                )
            generate_split(folder, split, spec.get("n", 32), **opts)
            write_atomic(record, settings)
        return JsonlDataset(path, spec.get("limit"), spec["name"], spec.get("validate", "full"))
    return JsonlDataset(spec["path"], spec.get("limit"), spec["name"], spec.get("validate", "full"))


def _validation_samples(model: Model, data: JsonlDataset, batch_size: int) -> list:
    """The samples a cell is validated on before any work: the first batch, plus on LLaVA-NeXT the
    samples with the fewest and the most image tokens (budgets are checked against them)."""
    samples = data.samples
    if data.validate == "lazy":  # images not checked yet: validate on those that decode
        samples = [x for x in samples if check_image(x.image, decode=False) is None]
        first = list(itertools.islice((x for x in samples if check_image(x.image) is None), batch_size))
    else:
        first = samples[:batch_size]
    if not model.layout.has_crops or not samples:
        return first
    counts = []
    for x in samples:
        with Image.open(x.image) as im:  # the header only
            counts.append(model.image_token_count((im.size[1], im.size[0])))
    some = {x.id: x for x in first}
    for i in (counts.index(min(counts)), counts.index(max(counts))):
        if data.validate == "full" or check_image(samples[i].image) is None:
            some.setdefault(samples[i].id, samples[i])
    return list(some.values())


def _decode_flops_per_token(rows: list[dict]) -> float:
    """Decode FLOPs per decoded token over all samples (a sample that stopped at its first token
    decodes nothing and weighs nothing); rows written before the totals were recorded fall back to
    the mean of per-sample means."""
    if all("decode_steps" in r for r in rows):
        return sum(r["decode_flops"] for r in rows) / max(sum(r["decode_steps"] for r in rows), 1)
    return sum(r["decode_flops_per_token"] for r in rows) / max(len(rows), 1)


def _truncated_cells(out: Path, exp: Experiment, datasets: dict[str, JsonlDataset], done: set[str]) -> set[str]:
    """Finished cells whose prediction file no longer holds one row per sample of their dataset
    (cut, or edited, after the cell finished): their results rows are removed, with a warning, so
    that the run recomputes the missing rows and the summary. Returns those cells."""
    cells = {c.id: c for c in exp.cells}
    bad = {}
    for cell in sorted(done & set(cells)):
        path = out / "predictions" / f"{cell}.jsonl"
        rows = read_rows(path)
        want = [x.id for x in datasets[cells[cell].dataset].samples]
        if sorted(r["id"] for r in rows) != sorted(want):
            bad[cell] = f"{len(rows)} prediction rows for {len(want)} samples"
            keep, known = {}, set(want)  # each sample's first row (a line written twice, or rows of other samples, go)
            for r in rows:
                if r["id"] in known:
                    keep.setdefault(r["id"], r)
            _rewrite(path, list(keep.values()))
    if bad:
        results = out / "results.jsonl"
        _rewrite(results, [r for r in read_rows(results) if r["cell"] not in bad])
        for cell, why in bad.items():
            tqdm.write(f"warning: finished cell {cell} has {why}: recomputing it", file=sys.stderr)
    return set(bad)


def _check_extends(out: Path, saved_text: str, new: Experiment) -> None:
    """A run directory takes a changed experiment file only when it adds cells: everything outside
    the [[method]] tables as it was (compared as parsed TOML), and every cell already started
    (finished or with saved predictions) still in the file, unchanged."""
    try:
        old_doc = tomllib.loads(saved_text)
    except tomllib.TOMLDecodeError as e:
        raise TokencompError(
            f"{out / 'experiment.toml'} (the file the run was started with) is damaged: {e}; restore it from a "
            "copy, or start the run in another out directory"
        ) from e
    new_doc = tomllib.loads(new.text)

    def fixed(doc: dict) -> dict:  # plugins may be added to bring new methods (rows' code tracks them)
        return {k: v if k != "experiment" else {**v, "plugins": None} for k, v in doc.items() if k != "method"}

    same = fixed(old_doc) == fixed(new_doc)
    started = {r["cell"] for r in read_rows(out / "results.jsonl")}
    started |= {p.stem for p in (out / "predictions").glob("*.jsonl")} | {_part_cell(p) for p in _parts(out)}
    gone = sorted(started - {c.id for c in new.cells})
    if same and not gone:
        return
    why = "it differs outside the [[method]] tables" if not same else f"cells {gone[:3]} are gone or changed"
    raise TokencompError(
        f"{out} holds results of a different experiment file ({why}); a run can only gain new "
        "cells (a new [[method]] table or grid value): choose another out directory"
    )


@contextmanager
def _run_lock(run: Path):
    """Hold ``run/.lock`` for the block; a `TokencompError` if another process holds it."""
    if fcntl is None:  # not POSIX: no lock
        yield
        return
    try:
        f = open(run / ".lock", "a")  # noqa: SIM115 (closed by the with below)
    except OSError as e:
        raise TokencompError(f"cannot write in the run directory {run}: {e.strerror}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            # EWOULDBLOCK (BlockingIOError), or EACCES where flock is emulated by fcntl locks: held
            if isinstance(e, BlockingIOError) or e.errno == errno.EACCES:
                raise TokencompError(
                    f"{run} is in use by another tokencomp compare or remeasure; wait for it to finish, "
                    "or use another --out"
                ) from None
            # a file system without locks (ENOLCK, ENOSYS, EOPNOTSUPP: some network mounts): run unlocked
            yield
            return
        try:  # removed between our open and our lock (the run that made it failed validation)?
            now, ours = os.stat(run / ".lock"), os.fstat(f.fileno())
            here = (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)
        except FileNotFoundError:
            here = False
        if not here:
            fcntl.flock(f, fcntl.LOCK_UN)
            raise TokencompError(f"{run} was removed by the tokencomp run that made it; start again")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_in_progress(run: str | Path, wait: bool = False) -> bool:
    """Whether a ``compare`` or ``remeasure`` is working in ``run`` now (it holds ``run/.lock``);
    with ``wait``, block until none is (then False)."""
    lock = Path(run) / ".lock"
    if fcntl is None or not lock.is_file():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            return isinstance(e, BlockingIOError) or e.errno == errno.EACCES
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def run_experiment(
    exp: Experiment, progress: bool = True, side_by_side: bool = True, processes: Processes | None = None
) -> Path:
    """Run every unfinished cell of ``exp``; returns the results file.

    Each cell's latency is timed when it finishes; with ``side_by_side`` (default), once cells
    have run, every finished cell is then timed again side by side (`remeasure_latency`), so the
    latency ratios in the report come from one interleaved measurement. A `TokencompError` if
    another process is working in ``exp.out``.

    ``processes``: this process's place in a data-parallel launch (`tokencomp.distributed`; every
    process of the launch calls this): process 0 sets the run up and times, each runs its share of
    every cell's batches."""
    procs = processes or Processes()
    if not procs.main:
        return _follow(exp, procs)
    with ExitStack() as stack:
        try:
            created = _make_run_dir(exp.out)
            stack.enter_context(_run_lock(exp.out))
            setup = _set_up(exp, created, procs)
        except BaseException as e:
            procs.from_main(str(e) or type(e).__name__)  # the other processes stop too
            raise
        procs.from_main(None)
        return _run(exp, setup, progress, side_by_side, procs)


def _make_run_dir(out: Path) -> bool:
    """Make the run directory; returns whether this call made it (else it existed)."""
    if out.exists() and not out.is_dir():
        raise TokencompError(f"the run directory {out} is a file; choose another out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokencompError(f"cannot make the run directory {out}: {e.strerror}") from None
    try:  # atomic: of two runs starting on a new directory, one made it and may remove it
        out.mkdir()
        return True
    except OSError:  # EEXIST, or EACCES / EROFS that some systems give for a directory that exists
        if not out.is_dir():
            raise
        return False


@dataclass
class _SetUp:
    """What `_set_up` validated and loaded for a run."""

    datasets: dict[str, JsonlDataset]
    models: dict[str, Model]
    engines: dict[str, Engine]
    done: set[str]


def _set_up(exp: Experiment, created: bool, procs: Processes) -> _SetUp:
    """Validate the whole experiment against the run directory, its data and its models before any
    work (a run directory this call ``created`` is removed again if anything fails)."""
    out = exp.out
    saved = out / "experiment.toml"
    results = out / "results.jsonl"
    started = results.is_file() or any((out / "predictions").glob("*.jsonl")) or any(_parts(out))
    try:
        if started and saved.is_file():
            before = read_text(saved, "the run's experiment file")
            if before != exp.text:
                _check_extends(out, before, exp)
        done = {r["cell"] for r in read_rows(results, repair=True)}
        _check_load(out, exp, started)
        # every row of every dataset checked (`JsonlDataset`) before any model loads
        datasets = {name: _dataset(spec, out) for name, spec in exp.datasets.items()}
        # the data a resumed run continues on must be the data its earlier rows came from
        prints = _check_data(out, datasets, started)
        models = {name: _load_model(src, exp.load[name], procs) for name, src in exp.models.items()}
        # validate every cell on its model and data (first batch, extreme image sizes) before any forward pass
        engines, checks = {}, {}
        for cell in exp.cells:
            model, data = models[cell.model], datasets[cell.dataset]
            engine = Engine(model, cell.strategies())
            if (cell.model, cell.dataset) not in checks:
                some = _validation_samples(model, data, exp.settings["batch_size"])
                template = exp.settings["template"] or model.family
                checks[cell.model, cell.dataset] = prepare(
                    model, [s.load_image() for s in some], [prompt(s, template) for s in some]
                )
            engine.validate(checks[cell.model, cell.dataset])
            engines[cell.id] = engine
        write_atomic(out / "datasets.json", json.dumps(prints, indent=1))
        write_atomic(saved, exp.text)  # only once the whole file has passed validation
        write_atomic(out / "experiment.base", str(exp.base))  # where its relative dataset paths point
    except BaseException:
        if created:  # a file that fails validation leaves no stub run dir behind (data, models.json)
            shutil.rmtree(out, ignore_errors=True)
        raise
    return _SetUp(datasets, models, engines, done)


def _run(exp: Experiment, setup: _SetUp, progress: bool, side_by_side: bool, procs: Processes) -> Path:
    out = exp.out
    results = out / "results.jsonl"
    datasets, models, engines = setup.datasets, setup.models, setup.engines
    (out / "predictions").mkdir(exist_ok=True)
    done = setup.done - _truncated_cells(out, exp, datasets, setup.done)
    todo = [c for c in exp.cells if c.id not in done]
    procs.from_main([c.id for c in todo])  # the cells every process runs its share of
    package = code_version()
    codes = {c.id: _cell_code(package, engines[c.id]) for c in exp.cells}
    _warn_other_code(out, codes)
    if progress and len(todo) < len(exp.cells):
        tqdm.write(
            f"resuming {out}: {len(exp.cells) - len(todo)} of {len(exp.cells)} cells already done", file=sys.stderr
        )
    for cell in tqdm(todo, desc=f"compare {exp.name}", unit="cell", disable=not progress):
        model, data = models[cell.model], datasets[cell.dataset]
        _run_cell(exp, cell, model, data, engines[cell.id], results, codes[cell.id], progress, procs)
    if side_by_side:  # groups with new cells, or whose pass was cut short, are timed (again)
        stale = _stale_groups(exp)
        if stale:
            _time_side_by_side(exp, models, datasets, exp.settings["latency_repeats"], progress, package, stale)
    _in_cell_order(exp)
    _paired_deltas(exp)
    return results


def _cell_code(package: str, engine: Engine) -> str:
    """A cell's code: the package's `code_version`, then the digests of the files outside it that
    define the cell's methods (plugins)."""
    return package + file_digests(strategy_files(engine.strategies))


def _follow(exp: Experiment, procs: Processes) -> Path:
    """A data-parallel run on a process other than 0: once process 0 has set the run up, load the
    data and models and run this process's share of each unfinished cell."""
    failed = procs.from_main(None)
    if failed is not None:
        raise TokencompError(f"process 0 could not start the run: {failed}")
    # rows read again, images not decoded again: process 0 checked every one
    datasets = {
        name: _dataset({**spec, "validate": "lazy"}, exp.out, regenerate=False) for name, spec in exp.datasets.items()
    }
    models = {name: _load_model(src, exp.load[name], procs) for name, src in exp.models.items()}
    todo = set(procs.from_main(None))
    package = code_version()
    for cell in (c for c in exp.cells if c.id in todo):
        model, data = models[cell.model], datasets[cell.dataset]
        engine = Engine(model, cell.strategies())
        code = _cell_code(package, engine)
        _run_cell(exp, cell, model, data, engine, exp.out / "results.jsonl", code, False, procs)
    return exp.out / "results.jsonl"


def _image_ref(image: str | Path, out: Path) -> str:
    """How a prediction row names its image: relative to the run dir ``out`` when inside it, else absolute."""
    path, run = Path(image).resolve(), out.resolve()
    return str(path.relative_to(run)) if path.is_relative_to(run) else str(path)


def _warn_other_code(out: Path, codes: dict[str, str]) -> None:
    """Say so on stderr when a run resumes on other code than its cells' rows were made with (the
    rows from before and after may differ where the scoring changed); rows record which is which.
    ``codes``: each cell's code now."""
    rows = {r["cell"]: [r] for r in read_rows(out / "results.jsonl")}
    for path in sorted((out / "predictions").glob("*.jsonl")):
        try:  # a damaged file is the business of its cell's run (which says so), not of this warning
            rows.setdefault(path.stem, []).extend(read_rows(path))
        except TokencompError:
            continue
    other = sorted({c for cell, got in rows.items() if cell in codes for c in codes_of(got) if c != codes[cell]})
    if other:
        now = sorted({codes[cell] for cell in rows if cell in codes})
        tqdm.write(
            f"warning: {out} has rows made with other code ({', '.join(other)}) than this run ({', '.join(now)}); "
            "where scoring changed between them their cells do not compare (each row's `code` says which made it)",
            file=sys.stderr,
        )


def _in_cell_order(exp: Experiment) -> None:
    """Rewrite ``results.jsonl`` in the experiment file's cell order, the order the report lists:
    a cell added to a finished run's file runs last but is listed where the file puts it."""
    results = exp.out / "results.jsonl"
    rows = read_rows(results)
    order = {c.id: i for i, c in enumerate(exp.cells)}
    ranked = sorted(rows, key=lambda r: order.get(r["cell"], len(order)))
    if ranked != rows:
        _rewrite(results, ranked)


def _paired_deltas(exp: Experiment) -> None:
    """Each finished cell's accuracy difference to the unmodified model on the same questions
    (``delta_vs_identity``: ``[difference, low, high]``, a paired bootstrap 95% interval), for
    every model and dataset with a finished ``identity`` cell; written into ``results.jsonl``."""
    results = exp.out / "results.jsonl"
    rows = read_rows(results)
    ref = {(r["model"], r["dataset"]): r["cell"] for r in rows if is_unmodified(r)}
    if not ref:
        return

    def scores(cell: str) -> dict:  # skipped samples (a lazily validated dataset) are not scored
        return {p["id"]: p["score"] for p in read_rows(exp.out / "predictions" / f"{cell}.jsonl") if "score" in p}

    base = {key: scores(cell) for key, cell in ref.items()}
    for r in rows:
        b = base.get((r["model"], r["dataset"]))
        if b is None:  # no reference for this model and dataset
            continue
        mine = scores(r["cell"])
        if not mine or set(mine) != set(b):  # predictions not at hand, or other questions
            continue
        ids = sorted(b)
        r["delta_vs_identity"] = list(paired_difference_ci([mine[i] for i in ids], [b[i] for i in ids]))
    _rewrite(results, rows)


def _check_data(out: Path, datasets: dict[str, JsonlDataset], started: bool) -> dict[str, str]:
    """Each dataset file's sha256; a `TokencompError` if a started run's ``datasets.json`` records
    another one for it (its rows came from other data)."""
    prints = {name: hashlib.sha256(d.path.read_bytes()).hexdigest() for name, d in datasets.items()}
    record = out / "datasets.json"
    if started and record.is_file():
        before = _read_json(record, "each dataset file's sha256")
        if not isinstance(before, dict):
            raise TokencompError(
                f"{record} is damaged (not a table of datasets); restore it, or use another out directory"
            )
        changed = sorted(n for n in prints if n in before and before[n] != prints[n])
        if changed:
            raise TokencompError(
                f"dataset file(s) of {changed} changed since {out} was started; choose another out directory"
            )
    return prints


def _latency_batch(exp: Experiment, model: Model, data: JsonlDataset):
    """The batch latency is timed on: always the dataset's first batch, so a resumed run (or a
    re-measurement) times the same inputs."""
    loaded = ((x, x.try_image()[0]) for x in data.samples)  # a lazily validated dataset: those that load
    first = list(itertools.islice(((x, im) for x, im in loaded if im is not None), exp.settings["batch_size"]))
    if not first:
        raise TokencompError(f"no image of dataset {data.name!r} loads")
    template = exp.settings["template"] or model.family
    return prepare(model, [im for _, im in first], [prompt(x, template) for x, _ in first])


def _latency_tokens(exp: Experiment) -> int:
    """Tokens generated per timed run: at least one decode step is timed, even for one-token answers."""
    return max(2, min(4, exp.settings["max_new_tokens"]))


def remeasure_latency(run_dir: str | Path, repeats: int | None = None, progress: bool = True) -> Path:
    """Time every finished cell of a run again, side by side (`tokencomp.profiler.measure_interleaved`
    per model and dataset, ``repeats`` rounds, default the experiment's ``latency_repeats``), and
    rewrite the latency fields of ``results.jsonl``: ``prefill_ms``, ``prefill_spread_ms``,
    ``decode_ms_per_token``, plus ``latency`` saying how they were taken. Accuracy, FLOPs and peak
    memory (which interleaving cannot attribute) are left as they are. For runs whose timings were
    disturbed (another job on the machine) or taken one cell at a time, hours apart. Refused
    while another process works in the run directory.

    Each model and dataset's rows are rewritten as soon as they are timed (a crash loses at most
    the group under way). Returns the results file."""
    run = Path(run_dir)
    results, saved = run / "results.jsonl", run / "experiment.toml"
    if not saved.is_file() or not results.is_file():
        raise TokencompError(
            f"{run} is not a run directory (no experiment.toml and results.jsonl); run `tokencomp compare` first"
        )
    if repeats is not None:
        check_int("repeats (timed rounds)", repeats, 1)
    with _run_lock(run):  # before reading the run: a compare finishing meanwhile may extend it
        base, loaded = run / "experiment.base", run / "models.json"
        # time on the device and dtype the run was made with, not the file's own settings
        made_with = _read_json(loaded, "the load settings each model was run with") if loaded.is_file() else None
        where = read_text(base, "the run's dataset folder") if base.is_file() else None
        exp = load_experiment(saved, run, where, load=made_with)
        repeats = exp.settings["latency_repeats"] if repeats is None else repeats
        done = {r["cell"] for r in read_rows(results)}
        if not any(c.id in done for c in exp.cells):
            raise TokencompError(f"{results} has no finished cell of {saved}")
        datasets = {name: _dataset(spec, run, regenerate=False) for name, spec in exp.datasets.items()}
        _check_data(run, datasets, started=True)
        package = code_version()
        made = sorted({split_code(c)[0] for c in codes_of(read_rows(results))} - {package})
        if made:  # timings of this code beside accuracy and FLOPs of another
            tqdm.write(
                f"warning: {run}'s cells were made with other code ({', '.join(made)}) than re-times them "
                f"({package}); each row's latency.code says which timed it",
                file=sys.stderr,
            )
        return _time_side_by_side(exp, {}, datasets, repeats, progress, package)


def _finished_groups(exp: Experiment) -> dict[tuple[str, str], list[Cell]]:
    """The finished cells of ``exp`` by (model, dataset)."""
    done = {r["cell"] for r in read_rows(exp.out / "results.jsonl")}
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in exp.cells:
        if c.id in done:
            groups.setdefault((c.model, c.dataset), []).append(c)
    return groups


def _stale_groups(exp: Experiment) -> set[tuple[str, str]]:
    """Groups whose rows were not all timed in one side-by-side pass over all of their cells."""
    taken = {r["cell"]: r.get("latency") or {} for r in read_rows(exp.out / "results.jsonl")}
    return {
        key
        for key, cells in _finished_groups(exp).items()
        if any(taken[c.id].get("taken") != "interleaved" or taken[c.id].get("cells") != len(cells) for c in cells)
    }


def _time_side_by_side(
    exp: Experiment, models: dict, datasets: dict, repeats: int, progress: bool, code: str, only: set | None = None
) -> Path:
    """`remeasure_latency`'s work on a loaded experiment (``models``: those already loaded; the
    others are loaded when needed; ``code``: the package's `code_version`, which the timings
    record; ``only``: the (model, dataset) groups to time, default all)."""
    results = exp.out / "results.jsonl"
    groups = {k: v for k, v in _finished_groups(exp).items() if only is None or k in only}
    for (model_name, dataset), group in tqdm(groups.items(), desc="side-by-side latency", disable=not progress):
        if model_name not in models:
            models[model_name] = _load_model(exp.models[model_name], exp.load[model_name])
        model = models[model_name]
        engines = {c.id: Engine(model, c.strategies()) for c in group}
        batch = _latency_batch(exp, model, datasets[dataset])
        torch.manual_seed(exp.settings["seed"])
        timing = measure_interleaved(engines, batch, repeats, new_tokens=_latency_tokens(exp), progress=progress)
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        rows = read_rows(results)
        for r in rows:
            if r["cell"] in timing:
                r.update(_latency_fields(timing[r["cell"]]))
                r["latency"] = {
                    "taken": "interleaved",
                    "cells": len(group),
                    "repeats": repeats,
                    "when": when,
                    "code": code,
                }
        _rewrite(results, rows)
    return results


def _latency_fields(t: Timing) -> dict[str, float]:
    """A results row's latency columns (milliseconds) from a `Timing` (seconds)."""
    return {
        "prefill_ms": t.prefill_median * 1e3,
        "prefill_spread_ms": t.prefill_spread * 1e3,
        "decode_ms_per_token": t.decode_per_token_median * 1e3,
    }


def _rewrite(path: Path, rows: list[dict]) -> None:
    """Replace a JSONL file whole (`write_atomic`)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_json(path: Path, what: str):
    """A run file's JSON, or a `TokencompError` naming the damaged file and what it holds."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise TokencompError(
            f"{path} ({what}) is damaged: {e}; restore it from a copy, or start the run in another out directory"
        ) from e


def _parts(out: Path, cell: str = "*") -> list[Path]:
    """The prediction rows of ``cell`` that the processes of a data-parallel run wrote, one file
    each (``predictions/<cell>.rank<r>.part``), not merged yet."""
    pattern = "*" if cell == "*" else glob.escape(cell)  # a label may hold [, * or ?
    return sorted((out / "predictions").glob(f"{pattern}.rank*.part"))


def _part_cell(part: Path) -> str:
    """The cell a part file (`_parts`) holds rows of."""
    return part.name.rsplit(".rank", 1)[0]


def _run_cell(
    exp, cell: Cell, model: Model, data: JsonlDataset, engine: Engine, results: Path, code: str, progress: bool, procs
) -> None:
    """Predict every sample of ``data`` a cell has no row for (this process: its share of the
    batches), then (process 0) merge the processes' rows, time the cell and write its summary."""
    pred_path = exp.out / "predictions" / f"{cell.id}.jsonl"
    done = procs.from_main(_done_samples(pred_path, _parts(exp.out, cell.id)) if procs.main else None)
    mine = pred_path if procs.world == 1 else pred_path.with_name(f"{cell.id}.rank{procs.rank}.part")
    _predict(exp, model, data, engine, mine, code, done, procs, cell.label if progress else None)
    procs.barrier()  # every process's rows are written
    if procs.main:
        parts = _parts(exp.out, cell.id)
        if parts:
            _merge(pred_path, parts, data)
        _summarise(exp, cell, model, data, engine, results, pred_path)
    procs.barrier()  # the others wait while process 0 times the cell


def _done_samples(pred_path: Path, parts: list[Path]) -> set[str]:
    """The samples a cell has rows for: in its predictions file and in unmerged parts (each file's
    torn last line, what a crash leaves, repaired)."""
    return {r["id"] for path in [pred_path, *parts] for r in read_rows(path, repair=True)}


def _merge(pred_path: Path, parts: list[Path], data: JsonlDataset) -> None:
    """Fold the processes' rows into the cell's predictions file, in dataset order (each sample's
    first row), then remove the parts (a crash in between leaves rows the next merge folds once)."""
    order = {x.id: i for i, x in enumerate(data.samples)}
    rows: dict[str, dict] = {}
    for path in [pred_path, *parts]:
        for r in read_rows(path):
            rows.setdefault(r["id"], r)
    ranked = sorted(rows.values(), key=lambda r: order.get(r["id"], len(order)))
    _rewrite(pred_path, ranked)
    for part in parts:
        part.unlink()


def _predict(exp, model: Model, data: JsonlDataset, engine: Engine, path: Path, code: str, done, procs, bar) -> None:
    """Append to ``path`` a row per sample not in ``done``, for this process's batches: the dataset
    cut into ``batch_size`` batches in file order, every ``procs.world``-th (all of them for one
    process). ``bar``: the progress bar's label, None for none."""
    s = exp.settings
    torch.manual_seed(s["seed"])
    template = s["template"] or model.family
    scoring = dataset_scoring(exp.datasets[data.name])
    bs = s["batch_size"]
    tok = model.tokenizer
    batches = [data.samples[i : i + bs] for i in range(0, len(data.samples), bs)]
    mine = [[x for x in b if x.id not in done] for j, b in enumerate(batches) if procs.takes(j)]
    with path.open("a") as f:
        for pending in tqdm([b for b in mine if b], desc=bar, leave=False, disable=bar is None):
            chunk, images = [], []
            for x in pending:  # a dataset validated lazily: an image that fails is skipped, recorded
                image, problem = x.try_image()
                if problem is None:
                    chunk.append(x)
                    images.append(image)
                    continue
                skipped = {"id": x.id, "type": x.type, "question": x.question, "answers": x.answers}
                f.write(
                    json.dumps({**skipped, "skipped": problem, "image": _image_ref(x.image, exp.out), "code": code})
                )
                f.write("\n")
            if not chunk:
                continue
            batch = prepare(model, images, [prompt(x, template) for x in chunk])
            tokens, pre = engine.generate(batch, s["max_new_tokens"], tok.eos_token_id, tok.pad_token_id or 0)
            flops = pre.flops
            for b, x in enumerate(chunk):
                text = tok.decode(tokens[b], skip_special_tokens=True).strip()
                lay = pre.state.layout(b)
                base = (lay["view"] == 0) & (lay["image"] == 0) & (lay["patch"] >= 0)
                row = {
                    "id": x.id,
                    "type": x.type,
                    "question": x.question,
                    "answers": x.answers,
                    "prediction": text,
                    "score": answer_score(text, x.answers, scoring),
                    "visual_tokens_llm": pre.record.visual_tokens_llm[b],
                    "tokens_per_layer": pre.record.tokens_per_layer[b],
                    "visual_per_layer": pre.record.visual_per_layer[b],
                    "image_per_layer": pre.record.image_per_layer[b],
                    "prefill_flops": flops[b].prefill,
                    "total_prefill_flops": flops[b].total_prefill,
                    "vision_flops": flops[b].vision,
                    "projector_flops": flops[b].projector,
                    "overhead_flops": flops[b].overhead,
                    "decode_flops_per_token": sum(flops[b].decode) / max(len(flops[b].decode), 1),
                    "decode_flops": sum(flops[b].decode),
                    "decode_steps": len(flops[b].decode),
                    "kept_patches": lay["patch"][base].tolist(),
                    # the run dir's own generated images by a path relative to it (a run dir moved or
                    # read from elsewhere still finds them), any other image by its absolute path
                    "image": _image_ref(x.image, exp.out),
                    "code": code,
                }
                f.write(json.dumps(row) + "\n")
            f.flush()


def _summarise(exp, cell: Cell, model: Model, data: JsonlDataset, engine: Engine, results: Path, pred_path) -> None:
    """Check that the cell has a row per sample, time it, and append its summary to ``results``."""
    s = exp.settings
    rows = read_rows(pred_path, repair=True)
    got, want = [r["id"] for r in rows], [x.id for x in data.samples]
    if sorted(got) != sorted(want):
        raise TokencompError(
            f"{pred_path} holds {len(got)} rows for {len(want)} samples; delete it to recompute the cell"
        )
    skipped = len(rows)
    rows = [r for r in rows if "skipped" not in r]  # scored over the samples that ran
    skipped -= len(rows)
    if not rows:
        raise TokencompError(f"every sample of cell {cell.id} was skipped (see the skipped rows of {pred_path})")
    first_batch = _latency_batch(exp, model, data)
    timing = measure(engine, first_batch, repeats=s["latency_repeats"], new_tokens=_latency_tokens(exp))
    yn = [r for r in rows if r["answers"][0].strip().lower() in ("yes", "no")]  # POPE-style yes/no items
    n = len(rows)

    def mean(key):
        return sum(r[key] for r in rows) / n

    summary = {
        "cell": cell.id,
        "model": cell.model,
        "dataset": cell.dataset,
        "method": cell.label,
        "family": model.family,
        "grid": list(model.grid),
        "spec": cell.spec,
        "samples": n,
        "skipped": skipped,  # samples of a lazily validated dataset whose image failed (not scored)
        "accuracy": mean("score"),
        "scoring": dataset_scoring(exp.datasets[cell.dataset]),  # how answers were normalised
        "accuracy_ci95": list(mean_ci([r["score"] for r in rows])),  # bootstrap over the samples
        "accuracy_by_type": scores_by_type(rows),
        "yes_no": yes_no_scores([r["prediction"] for r in yn], [r["answers"][0] for r in yn]) if yn else None,
        "visual_tokens_llm": mean("visual_tokens_llm"),
        # visual tokens (newlines not counted, as in visual_tokens_llm) averaged over the decoder
        # layers: what an in-LLM method keeps on average (None for a cell resumed from older rows)
        "visual_tokens_mean": (
            sum(sum(r["image_per_layer"]) / len(r["image_per_layer"]) for r in rows) / n
            if all("image_per_layer" in r for r in rows)
            else None
        ),
        "tokens_per_layer": [
            sum(r["tokens_per_layer"][i] for r in rows) / n for i in range(len(rows[0]["tokens_per_layer"]))
        ],
        "prefill_tflops": mean("prefill_flops") / 1e12,
        "total_prefill_tflops": mean("total_prefill_flops") / 1e12,
        "vision_tflops": mean("vision_flops") / 1e12,
        # None for a cell resumed from rows written before the field
        "projector_tflops": mean("projector_flops") / 1e12 if all("projector_flops" in r for r in rows) else None,
        "overhead_tflops": mean("overhead_flops") / 1e12,
        "decode_tflops_per_token": _decode_flops_per_token(rows) / 1e12,
        **_latency_fields(timing),
        "latency_batch_size": first_batch.input_ids.shape[0],
        "peak_memory_mb": timing.peak_memory_bytes / 2**20,
        "kv_cache_mb": timing.kv_cache_bytes / 2**20,
        "device": timing.device,
        "dtype": str(model.dtype).removeprefix("torch."),
        # the backend that served this model's tensors ("auto" resolved: Triton on CUDA)
        "kernel_backend": kernels.backend(model.lm_head.weight, engine.options.kernel_backend),
        "flops_unit": "FLOPs (2 x multiply-adds; matrix products only)",
        # the code its predictions were made with (more than one: a cell resumed on other code)
        "code": codes_of(rows),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with results.open("a") as f:
        f.write(json.dumps(summary) + "\n")
