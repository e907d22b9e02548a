"""Limits, checked at validation, each a clean line (issue 17, item 6).

What a hostile user found: values that overflowed or exhausted memory far from their key (a seed of 1e20, a
batch of 1e7, 100,000-pixel images), a YAML alias bomb, duplicate YAML keys and class names accepted silently,
a replay budget too small for any image, caps and ignored values not said, and a million-cell grid that printed
nothing for minutes. Each is now one 'clipcl: error:' line naming the key, file or value and what to do (exit
2, no traceback, a finished run given with --overwrite left byte for byte), or one 'clipcl: warning:' line that
results.json also records.
"""
from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcl import config, sweep
from clipcl.cli import main
from clipcl.config import ConfigError, load_config
from cli_checks import fail, snapshot

TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=1", "optim.epochs=1",
        "optim.batch_size=16", "method.name=er", "memory.per_class=2", "eval.batch_size=64"]
FOLDER = ["model.name=clipcl-tiny-rn", "model.pretrained=", "model.lock_text=true", "scenario.image_size=32",
          "optim.max_steps=1", "optim.batch_size=8", "optim.warmup_steps=1", "memory.per_class=1",
          "method.name=er", "device=cpu", "eval.batch_size=16", "scenario.decode_workers=0",
          "scenario.classes_per_task=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished er run (1 task) to give with --overwrite: every refusal must leave it as it was."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "fmnist-cil", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def refused(argv: list[str], finished: Path, tmp_path: Path, capsys, words: list[str]) -> str:
    """argv + --out <a copy of the finished run> --overwrite: one error line holding every word, the run intact."""
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    err = fail([*argv, "--out", str(out), "--overwrite"], capsys)
    for w in words:
        assert w in err, err
    assert snapshot(out) == before
    return err


def write_folder(root: Path, classes=("apple", "bus", "cat", "dog"), n_train=3, n_test=2) -> Path:
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png: a user's tiny image folder."""
    rng = np.random.default_rng(0)
    for y, c in enumerate(classes):
        counts = n_train.get(c, 3) if isinstance(n_train, dict) else n_train
        for split, n in (("train", counts), ("test", n_test)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(20, 24, 3), dtype=np.uint8)
                img[..., y % 3] += 150
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("clipcl: warning:")]


# ---------------------------------------------------------------------- integers and sizes with a sane maximum
@pytest.mark.parametrize("bad, words", [
    ("seed=1e20", ["'seed' = 100000000000000000000", "at most 4,294,967,295", "2**32-1"]),
    ("seed=4294967296", ["'seed' = 4294967296", "at most 4,294,967,295"]),
    ("scenario.order_seed=99999999999", ["'scenario.order_seed'", "at most 4,294,967,295"]),
    ("optim.batch_size=1e7", ["'optim.batch_size' = 10000000", "at most 262,144"]),
    ("eval.batch_size=1e7", ["'eval.batch_size' = 10000000", "at most 262,144"]),
    ("scenario.image_size=100000", ["'scenario.image_size' = 100000", "at most 4096", "224"]),
    ("scenario.decode_workers=100000", ["'scenario.decode_workers' = 100000", "at most 512"]),
    ("memory.per_class=1e30", ["'memory.per_class'", "too large", "9,223,372,036,854,775,807"]),
    ("optim.max_steps=123456789012345678901234567890", ["'optim.max_steps'", "too large"]),
    ("scenario.classes=[0, 99999999999999999999999]", ["'scenario.classes'", "99999999999999999999999", "too large"]),
])
def test_a_value_beyond_its_maximum_is_one_line_and_keeps_the_finished_run(bad, words, finished, tmp_path, capsys):
    refused(["run", "fmnist-cil", *TINY, bad], finished, tmp_path, capsys, words)


def test_the_largest_accepted_seed_is_one_every_generator_takes():
    cfg = load_config("fmnist-cil", ["seed=4294967295", "scenario.order_seed=4294967295"])
    np.random.seed(cfg.seed)  # numpy's legacy seeding is the narrowest: 0 .. 2**32-1
    np.random.default_rng(cfg.seed + 7919)
    torch.Generator().manual_seed(cfg.seed)


def test_imagefolder_image_size_beyond_the_maximum_is_refused_before_any_image_is_read(finished, tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    refused(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "scenario.image_size=100000"], finished,
            tmp_path, capsys, ["'scenario.image_size' = 100000", "at most 4096"])


def test_a_batch_larger_than_the_memory_is_refused_with_an_estimate(finished, tmp_path, capsys):
    """4096-px images, 100,000 a step: 25 TB before the model sees one; said with the estimate and the keys."""
    data = write_folder(tmp_path / "data")
    err = refused(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "scenario.image_size=4096",
                   "optim.batch_size=100000"], finished, tmp_path, capsys,
                  ["'optim.batch_size' = 100,000", "3x4096x4096", "TB", "memory available", "scenario.image_size"])
    assert "25.2 TB" in err


