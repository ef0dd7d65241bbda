"""Count the operations that make the host wait for the device (host syncs), on any device.

On a GPU, PyTorch queues kernels and returns at once. An operation whose result the host must
read waits until the device has finished everything queued before it, and the kernel launches
after it are then no longer hidden behind device work. Such operations are: a Python ``bool`` /
``int`` / ``float`` of a tensor, ``.item()``, ``.tolist()``, ``.cpu()``; and operations whose
output shape depends on the data, such as ``nonzero``, boolean-mask indexing and ``bincount``.
A few per prefill are unavoidable (a packed width after pruning is data-dependent). One per
decoder layer adds up: 32 layers at batch 1 on an H100 run in a few milliseconds.

`HostSyncs` counts these calls at the Python level through a `torch.overrides.TorchFunctionMode`.
It works on the CPU, where nothing waits, so tests can hold the engine to a budget without a GPU.
It cannot see a sync inside a C++ operator (none of the engine's own operators does), and it
counts ``.cpu()`` and ``.numpy()`` even on CPU tensors, where they are free.

Example::

    with HostSyncs() as syncs:
        engine.prefill(batch)
    print(syncs.total, syncs.counts.most_common(3), syncs.sites.most_common(3))
"""

from __future__ import annotations

import sys
from collections import Counter
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
_TORCH_DIR = str(Path(torch.__file__).parent)


def _has_bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def is_host_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call ``name(*args, **kwargs)`` (a torch function or `torch.Tensor` method) reads
    device data on the host: see the module docstring."""
    if name in ALWAYS:
        return True
    if name in INDEXING:
        return _has_bool_index(args)
    if name == "where":  # the one-argument form is nonzero
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":  # tensor repeats without output_size
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    return False


class HostSyncs(TorchFunctionMode):
    """Context manager counting host syncs (see the module docstring) made inside it.

    Attributes:
        counts: ``Counter`` of operation name -> calls (boolean-mask indexing as ``"name[bool]"``).
        sites: ``Counter`` of ``"file:line"`` -> calls, the innermost caller outside torch.
        total: all calls counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if is_host_sync(name, args, kwargs):
            self.counts[f"{name}[bool]" if name in INDEXING else name] += 1
            self.sites[_caller()] += 1
        return func(*args, **kwargs)


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _internal(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR) or filename == __file__
