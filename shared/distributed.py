"""Several processes, one run, through PyTorch's own stack.

`torchrun` and `accelerate launch` both start one process per GPU with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address in the environment; `setup()` reads them (no accelerate
import is needed) and joins the process group: NCCL for CUDA tensors, gloo for CPU tensors.
Without those variables everything here is a no-op and a run is one process, as before.

How a step is shared (the trainer does it, `plan_accumulation` decides it): every rank keeps the
same data position and draws the same global sequence of micro-batches, keeping its share, so the
global batch, the unit counts and the checkpointed data position are those of one process.
Only rank 0 writes (logs, samples, checkpoints, the summary); other ranks print nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError

# Rank 0 may tokenise or decode a whole data set while the others wait at a barrier.
TIMEOUT = timedelta(minutes=int(os.environ.get("BLUEBERRY_DIST_TIMEOUT_MIN", "120")))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)
    active: bool = False  # launched by torchrun/accelerate: the DDP/FSDP path, even for one process

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Join the process group when launched by torchrun/accelerate (idempotent). A plain
    `python script.py` is one process without any of it; `torchrun --nproc_per_node 1` takes the
    distributed path with one process, which is how its overhead is measured."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(_teardown)
        if dist.get_rank() != 0:  # one voice: the other ranks' stdout would repeat rank 0's
            sys.stdout = open(os.devnull, "w")
    return current()


def current() -> Dist:
    if not dist.is_initialized():
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")), True)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it fills the caches: tokens, decoded images, visual tokens);
    the others wait, then run it and find the caches ready."""
    info = current()
    if info.active and not info.main:
        dist.barrier()
    yield
    if info.active and info.main:
        dist.barrier()


def barrier() -> None:
    if current().active:
        dist.barrier()


def mean_across(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (itself in one process)."""
    if not current().active:
        return t
    t = t.detach().float().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)  # SUM then divide: gloo has no AVG
    return t / dist.get_world_size()


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (itself in one process)."""
    if not current().active:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_across(flag: torch.Tensor) -> torch.Tensor:
    """True on every rank when it is true on any."""
    if not current().active:
        return flag
    t = flag.detach().to(torch.int32).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool()


def from_main(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not current().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_(*tensors: torch.Tensor) -> None:
    """Overwrite tensors in place with rank 0's values (random choices every rank must share)."""
    if current().active:
        for t in tensors:
            dist.broadcast(t, src=0)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x [N, ...] concatenated in rank order (no gradient), the same on all ranks."""
    if not current().active:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


@dataclass(frozen=True)
class Accumulation:
    """This rank's share of a step of `grad_accum` micro-batches of `batch_size` rows."""

    micro_batches: tuple[int, ...]  # the global micro-batch numbers this rank trains on
    rows: slice | None  # the rows of each it keeps (None: all)
    total: int  # micro-batches drawn per step (every rank draws all, to keep one data position)


def plan_accumulation(grad_accum: int, batch_size: int, rank: int, world: int) -> Accumulation:
    """Split whole micro-batches across ranks when grad_accum allows (each rank then sees the
    micro-batch a single process would, so BatchNorm statistics are unchanged), else split the
    rows of every micro-batch. The global batch stays batch_size x grad_accum either way."""
    if grad_accum % world == 0:
        share = grad_accum // world
        return Accumulation(tuple(range(rank * share, (rank + 1) * share)), None, grad_accum)
    if batch_size % world == 0:
        rows = batch_size // world
        return Accumulation(tuple(range(grad_accum)), slice(rank * rows, (rank + 1) * rows), grad_accum)
    raise ConfigError(f"{world} processes cannot share a step of train.grad_accum={grad_accum} micro-batches of "
                      f"train.batch_size={batch_size}: make grad_accum or batch_size a multiple of {world}")


def map_tensors(fn, batch):
    """`fn` applied to every tensor of a batch: a tensor, or a dict/list/tuple of them (nested);
    anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def take_rows(batch, rows: slice | None):
    """This rank's rows of a batch (a tensor, or a tuple/list/dict of them)."""
    if rows is None:
        return batch
    return map_tensors(lambda t: t[rows], batch)
