"""Bad inputs and faults, tried as a user would: each one ends with one 'clipcl: error:' line that says what
to do, a non-zero exit, no traceback, and every file that existed before still there, byte for byte.

Covers: the output folder (--out "", ".", "/", home, parents, foreign folders, files in the way), values that
used to pass validation and fail after --overwrite (negative seeds, inf, nan), checkpoints that could run
code, resumes on changed data, symlinks planted in a run folder, a full disk, and the command line's own
promises (progress lines without a terminal, `clipcl resume`, a fast --help).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcl import checkpoint, files, rundir
from clipcl.cli import main
from cli_checks import fail, snapshot
from clipcl.config import ConfigError, load_config
from clipcl.engine import Trainer

TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=1", "optim.epochs=1",
        "optim.batch_size=16", "method.name=gdro", "memory.per_class=2", "eval.batch_size=64"]
ZEROSHOT = [*TINY, "method.name=zeroshot"]
FOLDER = ["model.name=clipcl-tiny-rn", "model.pretrained=", "model.lock_text=true", "scenario.image_size=32",
          "optim.max_steps=2", "optim.batch_size=8", "optim.warmup_steps=1", "memory.per_class=1",
          "method.name=er", "device=cpu", "eval.batch_size=16", "scenario.decode_workers=0",
          "scenario.classes_per_task=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished gdro run (1 task) to copy, break, overwrite and resume."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "fmnist-cil", *TINY, "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(finished: Path, tmp_path: Path, name="run") -> Path:
    out = tmp_path / name
    shutil.copytree(finished, out, symlinks=True)
    return out


# ---------------------------------------------------------------------- --overwrite never destroys data
@pytest.mark.parametrize("out, why", [
    ("", "--out is empty"),
    (".", "the current folder"),
    ("..", "a parent of the current folder"),
    ("/", "the root of the file system"),
    ("~", "your home folder"),
])
def test_overwrite_of_protected_folders_is_refused(out, why, tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "home" / "papers" / "draft"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    (work.parent / "figures.svg").write_text("<svg/>")
    (home / "photo.jpg").write_bytes(b"\xff\xd8 precious")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = snapshot(home)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", out, "--overwrite"], capsys)
    assert why in err
    assert snapshot(home) == before


def test_overwrite_of_a_protected_folder_that_is_a_run_is_still_refused(finished, tmp_path, monkeypatch, capsys):
    """Running inside a run's folder with --out . --overwrite: the current folder is never replaced."""
    out = copy_run(finished, tmp_path)
    monkeypatch.chdir(out)
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", ".", "--overwrite"], capsys)
    assert "the current folder" in err and snapshot(out) == before


def _foreign_files(out: Path):
    (out / "data.csv").write_text("a,b\n1,2\n")


def _fake_results(out: Path):
    (out / "results.json").write_text(json.dumps({"accuracy": 0.9}))


def _garbage_checkpoint(out: Path):
    (out / "checkpoint.pt").write_bytes(os.urandom(256))


def _foreign_zip_checkpoint(out: Path):
    torch.save({"weights": torch.zeros(3)}, out / "checkpoint.pt")  # someone's model, not a clipcl run


@pytest.mark.parametrize("plant", [_foreign_files, _fake_results, _garbage_checkpoint, _foreign_zip_checkpoint])
def test_overwrite_of_a_folder_that_is_not_a_clipcl_run_is_refused(plant, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    plant(out)
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *ZEROSHOT, "--out", str(out), "--overwrite"], capsys)
    assert "not empty and holds no clipcl run" in err and str(out) in err
    assert snapshot(out) == before


@pytest.mark.parametrize("bad, words", [
    ("seed=-1", ["'seed' = -1", "0 or more"]),
    ("scenario.order_seed=-1", ["'scenario.order_seed' = -1"]),
    ("optim.epochs=inf", ["'optim.epochs' = inf", "finite"]),
    ("optim.lr=inf", ["'optim.lr' = inf", "finite"]),
    ("optim.lr=.nan", ["'optim.lr' = nan", "finite"]),
    ("method.lam=-inf", ["'method.lam'", "finite"]),
    ("optim.batch_size=inf", ["'optim.batch_size'", "whole number"]),
    ("optim.max_steps=.nan", ["'optim.max_steps'", "whole number"]),
    ("model.name=", ["'model.name'"]),
    ("scenario.dataset=", ["'scenario.dataset'"]),
    ("scenario.dataset=mnist", ["'scenario.dataset' = 'mnist'", "Known datasets"]),
    ("method.name=bogus", ["bogus"]),
])
def test_bad_value_with_overwrite_keeps_the_finished_run(bad, words, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *TINY, bad, "--out", str(out), "--overwrite"], capsys)
    for w in words:
        assert w in err, err
    assert snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *TINY, "device=cuda", "--out", str(out), "--overwrite"], capsys)
    assert "'device' = 'cuda'" in err and "device=cpu" in err and "download" not in err
    assert snapshot(out) == before


