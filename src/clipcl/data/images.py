"""Image containers: every image reaches the training loop as a uint8 tensor [C, H, W].

Small data sets are decoded once into one uint8 tensor (TensorStore); folder data sets decode files on
demand (FileStore), in worker processes. An ImageSet is a view (positions + labels) over a store, so subsets,
relabelled class orders and per-task splits cost no copies of the images.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import torch

from ..config import ConfigError

if TYPE_CHECKING:
    from PIL import Image


class Store(Protocol):
    """Where images live; read() returns uint8 [n, C, H, W] for store indices."""

    def read(self, index: np.ndarray) -> torch.Tensor: ...


class TensorStore:
    """Images held in memory as one uint8 tensor [N, C, H, W]."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"TensorStore wants uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def read(self, index: np.ndarray) -> torch.Tensor:
        return self.images[torch.as_tensor(index, dtype=torch.long)]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # PIL modes that convert("RGB") clips instead of scaling


def _reason(e: BaseException) -> str:
    """An exception as one short line (the form unreadable files are reported in)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _deep_grey_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit 'L', its range scaled rather than clipped.

    PIL's convert() clips these modes to 0..255, so a 16-bit scan comes out almost white. Integers are read
    as 0..65535 (or 0..max when a 32-bit image goes beyond that); floats as 0..1 when none exceeds 1,
    otherwise as 0..255.
    """
    from PIL import Image

    x = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
    top = float(x.max(initial=0.0))
    if img.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    else:
        scale = 255.0 / max(top, 65535.0)
    return Image.fromarray(np.clip(np.rint(x * scale), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


def decode_image(path: str, size: int) -> np.ndarray:
    """One file -> uint8 [3, size, size]: RGB, the central square of the image resized to size x size.

    Cropping the central square and resizing it is resize-shorter-side-then-centre-crop (CLIP's test
    transform) in one resampling step. JPEGs are decoded at a reduced scale where that still leaves the
    shorter side at least `size` (PIL's draft mode): several times faster on full-size photographs.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img = (_deep_grey_to_l(img) if img.mode in DEEP_GREY_MODES else img).convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _decode_chunk(paths: list[str], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode several files; unreadable ones come back as zeros plus (position, reason)."""
    out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    bad = []
    for k, path in enumerate(paths):
        try:
            out[k] = decode_image(path, size)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            bad.append((k, _reason(e)))
    return out, bad


def check_image(path: str) -> str | None:
    """Why a file is not a readable image, or None if it is: a header check, much cheaper than decoding.

    A missing or empty file is bad; otherwise PIL opens the file and verify()s it, which checks the chunk
    checksums of a PNG but reads no pixels of a JPEG: a JPEG cut short after its header passes here and is
    caught when FileStore.read() decodes it.
    """
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # as in _decode_chunk: PIL's errors come in many types
        return _reason(e)
    return None


def _check_chunk(paths: list[str]) -> list[str | None]:
    """check_image over several files: one thread-pool task per chunk, not per file."""
    return [check_image(p) for p in paths]


class FileStore:
    """Images decoded from files on demand: read() returns uint8 [n, 3, size, size].

    Decoding runs in `workers` processes (a persistent pool, started at the first read, forked like torch's
    DataLoader workers where the platform allows); workers=0 decodes in the calling process.
    An unreadable file stops the run with a ConfigError naming it, unless skip_bad is true: then it is
    replaced by the next readable image of the same group (groups: one id per class and split, so a test
    image is never replaced by a training image) and recorded in `self.bad` (path -> reason), which
    Dataset.notes shares. Files are not checked when the dataset is indexed (a scenario uses only some of
    them); verify() header-checks the ones a scenario uses, and files it puts in `bad` are never decoded.
    """

    def __init__(self, paths: Sequence[str], size: int, workers: int = 0, skip_bad: bool = False,
                 groups: np.ndarray | None = None):
        if size < 1:
            raise ConfigError(f"config key 'scenario.image_size' = {size}: must be at least 1")
        if workers < 0:
            raise ConfigError(f"config key 'scenario.decode_workers' = {workers}: must be 0 or more")
        self.paths = list(paths)
        self.size, self.workers, self.skip_bad = size, workers, skip_bad
        self.groups = np.zeros(len(self.paths), np.int64) if groups is None else np.asarray(groups, np.int64)
        self.bad: dict[str, str] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # a pool belongs to one process
        return state

    def close(self) -> None:
        """Stop the worker processes (a later read starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
        return self._pool

    def verify(self, store_indices: np.ndarray, workers: int = 16) -> dict[int, str]:
        """Header-check the files at these store indices (check_image): {store index: reason} of the bad ones.

        Ascending index order, so the first entry is the first bad file in the dataset's own order. The
        checks run in `workers` threads (0 or 1: in this one): they mostly wait on the disk, and threads
        overlap those waits. Files go to the threads in chunks, which keeps a million of them cheap to queue.
        """
        index = np.unique(np.asarray(store_indices, dtype=np.int64))
        paths = [self.paths[i] for i in index]
        chunks = [paths[s:s + 256] for s in range(0, len(paths), 256)]
        if workers <= 1:
            reasons = [why for chunk in chunks for why in _check_chunk(chunk)]
        else:
            with ThreadPoolExecutor(workers) as pool:
                reasons = [why for part in pool.map(_check_chunk, chunks) for why in part]
        return {int(i): why for i, why in zip(index, reasons) if why is not None}

    def read(self, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        known = [k for k, i in enumerate(index) if self.paths[i] in self.bad]
        if known:  # files already found bad (by verify() or an earlier read) are substituted, not decoded again
            images = np.empty((len(index), 3, self.size, self.size), dtype=np.uint8)
            fresh = np.setdiff1d(np.arange(len(index)), known)
            if len(fresh):
                images[fresh] = self.read(index[fresh]).numpy()
            for k in known:
                images[k] = self._substitute(int(index[k]), self.bad[self.paths[index[k]]])
            return torch.from_numpy(images)
        paths = [self.paths[i] for i in index]
        if self.workers == 0 or len(paths) < 2:
            images, bad = _decode_chunk(paths, self.size)
        else:
            chunk = -(-len(paths) // self.workers)
            starts = range(0, len(paths), chunk)
            try:
                parts = list(self._get_pool().map(_decode_chunk, [paths[s:s + chunk] for s in starts],
                                                  [self.size] * len(starts)))
            except BrokenProcessPool:
                self._pool = None
                raise RuntimeError("an image-decoding worker process died (out of memory?); lower "
                                   "scenario.decode_workers, or set it to 0 to decode in the main process") from None
            images = np.concatenate([p[0] for p in parts])
            bad = [(s + k, why) for s, p in zip(starts, parts) for k, why in p[1]]
        for k, why in bad:
            images[k] = self._substitute(int(index[k]), why)
        return torch.from_numpy(images)

    def _substitute(self, i: int, why: str) -> np.ndarray:
        """A readable stand-in for unreadable file i (or a ConfigError naming the file)."""
        path = self.paths[i]
        if not self.skip_bad:
            raise ConfigError(f"cannot read image '{path}' ({why}). Delete or replace the file, or set "
                              "scenario.skip_bad_images=true to replace unreadable images by another image of "
                              "the same class (they are counted in the results).")
        self.bad[path] = why
        same = np.flatnonzero(self.groups == self.groups[i])
        for j in np.roll(same, -int(np.searchsorted(same, i)) - 1):
            if self.paths[j] in self.bad:
                continue
            try:
                return decode_image(self.paths[j], self.size)
            except Exception as e:
                self.bad[self.paths[j]] = f"{type(e).__name__}: {e}"
        raise ConfigError(f"no readable image left in the class and split of '{path}' ({why}); "
                          f"unreadable files so far: {len(self.bad)}.")


class ImageSet:
    """A labelled view over a store: position k is image store[index[k]] with label targets[k]."""

    def __init__(self, store: Store, index: np.ndarray, targets: np.ndarray):
        self.store = store
        self.index = np.asarray(index, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.index) != len(self.targets):
            raise ValueError("index and targets differ in length")

    @classmethod
    def from_tensor(cls, images: torch.Tensor, targets: Sequence[int] | np.ndarray) -> "ImageSet":
        """An ImageSet over in-memory uint8 images."""
        return cls(TensorStore(images), np.arange(len(images)), np.asarray(targets))

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, positions: np.ndarray | Sequence[int]) -> torch.Tensor:
        """uint8 images [n, C, H, W] at the given positions."""
        return self.store.read(self.index[np.asarray(positions, dtype=np.int64)])

    def subset(self, positions: np.ndarray | Sequence[int]) -> "ImageSet":
        """The view restricted to some positions (in that order)."""
        positions = np.asarray(positions, dtype=np.int64)
        return ImageSet(self.store, self.index[positions], self.targets[positions])

    def relabel(self, mapping: dict[int, int]) -> "ImageSet":
        """Keep only images whose label is in mapping, with labels mapped (used for class orders)."""
        keep = np.flatnonzero(np.isin(self.targets, list(mapping)))
        lut = np.full(max(self.targets.max(initial=0), max(mapping, default=0)) + 1, -1, dtype=np.int64)
        for old, new in mapping.items():
            lut[old] = new
        return ImageSet(self.store, self.index[keep], lut[self.targets[keep]])

    def per_class_limit(self, limit: int, generator: np.random.Generator) -> "ImageSet":
        """At most `limit` images per class, chosen at random with the given generator (0 = all)."""
        if limit <= 0:
            return self
        keep = []
        for c in np.unique(self.targets):
            pos = np.flatnonzero(self.targets == c)
            if len(pos) > limit:
                pos = np.sort(generator.choice(pos, size=limit, replace=False))
            keep.append(pos)
        return self.subset(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))


class ConcatImageSet(ImageSet):
    """Several ImageSets end to end (joint training, D_t together with the memory)."""

    def __init__(self, parts: Sequence[ImageSet]):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.targets = np.concatenate([p.targets for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        self.index = np.arange(len(self.targets))

    def load(self, positions: np.ndarray | Sequence[int]) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        out: torch.Tensor | None = None
        for k in np.unique(part):
            sel = np.flatnonzero(part == k)
            imgs = self.parts[k].load(positions[sel] - self.offsets[k])
            if out is None:
                out = imgs.new_empty((len(positions), *imgs.shape[1:]))
            out[torch.as_tensor(sel)] = imgs
        assert out is not None, "load() of no positions"
        return out

    def subset(self, positions: np.ndarray | Sequence[int]) -> ImageSet:
        positions = np.asarray(positions, dtype=np.int64)
        return _Gathered(self, positions)

    def relabel(self, mapping: dict[int, int]) -> ImageSet:
        return ConcatImageSet([p.relabel(mapping) for p in self.parts])


class _Gathered(ImageSet):
    """A subset of a ConcatImageSet."""

    def __init__(self, base: ImageSet, positions: np.ndarray):
        self.base, self.positions = base, positions
        self.targets = base.targets[positions]
        self.index = np.arange(len(positions))

    def load(self, positions: np.ndarray | Sequence[int]) -> torch.Tensor:
        return self.base.load(self.positions[np.asarray(positions, dtype=np.int64)])

    def subset(self, positions: np.ndarray | Sequence[int]) -> ImageSet:
        return _Gathered(self.base, self.positions[np.asarray(positions, dtype=np.int64)])
