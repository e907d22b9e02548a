"""Training augmentation, on the device, one random affine map per image (one grid_sample per batch).

- `crop_flip`: random resized crop (area 50-100% of the image, aspect 3/4-4/3) and horizontal flip with
  probability 1/2: the usual augmentation for natural images;
- `shift`: a random translation of up to 2/28 of the image side (2 pixels of Fashion-MNIST) each way,
  edges replicated: small images whose object fills the frame;
- `none`.
New and memory images are augmented alike, so a memory of 2 images per class is not memorised in a few
steps. The parameters are drawn on the CPU from a generator derived from (seed, task, step): a resumed run
augments exactly as an uninterrupted one. Evaluation never augments.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "shift", "crop_flip")
MAX_SHIFT = 2 / 28  # of the image side


def affine_params(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2, 3] affine maps (output grid -> input coordinates in [-1, 1]) of one augmentation."""
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if kind == "shift":
        theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * MAX_SHIFT)
    elif kind == "crop_flip":
        u = torch.rand(n, 5, generator=generator)
        area = 0.5 + 0.5 * u[:, 0]
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
        sx = torch.sqrt(area * ratio).clamp(max=1.0)  # half-widths of the window, as fractions of the image
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta[:, 0, 0], theta[:, 1, 1] = sx * flip, sy
        theta[:, 0, 2] = (u[:, 2] * 2 - 1) * (1 - sx)  # the window stays inside the image
        theta[:, 1, 2] = (u[:, 3] * 2 - 1) * (1 - sy)
    elif kind != "none":
        raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(AUGMENTS)}")
    return theta


def augment(x: torch.Tensor, kind: str, generator: torch.Generator, total: int = 0, start: int = 0) -> torch.Tensor:
    """Augment a float batch [B, C, H, W] (any normalisation): same shape, same device. With `total`, x is rows
    start..start+B of a batch of `total` images (one rank's shard): the maps drawn for the whole batch, its
    rows used, so that every number of ranks augments an image alike."""
    if kind == "none" or len(x) == 0:
        return x
    theta = affine_params(kind, total or len(x), generator)[start:start + len(x)].to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
