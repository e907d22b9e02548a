"""The per-step log: log.csv always (its rows against the steps, the learning-rate schedule and the method's
terms), TensorBoard events equal to its rows, Weights & Biases fed the same rows, trackers checked at start."""
from __future__ import annotations

import csv
import importlib.machinery
import math
import sys
import types
from pathlib import Path

import pytest

from clipcl.cli import main
from clipcl.config import load_config
from clipcl.engine import Trainer

TINY = ["scenario.train_per_class=40", "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1",
        "optim.batch_size=16", "optim.warmup_steps=2", "memory.per_class=2", "eval.batch_size=64",
        "method.name=gdro"]
STEPS = 5  # ceil(80 new images / 16) per task; gdro's epoch counts new images


def run(out: Path, *overrides: str) -> dict:
    cfg = load_config("fmnist-cil", [*TINY, *overrides])
    return Trainer(cfg, out, progress_bar=False, quiet=True).run()


def read_log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def expected_lr(step: int, total: int, base: float = 0.002, warmup: int = 2) -> float:
    """Linear warm-up then cosine to 0, written out again here."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_log_csv_has_a_row_per_step_with_the_schedule_and_the_terms(tmp_path):
    results = run(tmp_path / "run")
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [str(s) for s in range(2 * STEPS)]  # tasks end to end
    assert [r["task"] for r in rows] == ["1"] * STEPS + ["2"] * STEPS  # numbered from 1
    assert [int(r["task_step"]) for r in rows] == list(range(STEPS)) * 2
    for r in rows:
        assert float(r["lr"]) == pytest.approx(expected_lr(int(r["task_step"]), STEPS), rel=1e-5)
        assert float(r["images_per_second"]) > 0
        # the logged loss of gdro is its value term (the surrogate is what trains)
        assert float(r["loss"]) == pytest.approx(float(r["gcl_value"]), rel=1e-5)
    assert {"gcl_loss", "gcl_value"} <= set(rows[0])
    assert [t["steps"] for t in results["timing"]["tasks"]] == [STEPS, STEPS]


def test_log_every_keeps_every_nth_step_and_each_task_s_last(tmp_path):
    run(tmp_path / "run", "log.every=2")
    assert [int(r["task_step"]) for r in read_log(tmp_path / "run")] == [0, 2, 4] * 2


def test_tensorboard_events_hold_the_rows_of_the_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path / "run", "log.tensorboard=true")
    rows = read_log(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    assert [e.step for e in events.Scalars("eval/seen_accuracy")] == [STEPS - 1, 2 * STEPS - 1]  # tasks' last steps


class FakeWandb(types.ModuleType):
    """Records what clipcl sends to Weights & Biases (no network, no account)."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_the_rows_of_the_log(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tmp_path / "run", "log.wandb=true", "log.wandb_project=cl-tests")
    rows = read_log(tmp_path / "run")
    assert len(fake.inits) == 1 and fake.inits[0]["project"] == "cl-tests"
    assert fake.inits[0]["config"]["method"]["name"] == "gdro"
    train = [(step, v) for step, v in fake.logged if "train/loss" in v]
    assert [s for s, _ in train] == [int(r["step"]) for r in rows]
    assert [v["train/loss"] for _, v in train] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    assert fake.finished == 1
    # the W&B run id is drawn when the run starts and kept in its checkpoint (a resume continues that W&B run);
    # a new run in the same folder gets another one, so it never lands in the old run's history
    from clipcl import checkpoint

    run_id = fake.inits[0]["id"]
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["progress"]["log_id"] == run_id
    cfg = load_config("fmnist-cil", [*TINY, "scenario.n_tasks=1", "log.wandb=true"])
    Trainer(cfg, tmp_path / "run", progress_bar=False, quiet=True, overwrite=True).run()
    assert fake.inits[1]["id"] != run_id


def test_a_tracker_that_is_not_installed_is_one_error_line_before_anything_is_written(tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if absent
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    rc = main(["run", "fmnist-cil", *TINY, "log.wandb=true", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "log.wandb" in err and "pip install wandb" in err
    assert not out.exists()


def test_overwrite_removes_the_log_and_the_event_files_but_nothing_else(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    run(out, "log.tensorboard=true")
    (out / "tensorboard" / "notes.txt").write_text("mine")
    old_events = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert old_events and (out / "log.csv").is_file()
    cfg = load_config("fmnist-cil", [*TINY, "scenario.n_tasks=1"])
    Trainer(cfg, out, progress_bar=False, quiet=True, overwrite=True).run()
    assert (out / "tensorboard" / "notes.txt").read_text() == "mine"
    assert not any(p.exists() for p in old_events)
    assert len(read_log(out)) == STEPS  # the new run's rows only
