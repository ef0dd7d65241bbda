"""The compare-methods runner: ``tokencomp compare EXPERIMENT.toml``.

An experiment file names models, datasets and a grid of methods::

    [experiment]
    name = "demo"            # results go to runs/<name> unless out = "..." is given
    plugins = ["my_policy.py"]  # optional: your own methods (files registering them with
                             # tc.register, relative to this file, or importable module names)
    batch_size = 4
    max_new_tokens = 4
    latency_repeats = 3
    seed = 0
    template = "vicuna_v1"   # optional: a tokencomp.data.TEMPLATES name or a format string with
                             # {question} (default: the model family's, "llava" / "llava-next")

    [[model]]
    name = "tiny-llava"      # embedded name, local checkpoint path, or "tiny-random:llava[-next]"
    datasets = ["scenes"]    # optional: the datasets this model runs on (default: all)
    device = "cuda"          # optional (default "cpu"); dtype = "float16" / "bfloat16" / "float32"
                             # (default), attn_implementation = "sdpa" (default) / "eager" /
                             # "flash_attention_2"; `tokencomp compare --device --dtype` sets all

    [[dataset]]
    name = "scenes"
    generator = "tc-scenes"  # the project's benchmark (tokencomp.benchmark.PRESETS; split, n,
    split = "test"           # optional size = [h, w] and tag_px), or path = "data.jsonl"
    n = 24                   # limit = k: the first k samples of a path's file
                             # validate = "lazy": images checked as they load (default "full")

    [[method]]
    name = "visionzip"
    budget = [192, 128, 64]  # a list is a grid axis; give a list-valued parameter as [[...]]

    [[method]]
    label = "pool64+fastv"   # a composition of strategies in one run
    compose = [{name = "pool", budget = 64}, {name = "fastv", k = 2}]

The whole file is validated before any work: before any model is loaded, a missing model path or
dataset file, an unknown table, key, method or parameter (named with the nearest valid one), a
value of the wrong type (a boolean is not a number), conflicting keys, an empty grid axis, a
missing dataset, two configurations under one label, a name that would leave the run directory,
and every row of every dataset (`tokencomp.data.JsonlDataset`); then a bad budget on the first batch or on the LLaVA-NeXT images with the fewest and most
tokens, a method a model cannot serve. Every finished sample is appended to
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

import difflib
import errno
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import kernels
from ._compat import tomllib
from .api import prepare
from .benchmark import PRESETS, SPLIT_SEED, generate_split
from .data import JsonlDataset, check_image, is_unmodified, prompt, read_rows, write_atomic
from .distributed import Processes
from .engine import Engine
from .errors import TokencompError, renamed
from .metrics import answer_score, mean_ci, paired_difference_ci, scores_by_type, yes_no_scores
from .model import Model, load_model, model_path
from .profiler import Timing, measure, measure_interleaved
from .provenance import code_version, codes_of, file_digests, split_code, strategy_files
from .registry import load_builtins
from .registry import method as make_method
from .strategy import check_int

try:
    import fcntl  # the run directory's lock (POSIX)
except ImportError:  # pragma: no cover - Windows
    fcntl = None

EXPERIMENT_KEYS = {"name", "out", "batch_size", "max_new_tokens", "latency_repeats", "seed", "template", "plugins"}
MODEL_KEYS = {"name", "source", "datasets", "device", "dtype", "attn_implementation", "device_map", "offload_folder"}
DISPATCH_KEYS = ("device_map", "offload_folder")  # accelerate's big-model dispatch, only where a table asks
GENERATOR_KEYS = {"generator", "split", "n", "size", "tag_px"}  # a generated split's settings
PATH_KEYS = {"path", "limit"}  # a dataset file's
DATASET_KEYS = {"name", "validate"} | GENERATOR_KEYS | PATH_KEYS
# an experiment file's tables: [experiment] once, the others as arrays of tables
TABLES = {"experiment": "[experiment]", "model": "[[model]]", "dataset": "[[dataset]]", "method": "[[method]]"}
TINY_FAMILIES = ("llava", "llava-next")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# how a model is loaded when its [[model]] table says nothing (the committed results' settings)
DEFAULT_LOAD = {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}


def model_load_options(table: dict, device: str | None = None, dtype: str | None = None) -> dict:
    """The ``{"device", "dtype", "attn_implementation"}`` a [[model]] table asks for, ``device`` /
    ``dtype`` overriding it when given; checked here (a CUDA device must exist, FlashAttention must
    be installed and run on CUDA in half precision), so a bad setting fails before any work."""
    name = table.get("name", "?")
    opts = {k: table.get(k, v) for k, v in DEFAULT_LOAD.items()}
    opts |= {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    try:
        dev = torch.device(opts["device"])
    except (RuntimeError, TypeError) as e:
        raise TokencompError(f"model {name!r}: device={opts['device']!r} is not a torch device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokencompError(f"model {name!r}: device={opts['device']!r} but CUDA is not available on this machine")
    opts["device"] = canonical_device(dev)
    if opts["dtype"] not in DTYPES:
        raise TokencompError(f"model {name!r}: dtype={opts['dtype']!r} must be one of {sorted(DTYPES)}")
    if opts["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
        raise TokencompError(
            f"model {name!r}: attn_implementation={opts['attn_implementation']!r} must be one of {ATTN_IMPLEMENTATIONS}"
        )
    for key in DISPATCH_KEYS:  # recorded only when given: a run without them resumes as it began
        if key in table:
            opts[key] = table[key]
    if "device_map" in opts:
        dm = opts["device_map"]
        ok = isinstance(dm, str) or (
            isinstance(dm, dict) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in dm.values())
        )
        if not ok:
            raise TokencompError(
                f'model {name!r}: device_map={dm!r} must be a string ("auto") or a table of module -> device '
                '("cuda:0", "cpu", "disk")'
            )
        if importlib.util.find_spec("accelerate") is None:
            raise TokencompError(f"model {name!r}: device_map needs accelerate (pip install -e '.[dispatch]')")
    if "offload_folder" in opts and not isinstance(opts["offload_folder"], str):
        raise TokencompError(f"model {name!r}: offload_folder must be a path string, got {opts['offload_folder']!r}")
    if opts["attn_implementation"] == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise TokencompError(f"model {name!r}: flash_attention_2 needs the flash extra (pip install -e '.[flash]')")
        if dev.type != "cuda" or opts["dtype"] == "float32":
            raise TokencompError(f"model {name!r}: flash_attention_2 runs on CUDA in float16 or bfloat16 only")
    return opts


def canonical_device(device: str | torch.device) -> str:
    """One name per device, so that settings compare equal when they mean the same device:
    ``"cpu"`` for any CPU, ``"cuda:<current>"`` for a CUDA device named without an index."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