def test_a_data_folder_path_too_long_for_the_file_system_is_one_line(finished, tmp_path, capsys):
    refused(["run", "imagefolder", "scenario.root=/" + "x" * 4500, "scenario.download=false", *FOLDER], finished,
            tmp_path, capsys, ["'scenario.root'", "File name too long", "scenario.download is false"])


# ---------------------------------------------------------------------- YAML: size, aliases, duplicate keys
def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """'Billion laughs': each level lists the previous one `width` times; the last is 10**9 strings in `name`."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * width) + "]")
    lines.append("name: [" + ", ".join([f"*l{levels - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_a_config_file_is_refused_at_once(finished, tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    start = time.perf_counter()
    refused(["run", str(path)], finished, tmp_path, capsys, [str(path), "alias", "1,000,000 values"])
    assert time.perf_counter() - start < 1.0


def test_an_alias_bomb_in_a_grid_file_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(alias_bomb().replace("name: [", "grid:\n  name: ["))
    start = time.perf_counter()
    err = fail(["sweep", "fmnist-cil", str(path), "--out", str(tmp_path / "sweep")], capsys)
    assert time.perf_counter() - start < 1.0
    assert "grid file" in err and str(path) in err and "alias" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("text, words", [
    ("name: &a [x, *a]\n", ["recursive", "aliases"]),
    ("[" * 20000 + "]" * 20000 + "\n", ["nested too deeply"]),
])
def test_a_self_referring_or_bottomless_config_is_one_line(text, words, finished, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    refused(["run", str(path)], finished, tmp_path, capsys, [str(path), *words])


def test_an_alias_bomb_in_an_override_is_refused(finished, tmp_path, capsys):
    refused(["run", "fmnist-cil", *TINY, "name=&a [x, *a]"], finished, tmp_path, capsys,
            ["override 'name=...'", "recursive"])


@pytest.mark.parametrize("text, words", [
    ("seed: 1\nscenario:\n  dataset: fashion_mnist\nseed: 2\n", ["key 'seed' appears twice", "lines 1 and 4"]),
    ("scenario:\n  dataset: fashion_mnist\n  train_per_class: 20\n  dataset: cifar100\n",
     ["key 'dataset' appears twice", "lines 2 and 4"]),
])
def test_a_duplicate_key_in_a_config_file_is_refused_naming_key_and_lines(text, words, finished, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    refused(["run", str(path), *TINY], finished, tmp_path, capsys, [f"config file '{path}'", *words, "Remove one"])


def test_a_merge_key_may_still_be_overridden_by_its_neighbours(tmp_path):
    """'<<: *base' then the same key is YAML's way to override a merged value, not a duplicate."""
    path = tmp_path / "cfg.yaml"
    path.write_text("optim: &o\n  lr: 0.01\n  epochs: 2\neval: {batch_size: 64}\nmethod:\n  name: er\n"
                    "scenario: {dataset: fashion_mnist, <<: {train_per_class: 5}, test_per_class: 5}\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.scenario.train_per_class) == (0.01, 5)


def test_a_duplicate_key_in_a_grid_file_is_refused(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("grid:\n  seed: [0, 1]\n  memory.per_class: [1]\n  seed: [2, 3]\n")
    err = fail(["sweep", "fmnist-cil", str(path), "--out", str(tmp_path / "sweep")], capsys)
    assert f"grid file '{path}'" in err and "key 'seed' appears twice (lines 2 and 4)" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("what", ["config", "grid"])
def test_a_yaml_file_over_1_mib_is_refused_unread(what, finished, tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("seed: 0\n" + "# padding\n" * 120_000)
    if what == "config":
        refused(["run", str(path)], finished, tmp_path, capsys, [f"config file '{path}'", "larger than 1 MiB"])
    else:
        err = fail(["sweep", "fmnist-cil", str(path), "--out", str(tmp_path / "sweep")], capsys)
        assert f"grid file '{path}'" in err and "larger than 1 MiB" in err


# ---------------------------------------------------------------------- class names
def test_class_folders_differing_only_in_case_are_refused(finished, tmp_path, capsys):
    data = write_folder(tmp_path / "data", classes=("Cat", "cat", "dog", "fox"))
    refused(["run", "imagefolder", f"scenario.root={data}", *FOLDER], finished, tmp_path, capsys,
            [str(data), "'Cat' and 'cat'", "same class name 'cat'", "classnames.txt"])


def test_class_folders_differing_only_in_underscores_are_refused(finished, tmp_path, capsys):
    data = write_folder(tmp_path / "data", classes=("ice_cream", "Ice cream", "dog", "fox"))
    refused(["run", "imagefolder", f"scenario.root={data}", *FOLDER], finished, tmp_path, capsys,
            ["'Ice cream' and 'ice_cream'", "same class name 'ice cream'"])


def test_a_classnames_file_repeating_a_name_is_refused(finished, tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    (data / "classnames.txt").write_text("cat\ncat\nCAT\ncat\n")
    refused(["run", "imagefolder", f"scenario.root={data}", *FOLDER], finished, tmp_path, capsys,
            [str(data / "classnames.txt"), "line 1 'cat' (folder 'apple')", "line 2 'cat' (folder 'bus')",
             "distinct name"])


def test_distinct_class_names_still_run(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    (data / "classnames.txt").write_text("green apple\nred bus\nCat\ndog\n")
    assert main(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["data_fingerprint"]["classnames"]) == ["Cat", "dog", "green apple", "red bus"]


# ---------------------------------------------------------------------- a memory budget that holds no image
@pytest.mark.parametrize("bad, words", [
    (["memory.bytes=10"], ["'memory.bytes' = 10 holds no image", "2 classes of the first task", "784 bytes",
                           "at least 7,840", "or to 0"]),
    (["memory.bytes=5000"], ["'memory.bytes' = 5,000 holds no image", "10 classes of the last task",
                             "at least 7,840"]),
    (["memory.bytes=100", "memory.codec=png"], ["'memory.bytes' = 100 holds no image", "png", "67 bytes"]),
    (["memory.bytes=400", "memory.codec=jpeg"], ["'memory.bytes' = 400 holds no image", "jpeg"]),
    (["memory.total=5"], ["'memory.total' = 5 holds no image", "10 classes of the last task", "at least 10"]),
    (["memory.total=1"], ["'memory.total' = 1 holds no image", "2 classes of the first task"]),
])
def test_a_memory_budget_that_holds_no_image_is_refused(bad, words, finished, tmp_path, capsys):
    tiny = [o for o in TINY if not o.startswith("scenario.n_tasks")]  # the whole stream: 5 tasks, 10 classes
    refused(["run", "fmnist-cil", *tiny, *bad], finished, tmp_path, capsys, words)


def test_a_budget_for_one_image_per_class_is_accepted():
    cfg = load_config("fmnist-cil", ["memory.bytes=7840"])  # 10 classes x 784 bytes
    assert cfg.memory.bytes == 7840


def test_an_encoded_budget_that_holds_no_image_is_refused_when_the_first_task_is_stored():
    """A png budget above any PNG's minimum but below these images' files: only encoding can tell."""
    from clipcl.data.images import ImageSet
    from clipcl.memory import ReplayMemory

    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8))
    data = ImageSet.from_tensor(noise, np.array([0, 0, 0, 1, 1, 1]))
    mem = ReplayMemory(bytes=400, codec="png")
    with pytest.raises(ConfigError) as e:
        mem.update(0, data, torch.Generator().manual_seed(0))
    msg = str(e.value)
    assert "'memory.bytes' = 400 holds no image" in msg and "each class gets 200 bytes" in msg and "png" in msg
    smallest = int(msg.split("takes ")[1].split(" bytes")[0].replace(",", ""))
    assert f"at least {2 * smallest:,}" in msg
    ok = ReplayMemory(bytes=2 * smallest, codec="png")
    ok.update(0, data, torch.Generator().manual_seed(0))
    assert len(ok) >= 1


# ---------------------------------------------------------------------- ignored or capped values, said
def test_a_per_class_cap_above_every_class_is_said(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "fmnist-cil", *TINY, "scenario.train_per_class=1000000", "optim.max_steps=1"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    (line,) = [w for w in warnings_of(capsys.readouterr().err) if "train_per_class" in w]
    assert "scenario.train_per_class = 1,000,000 is more than any class has" in line and "6,000" in line
    notes = json.loads((out / "results.json").read_text())["data_notes"]["warnings"]
    assert line.removeprefix("clipcl: warning: ") in notes


def test_a_cap_some_classes_fall_short_of_is_said_naming_them(tmp_path, capsys):
    data = write_folder(tmp_path / "data", n_train={"apple": 4, "bus": 4, "cat": 2, "dog": 4})
    out = tmp_path / "run"
    assert main(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "scenario.train_per_class=3",
                 "--out", str(out), "--quiet"]) == 0
    (line,) = [w for w in warnings_of(capsys.readouterr().err) if "train_per_class" in w]
    assert "scenario.train_per_class = 3: 1 of the stream's 4 classes has fewer training images" in line
    assert "cat (2)" in line
    assert line.removeprefix("clipcl: warning: ") in json.loads((out / "results.json").read_text())["data_notes"][
        "warnings"]


def test_decoding_settings_a_dataset_ignores_are_said(tmp_path, capsys):
    """Fashion-MNIST is 28x28 in memory: neither the decoding size nor the decoding processes apply."""
    out = tmp_path / "run"
    assert main(["run", "fmnist-cil", *TINY, "scenario.image_size=64", "scenario.decode_workers=8",
                 "optim.max_steps=1", "--out", str(out), "--quiet"]) == 0
    lines = warnings_of(capsys.readouterr().err)
    (size,) = [w for w in lines if "image_size" in w]
    (workers,) = [w for w in lines if "decode_workers" in w]
    assert "scenario.image_size = 64 is ignored" in size and "1x28x28" in size
    assert "scenario.decode_workers = 8 is ignored" in workers
    notes = json.loads((out / "results.json").read_text())["data_notes"]["warnings"]
    assert {size.removeprefix("clipcl: warning: "), workers.removeprefix("clipcl: warning: ")} <= set(notes)


def test_no_warning_when_nothing_is_ignored_or_capped(tmp_path, capsys):
    assert main(["run", "fmnist-cil", *TINY, "optim.max_steps=1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert warnings_of(capsys.readouterr().err) == []


# ---------------------------------------------------------------------- the grid's size
def write_grid(tmp_path: Path, axes: dict[str, int], variants: str = "") -> Path:
    path = tmp_path / "grid.yaml"
    lines = [variants] if variants else []
    lines.append("grid:")
    lines += [f"  {key}: [{', '.join(str(v) for v in range(n))}]" for key, n in axes.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_million_cell_grid_is_refused_before_it_is_expanded(tmp_path, capsys):
    path = write_grid(tmp_path, {"seed": 100, "memory.per_class": 100, "scenario.order_seed": 100})
    start = time.perf_counter()
    err = fail(["sweep", "fmnist-cil", str(path), "--out", str(tmp_path / "sweep")], capsys)
    assert time.perf_counter() - start < 2.0
    assert (f"grid file '{path}' makes 1,000,000 cells (100 seed x 100 memory.per_class x 100 scenario.order_seed)"
            in err and "limit of 10,000" in err and "--max-cells 1000000" in err)
    assert not (tmp_path / "sweep").exists()


def test_max_cells_counts_variants_and_pinned_keys_and_can_be_raised(tmp_path, capsys):
    path = write_grid(tmp_path, {"seed": 3, "memory.per_class": 2},
                      "variants:\n  a: [method.name=er]\n  b: [method.name=gcl, seed=0]")
    grid = sweep.load_grid(str(path))
    assert sweep.count_cells(grid) == len(sweep.expand(grid)) == 8  # 6 + 2: b pins seed
    err = fail(["sweep", "fmnist-cil", str(path), "--out", str(tmp_path / "sweep"), "--max-cells", "7"], capsys)
    assert "makes 8 cells (2 variants times 3 seed x 2 memory.per_class)" in err and "--max-cells 8" in err
    assert not (tmp_path / "sweep").exists()
    fake = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); "
            "(p / 'ran.txt').write_text('ok')")
    rc = sweep.run("fmnist-cil", str(path), [], tmp_path / "sweep", max_cells=8, stream=io.StringIO(),
                   command=lambda c, o, out, a: [__import__("sys").executable, "-c", fake, str(out)])
    assert rc == 0 and len(list((tmp_path / "sweep").glob("*/ran.txt"))) == 8


def test_ten_thousand_cells_are_checked_in_seconds_and_said(tmp_path):
    """Before: 28 s of silence on this 2-core machine (49 s to the first run); now about 3 s, announced."""
    path = write_grid(tmp_path, {"seed": 100, "memory.per_class": 100})
    grid = sweep.load_grid(str(path))
    cells = sweep.expand(grid)
    stream = io.StringIO()
    start = time.perf_counter()
    cfgs = sweep.configs("fmnist-cil", grid, cells, [], stream)
    took = time.perf_counter() - start
    assert len(cfgs) == 10_000 and cfgs["seed-42__memory.per_class-7"].memory.per_class == 7
    assert "checking the configs of 10,000 cells" in stream.getvalue()
    assert took < 30, f"{took:.1f} s"  # about 3 s alone; a loose bound for a machine busy with other tests


# ---------------------------------------------------------------------- what validation knows of the datasets
def test_the_dataset_facts_validation_uses_match_the_loaders():
    from clipcl.config import ScenarioCfg
    from clipcl.data.datasets import DATASETS, load_dataset

    assert set(config.DATASET_FACTS) == set(DATASETS)
    ds = load_dataset(ScenarioCfg(dataset="fashion_mnist"))
    assert config.DATASET_FACTS["fashion_mnist"] == (tuple(ds.train.store.images.shape[1:]), len(ds.classnames))
