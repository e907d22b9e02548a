"""Runs that survive: a run killed (SIGKILL, mid-task or mid-checkpoint-write) or stopped (SIGTERM, SIGINT) and
resumed with --resume ends bit for bit where the uninterrupted run ends: same accuracy matrix, same weights,
same memory, same estimator states.

The end-to-end tests run the real command line in subprocesses that share one environment (thread counts
pinned), as a user would; the in-process tests check the checkpoint contents the resumes rely on.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipcl import checkpoint, owned
from clipcl.config import load_config
from clipcl.engine import Interrupted, Trainer, lr_at
from cli_checks import assert_same_run

ARGS = ["fmnist-cil", "scenario.train_per_class=100", "scenario.test_per_class=50", "scenario.n_tasks=3",
        "optim.epochs=2", "optim.batch_size=32", "checkpoint_every=2", "method.name=gdro", "memory.per_class=5"]
STEPS_PER_TASK = 13  # ceil(2 epochs * 200 images / 32)
# The same environment for every run of a comparison: bit-exactness on CPU holds for one thread count (runs
# with 1 and 2 threads end with different weights). One thread is also the fastest here for this tiny model.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"}
_script = Path(sys.executable).parent / "clipcl"
CLIPCL = [str(_script)] if _script.is_file() else [sys.executable, "-m", "clipcl.cli"]
TIMEOUT = 240


def run_cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLIPCL, "run", *ARGS, "--out", str(out), *extra], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)


def start_cli(out: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLIPCL, "run", *ARGS, "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, ready) -> dict:
    """Poll out/checkpoint.pt (each version is whole: it is renamed into place) until ready(progress)."""
    path, seen, deadline = out / checkpoint.CHECKPOINT_NAME, None, time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended before the wanted checkpoint: {proc.communicate()}"
        if path.is_file() and path.stat().st_mtime_ns != seen:
            seen = path.stat().st_mtime_ns
            progress = checkpoint.load(path)["progress"]
            if ready(progress):
                return progress
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no suitable checkpoint appeared in time")


def final_state(out: Path) -> dict:
    return checkpoint.load(out / checkpoint.CHECKPOINT_NAME)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_cli(out)
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_mid_task_then_resume_is_bit_exact(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_cli(out)
    # kill in the second task, after a mid-task checkpoint: memory, estimators and AdamW moments all live
    wait_for_checkpoint(out, proc, lambda p: p["task"] == 1 and p["step"] >= 2)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = final_state(out)
    assert state["progress"]["task"] == 1 and 0 < state["progress"]["step"] < STEPS_PER_TASK, "not killed mid-task"
    assert state["optimizer"] is not None and state["optimizer"]["state"], "mid-task checkpoint without AdamW state"
    assert json.loads((out / "results.json").read_text())["complete"] is False  # only the rows so far

    done = run_cli(out, "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(out, reference)
    # the per-step log: the rows written after the checkpoint were dropped and trained again
    assert log_rows(out) == log_rows(reference)


def log_rows(out: Path) -> list[dict]:
    """log.csv without its timing column (the one thing that differs between two runs of the same steps)."""
    import csv

    with open(out / "log.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "images_per_second"} for row in csv.DictReader(f)]
    assert len(rows) == 3 * STEPS_PER_TASK
    return rows


DYING_SAVE = """
import io, os, signal, sys, torch
real_save, calls = torch.save, [0]
def dying_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["DIE_AT_SAVE"]):  # write half of this checkpoint, then die
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from clipcl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_checkpoint_write_keeps_last_good_one(reference, tmp_path):
    out = tmp_path / "run"
    # saves: task 0 at steps 2, 4, ..., 12 and its end (7), then task 1 at steps 2 (8th) and 4 (9th)
    proc = subprocess.run([sys.executable, "-c", DYING_SAVE, "run", *ARGS, "--out", str(out)],
                          env={**ENV, "DIE_AT_SAVE": "9"}, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = list(out.glob(f".{checkpoint.CHECKPOINT_NAME}.tmp-*"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (out / checkpoint.CHECKPOINT_NAME).stat().st_size
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(partial[0])  # the partial file really is broken
    progress = final_state(out)["progress"]
    assert (progress["task"], progress["step"]) == (1, 2)  # the last complete checkpoint

    done = run_cli(out, "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(out, reference)
    assert not list(out.glob(f".{checkpoint.CHECKPOINT_NAME}.tmp-*")), "stale partial checkpoint left behind"


# SIGINT takes the same path as SIGTERM (test_sigint_through_main_in_process covers it quickly)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_writes_checkpoint_exits_cleanly_and_resumes(sig, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_cli(out)
    wait_for_checkpoint(out, proc, lambda p: p["task"] == 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert f"interrupted by {sig.name}" in err and "checkpoint written" in err
    assert f"Continue with: clipcl resume {out}" in err
    progress = final_state(out)["progress"]
    assert progress["task"] >= 1 and json.loads((out / "results.json").read_text())["complete"] is False

    # the command the message gives: no config or overrides to retype, the run's stored config is used
    done = subprocess.run([*CLIPCL, "resume", str(out)], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert_same_run(out, reference)


# ---------------------------------------------------------------------- in-process: what checkpoints hold
TINY = ["scenario.train_per_class=20", "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1",
        "optim.batch_size=16", "optim.warmup_steps=2", "method.name=gdro", "memory.per_class=2",
        "checkpoint_every=1"]  # 3 steps per task (40 images + memory, batches of 16 new)


@pytest.fixture(scope="module")
def tiny_saves(tmp_path_factory):
    """An uninterrupted tiny run with every checkpoint it writes recorded (in memory, as saved)."""
    cfg = load_config("fmnist-cil", TINY)
    out = tmp_path_factory.mktemp("tiny") / "run"
    saves = []
    real = checkpoint.save

    def recording_save(path, state):
        saves.append(torch.load(_bytes(state), weights_only=True))  # what a resume can read
        real(path, state)

    checkpoint.save = recording_save
    try:
        trainer = Trainer(cfg, out, progress_bar=False)
        trainer.run()
    finally:
        checkpoint.save = real
    return cfg, out, trainer, saves


def _bytes(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_checkpoints_are_written_every_n_steps_and_after_each_task(tiny_saves):
    cfg, out, trainer, saves = tiny_saves
    steps = trainer.total_steps(0)
    assert steps == 3
    where = [(s["progress"]["task"], s["progress"]["step"]) for s in saves]
    assert where == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    for s in saves:
        assert s["config"] == json.loads(json.dumps(s["config"]))  # plain data, the resolved config
        assert s["config"]["checkpoint_every"] == 1 and s["config"]["method"]["name"] == "gdro"
        assert {"model", "optimizer", "memory", "method", "progress", "torch_rng"} <= set(s)


def test_checkpoint_never_holds_the_optimizer_of_a_finished_task(tiny_saves):
    cfg, out, trainer, saves = tiny_saves
    for s in saves:
        task, step = s["progress"]["task"], s["progress"]["step"]
        if step == 0:  # between tasks: the next task starts a fresh AdamW and schedule
            assert s["optimizer"] is None
            assert len(s["progress"]["rows"]) == task
        else:  # mid-task: AdamW moments and its step count, and the lr the schedule gave the last step
            opt = s["optimizer"]
            moments = list(opt["state"].values())
            assert moments and all({"exp_avg", "exp_avg_sq", "step"} <= set(m) for m in moments)
            assert all(float(m["step"]) == step for m in moments)
            want = lr_at(step - 1, trainer.total_steps(task), cfg.optim.lr, cfg.optim.warmup_steps)
            assert all(g["lr"] == want for g in opt["param_groups"])
            assert s["method"]["pgcl"]["visited"].any() and s["method"]["dro"]["visited"].any()  # prompts form
            if task == 1:
                assert s["memory"]["keys"]  # the memory of task 0 is in the checkpoint


def test_in_process_interrupt_and_resume_restores_adam_moments_and_matches(tiny_saves, tmp_path, monkeypatch):
    cfg, ref_out, ref, _ = tiny_saves
    out = tmp_path / "run"
    trainer = Trainer(cfg, out, progress_bar=False)
    real_save = Trainer.save_checkpoint
    calls = []

    def save_then_signal(self):  # a SIGTERM that arrives right after the checkpoint of task 1, step 1
        seconds = real_save(self)
        calls.append(1)
        if len(calls) == 4:
            self._signal = signal.SIGTERM
        return seconds

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_signal)
    with pytest.raises(Interrupted):
        trainer.run()
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    saved = final_state(out)
    assert (saved["progress"]["task"], saved["progress"]["step"]) == (1, 1)

    resumed = Trainer(cfg, out, progress_bar=False)
    resumed.load_checkpoint()
    opt = resumed.optimizer.state_dict()
    assert len(opt["state"]) == len(saved["optimizer"]["state"]) > 0
    for k, m in saved["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt["state"][k][name], m[name])
    results = resumed.run(resume=True)  # loads the same checkpoint again: harmless
    assert results["accuracy_matrix"] == ref.progress.rows
    final = resumed.bundle.model.state_dict()
    for k, v in ref.bundle.model.state_dict().items():
        assert torch.equal(final[k], v), k


def test_resume_without_adam_moments_would_differ(tiny_saves, tmp_path, monkeypatch):
    """Sensitivity of the comparisons above: a resume that restarts AdamW mid-task ends with other weights."""
    cfg, ref_out, ref, saves = tiny_saves
    out = tmp_path / "run"
    mid = next(s for s in saves if (s["progress"]["task"], s["progress"]["step"]) == (1, 1))
    out.mkdir()
    owned.create_marker(out, "run", [checkpoint.CHECKPOINT_NAME])  # a run folder of clipcl's
    checkpoint.save(out / checkpoint.CHECKPOINT_NAME, {k: v for k, v in mid.items() if k != "format_version"})
    real_load = Trainer.load_checkpoint

    def load_but_restart_adam(self):
        real_load(self)
        self._start_optimizer()

    monkeypatch.setattr(Trainer, "load_checkpoint", load_but_restart_adam)
    trainer = Trainer(cfg, out, progress_bar=False)
    trainer.run(resume=True)
    final = trainer.bundle.model.state_dict()
    assert any(not torch.equal(final[k], v) for k, v in ref.bundle.model.state_dict().items())


def test_sigint_through_main_in_process(tmp_path, monkeypatch, capsys):
    """Ctrl-C during training: a checkpoint, exit code 130, and a message saying how to resume."""
    from clipcl.cli import main

    out = tmp_path / "run"
    real_save = Trainer.save_checkpoint
    calls = []

    def save_then_ctrl_c(self):
        seconds = real_save(self)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: no KeyboardInterrupt
        return seconds

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)
    code = main(["run", "fmnist-cil", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT
    assert "interrupted by SIGINT" in err and f"clipcl resume {out}" in err and "Traceback" not in err
    progress = final_state(out)["progress"]
    assert (progress["task"], progress["step"]) == (0, 2)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer put its handler back


def test_resume_with_another_thread_count_warns(tiny_saves, tmp_path, capsys):
    """Bit-exactness holds for one thread count: a resume under another one says so, in one clean line."""
    cfg, _, _, saves = tiny_saves
    assert all(s["threads"] == torch.get_num_threads() for s in saves)
    out = tmp_path / "run"
    out.mkdir()
    state = {k: v for k, v in saves[1].items() if k != "format_version"}
    checkpoint.save(out / checkpoint.CHECKPOINT_NAME, {**state, "threads": torch.get_num_threads() + 1})
    trainer = Trainer(cfg, out, progress_bar=False)
    capsys.readouterr()
    trainer.load_checkpoint()
    err = capsys.readouterr().err
    assert err.startswith("clipcl: warning: the checkpoint was written with") and "CPU threads" in err, err


def test_a_checkpoint_of_an_older_clipcl_without_a_new_key_still_resumes(tiny_saves, tmp_path):
    """A key added to the config since a run was written counts as its default (which reproduces what the older
    version did): the run resumes, a sweep recognises its finished cells, the report groups it with new runs."""
    from clipcl.config import to_dict, with_defaults
    from clipcl.summary import _settings
    from clipcl.sweep import cell_state

    cfg, out, trainer, saves = tiny_saves
    path = out / checkpoint.CHECKPOINT_NAME
    old = to_dict(cfg)
    del old["model"]["resize"], old["method"]["t2i_eps"]  # as written before those keys existed
    assert with_defaults(old) == to_dict(cfg)
    checkpoint.load(path, old)  # no CheckpointError
    changed = to_dict(cfg)
    changed["model"]["resize"] = "openclip"
    with pytest.raises(checkpoint.CheckpointError, match="model.resize"):
        checkpoint.load(path, changed)  # a key set to another value is still another config
    r = json.loads((out / "results.json").read_text())
    cell = tmp_path / "cell"  # a finished sweep cell of the older version
    shutil.copytree(out, cell)
    r_old = {**r, "config": old}
    (cell / "results.json").write_text(json.dumps(r_old))
    assert cell_state(cell, cfg)[0] == "skip"
    (cell / "results.json").write_text(json.dumps({**r, "config": changed}))
    assert cell_state(cell, cfg)[0] == "refuse"
    from clipcl.report import gather

    warnings = gather([str(out), str(cell)]).warnings  # the report says why the two are not comparable
    assert any("config.model.resize" in w and "openclip" in w for w in warnings)
    (cell / "results.json").write_text(json.dumps(r_old))
    assert not any("resize" in w for w in gather([str(out), str(cell)]).warnings)
    assert _settings(r_old) == _settings(r)
    assert _settings({**r, "config": changed}) != _settings(r)
