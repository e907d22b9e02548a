"""Checkpoints that are damaged or edited, tried as a hostile user would: each one is refused with one
'clipcl: error:' line that names the file and what is wrong (the damaged part, or the field), exit code 2, no
traceback, nothing resumed, and every file of the run folder left as it was, byte for byte (so no results.json
is written again).

Damage (the zip's CRCs catch it before anything is unpickled): flipped bytes inside a tensor's payload, half of
every payload zeroed, a truncated file. Edits (re-saved with torch.save, so their CRCs are valid: the schema
check catches them): one case per field, model, progress, AdamW state, memory, method, generator, threads,
format version and config. Every case is resumed both ways, `clipcl run CONFIG ... --resume` and
`clipcl resume DIR`.
"""
from __future__ import annotations

import json
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from clipcl import checkpoint
from clipcl.cli import main
from clipcl.engine import Trainer
from cli_checks import fail, snapshot

# 2 tasks of 2 classes, 3 steps each; gdro (estimators, DRO weights, telemetry) with a memory of task 0
TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1",
        "optim.batch_size=16", "optim.max_steps=3", "method.name=gdro", "memory.per_class=2", "eval.batch_size=64",
        "checkpoint_every=1"]
NAME = checkpoint.CHECKPOINT_NAME


@pytest.fixture(scope="module", autouse=True)
def dataset_files_read_once():
    """Fashion-MNIST's files decompressed once for the module, not once per resume (most of a refused resume's
    time otherwise; the data are the same, their fingerprint too)."""
    from clipcl.data import datasets

    cache, real = {}, datasets.read_idx

    def read_idx(path):
        key = (str(path), Path(path).stat().st_mtime_ns)
        if key not in cache:
            cache[key] = real(path)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "read_idx", read_idx)
        yield


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped (SIGTERM) right after its checkpoint at task 1, step 1: AdamW's moments, a memory of task 0,
    the method's estimators, one accuracy row and a results.json of task 0 (complete: false)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    real = Trainer.save_checkpoint

    def save_then_stop(self):
        seconds = real(self)
        if (self.progress.task, self.progress.step) == (1, 1):
            self._signal = signal.SIGTERM
        return seconds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "save_checkpoint", save_then_stop)
        assert main(["run", "fmnist-cil", *TINY, "--out", str(out), "--quiet"]) == 128 + signal.SIGTERM
    state = checkpoint.load(out / NAME)
    assert (state["progress"]["task"], state["progress"]["step"]) == (1, 1)
    assert state["optimizer"]["state"] and state["memory"]["keys"]
    assert not json.loads((out / "results.json").read_text())["complete"]
    return out


def copy_run(stopped: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped, out, symlinks=True)
    return out


def resume_argv(via: str, out: Path) -> list[str]:
    return ["run", "fmnist-cil", *TINY, "--out", str(out), "--resume"] if via == "--resume" else ["resume", str(out)]


def refused(via: str, out: Path, capsys) -> str:
    """Resume `via` one way, expecting exit 2 with one error line naming the checkpoint and every file as it was."""
    before = snapshot(out)
    err = fail(resume_argv(via, out), capsys)
    assert str(out / NAME) in err, err
    assert snapshot(out) == before  # results.json included: nothing was written again
    assert not json.loads((out / "results.json").read_text())["complete"]
    return err


