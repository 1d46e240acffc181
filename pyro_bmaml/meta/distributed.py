r"""Data-parallel meta-training on :mod:`torch.distributed`.

A meta-batch of ``T`` tasks is split among the ``W`` processes (ranks): each rank adapts its
``T / W`` tasks with *all* their particles (the SVGD kernel couples the particles of a task,
never tasks), computes the meta-loss of its shard and its gradient, and the gradients are
all-reduced and averaged. Since every meta-loss here is a mean over tasks, the average of
the shard gradients is exactly the gradient of the full meta-batch, so the ranks' identical
optimizers step from identical parameters to identical parameters, as a single process
would with the same total meta-batch (up to the order of floating-point sums).

:class:`torch.nn.parallel.DistributedDataParallel` is not used: its gradient hooks do not
support the double backward the meta-gradient needs. The gradients are reduced here after
``backward`` instead, as one flat buffer (one collective per meta-step).

Every rank draws the same meta-batch from the same seeded generator and keeps its shard, so
no data moves between processes. :func:`~pyro_bmaml.meta.training.fit` uses this module when a
process group is initialized (``torchrun --nproc_per_node=N -m pyro_bmaml train ...``);
rank 0 alone evaluates, checkpoints and reports.
"""

from __future__ import annotations

import datetime
import os
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist

from ..tasks.base import TaskBatch

__all__ = ["is_distributed", "rank_and_size", "init_from_environment", "shard",
           "broadcast_parameters", "average_gradients", "all_reduce_mean"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_size() -> Tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_from_environment(device: str = "cpu", timeout: Optional[float] = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ...): gloo on CPU, nccl on CUDA. Returns whether this is
    a multi-process run; does nothing (``False``) when ``WORLD_SIZE`` is unset or 1.

    :param timeout: seconds a collective waits for the other ranks before it raises (torch's
        default, 30 minutes, when ``None``). A rank that dies closes its connections, and
        the others' next collective fails at once; a rank that hangs is caught by the
        timeout. Either way the survivors raise instead of waiting forever, and ``torchrun``
        (without ``--max-restarts``) then stops the whole group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend=backend, **kwargs)
    return is_distributed()


def shard(batch: TaskBatch, name: str = "meta_batch_size") -> TaskBatch:
    """This rank's contiguous share of a batch of tasks; the batch size must be a multiple
    of the world size (so that every rank's mean weighs the same)."""
    rank, size = rank_and_size()
    if size == 1:
        return batch
    if batch.num_tasks % size:
        raise ValueError(f"{name} ({batch.num_tasks}) must be a multiple of the number of "
                         f"processes ({size}) to shard the meta-batch's tasks evenly")
    per = batch.num_tasks // size
    return batch[rank * per:(rank + 1) * per]


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and floating buffers to every rank (a common start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks, with one all-reduce of
    a flat buffer (parameters without a gradient count as zero)."""
    if not is_distributed():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a copy; the tensor itself without a process group)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()
