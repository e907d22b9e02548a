"""Compositional Fashion-MNIST: 10 garments x 10 colours = 100 classes named "red coat", "blue sandal", ...

The paper's regime on a CPU: many classes, class names a text tower can learn (a colour word and a garment
word), siblings that interfere (a red coat and an orange coat; a red coat and a red pullover), and a
pretraining that sees only some of the combinations, so a CLIP pretrained here knows the words but must
compose them for the rest (zero-shot accuracy on unseen combinations means something).

Every image is a Fashion-MNIST garment (grey level g) painted in its class's colour: pixel = g / 255 * c,
with c the colour's RGB times a per-image brightness in [0.75, 1] and a per-image tint of +-12 per channel
(both drawn from the image's Fashion-MNIST index, so the same image is always painted the same way). The
colour of each image is assigned so that the colours are balanced within every garment and split.

- fmnist100            CIL stream: training images 0-49,999 (500 per class), test images (100 per class).
- fmnist100_dil        DIL stream: 5 domains (photo, blurred, sketch, rotated, faded), each from its own block
                       of 10,000 training images, with class frequencies that differ per domain (from 100 down
                       to 10 images per class, a seeded order per domain), balanced test images in each.
- fmnist100_pretrain   what `clipcl:fmnist100` pretrains on: training images 50,000-59,999 (never in a stream),
                       painted as the CIL stream's (PRETRAIN_DOMAIN), only the 60 combinations
                       PRETRAIN_COMBINATIONS lists (a washed-out domain put zero-shot at 43%, below the 55-75% aimed at).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import ScenarioCfg
from .datasets import (FMNIST_CLASSES, PRETRAIN_START, Dataset, fashion_mnist_arrays, fmnist_domain, fmnist_washed,
                       register)
from .images import ImageSet

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (230, 215, 40), "green": (40, 180, 60),
    "cyan": (40, 200, 215), "blue": (50, 80, 235), "purple": (145, 60, 205), "pink": (240, 120, 185),
    "brown": (150, 95, 50), "white": (235, 235, 235)}
GARMENTS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
N_COLOURS, N_GARMENTS = len(COLOURS), len(GARMENTS)
CLASSNAMES = [f"{colour} {garment}" for garment in GARMENTS for colour in COLOURS]  # label = 10 * garment + colour
assert len(FMNIST_CLASSES) == N_GARMENTS
SEEN_PER_GARMENT = 6  # combinations of each garment (and of each colour) in the pretraining
# (garment, colour) pairs the pretraining sees: colour (garment + k) mod 10 for k < 6, under a fixed shuffle of
# the colours, so each garment is seen in 6 colours and each colour on 6 garments (a Latin-square design)
_COLOUR_SHUFFLE = [3, 7, 0, 5, 9, 1, 8, 2, 6, 4]
PRETRAIN_COMBINATIONS = tuple(sorted(10 * g + _COLOUR_SHUFFLE[(g + k) % N_COLOURS]
                                     for g in range(N_GARMENTS) for k in range(SEEN_PER_GARMENT)))
UNSEEN_COMBINATIONS = tuple(c for c in range(N_GARMENTS * N_COLOURS) if c not in PRETRAIN_COMBINATIONS)
PRETRAIN_DOMAIN = "original"
DIL_DOMAINS = ("photo", "blurred", "sketch", "rotated", "faded")
DIL_BLOCK = 10_000  # training images per domain (domain d: images d * 10,000 ... (d + 1) * 10,000 - 1)
DIL_MOST, DIL_FEWEST = 100, 10  # a domain's most and least frequent classes' training images
_PAINT_SEED, _ASSIGN_SEED, _FREQ_SEED = 31337, 4242, 2718


def paint_colours(colours: np.ndarray, source: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, 3] each image is painted in: its colour id's RGB times a brightness in [0.75, 1], plus a
    tint of +-12 per channel, both fixed by the image's Fashion-MNIST index `source`."""
    rgb = np.array(list(COLOURS.values()), dtype=np.float32)[colours]  # [N, 3]
    bright = 0.75 + 0.25 * _unit(source, 0)
    tint = (np.stack([_unit(source, k) for k in (1, 2, 3)], 1) - 0.5) * 24.0
    return np.clip(np.rint(rgb * bright[:, None] + tint), 0, 255).astype(np.uint8)