# ---------------------------------------------------------------------- damaged bytes: the zip's CRCs
def payloads(path: Path) -> list[tuple[str, int, int]]:
    """(name, start, size) of every tensor payload (archive/data/N) in the checkpoint's zip, largest first."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                f.seek(info.header_offset)
                header = f.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return sorted(out, key=lambda x: -x[2])


def _flip_bytes(path: Path) -> str:
    name, start, size = payloads(path)[0]
    data = bytearray(path.read_bytes())
    for at in range(start + size // 2, start + size // 2 + 8):
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return name


def _zero_half_of_every_payload(path: Path) -> str:
    data = bytearray(path.read_bytes())
    found = payloads(path)
    for _, start, size in found:
        data[start:start + size // 2] = bytes(size // 2)
    path.write_bytes(bytes(data))
    return min((name for name, _, size in found if size >= 2), key=lambda n: int(n.rsplit("/", 1)[1]))


def _truncate_inside_a_payload(path: Path) -> str:
    name, start, size = payloads(path)[0]
    data = path.read_bytes()
    path.write_bytes(data[:start + size // 2])
    return ""


@pytest.mark.parametrize("via", ["--resume", "resume"])
@pytest.mark.parametrize("damage, words", [
    (_flip_bytes, ["is damaged", "does not match its checksum (CRC-32)"]),
    (_zero_half_of_every_payload, ["is damaged", "does not match its checksum (CRC-32)", "other parts"]),
    (_truncate_inside_a_payload, ["is unreadable", "truncated or corrupt"]),
])
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_part(damage, words, via, stopped, tmp_path, capsys):
    out = copy_run(stopped, tmp_path)
    part = damage(out / NAME)
    err = refused(via, out, capsys)
    for w in [*words, part, "--overwrite"]:
        assert w in err, err


def test_damage_is_found_before_anything_is_unpickled(stopped, tmp_path, monkeypatch):
    """The CRCs are checked on the bytes: torch.load never sees a damaged file."""
    out = copy_run(stopped, tmp_path)
    _flip_bytes(out / NAME)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a damaged checkpoint"))
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        checkpoint.read(out / NAME)


def test_a_config_only_read_checks_the_parts_that_hold_the_config(stopped, tmp_path):
    """`clipcl resume` reads the stored config memory-mapped: damage to the pickle is found there already."""
    out = copy_run(stopped, tmp_path)
    path = out / NAME
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 40] ^= 0x01  # a bit inside the pickle
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="data.pkl' does not match its checksum"):
        checkpoint.read(path, mmap=True)


# ---------------------------------------------------------------------- edited fields: the schema check
def _edit(function, field, *words):
    return pytest.param(function, field, words, id=function.__name__.strip("_"))


def model_key_removed(s):
    del s["model"]["logit_scale"]


def model_key_added(s):
    s["model"]["visual.extra.weight"] = torch.zeros(3)


def model_wrong_shape(s):
    s["model"]["text_projection"] = torch.zeros(s["model"]["text_projection"].shape[0] + 1, 7)


def model_wrong_dtype(s):
    s["model"]["text_projection"] = s["model"]["text_projection"].double()


def step_negative(s):
    s["progress"]["step"] = -5


def step_beyond_the_task(s):
    s["progress"]["step"] = 4  # the task has 3 steps


def task_99(s):
    s["progress"]["task"] = 99


def task_as_a_string(s):
    s["progress"]["task"] = "1"


def task_finished_but_mid_step(s):
    s["progress"]["task"], s["progress"]["rows"] = 2, s["progress"]["rows"] * 2  # done, yet at step 1


def rows_of_wrong_length(s):
    s["progress"]["rows"][0] = s["progress"]["rows"][0][:1]


def rows_missing(s):
    s["progress"]["rows"] = []


def accuracy_of_7(s):
    s["progress"]["rows"][0][0] = 7.0


def accuracy_before_of_nan(s):
    s["progress"]["before"][1] = float("nan")


def before_too_short(s):
    s["progress"]["before"] = s["progress"]["before"][:1]


def timing_missing(s):
    s["progress"]["timing"] = []


def counter_negative(s):
    s["progress"]["images_seen"] = -32


def progress_field_added(s):
    s["progress"]["epoch"] = 3


def optimizer_removed(s):
    s["optimizer"] = None


def optimizer_field_removed(s):
    del s["optimizer"]


def optimizer_moment_of_wrong_shape(s):
    first = next(iter(s["optimizer"]["state"]))
    s["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)


def optimizer_group_removed(s):
    s["optimizer"]["param_groups"] = s["optimizer"]["param_groups"][:1]


def optimizer_step_beyond(s):
    first = next(iter(s["optimizer"]["state"]))
    s["optimizer"]["state"][first]["step"] = torch.tensor(50.0)


def memory_class_out_of_range(s):
    s["memory"]["keys"][0] = (0, 99)


def memory_task_out_of_range(s):
    s["memory"]["keys"][0] = (5, 0)


def memory_image_of_wrong_form(s):
    s["memory"]["images"][0][0] = torch.zeros(3, 28, 28)  # float, not uint8 pixels


def memory_budget_changed(s):
    s["memory"]["per_class"] = 50


def method_estimates_of_wrong_length(s):
    s["method"]["gcl"]["log_u1"] = torch.zeros(5, dtype=torch.float64)


def method_entry_removed(s):
    del s["method"]["dro"]


def method_telemetry_broken(s):
    s["method"]["telemetry"][0]["weights"] = "heavy"


def torch_rng_wrong(s):
    s["torch_rng"] = torch.zeros(10, dtype=torch.uint8)


def torch_rng_float(s):
    s["torch_rng"] = s["torch_rng"].float()


def threads_0(s):
    s["threads"] = 0


def format_version_as_a_string(s):
    s["format_version"] = "3"


def config_missing(s):
    del s["config"]


def field_added(s):
    s["notes"] = "mine"


def data_not_a_fingerprint(s):
    s["data"] = [1, 2]


EDITS = [
    _edit(model_key_removed, "model.logit_scale", "is missing"),
    _edit(model_key_added, "model.visual.extra.weight", "is not one of the model's tensors"),
    _edit(model_wrong_shape, "model.text_projection", "of shape"),
    _edit(model_wrong_dtype, "model.text_projection", "of dtype float32", "float64"),
    _edit(step_negative, "progress.step", "= -5", "from 0 to 3"),
    _edit(step_beyond_the_task, "progress.step", "= 4", "task 1 has 3 steps"),
    _edit(task_99, "progress.task", "= 99", "from 0 to 2"),
    _edit(task_as_a_string, "progress.task", "'1' (a string)", "whole number"),
    _edit(task_finished_but_mid_step, "progress.step", "= 1: must be 0", "done all its tasks"),
    _edit(rows_of_wrong_length, "progress.rows[0]", "must hold 2 items"),
    _edit(rows_missing, "progress.rows", "must hold 1 item ("),
    _edit(accuracy_of_7, "progress.rows[0][0]", "= 7.0", "from 0.0 to 1.0"),
    _edit(accuracy_before_of_nan, "progress.before[1]", "= nan", "finite"),
    _edit(before_too_short, "progress.before", "must hold 2 accuracies"),
    _edit(timing_missing, "progress.timing", "must hold 1 item", "one entry per task trained"),
    _edit(counter_negative, "progress.images_seen", "= -32", "0 or more"),
    _edit(progress_field_added, "progress.epoch", "is not one clipcl writes"),
    _edit(optimizer_removed, "optimizer", "is None", "needs AdamW's state"),
    _edit(optimizer_field_removed, "optimizer", "is missing"),
    _edit(optimizer_moment_of_wrong_shape, "optimizer.state[0].exp_avg", "of shape"),
    _edit(optimizer_group_removed, "optimizer.param_groups", "must hold 2 items"),
    _edit(optimizer_step_beyond, "optimizer.state[0].step", "= 50.0"),
    _edit(memory_class_out_of_range, "memory.keys[0]", "(0, 99)", "class 99"),
    _edit(memory_task_out_of_range, "memory.keys[0]", "(5, 0)", "task 5"),
    _edit(memory_image_of_wrong_form, "memory.images[0][0]", "dtype uint8"),
    _edit(memory_budget_changed, "memory.per_class", "= 50", "config"),
    _edit(method_estimates_of_wrong_length, "method.gcl.log_u1", "length"),
    _edit(method_entry_removed, "method.dro", "is missing"),
    _edit(method_telemetry_broken, "method.telemetry[0].weights", "must be a list"),
    _edit(torch_rng_wrong, "torch_rng", "of shape [5056]"),
    _edit(torch_rng_float, "torch_rng", "of dtype uint8"),
    _edit(threads_0, "threads", "= 0", "1 or more"),
    _edit(format_version_as_a_string, "format_version", "format version '3' (a string)", "reads version 3"),
    _edit(config_missing, "config", "is missing"),
    _edit(field_added, "notes", "is not a field clipcl writes"),
    _edit(data_not_a_fingerprint, "data", "must be a dict"),
]


# every edit through `clipcl run --resume`; through `clipcl resume DIR` (the same check) in the slow suite
@pytest.mark.parametrize("via", ["--resume", pytest.param("resume", marks=pytest.mark.slow)])
@pytest.mark.parametrize("edit, field, words", EDITS)
def test_edited_checkpoint_is_refused_naming_the_file_and_the_field(edit, field, words, via, stopped, tmp_path,
                                                                    capsys):
    out = copy_run(stopped, tmp_path)
    state = torch.load(out / NAME, weights_only=True)
    edit(state)
    torch.save(state, out / NAME)  # a valid zip: only the schema check can tell
    err = refused(via, out, capsys)
    for w in [f"'{field}'", *words, "--overwrite"]:
        assert w in err, err
    assert "Traceback" not in err and "UserWarning" not in err


def test_every_edit_passes_the_zip_check(stopped, tmp_path):
    """Sensitivity: the edited files are whole zips (the CRCs say nothing), so the schema check is what refuses."""
    out = copy_run(stopped, tmp_path)
    state = torch.load(out / NAME, weights_only=True)
    task_99(state)
    torch.save(state, out / NAME)
    checkpoint.verify(out / NAME)


@pytest.mark.parametrize("variant", [
    ["method.name=er", "eval.unseen=true"],  # the unseen matrix, a memory
    ["method.name=zscl"],  # a teacher and a weight ensemble
    ["method.name=wiseft"],  # the weights before the task
    ["method.name=derpp", "memory.codec=png"],  # stored logits beside encoded images
], ids=lambda v: v[0].split("=")[1])
def test_the_checks_accept_every_checkpoint_a_run_writes(variant, tmp_path):
    """No false alarm: every checkpoint of a run (mid-task, between tasks, finished) passes the check of a fresh
    trainer, as a resume would build it."""
    from clipcl.config import load_config

    cfg = load_config("fmnist-cil", [*TINY, *variant, "optim.max_steps=2"])
    checker = Trainer(cfg, tmp_path / "other", progress_bar=False, quiet=True)
    seen, real = [], checkpoint.save

    def save_then_check(path, state):
        real(path, state)
        checker.check_state(checkpoint.read(path))
        seen.append((state["progress"]["task"], state["progress"]["step"]))

    checkpoint.save = save_then_check
    try:
        Trainer(cfg, tmp_path / "run", progress_bar=False, quiet=True).run()
    finally:
        checkpoint.save = real
    assert seen == [(0, 1), (1, 0), (1, 1), (2, 0)]


# ---------------------------------------------------------------------- the thread count on resume
def test_another_thread_count_is_one_clean_warning_line(stopped, tmp_path, capsys):
    out = copy_run(stopped, tmp_path)
    state = torch.load(out / NAME, weights_only=True)
    state["threads"] = torch.get_num_threads() + 1
    torch.save(state, out / NAME)
    assert main(["resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "CPU threads" in line]
    assert len(lines) == 1 and lines[0].startswith("clipcl: warning: the checkpoint was written with"), err
    assert f"OMP_NUM_THREADS={torch.get_num_threads() + 1}" in lines[0]
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err, err
    assert json.loads((out / "results.json").read_text())["complete"]