def _pickle_that_writes(target: Path) -> bytes:
    """A pickle that, when loaded with plain pickle, creates target (what a planted file could do)."""

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (target, "pwned"))

    return pickle.dumps({"state_dict": Payload()})


@pytest.mark.parametrize("content", ["garbage", "text", "malicious"])
def test_unusable_pretrained_file_keeps_the_old_run(content, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    weights, marker = tmp_path / "weights.pt", tmp_path / "pwned.txt"
    weights.write_bytes({"garbage": os.urandom(512), "text": b"not a checkpoint\n",
                         "malicious": _pickle_that_writes(marker)}[content])
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *TINY, f"model.pretrained={weights}", "--out", str(out), "--overwrite"], capsys)
    assert "'model.pretrained'" in err and str(weights) in err
    assert snapshot(out) == before and not marker.exists()


def test_out_under_a_regular_file_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    err = fail(["run", "fmnist-cil", *TINY, "--out", str(blocker / "run")], capsys)
    assert f"is under '{blocker}', which is a file" in err
    assert blocker.read_text() == "a file, not a folder"


def test_out_that_is_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("x")
    err = fail(["run", "fmnist-cil", *TINY, "--out", str(blocker), "--overwrite"], capsys)
    assert f"output folder '{blocker}' is a file" in err and blocker.read_text() == "x"


