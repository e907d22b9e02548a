"""ReplayMemory: a class-balanced store of uint8 images, kept apart from how exemplars are chosen.

Capacity: `per_class` images for every seen class, or a `total` budget split equally (floor) over the
seen classes, so that old classes shrink as new ones arrive. Within a class the slots are split equally
over the tasks that brought the class (in domain-incremental streams a class comes back in every domain).
Images of a group are kept in the random order they were drawn in, so shrinking a group to its first k
images keeps a uniform random subset.
"""
from __future__ import annotations

import numpy as np
import torch

from .data.images import ImageSet


class ReplayMemory:
    """Class-balanced replay memory of uint8 images."""

    def __init__(self, per_class: int = 0, total: int = 0):
        if per_class < 0 or total < 0:
            raise ValueError("memory sizes must be 0 or more")
        self.per_class = per_class
        self.total = total
        self.groups: dict[tuple[int, int], torch.Tensor] = {}  # (task, class) -> uint8 [n, C, H, W]

    @property
    def classes(self) -> list[int]:
        """Classes with a slot in the memory, sorted."""
        return sorted({c for _, c in self.groups})

    def class_capacity(self, n_classes: int) -> int:
        """Images allowed per class when n_classes classes have been seen."""
        if self.total:
            return self.total // max(n_classes, 1)
        return self.per_class

    def __len__(self) -> int:
        return sum(len(x) for x in self.groups.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored images."""
        return sum(x.numel() * x.element_size() for x in self.groups.values())

    def counts(self) -> dict[int, int]:
        """Images held per class."""
        out: dict[int, int] = {}
        for (_, c), x in self.groups.items():
            out[c] = out.get(c, 0) + len(x)
        return out

    def _group_caps(self, keys: list[tuple[int, int]], n_classes: int) -> dict[tuple[int, int], int]:
        cap = self.class_capacity(n_classes)
        by_class: dict[int, list[tuple[int, int]]] = {}
        for k in sorted(keys):
            by_class.setdefault(k[1], []).append(k)
        caps = {}
        for ks in by_class.values():
            share, extra = divmod(cap, len(ks))
            for i, k in enumerate(ks):  # the most recent tasks get the remainder
                caps[k] = share + (1 if i >= len(ks) - extra else 0)
        return caps

    def update(self, task: int, data: ImageSet, generator: torch.Generator) -> None:
        """Add task `task`'s images: draw each new group at random, then shrink every group to its share."""
        new_classes = np.unique(data.targets).tolist()
        keys = list(self.groups) + [(task, c) for c in new_classes if (task, c) not in self.groups]
        n_classes = len({c for _, c in keys})
        caps = self._group_caps(keys, n_classes)
        for c in new_classes:
            key = (task, c)
            if key in self.groups:
                continue
            pos = np.flatnonzero(data.targets == c)
            take = min(caps[key], len(pos))
            order = torch.randperm(len(pos), generator=generator).numpy()[:take]
            if take:
                self.groups[key] = data.load(pos[order]).clone()
        for key in list(self.groups):
            self.groups[key] = self.groups[key][: caps[key]]
            if len(self.groups[key]) == 0:
                del self.groups[key]

    def as_imageset(self) -> ImageSet:
        """The memory's images and labels as one ImageSet (stable order: by task, then class)."""
        keys = sorted(self.groups)
        if not keys:
            return ImageSet.from_tensor(torch.zeros(0, 1, 1, 1, dtype=torch.uint8), [])
        images = torch.cat([self.groups[k] for k in keys])
        labels = np.concatenate([np.full(len(self.groups[k]), k[1]) for k in keys])
        return ImageSet.from_tensor(images, labels)

    def state_dict(self) -> dict:
        """Everything needed to rebuild the memory exactly."""
        return {"per_class": self.per_class, "total": self.total,
                "keys": sorted(self.groups), "images": [self.groups[k] for k in sorted(self.groups)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a memory saved with state_dict()."""
        self.per_class, self.total = int(state["per_class"]), int(state["total"])
        self.groups = {tuple(k): x.clone() for k, x in zip(state["keys"], state["images"])}