@dataclass
class Cell:
    """One (model, dataset, method configuration) of the grid."""

    model: str
    dataset: str
    label: str
    spec: list[dict]  # one dict per composed strategy: {"name": ..., params...}

    @property
    def id(self) -> str:
        key = json.dumps([self.model, self.dataset, self.spec], sort_keys=True)
        return f"{self.label}-{hashlib.sha1(key.encode()).hexdigest()[:10]}".replace("/", "_").replace(" ", "_")

    def strategies(self):
        out = [make_method(s["name"], **{k: v for k, v in s.items() if k != "name"}) for s in self.spec]
        return [s for s in out if s.name != "identity"] or None


@dataclass
class Experiment:
    """A parsed, validated experiment file."""

    name: str
    out: Path
    settings: dict
    models: dict[str, str]
    datasets: dict[str, dict]
    cells: list[Cell] = field(default_factory=list)
    text: str = ""
    base: Path = Path(".")  # the folder relative dataset paths were read from
    load: dict[str, dict] = field(default_factory=dict)  # model name -> `model_load_options`
    plugins: list[Path] = field(default_factory=list)  # the files of the plugins it imported


def _nearest(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(where: str, table: dict, known: set[str]) -> None:
    """A `TokencompError` naming each unknown key of ``table`` with the nearest known one."""
    bad = sorted(set(table) - known)
    if bad:
        named = ", ".join(f"{k!r}{_nearest(k, known)}" for k in bad)
        raise TokencompError(f"{where} has unknown key(s) {named}; known: {sorted(known)}")


def _count(where: str, value, low: int = 1) -> int:
    """An integer >= ``low`` (a boolean is not one), or a `TokencompError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TokencompError(f"{where}={value!r} must be an integer >= {low}")
    return value


def _text(where: str, value) -> str:
    """A non-empty string, or a `TokencompError` naming it."""
    if not isinstance(value, str) or not value:
        raise TokencompError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _path_name(where: str, name) -> str:
    """A name that becomes a file or folder name in the run directory: one plain path component."""
    _text(where, name)
    odd = any(c in name for c in "/\\") or any(ord(c) < 32 for c in name) or len(name.encode()) > 200
    if name in (".", "..") or odd or name != name.strip():
        raise TokencompError(
            f"{where}={name!r} becomes a folder in the run directory: use a plain name (no '/', '\\', "
            "'..', control characters or surrounding spaces; at most 200 bytes)"
        )
    return name


def _grid(table: dict) -> list[tuple[str, list[dict]]]:
    """Expand one [[method]] table into (label, spec) pairs."""
    table = dict(table)
    table.pop("models", None)
    label = table.pop("label", None)
    if label is not None:  # it names the cell's predictions file ('/' and spaces become '_')
        _path_name("a [[method]] label", label.replace("/", "_").replace("\\", "_").strip() or label)
    if "compose" in table:
        compose = table.pop("compose")
        if not isinstance(compose, list) or not compose or not all(isinstance(s, dict) for s in compose):
            raise TokencompError(f"compose must be a non-empty list of {{name = ..., ...}} tables, got {compose!r}")
        spec = [dict(s) for s in compose]
        if table:
            raise TokencompError(f"a compose method takes only label/models/compose, got {sorted(table)}")
        if any(not isinstance(s.get("name"), str) for s in spec):
            raise TokencompError("each entry of compose needs a name")
        return [(label or "+".join(s["name"] for s in spec), spec)]
    if not isinstance(table.get("name"), str):
        raise TokencompError(f"a [[method]] table needs a name (got keys {sorted(table)})")
    name = table.pop("name")
    empty = [k for k, v in table.items() if v == []]
    if empty:
        raise TokencompError(
            f"method {label or name!r}: {empty[0]} = [] is an empty grid axis; give at least one value "
            "(a list-valued parameter is written [[...]])"
        )
    axes = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
    out = []
    for values in itertools.product(*axes.values()) if axes else [()]:
        params = dict(zip(axes, values))
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        # a label names the table; its grid axes still tell its cells apart (a bare name also shows the budget)
        suffix = "-".join(f"{k}{v}" for k, v in params.items() if len(axes[k]) > 1 or (k == "budget" and not label))
        base = label or name
        out.append((f"{base}-{suffix}" if suffix else base, [{"name": name, **params}]))
    return out


def load_experiment(
    path: str | Path,
    out: str | Path | None = None,
    base: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    load: dict[str, dict] | None = None,
) -> Experiment:
    """Parse and expand an experiment file; raises `TokencompError` naming what is wrong.

    Relative dataset paths are read from ``base`` (default: the file's folder). ``device`` and
    ``dtype`` (e.g. ``"cuda"``, ``"float16"``) override every [[model]]'s own; ``load`` (model name
    -> settings, as a run's ``models.json`` holds them) overrides named models' settings first."""
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    if not path.is_file():
        raise TokencompError(f"experiment file {str(path)!r} does not exist")
    text = read_text(path, "experiment file")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TokencompError(f"{path}: invalid TOML: {e}") from e
    _check_tables(path, doc)
    exp = doc.get("experiment", {})
    _check_keys("[experiment]", exp, EXPERIMENT_KEYS)
    name = _path_name("[experiment] name", exp.get("name", path.stem))
    for key in ("out", "template"):
        if key in exp:
            _text(f"[experiment] {key}", exp[key])
    plugins = import_plugins(_names(exp.get("plugins", []), "[experiment] plugins"), base)
    settings = {"batch_size": 4, "max_new_tokens": 8, "latency_repeats": 3, "seed": 0, "template": None}
    settings.update({k: v for k, v in exp.items() if k in settings})
    for key in ("batch_size", "max_new_tokens", "latency_repeats"):
        _count(f"[experiment] {key}", settings[key])
    _count("[experiment] seed", settings["seed"], 0)
    models, model_datasets, settings_of = {}, {}, {}
    for m in doc.get("model", []):
        if "name" not in m:
            raise TokencompError("each [[model]] needs a name")
        _text("a [[model]] name", m["name"])
        _check_keys(f"[[model]] {m['name']!r}", m, MODEL_KEYS)
        for key in ("source", "device", "dtype", "attn_implementation"):
            if key in m:
                _text(f"model {m['name']!r}: {key}", m[key])
        if m["name"] in models:
            raise TokencompError(f"two [[model]] tables are named {m['name']!r}")
        models[m["name"]] = m.get("source", m["name"])
        _check_source(m["name"], models[m["name"]])
        if "device_map" in m and models[m["name"]].startswith("tiny-random:"):
            raise TokencompError(f"model {m['name']!r}: device_map serves checkpoints on disk, not tiny-random models")
        given = {k: v for k, v in ((load or {}).get(m["name"]) or {}).items() if k in (*DEFAULT_LOAD, *DISPATCH_KEYS)}
        if isinstance(m.get("offload_folder"), str):  # relative to the experiment file, as its dataset paths are
            m = {**m, "offload_folder": str(base / m["offload_folder"])}
        settings_of[m["name"]] = model_load_options({**m, **given}, device, dtype)
        if "datasets" in m:
            model_datasets[m["name"]] = _names(m["datasets"], f"model {m['name']!r}: datasets")
    if not models:
        raise TokencompError(f"{path}: no [[model]] given")
    datasets = {}
    for d in doc.get("dataset", []):
        if "name" not in d:
            raise TokencompError("each [[dataset]] needs a name")
        where = f"dataset {_path_name('a [[dataset]] name', d['name'])!r}"
        _check_keys(f"[[dataset]] {d['name']!r}", d, DATASET_KEYS)
        if d["name"] in datasets:
            raise TokencompError(f"two [[dataset]] tables are named {d['name']!r}")
        if "limit" in d:
            _count(f"{where}: limit", d["limit"])
        if d.get("validate", "full") not in JsonlDataset.VALIDATE:
            raise TokencompError(f"{where}: validate={d['validate']!r} must be one of {list(JsonlDataset.VALIDATE)}")
        kinds = [k for k in ("path", "generator") if k in d]
        if len(kinds) == 2:
            raise TokencompError(f"{where} gives both path and generator: a dataset is a file or a generated split")
        if not kinds or (kinds == ["generator"] and d["generator"] not in PRESETS):
            raise TokencompError(
                f"{where} needs path = 'file.jsonl' or generator = one of {sorted(PRESETS)}"
                + (f", got generator = {d['generator']!r}" if kinds else "")
            )
        foreign = sorted(set(d) & (PATH_KEYS if kinds == ["generator"] else GENERATOR_KEYS))
        if foreign:
            raise TokencompError(
                f"{where}: {foreign} apply to a {'dataset file (path)' if kinds == ['generator'] else 'generated split'}, "
                f"not to a {'generated split' if kinds == ['generator'] else 'dataset file'}"
            )
        if "generator" in d:
            if d.get("split", "test") not in SPLIT_SEED:
                raise TokencompError(f"{where}: split must be one of {sorted(SPLIT_SEED)}")
            _count(f"{where}: n", d.get("n", 32))
            size = d.get("size")
            if size is not None and (
                not isinstance(size, list) or len(size) != 2 or not all(_is_count(v) and v >= 32 for v in size)
            ):
                raise TokencompError(f"{where}: size must be [height, width] in pixels, each at least 32, got {size!r}")
            if "tag_px" in d:
                _count(f"{where}: tag_px", d["tag_px"])
        if "path" in d:
            _text(f"{where}: path", d["path"])
            p = Path(d["path"])
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                state = "is not a file" if p.exists() else "does not exist"
                raise TokencompError(f"dataset {d['name']!r}: file {str(p)!r} {state}")
            d = {**d, "path": str(p)}
        datasets[d["name"]] = d
    if not datasets:
        raise TokencompError(f"{path}: no [[dataset]] given")
    for mname, names in model_datasets.items():
        if set(names) - set(datasets):
            raise TokencompError(f"model {mname!r} names unknown datasets {sorted(set(names) - set(datasets))}")
    cells = []
    for table in doc.get("method", []):
        only = table.get("models")
        if only is not None:
            only = _names(only, f"method {table.get('name', table.get('label'))!r}: models")
        if only and set(only) - set(models):
            raise TokencompError(
                f"method {table.get('name', table.get('label'))!r} names unknown models {sorted(set(only) - set(models))}"
            )
        for label, spec in _grid(table):
            for mname in models:
                if only and mname not in only:
                    continue
                for dname in model_datasets.get(mname, datasets):
                    cells.append(Cell(mname, dname, label, spec))
    if not cells:
        raise TokencompError(f"{path}: no [[method]] given")
    for c in {json.dumps(c.spec, sort_keys=True): c for c in cells}.values():  # before any model loads
        try:
            c.strategies()
        except TokencompError as e:
            raise renamed(e, f"method {c.label!r}: {e}") from e
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise TokencompError("two method entries expand to the same configuration")
    seen: dict[tuple, Cell] = {}
    for c in cells:  # the report names a cell by its label: two configurations may not share one
        other = seen.setdefault((c.model, c.dataset, c.label), c)
        if other is not c:
            raise TokencompError(
                f"methods {other.spec} and {c.spec} are both labelled {c.label!r} on {c.model} / {c.dataset}; "
                "give each [[method]] a distinct label"
            )
    out_dir = Path(out) if out else Path(exp.get("out", Path("runs") / name))
    return Experiment(name, out_dir, settings, models, datasets, cells, text, base.resolve(), settings_of, plugins)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_tables(path: Path, doc: dict) -> None:
    """The file holds only the known tables, each written as the format wants it."""
    for key, value in doc.items():
        if key not in TABLES:
            raise TokencompError(
                f"{path}: unknown top-level {key!r}{_nearest(key, TABLES)}; an experiment file holds "
                f"{', '.join(TABLES.values())}"
            )
        if key == "experiment" and not isinstance(value, dict):
            raise TokencompError(f"{path}: write [experiment] (one table), not [[experiment]] or experiment = ...")
        if key != "experiment" and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise TokencompError(
                f"{path}: write {TABLES[key]} (one table per {key}, repeated), not [{key}] or {key} = ..."
            )


def read_text(path: Path, what: str) -> str:
    """A file of the run or the experiment as UTF-8 text, or a `TokencompError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is dropped
    except UnicodeDecodeError as e:
        raise TokencompError(f"{path} ({what}) is not UTF-8 text (damaged?): {e}") from e


def _names(value, what: str) -> list[str]:
    """A TOML list of strings, or a `TokencompError` saying so (a bare string is not split into letters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokencompError(f"{what} must be a list of names, e.g. [{value!r}], got {value!r}")
    if not value and not what.endswith("plugins"):
        raise TokencompError(f"{what} = [] names nothing; leave the key out to mean all")
    return value


def _check_source(name: str, source: str) -> None:
    """Fail on a model source that cannot load before any model is loaded."""
    if source.startswith("tiny-random:"):
        family = source.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise TokencompError(f"model {name!r}: tiny-random family {family!r} must be one of {TINY_FAMILIES}")
        return
    try:
        model_path(source)
    except TokencompError as e:
        raise TokencompError(f"model {name!r}: {e}") from e


def import_plugins(entries: list[str], base: str | Path) -> list[Path]:
    """Import the modules that register an experiment's own methods (``@tc.register``); returns
    their files (the digest of a method's file joins its cells' code: `tokencomp.provenance.strategy_files`).

    Args:
        entries: each a ``.py`` file (relative to ``base``) or an importable module name.
        base: the experiment file's folder.
    """
    load_builtins()  # first: a plugin reusing a built-in's name is refused, not swapped
    files = []
    for entry in entries:
        is_file = entry.endswith(".py") or "/" in entry or os.sep in entry
        file = (Path(entry) if Path(entry).is_absolute() else Path(base) / entry) if is_file else None
        if file is not None and not file.is_file():
            raise TokencompError(f"plugin {entry!r}: file {str(file)!r} does not exist")
        # while it imports, its own folder (a file's) or the experiment's (a module's) is searched
        # first, so a plugin may import its siblings
        folder = str((file.parent if file is not None else Path(base)).resolve())
        sys.path.insert(0, folder)
        name = None
        try:
            if file is not None:
                # a fresh module each time: an edited file registers its new version
                name = f"tokencomp_plugin_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:10]}_{file.stem}"
                spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module  # dataclasses look their module up while the file runs
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(entry)
                file = Path(module.__file__)
        except TokencompError:
            sys.modules.pop(name, None)
            raise
        except (Exception, SystemExit) as e:  # the plugin's own error, named
            sys.modules.pop(name, None)
            raise TokencompError(f"plugin {entry!r} failed to import: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(folder)
        files.append(file.resolve())
    return files


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


def _load_image(sample):
    """``(image, None)``, or ``(None, what went wrong)`` for an image that does not load."""
    try:
        return sample.load_image(), None
    except Exception as e:  # PIL raises many kinds; a lazily validated dataset records, not dies
        return None, f"image {str(sample.image)!r} did not load: {type(e).__name__}: {e}"


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
    # each cell's code: the package's, and the files of its methods defined outside it (plugins)
    package = code_version()
    codes = {c.id: package + file_digests(strategy_files(engines[c.id].strategies)) for c in exp.cells}
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
        code = package + file_digests(strategy_files(engine.strategies))
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
    loaded = ((x, _load_image(x)[0]) for x in data.samples)  # a lazily validated dataset: those that load
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
    bs = s["batch_size"]
    tok = model.tokenizer
    batches = [data.samples[i : i + bs] for i in range(0, len(data.samples), bs)]
    mine = [[x for x in b if x.id not in done] for j, b in enumerate(batches) if procs.takes(j)]
    with path.open("a") as f:
        for pending in tqdm([b for b in mine if b], desc=bar, leave=False, disable=bar is None):
            chunk, images = [], []
            for x in pending:  # a dataset validated lazily: an image that fails is skipped, recorded
                image, problem = _load_image(x)
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
                    "score": answer_score(text, x.answers),
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