def test_resume_and_overwrite_together_are_refused(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    err = fail(["run", "fmnist-cil", *TINY, "--out", str(out), "--resume", "--overwrite"], capsys)
    assert "--resume and --overwrite together" in err and snapshot(out) == before


def test_overwrite_removes_only_clipcl_files_and_no_stale_plot_is_left(finished, tmp_path, capsys):
    """gdro's class_weights.png must not survive into an er run; the user's own file must survive."""
    out = copy_run(finished, tmp_path)
    assert (out / "class_weights.png").is_file()
    (out / "my-notes.md").write_text("mine")
    assert main(["run", "fmnist-cil", *TINY, "method.name=er", "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "class_weights.png").exists()
    assert (out / "my-notes.md").read_text() == "mine"
    assert json.loads((out / "results.json").read_text())["config"]["method"]["name"] == "er"


def test_python_trainer_refuses_an_existing_run(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    trainer = Trainer(load_config("fmnist-cil", [*TINY, "method.name=er"]), out, progress_bar=False, quiet=True)
    with pytest.raises(ConfigError, match="is not empty"):
        trainer.run()
    assert snapshot(out) == before


def test_python_trainer_overwrites_when_told(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    cfg = load_config("fmnist-cil", [*TINY, "method.name=er"])
    Trainer(cfg, out, progress_bar=False, quiet=True, overwrite=True).run()
    assert json.loads((out / "results.json").read_text())["config"]["method"]["name"] == "er"
    assert not (out / "class_weights.png").exists()


def test_claim_never_follows_a_planted_link_when_removing(finished, tmp_path):
    """--overwrite removes a link planted under a clipcl file name, not what it points to."""
    out = copy_run(finished, tmp_path)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours to delete")
    (out / "accuracy.png").unlink()
    (out / "accuracy.png").symlink_to(outside)
    rundir.claim(out, overwrite=True)
    assert outside.read_bytes() == b"not yours to delete" and not (out / "accuracy.png").exists()


# ---------------------------------------------------------------------- symlinks planted in a run folder
def test_outputs_replace_planted_symlinks_instead_of_writing_through_them(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    victims = {}
    for name in ("accuracy_matrix.csv", "accuracy.png", "accuracy_matrix.png", "class_weights.png", "results.json"):
        target = tmp_path / f"victim-{name}"
        target.write_text(f"do not touch {name}")
        victims[target] = target.read_bytes()
        (out / name).unlink()
        (out / name).symlink_to(target)
    assert main(["resume", str(out), "--quiet"]) == 0  # a finished run: outputs are written again
    for target, data in victims.items():
        assert target.read_bytes() == data
    for name in ("accuracy_matrix.csv", "accuracy.png", "results.json"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.OutputError, match="no space left"):
        files.atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---------------------------------------------------------------------- checkpoints that could run code
@pytest.mark.parametrize("via", ["--resume", "resume"])
def test_malicious_checkpoint_is_refused_and_never_executed(via, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    torch.save({"format_version": checkpoint.FORMAT_VERSION, "config": {}, "x": Payload()}, out / "checkpoint.pt")
    argv = ["run", "fmnist-cil", *TINY, "--out", str(out), "--resume"] if via == "--resume" else ["resume", str(out)]
    before = snapshot(out)
    err = fail(argv, capsys)
    assert not marker.exists()
    assert str(out / "checkpoint.pt") in err and "refuses it" in err
    assert snapshot(out) == before


def test_checkpoint_of_an_older_clipcl_is_refused(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    state = checkpoint.load(out / "checkpoint.pt")
    torch.save({**state, "format_version": 1}, out / "checkpoint.pt")
    err = fail(["resume", str(out)], capsys)
    assert "format version 1" in err and str(out / "checkpoint.pt") in err


@pytest.mark.parametrize("argv, words", [
    (["resume", "{tmp}/nothing"], ["nothing to resume", "checkpoint.pt missing"]),
    (["run", "--out", "{tmp}/nothing", "--resume"], ["nothing to resume"]),
    (["run", "--out", "{tmp}/nothing"], ["needs a config"]),
    (["run", "seed=1", "--out", "{run}", "--resume"], ["seed=1: with --resume and no config", "only log.* may change"]),
])
def test_resume_command_mistakes(argv, words, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    err = fail([a.replace("{tmp}", str(tmp_path)).replace("{run}", str(out)) for a in argv], capsys)
    for w in words:
        assert w in err, err
    assert snapshot(out) == before


# ---------------------------------------------------------------------- the data a run resumes on
def write_folder(root: Path, classes=("apple", "bus", "cat", "dog"), n_train=4, n_test=2):
    rng = np.random.default_rng(0)
    for y, c in enumerate(classes):
        for split, n in (("train", n_train), ("test", n_test)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(20, 24, 3), dtype=np.uint8)
                img[..., y % 3] += 150
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def _add_class(root: Path):
    write_folder(root / "extra", classes=("zebra",))
    shutil.move(str(root / "extra" / "train" / "zebra"), root / "train" / "zebra")
    shutil.move(str(root / "extra" / "test" / "zebra"), root / "test" / "zebra")
    shutil.rmtree(root / "extra")


def _remove_images(root: Path):
    for p in sorted((root / "train").rglob("*.png"))[:2]:
        p.unlink()


def _rename_image(root: Path):
    p = sorted((root / "train").rglob("*.png"))[0]
    p.rename(p.with_name("renamed.png"))


@pytest.mark.parametrize("change, words", [
    (_add_class, ["zebra"]),
    (_remove_images, ["training images"]),
    (_rename_image, ["differ"]),
])
def test_resume_on_changed_data_is_refused_naming_the_change(change, words, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data)
    args = ["run", "imagefolder", f"scenario.root={data}", *FOLDER, "checkpoint_every=1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    change(data)
    before = snapshot(out)
    err = fail(["resume", str(out)], capsys)
    assert "the data changed" in err
    for w in words:
        assert w in err, err
    assert snapshot(out) == before


def test_resume_on_the_same_data_is_accepted(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data)
    assert main(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert sorted(first["data_fingerprint"]["classnames"]) == ["apple", "bus", "cat", "dog"]
    assert main(["resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == first["accuracy_matrix"]


def test_corrupt_image_stops_before_any_work_or_is_skipped_and_said(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data)
    bad = data / "test" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = fail(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "--out", str(out)], capsys)
    assert str(bad) in err and "skip_bad_images=true" in err
    assert not out.exists()  # nothing was trained, nothing was written
    assert main(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "scenario.skip_bad_images=true",
                 "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "clipcl: warning:" in err and str(bad) in err


def test_class_without_training_images_is_printed(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    write_folder(data)
    shutil.rmtree(data / "train" / "dog")
    (data / "train" / "dog").mkdir()
    assert main(["run", "imagefolder", f"scenario.root={data}", *FOLDER, "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert any(line.startswith("clipcl: warning:") and "dog" in line for line in err.splitlines()), err


# ---------------------------------------------------------------------- config files and the demo
@pytest.mark.parametrize("content, words", [
    (b"\x00\x01\x02\xff\xfe binary", ["not a text file"]),
    (b"seed: [1, 2\n", ["not valid YAML"]),
    (b"- a\n- b\n", ["must hold a mapping"]),
])
def test_bad_config_file_is_named(content, words, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    err = fail(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert str(path) in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("methods", ["er,bogus", ",", "zeroshot,gdr0"])
def test_demo_rejects_unknown_methods_before_training(methods, tmp_path, capsys):
    err = fail(["demo", "--methods", methods, "--out", str(tmp_path / "demo")], capsys)
    assert "unknown method" in err and "Known methods" in err
    assert not (tmp_path / "demo").exists()


def test_demo_overwrite_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "paper.pdf").write_bytes(b"%PDF")
    err = fail(["demo", "--methods", "zeroshot", *TINY[:3], "--out", str(out), "--overwrite"], capsys)
    assert "holds no clipcl demo output" in err and (out / "paper.pdf").read_bytes() == b"%PDF"


def test_demo_overwrite_replaces_its_own_output(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--methods", "zeroshot", *TINY[:3], "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "summary.md").is_file() and (out / "zeroshot" / "results.json").is_file()


# ---------------------------------------------------------------------- stops during a run
def test_nonfinite_loss_before_any_checkpoint_says_so(tmp_path, capsys):
    err = fail(["run", "fmnist-cil", *TINY, "optim.lr=1e30", "--out", str(tmp_path / "out")], capsys, code=3)
    assert "No checkpoint had been written yet" in err and "last good checkpoint" not in err


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs that holds one checkpoint of the tiny model but not two, where root can mount one (else None:
    the test simulates ENOSPC instead)."""
    from clipcl.models import create

    model = create(load_config("fmnist-cil").model).model
    size_kib = int(1.5 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1024)
    mnt = tmp_path / "disk"
    mnt.mkdir()
    ok = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_stops_cleanly_and_keeps_the_last_checkpoint(small_disk, tmp_path, monkeypatch, capsys):
    """The first checkpoint fits on the small disk; the second (the first is kept until it is whole) does not."""
    args = [*ZEROSHOT, "scenario.n_tasks=3"]
    if small_disk is not None:
        out = small_disk / "run"
    else:  # simulate: the second checkpoint's write fails with ENOSPC
        out = tmp_path / "run"
        real, calls = files._Recorded.write, []

        def write(self, data):
            if len(calls) > 0 and data:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data)

        real_save = checkpoint.save

        def save(path, state):
            real_save(path, state)
            calls.append(1)

        monkeypatch.setattr(files._Recorded, "write", write)
        monkeypatch.setattr(checkpoint, "save", save)
    err = fail(["run", "fmnist-cil", *args, "--out", str(out)], capsys, code=4)
    assert "no space left" in err and str(out) in err and f"clipcl resume {out}" in err
    assert "inline_container" not in err
    state = checkpoint.load(out / "checkpoint.pt")  # the last complete checkpoint is readable
    assert state["progress"]["task"] >= 1
    assert not list(out.glob(".*.tmp-*"))


# ---------------------------------------------------------------------- the command line's promises
_script = Path(sys.executable).parent / "clipcl"
CLIPCL = [str(_script)] if _script.is_file() else [sys.executable, "-m", "clipcl.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_line_per_task_on_stderr_without_a_terminal_and_none_with_quiet(tmp_path):
    args = ["run", "fmnist-cil", *ZEROSHOT, "scenario.n_tasks=2"]
    done = subprocess.run([*CLIPCL, *args, "--out", str(tmp_path / "a")], env=ENV, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("clipcl: zeroshot task")]
    assert [line.split(":")[1].strip() for line in lines] == ["zeroshot task 1/2", "zeroshot task 2/2"]
    assert "accuracy on seen classes" in lines[0] and "elapsed" in lines[0]
    quiet = subprocess.run([*CLIPCL, *args, "--out", str(tmp_path / "b"), "--quiet"], env=ENV, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_help_does_not_import_torch():
    """`clipcl --help` answers at once: the command line loads torch only for commands that need it."""
    code = "import sys, clipcl.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
