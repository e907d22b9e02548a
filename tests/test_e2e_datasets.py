"""End to end through the CLI on generated image folders: class-incremental and domain-incremental."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from clipcl.cli import main

CLASSES = ["apple_pie", "bus", "cat", "dog"]
TINY = ["model.name=clipcl-tiny-rn", "model.pretrained=", "model.lock_text=true", "scenario.image_size=32",
        "optim.max_steps=3", "optim.batch_size=8", "optim.warmup_steps=1", "memory.per_class=1",
        "method.name=er", "device=cpu", "eval.batch_size=16"]


def write_folder(root: Path, shift: int = 0, n_train=4, n_test=2):
    rng = np.random.default_rng(shift)
    for y, c in enumerate(CLASSES):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                img = rng.integers(0, 60, size=(36, 44, 3), dtype=np.uint8)
                img[..., y % 3] += np.uint8(150 + shift)
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split / c / f"{i}.jpg")


def run(tmp_path: Path, data: Path, *overrides: str) -> dict:
    out = tmp_path / "out"
    rc = main(["run", "imagefolder", f"scenario.root={data}", *TINY, *overrides, "--out", str(out)])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_cil_on_an_image_folder(tmp_path):
    write_folder(tmp_path / "data")
    res = run(tmp_path, tmp_path / "data", "scenario.kind=cil", "scenario.classes_per_task=2",
              "scenario.decode_workers=2")
    sc = res["scenario"]
    assert sc["kind"] == "cil" and sorted(sc["classnames"]) == ["apple pie", "bus", "cat", "dog"]
    assert sc["train_sizes"] == [8, 8] and sc["test_sizes"] == [4, 4]
    R = res["accuracy_matrix"]
    assert len(R) == 2 and len(R[0]) == 2
    assert R[0][1] is None and all(0.0 <= v <= 1.0 for v in (R[0][0], R[1][0], R[1][1]))
    assert res["memory"]["images"] == 4  # one image per seen class after the last task
    assert res["config"]["scenario"]["image_size"] == 32


def test_dil_on_an_image_folder_with_domains(tmp_path):
    for k, d in enumerate(["photo", "sketch", "cartoon"]):
        write_folder(tmp_path / "data" / d, shift=20 * k)
    res = run(tmp_path, tmp_path / "data", "scenario.kind=dil", "scenario.domains=[sketch,photo,cartoon]",
              "scenario.decode_workers=0")
    sc = res["scenario"]
    assert sc["kind"] == "dil" and sc["tasks"] == ["sketch", "photo", "cartoon"]
    assert sc["classnames"] == ["apple pie", "bus", "cat", "dog"]  # DIL keeps the folder order
    assert sc["train_sizes"] == [16, 16, 16] and sc["test_sizes"] == [8, 8, 8]
    R = res["accuracy_matrix"]
    assert len(R) == 3
    for row in R:  # every domain is evaluated after every task: full rows
        assert len(row) == 3 and all(v is not None and 0.0 <= v <= 1.0 for v in row)
    # the accuracy on a domain before training on it is the row before's entry for that domain
    before = res["accuracy_before_training"]
    assert before[1:] == [R[0][1], R[1][2]]


def test_the_command_exits_after_a_run_that_decoded_images_in_worker_processes(tmp_path):
    """The clipcl command skips the interpreter's teardown to save time; a run that started decoding processes
    must still end (its processes are stopped), not hang in the exit handlers."""
    import os
    import subprocess
    import sys

    write_folder(tmp_path / "data")
    script = Path(sys.executable).parent / "clipcl"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "clipcl.cli"]
    done = subprocess.run([*cmd, "run", "imagefolder", f"scenario.root={tmp_path / 'data'}", *TINY,
                           "scenario.classes_per_task=2", "scenario.decode_workers=2", "--quiet",
                           "--out", str(tmp_path / "out")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is True
