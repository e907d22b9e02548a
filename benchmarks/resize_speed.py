"""model.resize: the cost of feeding a model open_clip's own inputs (PIL, uint8, CPU) against the default
(torch bicubic on floats), and how far apart the two inputs are.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/resize_speed.py [--size 224] [--batch 256] [--repeats 5]

CIFAR-sized images (32 x 32 RGB, random pixels) are brought to --size the two ways; images per second are the
median of --repeats batches on this machine's CPU (the torch path can run on the GPU instead; the openclip
path always runs on the CPU, in the training process). Figures, not assertions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from clipcl.models import ClipBundle


def rate(fn, batch, repeats: int) -> float:
    fn(batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return len(batch) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    batch = torch.randint(0, 256, (args.batch, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = ClipBundle(None, None, args.size, mean, std, resize="torch")
    theirs = ClipBundle(None, None, args.size, mean, std, resize="openclip")
    r_torch = rate(lambda b: ours.prepare_images(ours.input_images(b)), batch, args.repeats)
    r_pil = rate(lambda b: theirs.prepare_images(theirs.input_images(b)), batch, args.repeats)
    diff = (ours.prepare_images(batch) - theirs.prepare_images(theirs.input_images(batch))).abs()
    pix = diff * torch.tensor(std).view(1, 3, 1, 1)  # back in [0, 1] pixel units
    print(f"32 x 32 -> {args.size} x {args.size}, batch {args.batch}, torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"model.resize=torch    {r_torch:9.0f} images/s")
    print(f"model.resize=openclip {r_pil:9.0f} images/s  ({r_pil / r_torch:.2f} times torch's rate)")
    print(f"input difference: max {pix.max():.3f}, mean {pix.mean():.4f} in pixel units (0-1); max {diff.max():.3f} "
          "in the model's normalised units")


if __name__ == "__main__":
    main()
