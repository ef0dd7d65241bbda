"""Data-parallel runs on an existing launcher.

``torchrun --nproc-per-node N -m tokencomp.cli compare EXPERIMENT.toml`` (or ``accelerate launch
-m tokencomp.cli compare ...``) starts N processes; each takes every N-th batch of every cell (the
dataset cut into ``batch_size`` batches in file order, as one process cuts it), so that each batch,
and so each prediction row, is the one a single process makes. Process 0 sets the run up (the run
directory, its lock, the validation of the whole file), merges each cell's rows into
``predictions/<cell>.jsonl`` in dataset order, and alone times latency while the others wait, so
that timings stay clean; it alone writes the report.

A process that fails ends the launch: the launcher (torchrun's agent, which ``accelerate launch``
uses too) stops the others, and the same command started again resumes. Process 0 merges what
every process wrote in the run directory, so on several machines it must be a shared folder.

The processes find each other through the launcher's own variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which ``torch.distributed``'s ``env://``
rendezvous reads; they synchronise over a gloo process group (CPU, on any machine). On a GPU
machine a model whose device is ``"cuda"`` loads on ``cuda:<LOCAL_RANK>``, one GPU per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# how long a process waits for the others: process 0 may validate, merge and time for long
WAIT = timedelta(hours=6)


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run (a single process: rank 0 of 1).

    Attributes:
        rank: this process, in ``[0, world)``.
        world: processes in the run.
        local_rank: this process on its machine (its GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is process 0 (sets up, merges, times, reports)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Process 0's ``value`` (any picklable object), on every process."""
        if self.world == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def takes(self, batch: int) -> bool:
        """Whether this process runs batch number ``batch`` of a cell (every ``world``-th)."""
        return batch % self.world == self.rank

    def device(self, device: str) -> str:
        """The device this process loads a model on: in a data-parallel run any CUDA device
        (``"cuda"``, ``"cuda:0"``) becomes the process's own GPU, ``cuda:<local_rank>``."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device.startswith("cuda") else device


def launched() -> Processes:
    """The processes of the launch this one belongs to: a single process unless a launcher set
    ``WORLD_SIZE`` above 1, in which case it joins their gloo process group (`close` leaves it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local < torch.cuda.device_count():
        torch.cuda.set_device(local)  # "cuda" alone names this process's GPU
    return Processes(dist.get_rank(), dist.get_world_size(), local)


def launcher_device(device: str) -> str:
    """The device a process of a launch loads a model on when it does not join tokencomp's own
    process group (lmms-eval's processes): `Processes.device` for its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Processes(0, world, int(os.environ.get("LOCAL_RANK", "0"))).device(device)


def close(processes: Processes) -> None:
    """Leave the process group `launched` joined (nothing for a single process)."""
    if processes.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
