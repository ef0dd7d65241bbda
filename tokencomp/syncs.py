"""Count the operations that make the host wait for the device (host syncs), on any device.

On a GPU, PyTorch queues kernels and returns at once. An operation whose result the host must
read waits until the device has finished everything queued before it, and the kernel launches
after it are then no longer hidden behind device work. Such operations are: a Python ``bool`` /
``int`` / ``float`` of a tensor, ``.item()``, ``.tolist()``, ``.cpu()``; a blocking upload of
host data (``.to(device)``, ``torch.tensor(values, device=d)``, indexing a device tensor with a
Python list, which PyTorch uploads as an index tensor); and operations whose output shape depends
on the data, such as ``nonzero``, boolean-mask indexing and ``bincount``. A few per
prefill are unavoidable (the packed width after a pruning depends on the data); one per decoder
layer or per sample adds up.

`HostSyncs` counts these calls at the Python level through a `torch.overrides.TorchFunctionMode`.
It works on the CPU, where nothing waits, so tests can hold the engine to a budget without a GPU.
On the CPU every tensor is a host tensor, so it tells the two kinds apart by where they came
from: a tensor is on the host when it is a ``.cpu()`` / ``.numpy()`` copy, was created without
naming a device (``torch.tensor(values)``), was given as ``host=`` (a batch's tensors), or was
computed from such tensors alone; operations on host tensors are free. Everything else counts as
on the device. It cannot see a sync inside a C++ operator other than those named here.

Example::

    with HostSyncs(host=host_tensors(batch)) as syncs:
        engine.prefill(batch)
    print(syncs.total, syncs.counts.most_common(3), syncs.sites.most_common(3))
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

# operations that always read device data on the host
ALWAYS = frozenset(
    {
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "item",
        "tolist",
        "cpu",
        "numpy",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
        "equal",
        "allclose",
        "is_nonzero",
    }
)
INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})
HOST_COPIES = frozenset({"cpu", "numpy"})
# factories whose tensor lives on the host unless a device is named
FACTORIES = frozenset(
    {"tensor", "as_tensor", "arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "linspace", "eye"}
)
_TORCH_DIR = str(Path(torch.__file__).parent)


def _index_kind(args) -> str | None:
    """``"bool"`` for indexing with a boolean mask (a data-dependent shape), ``"list"`` for
    indexing with a Python list (an upload of the index), else None."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    flat = [q for p in parts for q in (p if isinstance(p, list) else [p])]
    if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in flat):
        return "bool"
    if any(isinstance(p, list) and not any(isinstance(q, torch.Tensor) for q in p) for p in parts):
        return "list"
    return None


def is_host_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call ``name(*args, **kwargs)`` (a torch function or `torch.Tensor` method) reads
    device data on the host: see the module docstring."""
    if name in ALWAYS:
        return True
    if name in INDEXING:
        return _index_kind(args) is not None
    if name == "where":  # the one-argument form is nonzero
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":  # tensor repeats without output_size
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    return False


class HostSyncs(TorchFunctionMode):
    """Context manager counting host syncs (see the module docstring) made inside it.

    Args:
        host: tensors known to live on the host, such as a `tokencomp.Batch`'s (`host_tensors`):
            work on them alone is free, and their upload to the device counts as one sync.

    Attributes:
        counts: ``Counter`` of operation name -> calls (indexing as ``"name[bool]"`` with a boolean
            mask, ``"name[list]"`` with a Python list).
        sites: ``Counter`` of ``"file:line"`` -> calls, the innermost caller outside torch.
        total: all calls counted.
    """

    def __init__(self, host: Iterable[torch.Tensor | None] = ()) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._host: dict[int, weakref.ref] = {}  # id -> tensor known to live on the host
        for t in host:
            if t is not None:
                self._mark_host(t)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors((args, kwargs)) if self._host or name in FACTORIES else None  # None: not needed
        on_host = bool(inputs) and all(self._is_host(t) for t in inputs)
        upload = _uploads(name, args, kwargs, inputs, on_host)
        if upload or (not on_host and is_host_sync(name, args, kwargs)):
            self.counts["upload" if upload else f"{name}[{_index_kind(args)}]" if name in INDEXING else name] += 1
            self.sites[_caller()] += 1
        out = func(*args, **kwargs)
        if (name in HOST_COPIES or upload) and isinstance(out, torch.Tensor) and out is args[0]:
            out = out.view_as(out)  # on the CPU a copy can be the tensor itself: a new alias stands for it
        made_here = name in FACTORIES and not inputs and kwargs.get("device") is None
        if not upload and (on_host or made_here or name in HOST_COPIES):
            for t in _tensors(out):
                self._mark_host(t)
        return out

    def _mark_host(self, t: torch.Tensor) -> None:
        key = id(t)
        self._host[key] = weakref.ref(t, lambda _: self._host.pop(key, None))  # forgotten when t dies

    def _is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t


def _uploads(name: str, args: tuple, kwargs: dict, inputs, on_host: bool) -> bool:
    """Whether the call copies host data to the device, which waits like a read unless
    ``non_blocking=True``: ``.to(device)`` / ``.cuda()`` of a host tensor, or a factory given
    Python data and a device (``torch.tensor(values, device=d)``)."""
    if kwargs.get("non_blocking"):
        return False
    if name in ("to", "cuda") and on_host:
        return name == "cuda" or "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])
    return name in ("tensor", "as_tensor") and not inputs and kwargs.get("device") is not None


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in ``value``: a tensor, or nested tuples, lists and dict values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _internal(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR) or filename == __file__


def host_tensors(batch) -> list[torch.Tensor]:
    """The tensors of a `tokencomp.Batch` as `tokencomp.prepare` makes them: on the host."""
    return [t for t in (batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes) if t is not None]
