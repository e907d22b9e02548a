"""Derived randomness: every random stream of a run is a function of (seed, task, step/epoch, stream id).

A checkpoint therefore only needs the step counters to continue the exact same stream, and a resumed run
matches an uninterrupted one. Stream ids: 0 batch order, 1 memory draws, 2 memory selection,
3 augmentation.
"""
from __future__ import annotations

import numpy as np
import torch

STREAM_ORDER, STREAM_MEMORY, STREAM_SELECT, STREAM_AUGMENT = 0, 1, 2, 3


def seeded(*keys: int) -> torch.Generator:
    """A torch generator whose seed is a hash of the keys (seed, task, step, ...).

    The number of keys is hashed too: SeedSequence pads its entropy with zeros, so (s, t, 2) and (s, t, 2, 0)
    would otherwise give the same stream.
    """
    seed = int(np.random.SeedSequence([len(keys), *(int(k) for k in keys)]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def stream_positions(seed: int, task: int, n: int, start: int, count: int) -> np.ndarray:
    """Positions start..start+count of the sample stream of a task: epoch permutations of range(n), end to end."""
    out = []
    pos = start
    while pos < start + count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=seeded(seed, task, epoch, STREAM_ORDER)).numpy()
        take = min(n - offset, start + count - pos)
        out.append(perm[offset: offset + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def concat_positions(seed: int, task: int, step: int, batch_size: int, n_new: int, n_mem: int) -> np.ndarray:
    """A batch of `batch_size` new samples (epoch stream) plus `batch_size` memory samples drawn for this step.

    Positions index D_t U M with the memory after the new data; no memory gives the new samples alone.
    """
    pos_new = stream_positions(seed, task, n_new, step * batch_size, batch_size)
    if n_mem == 0:
        return pos_new
    g = seeded(seed, task, step, STREAM_MEMORY)
    if n_mem >= batch_size:
        pos_mem = torch.randperm(n_mem, generator=g)[:batch_size].numpy()
    else:
        pos_mem = torch.randint(n_mem, (batch_size,), generator=g).numpy()
    return np.concatenate([pos_new, n_new + pos_mem])


def uniform_positions(seed: int, task: int, step: int, batch_size: int, n_new: int, n_mem: int) -> np.ndarray:
    """A batch of `batch_size` samples from the epoch stream over D_t U M (new and memory alike)."""
    return stream_positions(seed, task, n_new + n_mem, step * batch_size, batch_size)


def memory_draws_per_step(sampling: str, batch_size: int, n_new: int, n_mem: int) -> float:
    """How many times a step draws each memory image, in expectation (the replay rate): `concat` draws
    batch_size memory positions a step (without replacement when the memory holds that many), `uniform` draws
    batch_size positions of D_t U M alike. 0 without memory."""
    if n_mem <= 0:
        return 0.0
    if sampling == "uniform":
        return batch_size / (n_new + n_mem)
    return batch_size / n_mem


def replay_rates(cfg) -> list[float]:
    """The replay rate (memory_draws_per_step) of every task of a class-incremental RunCfg with a per-class
    memory, from the config alone: task t's memory holds memory.per_class images of each class of tasks < t, its
    new data scenario.train_per_class - scenario.val_per_class images of each of its classes."""
    s, n_classes = cfg.scenario, {"fmnist100": 100, "cifar100": 100}.get(cfg.scenario.dataset)
    if s.kind != "cil" or n_classes is None or cfg.memory.total or cfg.memory.bytes:
        raise ValueError("replay_rates: a class-incremental fmnist100 or cifar100 config with memory.per_class")
    per_class = {"fmnist100": 500, "cifar100": 500}[s.dataset]
    train = (min(s.train_per_class, per_class) if s.train_per_class else per_class) - s.val_per_class
    first = s.initial_classes or s.classes_per_task
    sizes = [first] + [s.classes_per_task] * ((n_classes - first) // s.classes_per_task)
    rates, old = [], 0
    for k in sizes:
        rates.append(memory_draws_per_step(cfg.method.sampling, cfg.optim.batch_size, k * train,
                                           cfg.memory.per_class * old))
        old += k
    return rates
