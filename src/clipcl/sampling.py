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
