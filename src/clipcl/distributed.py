"""Several processes on PyTorch's own distributed engine (`torchrun`): one process per device, rank 0 writes.

A run under torchrun (WORLD_SIZE > 1 in the environment) joins the process group of its launcher: NCCL on
CUDA, gloo on the CPU. Every rank builds the same scenario, model and memory (all derived from the seed), draws
the same global batch of optim.batch_size positions each step and trains on its shard of it; the batch's
embeddings are gathered so that every rank computes the loss of the whole global batch, and gradients are
averaged by DistributedDataParallel. A run therefore follows the same trajectory with any number of ranks
(to float rounding), and a checkpoint written with W ranks resumes with any other number. One exception:
BatchNorm (clipcl-tiny-rn) is synchronised on CUDA only; on CPUs each rank normalises its own share.
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def requested() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> None:
    """Join the launcher's process group (env:// rendezvous), once; a no-op for a single process."""
    if requested() and not dist.is_initialized():
        # CLIPCL_DIST_BACKEND=gloo lets several ranks share one GPU (NCCL refuses that): a smoke test, not speed
        backend = os.environ.get("CLIPCL_DIST_BACKEND") or ("nccl" if device_type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=30))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard_sizes(n: int, world: int) -> list[int]:
    """How n batch samples are split over the ranks: contiguous, sizes differing by at most one."""
    return [len(x) for x in np.array_split(np.arange(n), world)]


def shard(positions: np.ndarray, r: int, world: int) -> np.ndarray:
    """Rank r's contiguous part of a global batch of positions."""
    return np.array_split(positions, world)[r]


def gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The rows of every rank's x, in rank order (rank r holds sizes[r] rows). The own rows keep their autograd
    graph; the others are constants (open_clip's gather without grad plus the local slice)."""
    if not active():
        return x
    width = max(sizes)
    pad = torch.zeros((width - len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.empty((width, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in sizes]
    dist.all_gather(parts, torch.cat([x.detach(), pad]))
    r = rank()
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[r] = x
    return torch.cat(parts)


def shared(x: torch.Tensor) -> torch.Tensor:
    """A tensor every rank computes alike (class texts, the logit scale): the same value, its gradient divided
    by the world size, so that the gradients summed over the ranks count it once."""
    if not active() or not x.requires_grad:
        return x
    w = world_size()
    return x.detach() + (x - x.detach()) / w


def all_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum over the ranks (float64)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if active():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether the flag is set on any rank (e.g. a signal that reached only some processes)."""
    return bool(all_sum([float(flag)], device).item() > 0) if active() else flag
