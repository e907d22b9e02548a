"""Dataset registry: each loader reads real files (or downloads where the dataset allows it) and returns
uint8 images with the dataset's real class names.

Where the files are looked for: scenario.root, then $CLIPCL_DATA (each also with the dataset's usual
sub-folder names, see data_roots). Small datasets (Fashion-MNIST, CIFAR-100) are decoded once into memory;
folder datasets (ImageNet, DomainNet, image folders) are indexed when loaded and decoded batch by batch at
scenario.image_size by scenario.decode_workers processes (images.FileStore).
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError, ScenarioCfg
from .images import IMAGE_EXTENSIONS, FileStore, ImageSet


@dataclass
class Dataset:
    """A loaded dataset: class names by label id, and train/test splits (per domain for DIL)."""

    name: str
    classnames: list[str]
    train: ImageSet | None = None
    test: ImageSet | None = None
    domains: dict[str, tuple[ImageSet, ImageSet]] = field(default_factory=dict)
    shipped_order: list[int] | None = None  # the field's published class order, where there is one
    orders: dict[str, list[int]] = field(default_factory=dict)  # other published orders by name (class_order)
    # what a user should know about the files: 'root' (the folder read), 'warnings' (e.g. classes without
    # test images), 'unreadable_images' (path -> reason, filled while reading with skip_bad_images=true)
    notes: dict = field(default_factory=dict)


Loader = Callable[[ScenarioCfg], Dataset]
DATASETS: dict[str, Loader] = {}
DATASET_DOCS: dict[str, str] = {}


def register(name: str, doc: str) -> Callable[[Loader], Loader]:
    """Register a dataset loader under a name (decorator)."""

    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        DATASET_DOCS[name] = doc
        return fn

    return wrap


def load_dataset(cfg: ScenarioCfg) -> Dataset:
    """Load the dataset named by cfg.dataset, or fail with the list of known names."""
    if cfg.dataset not in DATASETS:
        raise ConfigError(
            f"config key 'scenario.dataset' = {cfg.dataset!r}: unknown dataset. "
            f"Known datasets: {', '.join(sorted(DATASETS))}."
        )
    return DATASETS[cfg.dataset](cfg)


def data_roots(cfg: ScenarioCfg, *subdirs: str) -> list[Path]:
    """Candidate folders for a dataset: scenario.root if set (and nothing else: an explicit folder is meant),
    otherwise $CLIPCL_DATA; each with its named sub-folders first."""
    base = cfg.root or os.environ.get("CLIPCL_DATA", "")
    if not base:
        return []
    return [Path(base).expanduser() / s for s in subdirs] + [Path(base).expanduser()]


# ---------------------------------------------------------------- Fashion-MNIST
FMNIST_CLASSES = ["t-shirt or top", "trouser", "pullover", "dress", "coat",
                  "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read IDX file '{path}': {e}. Delete it and fetch the dataset again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ConfigError(f"'{path}' is not an IDX file of unsigned bytes (bad magic number).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {data.size}.")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_arrays(cfg: ScenarioCfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images [N, 28, 28], labels [N]), 'test': ...} from the first folder that has the files."""
    candidates = data_roots(cfg, "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
    if not cfg.root:  # Debian's package, unless the user pointed somewhere else
        candidates.append(FMNIST_SYSTEM_DIR)
    for folder in candidates:
        found = {s: [_find_idx(folder, f) for f in files] for s, files in FMNIST_FILES.items()}
        if all(p is not None for ps in found.values() for p in ps):
            return {s: (read_idx(ps[0]), read_idx(ps[1])) for s, ps in found.items()}  # type: ignore[arg-type]
    if cfg.download:
        import torchvision

        root = Path(cfg.root or os.environ.get("CLIPCL_DATA", "") or Path.home() / ".cache" / "clipcl")
        try:
            out = {}
            for split in ("train", "test"):
                ds = torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
                out[split] = (ds.data.numpy(), ds.targets.numpy())
            return out
        except Exception as e:  # network errors come in many types
            reason = f"torchvision's download into '{root}' failed ({e})"
    else:
        reason = "scenario.download is false"
    raise ConfigError(
        "Fashion-MNIST not found. Looked for train-images-idx3-ubyte(.gz) and the three other IDX files in: "
        + ", ".join(str(c) for c in candidates) + f"; {reason}. Install Debian's 'dataset-fashion-mnist' "
        "package, or put the four IDX files in $CLIPCL_DATA/fashion-mnist."
    )


@register("fashion_mnist", "Fashion-MNIST, 10 classes, 28x28 grey (Debian package or torchvision download)")
def load_fashion_mnist(cfg: ScenarioCfg) -> Dataset:
    """Fashion-MNIST's IDX files as uint8 [N, 1, 28, 28]."""
    arrays = fashion_mnist_arrays(cfg)
    splits = {s: ImageSet.from_tensor(torch.from_numpy(x.copy()).unsqueeze(1), y) for s, (x, y) in arrays.items()}
    return Dataset("fashion_mnist", list(FMNIST_CLASSES), train=splits["train"], test=splits["test"])


# ---------------------------------------------------------------- Fashion-MNIST under domain shifts
FMNIST_DIL_DOMAINS = ("original", "inverted", "rotated", "blurred", "edges")


def _filter_matrix(taps: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] matrix applying a centred 1-D filter along an axis of length n, edges replicated."""
    r = len(taps) // 2
    m = torch.zeros(n, n)
    for i in range(n):
        for k, t in enumerate(taps.tolist()):
            m[i, min(max(i + k - r, 0), n - 1)] += t
    return m


def fmnist_domain(images: torch.Tensor, domain: str) -> torch.Tensor:
    """uint8 [N, 1, 28, 28] under one deterministic domain shift (FMNIST_DIL_DOMAINS)."""
    if domain == "original":
        return images.clone()
    if domain == "inverted":
        return 255 - images
    if domain == "rotated":
        return torch.rot90(images, 1, dims=(2, 3)).contiguous()
    # separable filters as matrix products M_rows @ x @ M_cols^T (edges replicated): a batched matmul is far
    # faster on CPU than conv2d or shifted slices over 60,000 single-channel images
    x = images[:, 0].float()
    if domain == "blurred":  # Gaussian blur, sigma 1.5, 7 taps
        g = torch.exp(-torch.arange(-3, 4, dtype=torch.float32) ** 2 / (2 * 1.5 ** 2))
        rows, cols = _filter_matrix(g / g.sum(), x.shape[1]), _filter_matrix(g / g.sum(), x.shape[2])
        return (rows @ x @ cols.T).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    if domain == "edges":  # Sobel gradient magnitude, each image rescaled so its strongest edge is 255
        smooth, diff = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])
        h, w = x.shape[1:]
        gx = _filter_matrix(smooth, h) @ x @ _filter_matrix(diff, w).T
        gy = _filter_matrix(diff, h) @ x @ _filter_matrix(smooth, w).T
        mag = (gx * gx + gy * gy).sqrt()
        peak = mag.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        return (mag * (255.0 / peak)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    raise ValueError(f"unknown Fashion-MNIST domain {domain!r}; known: {', '.join(FMNIST_DIL_DOMAINS)}")


@register("fmnist_dil", "Fashion-MNIST under 5 domain shifts (original, inverted, rotated, blurred, edges): DIL")
def load_fmnist_dil(cfg: ScenarioCfg) -> Dataset:
    """Fashion-MNIST's train and test images under each domain shift, computed once (same images per domain)."""
    arrays = fashion_mnist_arrays(cfg)
    base = {s: (torch.from_numpy(x.copy()).unsqueeze(1), y) for s, (x, y) in arrays.items()}
    domains = {d: (ImageSet.from_tensor(fmnist_domain(base["train"][0], d), base["train"][1]),
                   ImageSet.from_tensor(fmnist_domain(base["test"][0], d), base["test"][1]))
               for d in FMNIST_DIL_DOMAINS}
    return Dataset("fmnist_dil", list(FMNIST_CLASSES), domains=domains)


# ---------------------------------------------------------------- Fashion-MNIST for the pretrained-start benchmarks
PRETRAIN_START = 50_000  # training images from here on pretrain the tiny CLIP; the streams never use them


def fmnist_washed(images: torch.Tensor) -> torch.Tensor:
    """The pretraining domain: lower contrast on a lifted black level, x -> 24 + 9x/10 (uint8)."""
    return (24 + images.to(torch.int16) * 9 // 10).to(torch.uint8)


def _fmnist_part(cfg: ScenarioCfg, pretraining: bool) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """{'train', 'test'}: images [N, 1, 28, 28] and labels; train is the pretraining block or the rest."""
    arrays = fashion_mnist_arrays(cfg)
    x, y = arrays["train"]
    part = slice(PRETRAIN_START, None) if pretraining else slice(0, PRETRAIN_START)
    return {"train": (torch.from_numpy(x[part].copy()).unsqueeze(1), y[part]),
            "test": (torch.from_numpy(arrays["test"][0].copy()).unsqueeze(1), arrays["test"][1])}


@register("fmnist_pretrain", "Fashion-MNIST training images 50,000-59,999, contrast-shifted: pretrains the tiny CLIP")
def load_fmnist_pretrain(cfg: ScenarioCfg) -> Dataset:
    """The pretraining set of `clipcl:fmnist-washed`: a block of training images no stream uses, and the test
    images, both in the washed domain (so the streams' original images are a domain shift away)."""
    part = _fmnist_part(cfg, pretraining=True)
    sets = {s: ImageSet.from_tensor(fmnist_washed(x), y) for s, (x, y) in part.items()}
    return Dataset("fmnist_pretrain", list(FMNIST_CLASSES), train=sets["train"], test=sets["test"])


@register("fmnist_stream", "Fashion-MNIST without the pretraining block (training images 0-49,999): CIL")
def load_fmnist_stream(cfg: ScenarioCfg) -> Dataset:
    """Fashion-MNIST for a model pretrained on fmnist_pretrain: none of its training images were seen."""
    part = _fmnist_part(cfg, pretraining=False)
    sets = {s: ImageSet.from_tensor(x, y) for s, (x, y) in part.items()}
    return Dataset("fmnist_stream", list(FMNIST_CLASSES), train=sets["train"], test=sets["test"])


@register("fmnist_dil_stream", "fmnist_dil's 5 domains without the pretraining block: DIL")
def load_fmnist_dil_stream(cfg: ScenarioCfg) -> Dataset:
    """fmnist_dil over training images 0-49,999 (a model pretrained on fmnist_pretrain saw none of them)."""
    part = _fmnist_part(cfg, pretraining=False)
    domains = {d: (ImageSet.from_tensor(fmnist_domain(part["train"][0], d), part["train"][1]),
                   ImageSet.from_tensor(fmnist_domain(part["test"][0], d), part["test"][1]))
               for d in FMNIST_DIL_DOMAINS}
    return Dataset("fmnist_dil_stream", list(FMNIST_CLASSES), domains=domains)


# ---------------------------------------------------------------- CIFAR-100
def pycil_order(n_classes: int, seed: int = 1993) -> list[int]:
    """The class order of PyCIL (and the methods built on it, e.g. PROOF): np.random.seed(1993);
    np.random.permutation(n). Not PODNet's CIFAR-100 order, which is ICARL_CIFAR100_ORDER.

    numpy's legacy RandomState stream is frozen by numpy's compatibility policy, so this is exact.
    """
    return np.random.RandomState(seed).permutation(n_classes).tolist()


# CIFAR-100's order from iCaRL's code, the one PODNet, Continual-CLIP, ZSCL, MoE-Adapters4CL and RAPF train
# in (scenario.class_order=continual-clip): a fixed list of label ids, not a seeded draw
ICARL_CIFAR100_ORDER = [
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11, 4,
    67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9,
    31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56,
    48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
]


def _unpickle(path: Path) -> dict:
    """A CIFAR python pickle with str keys (the files were written by Python 2: keys load as bytes)."""
    import pickle

    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ConfigError(f"cannot read CIFAR-100 file '{path}': {e}. Delete the cifar-100-python folder "
                          "and fetch the dataset again.") from None
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in data.items()}


def _cifar_split(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or "fine_labels" not in d:
        raise ConfigError(f"'{path}' lacks the keys 'data' and 'fine_labels' of a CIFAR-100 python pickle.")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(f"'{path}': 'data' has shape {data.shape}, expected [N, 3072].")
    # rows are the 1024 red, then green, then blue values of a 32x32 image: already [3, 32, 32] order
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, np.asarray(d["fine_labels"], dtype=np.int64)


@register("cifar100", "CIFAR-100, 100 classes, 32x32 colour (local python pickles, or torchvision download)")
def load_cifar100(cfg: ScenarioCfg) -> Dataset:
    """CIFAR-100's python pickles read directly (torchvision only downloads them); fine labels and names."""
    candidates = data_roots(cfg, "cifar100", "cifar-100", "CIFAR100")
    folder = next((c / "cifar-100-python" for c in candidates if (c / "cifar-100-python" / "train").is_file()), None)
    if folder is None and cfg.download:
        import torchvision

        root = Path(cfg.root or os.environ.get("CLIPCL_DATA", "") or Path.home() / ".cache" / "clipcl")
        try:
            torchvision.datasets.CIFAR100(str(root), train=True, download=True)
            folder = root / "cifar-100-python"
        except Exception as e:  # network errors come in many types
            reason = f"torchvision's download into '{root}' failed ({e})"
    elif folder is None:
        reason = "scenario.download is false"
    if folder is None:
        raise ConfigError(
            "CIFAR-100 not found. Expected the python version's folder cifar-100-python/ (files train, test, "
            "meta) in one of: " + ", ".join(str(c) for c in candidates) + f"; {reason}. Set scenario.download="
            "true, or unpack cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into "
            "$CLIPCL_DATA."
        )
    meta = _unpickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise ConfigError(f"'{folder / 'meta'}' lacks the key 'fine_label_names'.")
    names = [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in meta["fine_label_names"]]
    train, test = _cifar_split(folder / "train"), _cifar_split(folder / "test")
    return Dataset("cifar100", names, train=ImageSet.from_tensor(*train), test=ImageSet.from_tensor(*test),
                   shipped_order=pycil_order(len(names)),
                   orders={"continual-clip": ICARL_CIFAR100_ORDER} if len(names) == 100 else {})


# ---------------------------------------------------------------- folders of image files
class _FileIndex:
    """Paths and labels gathered while scanning folders; becomes one FileStore shared by every split."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.labels: list[np.ndarray] = []
        self.groups: list[np.ndarray] = []
        self.spans: list[tuple[int, int]] = []

    def add(self, paths: list[str], labels: np.ndarray) -> int:
        """Append one split; returns its id (images of one class in one split form a substitution group)."""
        split = len(self.spans)
        start = len(self.paths)
        self.paths += paths
        labels = np.asarray(labels, dtype=np.int64)
        self.labels.append(labels)
        self.groups.append(split * 1_000_000 + labels)
        self.spans.append((start, len(self.paths)))
        return split

    def build(self, cfg: ScenarioCfg, notes: dict) -> list[ImageSet]:
        """One ImageSet per added split, over one FileStore."""
        groups = np.concatenate(self.groups) if self.groups else np.zeros(0, np.int64)
        store = FileStore(self.paths, cfg.image_size, cfg.decode_workers, cfg.skip_bad_images, groups)
        notes["unreadable_images"] = store.bad  # filled as files are read (skip_bad_images=true)
        return [ImageSet(store, np.arange(a, b), y) for (a, b), y in zip(self.spans, self.labels)]


def _list_images(folder: Path) -> list[str]:
    """Image files directly inside a folder, sorted by name."""
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def _class_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _scan_classes(split_dir: Path, classes: list[str], workers: int = 16) -> tuple[list[str], np.ndarray, list[str]]:
    """Files of each class folder of split_dir (label = position in classes); also the classes without files."""
    from concurrent.futures import ThreadPoolExecutor

    def files(c: str) -> list[str]:
        d = split_dir / c
        return _list_images(d) if d.is_dir() else []

    with ThreadPoolExecutor(workers) as pool:  # listing is I/O-bound: threads hide network-disk latency
        per_class = list(pool.map(files, classes))
    paths = [p for fs in per_class for p in fs]
    labels = np.repeat(np.arange(len(classes)), [len(fs) for fs in per_class])
    return paths, labels, [c for c, fs in zip(classes, per_class) if not fs]


def _empty_classes_warning(where: str, what: str, empty: list[str]) -> str:
    """One line naming classes without images in a split: such a class is never learnt (training) or never
    measured (test), which a user should hear about before the run rather than from odd accuracies."""
    more = ", ..." if len(empty) > 10 else ""
    noun = "class" if len(empty) == 1 else "classes"
    return f"{where}{len(empty)} {noun} without {what} images: {', '.join(empty[:10])}{more}"


def _read_imagenet_names() -> dict[str, str]:
    text = (RESOURCES / "imagenet_classes.tsv").read_text()
    return dict(line.split("\t", 1) for line in text.splitlines() if line.strip())


RESOURCES = Path(__file__).resolve().parent.parent / "resources"
IMAGENET_HELP = ("ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org/download.php, "
                 "unpack train/ and sort val/ into one folder per wnid (the usual valprep.sh), then set "
                 "scenario.root (or $CLIPCL_DATA) to the folder holding train/ and val/.")


def _imagenet_root(cfg: ScenarioCfg, what: str) -> Path:
    candidates = data_roots(cfg, "imagenet", "ImageNet", "ILSVRC2012", "imagenet1k", "imagenet100")
    for c in candidates:
        if (c / "train").is_dir() and (c / "val").is_dir():
            return c
    raise ConfigError(f"{what} not found. Expected the layout ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG; "
                      "looked for train/ and val/ in: " + (", ".join(str(c) for c in candidates) or
                                                          "nowhere (scenario.root and $CLIPCL_DATA are both unset)")
                      + ". " + IMAGENET_HELP)


def _imagenet(cfg: ScenarioCfg, name: str, wnids: list[str] | None) -> Dataset:
    """ImageNet (or a subset of its synsets) from ROOT/train/<wnid>/ and ROOT/val/<wnid>/."""
    root = _imagenet_root(cfg, name)
    if not _class_dirs(root / "val") and any(root.joinpath("val").glob("*.JPEG")):
        raise ConfigError(f"'{root / 'val'}' holds the validation images without class folders. Sort them into "
                          "val/<wnid>/ (the usual valprep.sh script does it). " + IMAGENET_HELP)
    found = _class_dirs(root / "train")
    notes: dict = {"root": str(root), "warnings": []}
    if wnids is None:
        wnids = [w for w in found if w.startswith("n") and w[1:].isdigit()]
        if not wnids:
            raise ConfigError(f"'{root / 'train'}' holds no wnid folders (n01440764, ...). " + IMAGENET_HELP)
        if len(wnids) != 1000:
            notes["warnings"].append(f"{len(wnids)} synset folders in {root / 'train'} (ImageNet-1K has 1000)")
    else:
        missing = sorted(set(wnids) - set(found))
        if missing:
            raise ConfigError(f"{name}: {len(missing)} of its {len(wnids)} synsets have no folder in "
                              f"'{root / 'train'}' (first missing: {', '.join(missing[:5])}). Point scenario.root "
                              "at a full ImageNet folder or at a copy holding these synsets.")
    names_by_wnid = _read_imagenet_names()
    names = [names_by_wnid.get(w, w.replace("_", " ")) for w in wnids]
    index = _FileIndex()
    for split, what in (("train", "training"), ("val", "test")):
        paths, labels, empty = _scan_classes(root / split, wnids)
        if empty:
            notes["warnings"].append(_empty_classes_warning(f"{root / split}: ", what, empty))
        index.add(paths, labels)
    train, test = index.build(cfg, notes)
    return Dataset(name, names, train=train, test=test, shipped_order=pycil_order(len(wnids)), notes=notes)


@register("imagenet", "ImageNet-1K from a local folder ROOT/train|val/<wnid>/*.JPEG (never downloaded)")
def load_imagenet(cfg: ScenarioCfg) -> Dataset:
    """Every wnid folder of ROOT/train (labels in sorted-wnid order = the standard index for the full 1000)."""
    return _imagenet(cfg, "imagenet", None)


@register("imagenet100", "ImageNet-100 (PODNet's 100 synsets, used by ZSCL via continuum), local ImageNet folder")
def load_imagenet100(cfg: ScenarioCfg) -> Dataset:
    """The shipped 100 synsets (resources/imagenet100_wnids.txt) from a full ImageNet folder or a copy of them."""
    wnids = (RESOURCES / "imagenet100_wnids.txt").read_text().split()
    return _imagenet(cfg, "imagenet100", wnids)


# ---------------------------------------------------------------- DomainNet
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def _read_domainnet_list(path: Path) -> tuple[list[str], np.ndarray]:
    rel, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConfigError(f"'{path}' line {n}: expected 'domain/class/file.jpg LABEL', got {line!r}")
        rel.append(parts[0])
        labels.append(int(parts[1]))
    return rel, np.asarray(labels, dtype=np.int64)


@register("domainnet", "DomainNet, 345 classes in 6 domains, official train/test lists, local folder: DIL")
def load_domainnet(cfg: ScenarioCfg) -> Dataset:
    """One (train, test) pair per domain from the official lists; class names from the lists' folder names."""
    candidates = data_roots(cfg, "domainnet", "DomainNet")
    root = next((c for c in candidates if any((c / f"{d}_train.txt").is_file() for d in DOMAINNET_DOMAINS)), None)
    if root is None:
        raise ConfigError(
            "DomainNet not found. Expected ROOT/<domain>/<class>/<file>.jpg with the official lists "
            "ROOT/<domain>_train.txt and ROOT/<domain>_test.txt (domains: " + ", ".join(DOMAINNET_DOMAINS)
            + "); looked in: " + (", ".join(str(c) for c in candidates) or "nowhere (scenario.root and $CLIPCL_DATA "
                                  "are both unset)") + ". Download the images and the train/test lists from "
            "https://ai.bu.edu/M3SDA/ and set scenario.root to the folder holding them.")
    notes: dict = {"root": str(root), "warnings": []}
    lists = {}
    for d in DOMAINNET_DOMAINS:
        if (root / f"{d}_train.txt").is_file() and (root / f"{d}_test.txt").is_file():
            lists[d] = (_read_domainnet_list(root / f"{d}_train.txt"), _read_domainnet_list(root / f"{d}_test.txt"))
        else:
            notes["warnings"].append(f"domain {d}: no {d}_train.txt and {d}_test.txt in {root}")
    folder_of: dict[int, str] = {}
    for d, splits in lists.items():
        for rel, labels in splits:
            for r, y in zip(rel, labels.tolist()):
                parts = r.split("/")
                if len(parts) < 3:
                    raise ConfigError(f"DomainNet list of '{d}': path {r!r} is not domain/class/file")
                if folder_of.setdefault(y, parts[1]) != parts[1]:
                    raise ConfigError(f"DomainNet lists give label {y} to two classes: {folder_of[y]!r} and "
                                      f"{parts[1]!r} (in {d}). The lists are not the official ones.")
    n = max(folder_of) + 1 if folder_of else 0
    if sorted(folder_of) != list(range(n)):
        raise ConfigError(f"DomainNet lists in {root}: labels {sorted(set(range(n)) - set(folder_of))[:5]} never "
                          "occur, so their class names are unknown.")
    names = [folder_of[y].replace("_", " ") for y in range(n)]
    for d, splits in lists.items():
        for (rel, labels), what in zip(splits, ("training", "test")):
            empty = sorted(set(range(n)) - set(labels.tolist()))
            if empty:
                notes["warnings"].append(_empty_classes_warning(f"domain {d}: ", what, [names[y] for y in empty]))
    index = _FileIndex()
    order = []
    for d, splits in lists.items():
        for rel, labels in splits:
            index.add([str(root / r) for r in rel], labels)
        order.append(d)
    sets = index.build(cfg, notes)
    domains = {d: (sets[2 * k], sets[2 * k + 1]) for k, d in enumerate(order)}
    return Dataset("domainnet", names, domains=domains, notes=notes)


# ---------------------------------------------------------------- a user's image folder
TEST_DIRS = ("test", "val")


def same_name_key(name: str) -> str:
    """What a class name reads as in a prompt, for telling two names apart: case-folded, '_' as a space, runs of
    spaces as one ('Cat', 'cat' and 'CAT_' are one class to a CLIP)."""
    return " ".join(name.replace("_", " ").casefold().split())


def _first_same_names(names: list[str]) -> tuple[int, int] | None:
    """Positions (i, j), i < j, of the first two names that read the same (same_name_key), or None."""
    seen: dict[str, int] = {}
    for j, name in enumerate(names):
        i = seen.setdefault(same_name_key(name), j)
        if i != j:
            return i, j
    return None


def _folder_classnames(root: Path, folders: list[str]) -> list[str]:
    """Names of the class folders: ROOT/classnames.txt (one per line, in sorted folder order) or the folder names.

    Two classes whose names read the same (case and '_' aside) are refused: their prompts would be identical, so
    a CLIP could not tell the classes apart, and every accuracy would quietly halve between them.
    """
    names_file = root / "classnames.txt"
    if not names_file.is_file():
        names = [f.replace("_", " ") for f in folders]
        same = _first_same_names(names)
        if same:
            i, j = same
            raise ConfigError(f"'{root}': the class folders '{folders[i]}' and '{folders[j]}' give the same class name "
                              f"'{same_name_key(names[j])}' (names are compared ignoring case and '_'), so their "
                              "prompts are identical and a CLIP cannot tell the classes apart. Merge or rename one "
                              f"of the folders, or give every class a distinct name in '{names_file}' (one line per "
                              "class folder, in sorted folder-name order).")
        return names
    try:
        text = names_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read '{names_file}' ({getattr(e, 'strerror', None) or e}); it should be a text "
                          "file of one class name per line.") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    names = [name for _, name in lines]
    if len(names) != len(folders):
        raise ConfigError(f"'{names_file}' holds {len(names)} names but there are {len(folders)} class folders "
                          f"({', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}). It needs one line per "
                          "class folder, in sorted folder-name order.")
    same = _first_same_names(names)
    if same:
        (i, j), (li, lj) = same, (lines[same[0]][0], lines[same[1]][0])
        raise ConfigError(f"'{names_file}' gives the same class name to two classes: line {li} '{names[i]}' (folder "
                          f"'{folders[i]}') and line {lj} '{names[j]}' (folder '{folders[j]}'); names are compared "
                          "ignoring case and '_', and identical prompts make the classes indistinguishable to a "
                          "CLIP. Give every class a distinct name.")
    return names


FLAT_TEST_SEED = 271828  # the held-out draw of a flat folder: fixed, so every run tests on the same files


def flat_test_positions(n: int, folder: str) -> np.ndarray:
    """Sorted positions, among the n sorted files of the flat class folder `folder`, of the files held out as test:
    a seeded tenth (n // 10, at least 1 when n >= 2), drawn by a generator seeded by the folder's name alone, so
    a class holds out the same files whatever the other classes (and in `clipcl pretrain` as in `clipcl run`)."""
    k = max(1, n // 10) if n >= 2 else 0
    rng = np.random.default_rng([FLAT_TEST_SEED, zlib.crc32(folder.encode("utf-8", "surrogateescape"))])
    return np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)


def _flat_imagefolder(cfg: ScenarioCfg, root: Path) -> Dataset:
    """ROOT/<class>/* without split folders: flat_test_positions of each class held out as the test split."""
    if (root / "train").is_dir():  # a split layout missing its test folder, not a class called 'train'
        raise ConfigError(f"'{root}' has train/ but no test/ (or val/) folder beside it. Add ROOT/test/<class>/*, "
                          "or put the class folders directly in ROOT (a tenth of each class is then held out as "
                          "test).")
    folders = _class_dirs(root)
    paths, labels, empty = _scan_classes(root, folders) if folders else ([], np.zeros(0, np.int64), [])
    if not paths:
        raise ConfigError(f"'{root}' has neither train/ and test/ (or val/) folders, nor domain folders holding them, "
                          "nor class folders holding images. Expected ROOT/train/<class>/* and ROOT/test/<class>/* "
                          "(or ROOT/<class>/*, a tenth of each class then held out as test) for class-incremental "
                          "runs, or ROOT/<domain>/train/<class>/* and ROOT/<domain>/test/<class>/* for "
                          "domain-incremental runs.")
    names = _folder_classnames(root, folders)
    notes: dict = {"root": str(root), "warnings": [], "layout": "flat"}
    counts = np.bincount(labels, minlength=len(folders))
    starts = np.concatenate([[0], np.cumsum(counts)])
    held = np.concatenate([starts[y] + flat_test_positions(int(n), c) for y, (c, n) in enumerate(zip(folders, counts))])
    kept = np.setdiff1d(np.arange(len(paths)), held)
    if empty:
        notes["warnings"].append(_empty_classes_warning("", "training", empty))
    single = [c for c, n in zip(folders, counts) if n == 1]
    if single:  # one image: kept for training, so the class is never measured
        notes["warnings"].append(_empty_classes_warning("", "test", single))
    index = _FileIndex()
    for positions in (kept, held):
        index.add([paths[i] for i in positions], labels[positions])
    train, test = index.build(cfg, notes)
    return Dataset("imagefolder", names, train=train, test=test, notes=notes)


@register("imagefolder", "your images: ROOT/train|test/<class>/* or ROOT/<class>/* (CIL), "
                        "ROOT/<domain>/train|test/<class>/* (DIL)")
def load_imagefolder(cfg: ScenarioCfg) -> Dataset:
    """A user's folder: labels follow the sorted class-folder names (the union over splits and domains)."""
    if not cfg.root and not os.environ.get("CLIPCL_DATA"):
        raise ConfigError("dataset 'imagefolder' needs scenario.root: the folder holding train/<class>/ and "
                          "test/<class>/ (or <domain>/train/<class>/ ... for domain-incremental runs).")
    root = Path(cfg.root or os.environ["CLIPCL_DATA"]).expanduser()

    def split_dirs(base: Path) -> tuple[Path, Path] | None:
        test = next((base / t for t in TEST_DIRS if (base / t).is_dir()), None)
        return (base / "train", test) if (base / "train").is_dir() and test is not None else None

    if not root.is_dir():
        raise ConfigError(f"scenario.root '{root}' is not a folder. Expected ROOT/train/<class>/* and "
                          "ROOT/test/<class>/* (or ROOT/<domain>/train|test/<class>/*).")
    if split_dirs(root):
        parts = {"": split_dirs(root)}
    else:
        parts = {d: split_dirs(root / d) for d in _class_dirs(root)}
        parts = {d: s for d, s in parts.items() if s is not None}
        if not parts and cfg.kind == "dil":  # a flat layout has no domains: its top folders would read as classes
            raise ConfigError(f"scenario.root '{root}' has no <domain>/train/ and <domain>/test/ folders, which a "
                              "domain-incremental run (scenario.kind=dil) reads: arrange it as "
                              "ROOT/<domain>/train/<class>/* and ROOT/<domain>/test/<class>/*.")
        if not parts:  # no split folders anywhere: class folders of images, a tenth held out as test
            return _flat_imagefolder(cfg, root)
    folders = sorted({c for tr, te in parts.values() for c in _class_dirs(tr) + _class_dirs(te)})
    if not folders:
        raise ConfigError(f"'{root}': no class folders inside train/ and test/.")
    names = _folder_classnames(root, folders)
    notes: dict = {"root": str(root), "warnings": []}
    index = _FileIndex()
    for d, (tr, te) in parts.items():
        for split_dir, what in ((tr, "training"), (te, "test")):
            paths, labels, empty = _scan_classes(split_dir, folders)
            if empty:
                notes["warnings"].append(_empty_classes_warning(f"domain {d}: " if d else "", what, empty))
            index.add(paths, labels)
    sets = index.build(cfg, notes)
    if "" in parts:
        return Dataset("imagefolder", names, train=sets[0], test=sets[1], notes=notes)
    domains = {d: (sets[2 * k], sets[2 * k + 1]) for k, d in enumerate(parts)}
    return Dataset("imagefolder", names, domains=domains, notes=notes)
