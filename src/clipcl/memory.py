"""ReplayMemory: a class-balanced store of images, kept apart from how exemplars are chosen.

Capacity, one of:
- `per_class` images for every seen class;
- a `total` image budget split equally (floor) over the seen classes, so old classes shrink as new ones come;
- a `bytes` budget split equally over the seen classes: each class keeps as many images as fit in its share
  of bytes, so a compressed memory (`codec` png, or jpeg at `quality`) holds more images in the same bytes.
Within a class the budget is split equally over the tasks that brought the class (in domain-incremental
streams a class comes back in every domain). Images of a group are kept in their selection order (random:
the order they were drawn in; herding: iCaRL's greedy order), so shrinking a group to its first k images
keeps a uniform random subset, or the k best herding exemplars.

Every image is stored as one uint8 tensor: raw pixels [C, H, W], or the encoded file's bytes [n] (PNG is
lossless, JPEG lossy). `nbytes` counts exactly those bytes. Images are decoded when a batch reads them.
Methods may attach a per-image tensor (`aux`, e.g. DER++'s logits) that is kept, shrunk and checkpointed
with its image.

A bytes budget too small for any image is refused: by validation where the image size is known before the data
(raw pixels of a dataset of fixed size, or smaller than any PNG or JPEG file), otherwise when the first task's
images come in and none fits (a ConfigError naming memory.bytes and the smallest budget that would hold one
image per class).
"""
from __future__ import annotations

import io
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .data.images import ImageSet

CODECS = ("raw", "png", "jpeg")
SELECTIONS = ("random", "herding")
Key = tuple[int, int]  # (task, class)


def encode(image: torch.Tensor, codec: str, quality: int = 90) -> torch.Tensor:
    """uint8 [C, H, W] -> the stored tensor: itself (raw) or the encoded file's bytes (png, jpeg)."""
    if codec == "raw":
        return image.clone()
    from PIL import Image

    arr = image.numpy()
    img = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    if codec == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=9)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def decode(stored: torch.Tensor, channels: int) -> torch.Tensor:
    """The stored tensor -> uint8 [C, H, W] (raw tensors have 3 dimensions, encoded ones 1)."""
    if stored.ndim == 3:
        return stored
    from PIL import Image

    with Image.open(io.BytesIO(stored.numpy().tobytes())) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


class MemoryStore:
    """A store (images.Store) over stored memory items, decoded on read."""

    def __init__(self, items: list[torch.Tensor], channels: int):
        self.items, self.channels = items, channels

    def read(self, index: np.ndarray) -> torch.Tensor:
        images = [decode(self.items[int(i)], self.channels) for i in np.asarray(index).reshape(-1)]
        return torch.stack(images) if images else torch.zeros(0, self.channels, 1, 1, dtype=torch.uint8)


def herding_order(features: torch.Tensor) -> Iterator[int]:
    """iCaRL herding: yield, one at a time, the sample that brings the mean of the chosen ones closest to the
    class mean (features are L2-normalised first; each sample is chosen once)."""
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen_sum = torch.zeros_like(mu)
    free = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, len(f) + 1):
        dist = ((mu - (chosen_sum + f) / k) ** 2).sum(1)
        dist[~free] = float("inf")
        i = int(dist.argmin())
        free[i] = False
        chosen_sum += f[i]
        yield i


