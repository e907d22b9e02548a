"""Data checks before a run: unreadable files found up front, deep greyscale decoded, data fingerprints, warnings."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcl.config import ConfigError, ScenarioCfg
from clipcl.data import fingerprint_diff, verify_images
from clipcl.data.datasets import Dataset, load_dataset
from clipcl.data.images import FileStore, ImageSet, check_image, decode_image
from clipcl.data.scenarios import build_scenario

CLASSES = ("cat", "dog", "fox")


def flat_image(path: Path, rgb, size=(40, 30)) -> Path:
    """A flat-coloured image file: its red value tells the class (70 per label), blue the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(int(c) for c in rgb)).save(path)
    return path


def write_folder(root: Path, classes=CLASSES, n_train=3, n_test=2) -> Path:
    """ROOT/train/<class>/{0,1,..}.png and ROOT/test/<class>/{0,1,..}.jpg, as a user's image folder."""
    for y, c in enumerate(classes):
        for i in range(n_train):
            flat_image(root / "train" / c / f"{i}.png", (70 * y, 0, 20 * i))
        for i in range(n_test):
            flat_image(root / "test" / c / f"{i}.jpg", (70 * y, 0, 0))
    return root


def noise_bytes(fmt: str, size=64) -> bytes:
    """A noisy image file's bytes (noise: JPEG and PNG data long enough to cut in half)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def add_bad_files(root: Path) -> list[Path]:
    """Garbage with a .jpg name, an empty file and a truncated PNG, in store order (train/dog, train/fox, test/cat)."""
    garbage = root / "train" / "dog" / "1b.jpg"  # sorts between dog/1.png and dog/2.png
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    empty = root / "train" / "fox" / "0z.png"
    empty.write_bytes(b"")
    truncated = root / "test" / "cat" / "9.png"
    truncated.write_bytes(noise_bytes("PNG")[:400])
    return [garbage, empty, truncated]


def cfg_for(root: Path, **kw) -> ScenarioCfg:
    base = dict(dataset="imagefolder", root=str(root), image_size=8, decode_workers=0, class_order="natural",
                classes_per_task=len(CLASSES))
    return ScenarioCfg(**{**base, **kw})


def position_of(images: ImageSet, path: Path) -> int:
    return [images.store.paths[i] for i in images.index].index(str(path))


# ------------------------------------------------------------------ verify_images
def test_a_good_folder_passes(tmp_path):
    sc = build_scenario(cfg_for(write_folder(tmp_path)))
    summary = verify_images(sc)
    assert summary["files"] == 15 and summary["bad"] == 0 and summary["seconds"] >= 0
    assert not any("unreadable" in w for w in sc.notes["warnings"])


@pytest.mark.parametrize("workers", [0, 4])
def test_bad_files_stop_the_run_naming_the_first_and_counting_them(tmp_path, workers):
    root = write_folder(tmp_path)
    first, *_ = add_bad_files(root)
    sc = build_scenario(cfg_for(root))
    with pytest.raises(ConfigError) as e:
        verify_images(sc, workers)
    msg = str(e.value)
    assert f"'{first}'" in msg and "3 of the 18 image files" in msg and "scenario.skip_bad_images=true" in msg
    assert "\n" not in msg


def test_filestore_verify_names_each_reason(tmp_path):
    root = write_folder(tmp_path)
    garbage, empty, truncated = add_bad_files(root)
    missing = root / "train" / "cat" / "gone.png"
    store = FileStore([str(p) for p in (garbage, root / "train" / "cat" / "0.png", empty, truncated, missing)], 8)
    assert store.verify(np.array([4, 3, 2, 1, 0, 0]), workers=2) == {
        0: check_image(str(garbage)), 2: "empty file (0 bytes)", 3: check_image(str(truncated)),
        4: "file not found"}
    assert check_image(str(garbage)) and check_image(str(truncated))  # each with a reason


@pytest.mark.parametrize("decode_workers", [0, 2])
def test_skip_bad_images_records_warns_and_substitutes_from_the_same_class(tmp_path, decode_workers):
    root = write_folder(tmp_path)
    garbage, empty, truncated = add_bad_files(root)
    sc = build_scenario(cfg_for(root, skip_bad_images=True, decode_workers=decode_workers))
    summary = verify_images(sc)
    assert summary == {"files": 18, "bad": 3, "seconds": summary["seconds"]}
    assert set(sc.notes["unreadable_images"]) == {str(garbage), str(empty), str(truncated)}
    lines = [w for w in sc.notes["warnings"] if w.startswith("skipped 3 unreadable images")]
    assert len(lines) == 1 and str(garbage) in lines[0]
    verify_images(sc)  # a second check (a resumed run) does not repeat the line
    assert len([w for w in sc.notes["warnings"] if "unreadable" in w]) == 1
    task = sc[0]
    for images, path, label in ((task.train, garbage, 1), (task.train, empty, 2), (task.test, truncated, 0)):
        k = position_of(images, path)
        assert images.targets[k] == label
        x = images.load([k, k + 1, 0])  # the stand-in, and the files around it decoded as usual
        assert abs(x[0, 0].float().mean().item() - 70 * label) < 3  # a readable image of the same class
        assert abs(x[1, 0].float().mean().item() - 70 * images.targets[k + 1]) < 3
        assert abs(x[2, 0].float().mean().item() - 70 * images.targets[0]) < 3
    task.train.store.close()


def test_only_the_images_the_scenario_keeps_are_checked(tmp_path):
    root = write_folder(tmp_path)
    add_bad_files(root)  # in dog, fox (training) and cat (test)
    sc = build_scenario(cfg_for(root, classes=(1, 2), classes_per_task=1, n_tasks=1))  # dog only
    with pytest.raises(ConfigError, match="1 of the 6 image files"):
        verify_images(sc)
    sc = build_scenario(cfg_for(root, classes=(0,), classes_per_task=1))  # cat: only its test file is bad
    with pytest.raises(ConfigError, match=r"1 of the 6 image files.*test/cat/9\.png"):
        verify_images(sc)


def test_a_jpeg_cut_after_its_header_is_still_caught_when_read(tmp_path):
    root = write_folder(tmp_path)
    cut = root / "train" / "cat" / "1b.jpg"
    data = noise_bytes("JPEG", size=128)
    cut.write_bytes(data[: len(data) // 2])
    sc = build_scenario(cfg_for(root))
    assert verify_images(sc)["bad"] == 0  # the header is fine: verify() reads no JPEG pixels
    k = position_of(sc[0].train, cut)
    with pytest.raises(ConfigError, match="1b.jpg"):
        sc[0].train.load([k])
    sc = build_scenario(cfg_for(root, skip_bad_images=True))
    x = sc[0].train.load([k])
    assert abs(x[0, 0].float().mean().item()) < 3 and str(cut) in sc.notes["unreadable_images"]


def test_a_class_and_split_with_no_readable_file_is_refused_up_front(tmp_path):
    root = write_folder(tmp_path)
    for p in (root / "test" / "fox").iterdir():
        p.write_bytes(b"")
    sc = build_scenario(cfg_for(root, skip_bad_images=True))
    with pytest.raises(ConfigError, match=r"every image file of the class and split of .*test/fox/0\.jpg"):
        verify_images(sc)


def test_in_memory_images_need_no_check():
    images = torch.zeros(20, 1, 4, 4, dtype=torch.uint8)
    ds = Dataset("toy", ["a", "b"], train=ImageSet.from_tensor(images, np.arange(20) % 2),
                 test=ImageSet.from_tensor(images[:4], np.arange(4) % 2))
    summary = verify_images(build_scenario(ScenarioCfg(dataset="toy", classes_per_task=1), dataset=ds))
    assert (summary["files"], summary["bad"]) == (0, 0)


# ------------------------------------------------------------------ deep greyscale
GRADIENT = np.tile(np.arange(16), (16, 1))  # 16 x 16, columns 0..15


@pytest.mark.parametrize("name, array, expected", [
    ("png16.png", (GRADIENT * 4369).astype(np.uint16), GRADIENT * 17),  # 0..65535 -> 0..255
    ("big16.tif", (GRADIENT * 4369).astype(">u2"), GRADIENT * 17),  # opens as I;16B
    ("pgm16.pgm", (GRADIENT * 4369).astype(np.uint16), GRADIENT * 17),  # opens as I
    ("int32.tif", (GRADIENT * 1_000_000).astype(np.int32), GRADIENT * 17),  # beyond 16 bits: scaled by its max
    ("unit.tif", (GRADIENT / 15).astype(np.float32), GRADIENT * 17),  # float 0..1
    ("float255.tif", (GRADIENT * 20.0).astype(np.float32), np.minimum(GRADIENT * 20, 255)),  # 0..255, clipped
])
def test_deep_greyscale_is_scaled_not_clipped(tmp_path, name, array, expected):
    Image.fromarray(array).save(tmp_path / name)
    out = decode_image(str(tmp_path / name), 16)
    assert out.shape == (3, 16, 16)
    # every pixel within 1 of the scaled value: PIL's own convert("RGB") turns ~97% of a 16-bit gradient to 255
    assert np.abs(out.astype(int) - expected[None]).max() <= 1


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "L"])
def test_other_modes_decode_as_before(tmp_path, mode):
    img = Image.new("RGB", (12, 12), (200, 100, 50)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    assert (np.abs(decode_image(str(path), 12).astype(int) - expected) <= 1).all()


# ------------------------------------------------------------------ fingerprints
def test_fingerprint_is_stable_json_and_independent_of_where_the_data_lives(tmp_path):
    write_folder(tmp_path / "a")
    fp = build_scenario(cfg_for(tmp_path / "a", classes_per_task=2)).fingerprint()
    assert fp == build_scenario(cfg_for(tmp_path / "a", classes_per_task=2)).fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert fp["train_sizes"] == [6, 3] and fp["test_sizes"] == [4, 2] and fp["tasks"][1] == "task1:fox"
    assert all(isinstance(h, str) and len(h) == 16 for h in fp["train_hashes"] + fp["test_hashes"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # relative paths: a moved copy is the same data
    assert fingerprint_diff(fp, build_scenario(cfg_for(tmp_path / "b", classes_per_task=2)).fingerprint()) == ""


def test_fingerprint_diff_names_an_added_class(tmp_path):
    root = write_folder(tmp_path)
    old = build_scenario(cfg_for(root, classes_per_task=1)).fingerprint()
    write_folder(root, classes=("cat", "dog", "fox", "zebra"))
    diff = fingerprint_diff(old, build_scenario(cfg_for(root, classes_per_task=1)).fingerprint())
    assert diff.startswith("class added: zebra") and "number of tasks 3 -> 4" in diff


def test_fingerprint_diff_names_a_removed_image_with_its_task(tmp_path):
    root = write_folder(tmp_path)
    old = build_scenario(cfg_for(root, classes_per_task=1)).fingerprint()
    (root / "train" / "dog" / "2.png").unlink()
    diff = fingerprint_diff(old, build_scenario(cfg_for(root, classes_per_task=1)).fingerprint())
    assert diff == "task 1 (task1:dog): training images 3 -> 2"


def test_fingerprint_diff_names_a_replaced_file_of_the_same_count(tmp_path):
    root = write_folder(tmp_path)
    old = build_scenario(cfg_for(root, classes_per_task=1)).fingerprint()
    (root / "test" / "fox" / "1.jpg").rename(root / "test" / "fox" / "1-new.jpg")
    diff = fingerprint_diff(old, build_scenario(cfg_for(root, classes_per_task=1)).fingerprint())
    assert diff == "task 2 (task2:fox): the test images differ (same count)"


def test_fingerprint_diff_names_a_changed_class_order(tmp_path):
    root = write_folder(tmp_path)
    old = build_scenario(cfg_for(root, classes=(0, 1, 2), classes_per_task=1)).fingerprint()
    diff = fingerprint_diff(old, build_scenario(cfg_for(root, classes=(1, 0, 2), classes_per_task=1)).fingerprint())
    assert diff.startswith("class order changed (position 0: 'dog', was 'cat')")
    assert "task 0 is 'task0:dog', was 'task0:cat'" in diff and "task 2" not in diff  # fox stays last


def fmnist_like(pixel: int = 0) -> Dataset:
    """Fashion-MNIST-shaped domains held in memory (uint8 [N, 1, 28, 28]); `pixel` changes one byte."""
    rng = np.random.default_rng(0)
    labels = np.arange(50) % 10
    domains = {}
    for d in ("original", "inverted", "rotated"):
        train = torch.from_numpy(rng.integers(0, 256, (50, 1, 28, 28), dtype=np.uint8))
        test = torch.from_numpy(rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8))
        if d == "rotated":
            test[7, 0, 3, 4] += pixel
        domains[d] = (ImageSet.from_tensor(train, labels), ImageSet.from_tensor(test, labels[:20]))
    return Dataset("fmnist_like", [f"c{k}" for k in range(10)], domains=domains)


def test_fingerprint_diff_names_a_changed_pixel_of_in_memory_images():
    cfg = ScenarioCfg(dataset="fmnist_like", kind="dil")
    old = build_scenario(cfg, dataset=fmnist_like()).fingerprint()
    assert fingerprint_diff(old, build_scenario(cfg, dataset=fmnist_like()).fingerprint()) == ""
    diff = fingerprint_diff(old, build_scenario(cfg, dataset=fmnist_like(pixel=1)).fingerprint())
    assert diff == "task 2 (rotated): the test images differ (same count)"
    assert json.loads(json.dumps(old)) == old


def test_fingerprint_diff_is_one_capped_line():
    old = {"kind": "cil", "classnames": [f"class {k}" for k in range(100)], "class_order": list(range(100)),
           "tasks": [f"t{k}" for k in range(10)], "train_sizes": [5] * 10, "test_sizes": [2] * 10,
           "train_hashes": ["0"] * 10, "test_hashes": ["0"] * 10}
    new = {**old, "classnames": [f"other {k}" for k in range(100)], "train_sizes": [4] * 10}
    diff = fingerprint_diff(old, new)
    assert diff.startswith("classes added: other 0, other 1, other 2, other 3, other 4 (+95 more); "
                           "classes removed: class 0")
    assert diff.endswith("; 6 more differences") and "\n" not in diff and len(diff) < 400
    assert fingerprint_diff(old, dict(old)) == ""


# ------------------------------------------------------------------ warnings
def test_a_class_without_images_is_a_warning_line(tmp_path):
    root = write_folder(tmp_path)
    (root / "train" / "empty_class").mkdir()  # a folder with no images: no training and no test images
    ds = load_dataset(cfg_for(root))
    assert "1 class without training images: empty_class" in ds.notes["warnings"]
    assert "1 class without test images: empty_class" in ds.notes["warnings"]


def test_domainnet_classes_missing_from_a_list_are_warned(tmp_path):
    for d in ("clipart", "sketch"):
        lines = {"train": [], "test": []}
        for y, c in enumerate(("axe", "bee", "cow")):
            for split in ("train", "test"):
                if d == "sketch" and split == "train" and c == "bee":
                    continue
                rel = f"{d}/{c}/{d}_{y}_{split}.jpg"
                flat_image(tmp_path / rel, (70 * y, 0, 0))
                lines[split].append(f"{rel} {y}")
        for split, ls in lines.items():
            (tmp_path / f"{d}_{split}.txt").write_text("\n".join(ls) + "\n")
    ds = load_dataset(ScenarioCfg(dataset="domainnet", root=str(tmp_path), kind="dil"))
    assert "domain sketch: 1 class without training images: bee" in ds.notes["warnings"]


def test_a_domain_incremental_folder_without_split_folders_is_refused_not_read_as_classes(tmp_path):
    for d in ("photo", "sketch"):  # ROOT/<domain>/<class>/*: the flat CIL layout would take the domains as classes
        for y, c in enumerate(("axe", "bee")):
            for i in range(3):
                flat_image(tmp_path / d / c / f"{i}.png", (70 * y, 0, 20 * i))
    with pytest.raises(ConfigError) as e:
        load_dataset(ScenarioCfg(dataset="imagefolder", root=str(tmp_path), kind="dil"))
    assert str(tmp_path) in str(e.value) and "<domain>/train/<class>" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo", "sketch"]  # nothing written
