"""Experiment files (``tokencomp compare EXPERIMENT.toml``): parsed, expanded into cells and checked
whole before any work; `tokencomp.runner` runs them.

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
                             # scoring = "vqa" (default: lmms-eval's answer normalisation)
                             # or "exact" (plainer)

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
tokens, a method a model cannot serve.
(The checks that need the models and data run in `tokencomp.runner` before any forward pass.)
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._compat import tomllib
from .benchmark import PRESETS, SPLIT_SEED
from .data import JsonlDataset
from .errors import TokencompError, renamed
from .metrics import SCORINGS
from .model import model_path
from .registry import load_builtins
from .registry import method as make_method

EXPERIMENT_KEYS = {"name", "out", "batch_size", "max_new_tokens", "latency_repeats", "seed", "template", "plugins"}
MODEL_KEYS = {"name", "source", "datasets", "device", "dtype", "attn_implementation", "device_map", "offload_folder"}
DISPATCH_KEYS = ("device_map", "offload_folder")  # accelerate's big-model dispatch, only where a table asks
GENERATOR_KEYS = {"generator", "split", "n", "size", "tag_px"}  # a generated split's settings
PATH_KEYS = {"path", "limit"}  # a dataset file's
DATASET_KEYS = {"name", "validate", "scoring"} | GENERATOR_KEYS | PATH_KEYS
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


def dataset_scoring(spec: dict) -> str:
    """How a [[dataset]] table's answers are scored (`tokencomp.metrics.answer_score`): its
    ``scoring`` key, ``"vqa"`` (lmms-eval's normalisation) by default."""
    return spec.get("scoring", "vqa")


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
        if dataset_scoring(d) not in SCORINGS:
            raise TokencompError(f"{where}: scoring={d['scoring']!r} must be one of {list(SCORINGS)}")
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
