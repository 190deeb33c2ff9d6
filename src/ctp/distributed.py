"""Data parallelism across processes: which process this is, and the few collectives ctp needs.

ctp's parallel work is plain data parallelism. Every process holds the whole
frozen model (and the prompt), scores its own share of each set of windows,
and the processes add up a handful of numbers: NLL sums, token counts and the
prompt's gradient. Nothing else is trainable, so one all-reduce of the prompt
gradient replaces DistributedDataParallel.

Library functions (``window_nll``, ``train_prompt``) read the state of
``torch.distributed``: with no process group, or a group of one process, every
helper here is a no-op and they run the single-process code unchanged. The
command line joins the group a launcher set up (``accelerate launch``,
``torchrun``) through :func:`init_from_env`, which lets Hugging Face
accelerate pick the backend (NCCL on GPUs, gloo on CPUs) and this process's
device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "cpu") -> str:
    """Join the launcher's process group, if there is one; return this process's device.

    ``device`` is the device asked for ('cpu' or 'cuda'). Under a launcher only
    its type counts: each process gets ``cuda:<local rank>`` (NCCL) or the CPU
    (gloo). Without a launcher ``device`` is returned as it is.
    """
    if not launched():
        return device
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu"
    state = PartialState(cpu=cpu)
    return "cpu" if cpu else str(state.device)


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this is the process that writes files, prints and shows progress."""
    return world()[0] == 0


def shard(x: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of ``x`` along dim 0 (the whole of it with one process).

    Shares differ in size by at most one row and may be empty when there are
    more processes than rows; callers normalise by the global size.
    """
    rank, size = world()
    return x if size == 1 else x.tensor_split(size)[rank]


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes, in place (every process gets the same bits)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_across(values: Sequence[float], device: str | torch.device = "cpu") -> list[float]:
    """Each of ``values`` summed over processes, in float64 (exact for token counts below 2^53)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return all_reduce_(t).tolist()


def any_across(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True on every process if ``flag`` is true on any (so all take the same branch)."""
    return sum_across([1.0 if flag else 0.0], device)[0] > 0


def broadcast(obj):
    """The main process's ``obj`` on every process (picklable objects; tensors come back on the CPU)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the block on the main process first, then on the others (e.g. to fill a cache once)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


__all__ = ["launched", "init_from_env", "world", "is_main", "shard", "all_reduce_", "sum_across", "any_across",
           "broadcast", "gather", "barrier", "main_first"]