class ReplayMemory:
    """Class-balanced replay memory."""

    def __init__(self, per_class: int = 0, total: int = 0, bytes: int = 0, codec: str = "raw", quality: int = 90,
                 selection: str = "random"):
        if per_class < 0 or total < 0 or bytes < 0:
            raise ValueError("memory sizes must be 0 or more")
        if codec not in CODECS or selection not in SELECTIONS:
            raise ValueError(f"codec must be one of {CODECS}, selection one of {SELECTIONS}")
        self.per_class, self.total, self.bytes = per_class, total, bytes
        self.codec, self.quality, self.selection = codec, quality, selection
        self.groups: dict[Key, list[torch.Tensor]] = {}  # (task, class) -> stored images, in selection order
        self.aux: dict[Key, list[torch.Tensor]] = {}  # (task, class) -> a method's tensor per image
        self.channels = 0
        self._smallest = 0

    @property
    def classes(self) -> list[int]:
        """Classes with a slot in the memory, sorted."""
        return sorted({c for _, c in self.groups})

    def class_capacity(self, n_classes: int) -> int:
        """Images allowed per class when n_classes classes have been seen (image budgets)."""
        if self.total:
            return self.total // max(n_classes, 1)
        return self.per_class

    def __len__(self) -> int:
        return sum(len(x) for x in self.groups.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored images (raw pixels, or the encoded files)."""
        return sum(x.numel() * x.element_size() for g in self.groups.values() for x in g)

    def counts(self) -> dict[int, int]:
        """Images held per class."""
        out: dict[int, int] = {}
        for (_, c), x in self.groups.items():
            out[c] = out.get(c, 0) + len(x)
        return out

    def _shares(self, keys: list[Key], n_classes: int) -> dict[Key, int]:
        """Each group's share of its class's budget (images, or bytes with a byte budget)."""
        cap = self.bytes // max(n_classes, 1) if self.bytes else self.class_capacity(n_classes)
        by_class: dict[int, list[Key]] = {}
        for k in sorted(keys):
            by_class.setdefault(k[1], []).append(k)
        shares = {}
        for ks in by_class.values():
            share, extra = divmod(cap, len(ks))
            for i, k in enumerate(ks):  # the most recent tasks get the remainder
                shares[k] = share + (1 if i >= len(ks) - extra else 0)
        return shares

    def _fits(self, items: list[torch.Tensor], share: int) -> int:
        """How many of the first items the share allows."""
        if not self.bytes:
            return min(share, len(items))
        used = 0
        for k, x in enumerate(items):
            used += x.numel()
            if used > share:
                return k
        return len(items)

    def update(self, task: int, data: ImageSet, generator: torch.Generator,
               features: torch.Tensor | None = None) -> list[Key]:
        """Add task `task`'s images, then shrink every group to its share; returns the keys added.

        Random selection draws each new group's order with `generator`; herding orders it by `features`
        ([len(data), D], needed then). A group takes images in that order while they fit its share.
        """
        if self.selection == "herding" and features is None:
            raise ValueError("herding selection needs the features of the task's images")
        was_empty = not self.groups
        self._smallest = 0  # the smallest encoded image that did not fit its share (a budget holding none)
        new_classes = np.unique(data.targets).tolist()
        keys = list(self.groups) + [(task, c) for c in new_classes if (task, c) not in self.groups]
        shares = self._shares(keys, len({c for _, c in keys}))
        added = []
        for c in new_classes:
            key = (task, c)
            if key in self.groups:
                continue
            pos = np.flatnonzero(data.targets == c)
            if self.selection == "herding":
                order: Iterator[int] = herding_order(features[torch.as_tensor(pos)])  # type: ignore[index]
            else:
                order = iter(torch.randperm(len(pos), generator=generator).tolist())
            items = self._take(data, pos, order, shares[key])
            if items:
                self.groups[key] = items
                added.append(key)
        for key in list(self.groups):
            keep = self._fits(self.groups[key], shares[key])
            self.groups[key] = self.groups[key][:keep]
            if key in self.aux:
                self.aux[key] = self.aux[key][:keep]
            if not self.groups[key]:
                del self.groups[key]
                self.aux.pop(key, None)
        if self.bytes and was_empty and not self.groups and len(data) and self._smallest:
            n = len({c for _, c in keys})
            raise ConfigError(
                f"config key 'memory.bytes' = {self.bytes:,} holds no image: split over the {n} classes of task "
                f"{task}, each class gets {self.bytes // n:,} bytes, and the smallest of its images that was tried "
                f"takes {self._smallest:,} bytes as {self.codec}. Set memory.bytes to at least {self._smallest * n:,} "
                "(one image per class; more for the classes to come), or to 0 to count images with memory.per_class")
        return added

    def _take(self, data: ImageSet, pos: np.ndarray, order: Iterator[int], share: int) -> list[torch.Tensor]:
        """Encode images of `pos` in `order` while they fit the share (decoded in chunks: files are slow)."""
        items: list[torch.Tensor] = []
        used, chunk = 0, (min(share, len(pos)) if not self.bytes else 32)
        while chunk > 0:
            picked = [i for _, i in zip(range(chunk), order)]
            if not picked:
                break
            images = data.load(pos[picked])
            self.channels = self.channels or int(images.shape[1])
            for image in images:
                x = encode(image, self.codec, self.quality)
                if self.bytes and used + x.numel() > share:
                    if not items:
                        self._smallest = min(self._smallest or x.numel(), x.numel())
                    return items
                items.append(x)
                used += x.numel()
            chunk = 32 if self.bytes else 0
        return items

    def keys(self) -> list[Key]:
        """Group keys in the order of as_imageset (by task, then class)."""
        return sorted(self.groups)

    def as_imageset(self) -> ImageSet:
        """The memory's images and labels as one ImageSet (stable order: by task, then class)."""
        keys = self.keys()
        items = [x for k in keys for x in self.groups[k]]
        labels = np.asarray([k[1] for k in keys for _ in self.groups[k]], dtype=np.int64)
        return ImageSet(MemoryStore(items, self.channels or 1), np.arange(len(items)), labels)

    def group_imageset(self, key: Key) -> ImageSet:
        """One group's images as an ImageSet (e.g. to compute a method's aux tensors for it)."""
        items = self.groups[key]
        return ImageSet(MemoryStore(items, self.channels or 1), np.arange(len(items)),
                        np.full(len(items), key[1], dtype=np.int64))

    def state_dict(self) -> dict:
        """Everything needed to rebuild the memory exactly (tensors and plain values only)."""
        keys = self.keys()
        return {"per_class": self.per_class, "total": self.total, "bytes": self.bytes, "codec": self.codec,
                "quality": self.quality, "selection": self.selection, "channels": self.channels,
                "keys": keys, "images": [list(self.groups[k]) for k in keys],
                "aux": [list(self.aux.get(k, [])) for k in keys]}

    def check_state(self, state: dict, task_classes: Sequence[Sequence[int]], n_classes: int) -> None:
        """Raise checkpoint.StateError (naming the field) unless `state` is what state_dict() of this memory
        can have written after the tasks whose classes are task_classes (one entry per task trained): the same
        budgets, groups of those tasks and classes, images of one form, method tensors beside them."""
        from .checkpoint import StateError, is_int, need_dict, need_int, need_list, need_tensor

        need_dict("memory", state, ["per_class", "total", "bytes", "codec", "quality", "selection", "channels",
                                    "keys", "images", "aux"])
        for name in ("per_class", "total", "bytes", "codec", "quality", "selection"):
            if state[name] != getattr(self, name) or type(state[name]) is not type(getattr(self, name)):
                raise StateError(f"memory.{name}", f"differs from the run's config ({getattr(self, name)!r})",
                                 state[name])
        channels = need_int("memory.channels", state["channels"], 0, None)
        keys = need_list("memory.keys", state["keys"])
        images = need_list("memory.images", state["images"], len(keys), "one group of images per key")
        aux = need_list("memory.aux", state["aux"], len(keys), "one list of method tensors per key")
        seen: set[tuple[int, int]] = set()
        shape = None
        for i, key in enumerate(keys):
            if not (isinstance(key, (list, tuple)) and len(key) == 2 and all(is_int(v) for v in key)):
                raise StateError(f"memory.keys[{i}]", "must be a (task, class) pair of whole numbers", key)
            task, label = key
            if not 0 <= task < len(task_classes):
                trained = f"the tasks trained are 0 to {len(task_classes) - 1}" if task_classes else "none is trained"
                raise StateError(f"memory.keys[{i}]", f"names task {task}, but {trained}", key)
            if not 0 <= label < n_classes:
                raise StateError(f"memory.keys[{i}]", f"names class {label}, but the scenario's classes are 0 to "
                                 f"{n_classes - 1}", key)
            if label not in task_classes[task]:
                raise StateError(f"memory.keys[{i}]", f"names class {label}, which task {task} does not bring", key)
            if (task, label) in seen:
                raise StateError(f"memory.keys[{i}]", "appears twice", key)
            seen.add((task, label))
            group = need_list(f"memory.images[{i}]", images[i])
            if not group:
                raise StateError(f"memory.images[{i}]", "is empty (clipcl drops empty groups)")
            for j, x in enumerate(group):
                field = f"memory.images[{i}][{j}]"
                need_tensor(field, x, dtype=torch.uint8)
                if self.codec == "raw":
                    need_tensor(field, x, ndim=3, why="raw pixels [C, H, W]")
                    shape = shape or tuple(x.shape)
                    need_tensor(field, x, shape=shape, why="as the memory's other images")
                    if x.shape[0] != channels:
                        raise StateError(field, f"has {x.shape[0]} channels, memory.channels says {channels}", x)
                elif x.ndim != 1 or x.numel() == 0:
                    raise StateError(field, f"must be the non-empty bytes of a {self.codec} file", x)
            if not channels:
                raise StateError("memory.channels", "must be 1 or more for a memory that holds images", channels)
            extra = need_list(f"memory.aux[{i}]", aux[i])
            if extra and len(extra) != len(group):
                raise StateError(f"memory.aux[{i}]", f"must be empty or hold one tensor per image ({len(group)})",
                                 extra)
            for j, x in enumerate(extra):
                need_tensor(f"memory.aux[{i}][{j}]", x, ndim=1, floating=True)
                if len(x) > n_classes:
                    raise StateError(f"memory.aux[{i}][{j}]", f"holds more values than the {n_classes} classes", x)

    def load_state_dict(self, state: dict) -> None:
        """Restore a memory saved with state_dict()."""
        self.per_class, self.total, self.bytes = int(state["per_class"]), int(state["total"]), int(state["bytes"])
        self.codec, self.quality, self.selection = state["codec"], int(state["quality"]), state["selection"]
        self.channels = int(state["channels"])
        keys = [tuple(k) for k in state["keys"]]
        self.groups = {k: [x.clone() for x in xs] for k, xs in zip(keys, state["images"])}  # type: ignore[misc]
        self.aux = {k: [x.clone() for x in xs] for k, xs in zip(keys, state["aux"]) if xs}  # type: ignore[misc]
