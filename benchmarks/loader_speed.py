"""Loader speed alone (no model): images per second that ImageSet.load delivers.

- TensorStore: random batches from Fashion-MNIST held in memory (the fmnist benchmarks' path);
- FileStore: a generated folder of ImageNet-sized JPEGs (500x375) decoded at --size, with 0 workers
  (the main process) and with --workers processes.

    python benchmarks/loader_speed.py [--images 512] [--batch 128] [--workers 4] [--size 224]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipcl.config import ConfigError, ScenarioCfg
from clipcl.data.datasets import load_dataset
from clipcl.data.images import FileStore, ImageSet


def images_per_second(data: ImageSet, batch: int, batches: int, seed: int = 0) -> float:
    """Time `batches` loads of `batch` random positions (after one warm-up load)."""
    rng = np.random.default_rng(seed)
    data.load(rng.integers(len(data), size=batch))
    start = time.perf_counter()
    for _ in range(batches):
        data.load(rng.integers(len(data), size=batch))
    return batches * batch / (time.perf_counter() - start)


def write_jpegs(folder: Path, n: int) -> list[str]:
    """n photo-like JPEGs of 500x375 (smooth colour gradients plus noise, quality 90)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    paths = []
    for k in range(n):
        base = np.stack([(xx * (k % 7 + 1)) % 256, (yy * (k % 5 + 1)) % 256, (xx + yy + 13 * k) % 256], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{k:05d}.JPEG"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="JPEG files to generate")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--size", type=int, default=224, help="decoded image size (the model's input size)")
    args = p.parse_args()
    print(f"cpus: {os.cpu_count()}, batch {args.batch}, decode size {args.size}")

    try:
        fm = load_dataset(ScenarioCfg(dataset="fashion_mnist", download=False))
        rate = images_per_second(fm.train, args.batch, 200)
        print(f"TensorStore (Fashion-MNIST, 28x28 grey, in memory): {rate:,.0f} images/s")
    except ConfigError as e:
        print(f"TensorStore: skipped ({e})")

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        labels = np.zeros(len(paths), np.int64)
        for workers in sorted({0, args.workers}):
            store = FileStore(paths, args.size, workers=workers)
            rate = images_per_second(ImageSet(store, np.arange(len(paths)), labels), args.batch, args.batches)
            store.close()
            print(f"FileStore ({args.images} JPEGs 500x375 -> {args.size}x{args.size} RGB, {workers} workers): "
                  f"{rate:,.0f} images/s")


if __name__ == "__main__":
    main()