def paint(grey: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W]: grey images [N, H, W] (uint8) painted in uint8 RGB [N, 3]: round(g * c / 255)."""
    out = grey.to(torch.int32)[:, None] * rgb.to(torch.int32)[:, :, None, None]
    return ((out + 127) // 255).to(torch.uint8)


def _unit(source: np.ndarray, k: int) -> np.ndarray:
    """A number in [0, 1) per image, fixed by (its Fashion-MNIST index, k): independent of what else is loaded."""
    table = np.random.default_rng(_PAINT_SEED + k).random(70_000, dtype=np.float32)
    return table[source]


def assign_colours(garments: np.ndarray, split_seed: int, allowed: dict[int, list[int]] | None = None) -> np.ndarray:
    """A colour id per image, balanced within each garment: the garment's images in a seeded order take the
    colours (or its `allowed` colours) in turn."""
    rng = np.random.default_rng(_ASSIGN_SEED + split_seed)
    colours = np.zeros(len(garments), dtype=np.int64)
    for g in range(N_GARMENTS):
        where = np.flatnonzero(garments == g)
        choice = np.asarray(allowed[g] if allowed is not None else range(N_COLOURS), dtype=np.int64)
        colours[where[rng.permutation(len(where))]] = choice[np.arange(len(where)) % len(choice)]
    return colours


def _imageset(grey: np.ndarray, garments: np.ndarray, colours: np.ndarray, source: np.ndarray,
              domain: str = "original") -> ImageSet:
    store = PaintedStore(torch.from_numpy(_domain_grey(grey, domain)), paint_colours(colours, source), source)
    labels = N_COLOURS * garments.astype(np.int64) + colours
    return ImageSet(store, np.arange(len(labels)), labels)


def _domain_grey(grey: np.ndarray, domain: str) -> np.ndarray:
    if domain in ("original", "photo"):
        return grey
    if domain == "faded":
        return (40 + grey.astype(np.int16) * 5 // 10).astype(np.uint8)
    if domain == "washed":
        return fmnist_washed(torch.from_numpy(grey)).numpy()
    named = {"sketch": "edges"}.get(domain, domain)
    return fmnist_domain(torch.from_numpy(grey.copy()).unsqueeze(1), named)[:, 0].numpy()


class PaintedStore:
    """Grey images and the colour of each, painted when read (a copy of every image in colour would cost 3x the
    memory and the time of painting images no run reads); `source`: the Fashion-MNIST index of each image."""

    def __init__(self, grey: torch.Tensor, rgb: np.ndarray, source: np.ndarray):
        self.grey, self.rgb = grey.contiguous(), torch.from_numpy(np.ascontiguousarray(rgb))
        self.source = np.asarray(source, dtype=np.int64)

    def read(self, index: np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long)
        return paint(self.grey[index], self.rgb[index])


def _stream_parts(cfg: ScenarioCfg) -> tuple[dict, dict]:
    arrays = fashion_mnist_arrays(cfg)
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    return {"x": xtr, "y": ytr.astype(np.int64)}, {"x": xte, "y": yte.astype(np.int64)}


@register("fmnist100", "compositional Fashion-MNIST: 10 garments x 10 colours = 100 classes ('red coat'), "
                       "training images 0-49,999: CIL")
def load_fmnist100(cfg: ScenarioCfg) -> Dataset:
    """500 training and 100 test images per class; no image the pretraining `clipcl:fmnist100` saw."""
    train, test = _stream_parts(cfg)
    src_tr = np.arange(PRETRAIN_START)
    src_te = np.arange(len(test["y"]))
    sets = [_imageset(part["x"][src], part["y"][src], assign_colours(part["y"][src], seed), src)
            for part, src, seed in ((train, src_tr, 0), (test, src_te, 1))]
    return Dataset("fmnist100", list(CLASSNAMES), train=sets[0], test=sets[1],
                   notes={"unseen_combinations": list(UNSEEN_COMBINATIONS)})


def domain_frequencies(domain: int) -> np.ndarray:
    """Training images per class [100] in DIL domain `domain`: geometric from DIL_MOST down to DIL_FEWEST over a
    seeded order of the classes that differs per domain."""
    ranks = np.random.default_rng(_FREQ_SEED + domain).permutation(N_GARMENTS * N_COLOURS)
    levels = DIL_MOST * (DIL_FEWEST / DIL_MOST) ** (np.arange(len(ranks)) / (len(ranks) - 1))
    counts = np.zeros(len(ranks), dtype=np.int64)
    counts[ranks] = np.rint(levels).astype(np.int64)
    return counts


@register("fmnist100_dil", "compositional Fashion-MNIST in 5 domains (photo, blurred, sketch, rotated, faded), "
                           "class frequencies that differ per domain: DIL")
def load_fmnist100_dil(cfg: ScenarioCfg) -> Dataset:
    """Domain d trains on its own block of 10,000 training images (d * 10,000 ...), each class keeping
    domain_frequencies(d) of them; every domain tests on all test images (100 per class) in its style."""
    train, test = _stream_parts(cfg)
    src_te = np.arange(len(test["y"]))
    colours_te = assign_colours(test["y"], 1)
    domains = {}
    for d, name in enumerate(DIL_DOMAINS):
        src = np.arange(d * DIL_BLOCK, (d + 1) * DIL_BLOCK)
        colours = assign_colours(train["y"][src], 10 + d)
        labels = N_COLOURS * train["y"][src] + colours
        want = domain_frequencies(d)
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:want[c]] for c in range(len(want))]))
        src = src[keep]
        domains[name] = (_imageset(train["x"][src], train["y"][src], colours[keep], src, name),
                         _imageset(test["x"][src_te], test["y"][src_te], colours_te, src_te, name))
    return Dataset("fmnist100_dil", list(CLASSNAMES), domains=domains,
                   notes={"unseen_combinations": list(UNSEEN_COMBINATIONS)})


@register("fmnist100_pretrain", "compositional Fashion-MNIST's pretraining: training images 50,000-59,999, "
                                "60 of the 100 combinations: pretrains `clipcl:fmnist100`")
def load_fmnist100_pretrain(cfg: ScenarioCfg) -> Dataset:
    """The 60 combinations of PRETRAIN_COMBINATIONS (labels 0-59 in that order), each garment in 6 colours:
    about 167 training images per class from the block no stream uses, and the test images painted alike."""
    train, test = _stream_parts(cfg)
    allowed = {g: [c % N_COLOURS for c in PRETRAIN_COMBINATIONS if c // N_COLOURS == g] for g in range(N_GARMENTS)}
    lut = np.full(N_GARMENTS * N_COLOURS, -1, dtype=np.int64)
    lut[list(PRETRAIN_COMBINATIONS)] = np.arange(len(PRETRAIN_COMBINATIONS))
    sets = []
    for part, src, seed in ((train, np.arange(PRETRAIN_START, len(train["y"])), 2), (test, np.arange(len(test["y"])), 3)):
        colours = assign_colours(part["y"][src], seed, allowed)
        full = _imageset(part["x"][src], part["y"][src], colours, src, PRETRAIN_DOMAIN)
        sets.append(ImageSet(full.store, full.index, lut[full.targets]))
    return Dataset("fmnist100_pretrain", [CLASSNAMES[c] for c in PRETRAIN_COMBINATIONS], train=sets[0], test=sets[1])
