"""Dataset loaders on small files generated in each dataset's real on-disk format (nothing downloads)."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcl.benchmarks import CONFIG_DIR, list_benchmarks
from clipcl.config import ConfigError, ScenarioCfg, load_config
from clipcl.data.datasets import (DATASETS, FMNIST_DIL_DOMAINS, RESOURCES, fmnist_domain, load_dataset,
                                  pycil_order)
from clipcl.data.images import FileStore, decode_image
from clipcl.data.scenarios import build_scenario


def colour_image(path: Path, rgb, size=(40, 30), mode="RGB"):
    """A flat-coloured image file (the colour tells which class and file it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, tuple(int(c) for c in rgb))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def corrupt_file(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path


# ------------------------------------------------------------------ FileStore
def test_decode_resizes_shorter_side_and_centre_crops(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)  # wide: left third red, middle green, right third blue
    img[:, :20, 0] = 255
    img[:, 20:40, 1] = 255
    img[:, 40:, 2] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.new("L", (9, 9), 77).save(tmp_path / "grey.png")
    out = decode_image(str(tmp_path / "a.png"), 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    inner = out[:, :, 1:-1]  # the outer columns blend in a little of the neighbours, as resize-then-crop does
    assert (inner[1] > 250).all() and (inner[0] < 5).all() and (inner[2] < 5).all()  # only the green centre
    assert (out[1] > 200).all()
    grey = decode_image(str(tmp_path / "grey.png"), 4)
    assert grey.shape == (3, 4, 4) and (grey == 77).all()  # greyscale becomes RGB


@pytest.mark.parametrize("workers", [0, 2])
def test_filestore_reads_in_order_with_and_without_workers(tmp_path, workers):
    paths = [str(colour_image(tmp_path / f"{k}.jpg", (10 * k, 0, 0), size=(50, 40))) for k in range(12)]
    store = FileStore(paths, 16, workers=workers)
    order = np.array([5, 0, 11, 3, 3, 7, 1])
    x = store.read(order)
    assert x.shape == (7, 3, 16, 16) and x.dtype == torch.uint8
    red = x[:, 0].float().mean(dim=(1, 2)).numpy()
    assert np.allclose(red, 10 * order, atol=3)
    store.close()


# ------------------------------------------------------------------ CIFAR-100
CIFAR_NAMES = [b"apple", b"aquarium_fish", b"baby", b"maple_tree"]


def write_cifar100(root: Path, n_train=8, n_test=4, names=CIFAR_NAMES):
    """cifar-100-python/{train,test,meta} as the real archive has them (pickles with bytes keys)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [k % len(names) for k in range(n)]
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, 0] = labels  # first red pixel = label
        data[:, 1024] = 200  # first green pixel
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": labels,
                         b"coarse_labels": [0] * n, b"data": data}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": list(names), b"coarse_label_names": [b"fruit"]}, f, protocol=2)


def test_cifar100_pickles(tmp_path):
    write_cifar100(tmp_path)
    ds = load_dataset(ScenarioCfg(dataset="cifar100", root=str(tmp_path), download=False))
    assert ds.classnames == ["apple", "aquarium fish", "baby", "maple tree"]
    assert len(ds.train) == 8 and len(ds.test) == 4
    x = ds.train.load(np.arange(8))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8
    assert (x[:, 0, 0, 0].numpy() == ds.train.targets).all()  # channel-major layout kept
    assert (x[:, 1, 0, 0] == 200).all()
    assert ds.shipped_order == pycil_order(4)


def test_cifar100_shipped_order_is_pycils():
    # PyCIL / PODNet's CIFAR-100 order (np.random.seed(1993); np.random.permutation(100)), as published
    assert pycil_order(100)[:12] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89]
    assert pycil_order(100)[-5:] == [67, 29, 49, 57, 33]


def test_cifar100_named_orders_follow_pycil_and_continual_clip(tmp_path):
    write_cifar100(tmp_path, n_train=200, n_test=100, names=[f"c{k}".encode() for k in range(100)])
    runs = {}
    for order in ("shipped", "pycil", "continual-clip"):
        cfg = ScenarioCfg(dataset="cifar100", root=str(tmp_path), download=False, class_order=order,
                          classes_per_task=10)
        sc = build_scenario(cfg)
        runs[order] = list(sc.class_order)
        x = sc.tasks[0].train.load(np.arange(len(sc.tasks[0].train)))  # the first red pixel is the label id
        assert (np.array(runs[order])[sc.tasks[0].train.targets] == x[:, 0, 0, 0].numpy()).all()
    assert runs["shipped"] == runs["pycil"] == pycil_order(100)
    # iCaRL's list, as Continual-CLIP / ZSCL / MoE-Adapters4CL / RAPF publish it
    assert runs["continual-clip"][:10] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]
    assert runs["continual-clip"][-6:] == [34, 55, 54, 26, 35, 39]
    assert sorted(runs["continual-clip"]) == list(range(100))


def test_cifar100_missing_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPCL_DATA", raising=False)
    with pytest.raises(ConfigError, match=r"cifar-100-python.*download is false.*cs.toronto.edu"):
        load_dataset(ScenarioCfg(dataset="cifar100", root=str(tmp_path), download=False))


# ------------------------------------------------------------------ ImageNet
WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


def write_imagenet(root: Path, wnids=WNIDS, n_train=3, n_val=2, skip_val=()):
    for k, w in enumerate(wnids):
        for i in range(n_train):
            colour_image(root / "train" / w / f"{w}_{i}.JPEG", (80 * k, 10 * i, 0))
        (root / "val" / w).mkdir(parents=True, exist_ok=True)
        if w in skip_val:
            continue
        for i in range(n_val):
            colour_image(root / "val" / w / f"ILSVRC2012_val_{k}{i}.JPEG", (80 * k, 0, 0))


def test_imagenet_folder_names_and_labels(tmp_path):
    write_imagenet(tmp_path, skip_val=("n01484850",))
    cfg = ScenarioCfg(dataset="imagenet", root=str(tmp_path), image_size=24, decode_workers=0)
    ds = load_dataset(cfg)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    assert ds.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.test.targets.tolist() == [0, 0, 1, 1]
    x = ds.train.load(np.arange(9))
    assert x.shape == (9, 3, 24, 24)
    assert np.allclose(x[:, 0].float().mean(dim=(1, 2)).numpy(), 80 * ds.train.targets, atol=4)
    assert any("n01484850" in w and "test" in w for w in ds.notes["warnings"])  # a class without test images
    assert ds.shipped_order == pycil_order(3)


def test_imagenet_classes_resource_is_complete():
    lines = (RESOURCES / "imagenet_classes.tsv").read_text().splitlines()
    wnids = [line.split("\t")[0] for line in lines]
    assert len(lines) == 1000 and wnids == sorted(set(wnids))
    assert lines[0] == "n01440764\ttench" and lines[-1] == "n15075141\ttoilet paper"
    in100 = (RESOURCES / "imagenet100_wnids.txt").read_text().split()
    assert len(set(in100)) == 100 and set(in100) <= set(wnids)


def test_imagenet100_selects_its_synsets(tmp_path, monkeypatch):
    in100 = (RESOURCES / "imagenet100_wnids.txt").read_text().split()
    extra = "n15075141"  # not in the subset: must be ignored
    write_imagenet(tmp_path, wnids=in100 + [extra], n_train=1, n_val=1)
    monkeypatch.setenv("CLIPCL_DATA", str(tmp_path))
    ds = load_dataset(ScenarioCfg(dataset="imagenet100", decode_workers=0))
    assert len(ds.classnames) == 100 and ds.classnames[0] == "tench"
    assert len(ds.train) == 100 and sorted(set(ds.train.targets.tolist())) == list(range(100))
    assert not any(extra in p for p in ds.train.store.paths)


def test_imagenet100_reports_missing_synsets(tmp_path):
    write_imagenet(tmp_path, n_train=1, n_val=1)
    with pytest.raises(ConfigError, match=r"97 of its 100 synsets have no folder"):
        load_dataset(ScenarioCfg(dataset="imagenet100", root=str(tmp_path)))


def test_imagenet_missing_folder_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCL_DATA", str(tmp_path / "data"))
    with pytest.raises(ConfigError) as e:
        load_dataset(ScenarioCfg(dataset="imagenet", root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert "ROOT/train/<wnid>/*.JPEG" in msg and str(tmp_path / "nowhere") in msg
    # an explicit scenario.root is meant: $CLIPCL_DATA is not searched behind the user's back
    assert str(tmp_path / "data") not in msg and "image-net.org" in msg


def test_imagenet_flat_val_folder_is_explained(tmp_path):
    write_imagenet(tmp_path, n_val=0)
    for w in WNIDS:
        (tmp_path / "val" / w).rmdir()
    colour_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3))
    with pytest.raises(ConfigError, match="without class folders"):
        load_dataset(ScenarioCfg(dataset="imagenet", root=str(tmp_path)))


# ------------------------------------------------------------------ DomainNet
DN_CLASSES = ["aircraft_carrier", "alarm_clock", "zebra"]


def write_domainnet(root: Path, domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch")):
    for di, d in enumerate(domains):
        for split, n in (("train", 2), ("test", 1)):
            lines = []
            for y, c in enumerate(DN_CLASSES):
                for i in range(n):
                    rel = f"{d}/{c}/{d}_{y:03d}_{split}{i:05d}.jpg"
                    colour_image(root / rel, (40 * di, 60 * y, 0))
                    lines.append(f"{rel} {y}")
            (root / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_lists(tmp_path):
    write_domainnet(tmp_path)
    cfg = ScenarioCfg(dataset="domainnet", root=str(tmp_path), kind="dil", image_size=8, decode_workers=0)
    ds = load_dataset(cfg)
    assert ds.classnames == ["aircraft carrier", "alarm clock", "zebra"]
    assert list(ds.domains) == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    tr, te = ds.domains["painting"]
    assert tr.targets.tolist() == [0, 0, 1, 1, 2, 2] and te.targets.tolist() == [0, 1, 2]
    x = te.load(np.arange(3))
    assert np.allclose(x[:, 0].float().mean(dim=(1, 2)).numpy(), 80, atol=3)  # painting = domain 2
    assert np.allclose(x[:, 1].float().mean(dim=(1, 2)).numpy(), [0, 60, 120], atol=3)
    sc = build_scenario(cfg, dataset=ds)
    assert [t.name for t in sc.tasks] == list(ds.domains) and sc.n_seen(0) == 3


def test_domainnet_inconsistent_labels(tmp_path):
    write_domainnet(tmp_path, domains=("clipart",))
    (tmp_path / "clipart_test.txt").write_text("clipart/zebra/x.jpg 0\n")
    with pytest.raises(ConfigError, match="two classes"):
        load_dataset(ScenarioCfg(dataset="domainnet", root=str(tmp_path)))


def test_domainnet_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"<domain>_train.txt.*M3SDA"):
        load_dataset(ScenarioCfg(dataset="domainnet", root=str(tmp_path)))


# ------------------------------------------------------------------ image folders
def write_imagefolder(root: Path, classes=("cat", "dog", "red_panda"), n_train=3, n_test=2, test_dir="test"):
    for y, c in enumerate(classes):
        for i in range(n_train):
            colour_image(root / "train" / c / f"{i}.png", (70 * y, 0, 20 * i))
        for i in range(n_test):
            colour_image(root / test_dir / c / f"{i}.jpg", (70 * y, 0, 0))


def test_imagefolder_cil_names_from_folders_and_val(tmp_path):
    write_imagefolder(tmp_path, test_dir="val")
    ds = load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path), image_size=12, decode_workers=0))
    assert ds.classnames == ["cat", "dog", "red panda"]
    assert ds.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(ds.test) == 6
    x = ds.test.load(np.arange(6))
    assert np.allclose(x[:, 0].float().mean(dim=(1, 2)).numpy(), 70 * ds.test.targets, atol=3)


def test_imagefolder_classnames_file(tmp_path):
    write_imagefolder(tmp_path, classes=("c1", "c0"))
    (tmp_path / "classnames.txt").write_text("zero\none\n")  # sorted folder order: c0, c1
    ds = load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path)))
    assert ds.classnames == ["zero", "one"]
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ConfigError, match="1 names but there are 2 class folders"):
        load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path)))


def test_imagefolder_corrupt_file_named_or_skipped_and_counted(tmp_path):
    write_imagefolder(tmp_path)
    bad = corrupt_file(tmp_path / "train" / "dog" / "1b.png")  # sorts between dog/1.png and dog/2.png
    cfg = ScenarioCfg(dataset="imagefolder", root=str(tmp_path), image_size=8, decode_workers=2)
    ds = load_dataset(cfg)
    with pytest.raises(ConfigError, match=str(bad)):
        ds.train.load(np.arange(len(ds.train)))
    ds = load_dataset(ScenarioCfg(**{**cfg.__dict__, "skip_bad_images": True}))
    x = ds.train.load(np.arange(len(ds.train)))
    assert len(ds.notes["unreadable_images"]) == 1 and str(bad) in ds.notes["unreadable_images"]
    k = [str(p) for p in ds.train.store.paths].index(str(bad))
    assert ds.train.targets[k] == 1
    # replaced by the next readable image of the same class and split: dog/2.png (blue 40)
    assert abs(x[k, 0].float().mean().item() - 70) < 3 and abs(x[k, 2].float().mean().item() - 40) < 3


def test_imagefolder_domains(tmp_path):
    for d in ("photo", "sketch"):
        write_imagefolder(tmp_path / d, classes=("cat", "dog"))
    (tmp_path / "sketch" / "test" / "dog").rename(tmp_path / "sketch" / "test" / "gone")  # gone: a class
    ds = load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path), kind="dil"))
    assert list(ds.domains) == ["photo", "sketch"] and ds.classnames == ["cat", "dog", "gone"]
    assert any("sketch" in w and "training" in w and "gone" in w for w in ds.notes["warnings"])
    assert any("sketch" in w and "test" in w and "dog" in w for w in ds.notes["warnings"])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ConfigError, match=r"ROOT/train/<class>/\* and ROOT/test/<class>/\*"):
        load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path)))


# ------------------------------------------------------------------ Fashion-MNIST domains
def write_idx(path: Path, array: np.ndarray):
    dims = array.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fmnist(root: Path, n_train=40, n_test=20):
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 6:22, 10:18] = rng.integers(100, 256, size=(n, 1, 1))  # an upright bar: rotation shows
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fmnist_dil_domains_deterministic_and_distinct(tmp_path):
    write_fmnist(tmp_path)
    cfg = ScenarioCfg(dataset="fmnist_dil", root=str(tmp_path), kind="dil")
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert tuple(a.domains) == FMNIST_DIL_DOMAINS == ("original", "inverted", "rotated", "blurred", "edges")
    imgs = {d: a.domains[d][0].load(np.arange(40)) for d in a.domains}
    for d in a.domains:
        assert imgs[d].dtype == torch.uint8 and imgs[d].shape == (40, 1, 28, 28)
        assert torch.equal(imgs[d], b.domains[d][0].load(np.arange(40)))
        assert a.domains[d][0].targets.tolist() == (np.arange(40) % 10).tolist()
    names = list(imgs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not torch.equal(imgs[names[i]], imgs[names[j]]), (names[i], names[j])
    x = imgs["original"]
    assert torch.equal(imgs["inverted"], 255 - x)
    assert torch.equal(imgs["rotated"], torch.rot90(x, 1, dims=(2, 3)))
    assert imgs["edges"].amax(dim=(1, 2, 3)).eq(255).all()  # rescaled to 0..255
    assert imgs["edges"][:, 0, 14, 14].eq(0).all()  # flat inside the bar: no edge
    assert imgs["blurred"].float().std() < x.float().std()
    sc = build_scenario(ScenarioCfg(**{**cfg.__dict__, "train_per_class": 2, "test_per_class": 1}), dataset=a)
    assert len(sc) == 5 and [len(t.train) for t in sc.tasks] == [20] * 5 and sc.n_seen(0) == 10


def test_fmnist_filters_match_convolutions():
    """The blur and Sobel filters equal their textbook convolutions (edges replicated), up to rounding."""
    F = torch.nn.functional
    x = torch.randint(0, 256, (16, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    g = torch.exp(-torch.arange(-3, 4, dtype=torch.float32) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    blur = F.conv2d(F.conv2d(F.pad(x.float(), (3, 3, 3, 3), mode="replicate"), g.view(1, 1, 1, 7)), g.view(1, 1, 7, 1))
    assert (blur.round().clamp(0, 255) - fmnist_domain(x, "blurred").float()).abs().max() <= 1
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    grad = F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="replicate"), torch.stack([kx, kx.T]).unsqueeze(1))
    mag = grad.pow(2).sum(1, keepdim=True).sqrt()
    edges = (mag * 255 / mag.amax(dim=(2, 3), keepdim=True)).round()
    assert (edges - fmnist_domain(x, "edges").float()).abs().max() <= 1


def test_fmnist_domain_unknown():
    with pytest.raises(ValueError, match="known: original"):
        fmnist_domain(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "sepia")


# ------------------------------------------------------------------ scenarios
def test_class_incremental_with_a_larger_first_task(tmp_path):
    """B50-Inc10 style: 6 classes first, then tasks of 2 (on a 10-class image folder)."""
    write_imagefolder(tmp_path, classes=tuple(f"c{k}" for k in range(10)), n_train=1, n_test=1)
    cfg = ScenarioCfg(dataset="imagefolder", root=str(tmp_path), classes_per_task=2, initial_classes=6)
    sc = build_scenario(cfg)
    assert [len(t.classes) for t in sc.tasks] == [6, 2, 2]
    assert [sc.n_seen(t) for t in range(3)] == [6, 8, 10]
    assert [c for t in sc.tasks for c in t.classes] == list(range(10))
    assert [len(t.test) for t in sc.tasks] == [6, 2, 2]
    assert sorted(sc.class_order) == list(range(10)) and sc.class_order != tuple(range(10))


# ------------------------------------------------------------------ shipped configs
NEW_CONFIGS = ["fmnist-dil", "cifar100-b0-inc5", "cifar100-b0-inc10", "cifar100-b0-inc20", "imagenet100",
               "imagenet1k", "domainnet", "imagefolder"]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_shipped_configs_load(name):
    path = CONFIG_DIR / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10
    cfg = load_config(path)
    assert cfg.scenario.dataset in DATASETS
    assert list_benchmarks()[name] == first.lstrip("# ").strip()
    if name != "fmnist-dil":
        assert (cfg.model.name, cfg.model.pretrained, cfg.memory.per_class) == ("ViT-B-16", "openai", 5)


def test_shipped_protocols():
    tasks = {n: load_config(n).scenario for n in NEW_CONFIGS}
    assert [tasks[f"cifar100-b0-inc{k}"].classes_per_task for k in (5, 10, 20)] == [5, 10, 20]
    assert tasks["imagenet100"].classes_per_task == 10 and tasks["imagenet1k"].classes_per_task == 100
    assert tasks["domainnet"].kind == "dil" and len(tasks["domainnet"].domains) == 6
    fm = tasks["fmnist-dil"]
    assert (fm.kind, fm.dataset, fm.train_per_class, fm.test_per_class) == ("dil", "fmnist_dil", 200, 100)


def test_explicit_root_without_fashion_mnist_files_is_an_error_not_a_fallback(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        load_dataset(ScenarioCfg(dataset="fashion_mnist", root=str(tmp_path / "empty"), download=False))
    assert str(tmp_path / "empty") in str(e.value) and "/usr/share/datasets" not in str(e.value)
