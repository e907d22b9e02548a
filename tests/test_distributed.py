"""Several ranks on the CPU (torchrun, gloo): a 2-process run follows the 1-process run of the same global
batch, and a 2-process run killed mid-task resumes as 1 process onto the uninterrupted trajectory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcl import checkpoint, distributed
from clipcl.augment import augment
from cli_checks import DIE_AFTER_SAVE, assert_same_training

# 2 tasks of 4 steps, a LayerNorm model (BatchNorm statistics are per rank on the CPU: SyncBatchNorm needs CUDA)
ARGS = ["run", "fmnist-cil", "model.name=clipcl-tiny-vit", "model.lock_text=false", "scenario.train_per_class=32",
        "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1", "optim.batch_size=16",
        "optim.warmup_steps=1", "memory.per_class=2", "eval.batch_size=64", "checkpoint_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], script: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                f"--master_port={_port()}", "--master_addr=127.0.0.1"]
    target = ["-m", "clipcl.cli"] if script is None else [script]
    return subprocess.run([*launcher, *target, *args], env=env or ENV, capture_output=True, text=True, timeout=600)


def _single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipcl.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)


def _assert_close_runs(a: Path, b: Path) -> None:
    ra, rb = (json.loads((x / "results.json").read_text()) for x in (a, b))
    np.testing.assert_allclose(np.array(ra["accuracy_matrix"], dtype=float),
                               np.array(rb["accuracy_matrix"], dtype=float), atol=0.02)  # one test image in 50
    sa, sb = (checkpoint.load(x / checkpoint.CHECKPOINT_NAME) for x in (a, b))
    assert_same_training(sa["model"], sb["model"])
    if "pgcl" in sa["method"]:  # gdro's estimators and class losses: the same on every rank as in one process
        assert bool(sa["method"]["pgcl"]["visited"].any())  # the prompts form's estimators were in use
        torch.testing.assert_close(sa["method"]["pgcl"]["log_u"], sb["method"]["pgcl"]["log_u"], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(sa["method"]["dro"]["v"], sb["method"]["dro"]["v"], atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    for name in ("er", "gdro"):
        done = _single([*ARGS, f"method.name={name}", "--out", str(root / name), "--quiet"])
        assert done.returncode == 0, done.stderr
    return root


@pytest.mark.parametrize("name", ["er", "gdro"])
def test_two_ranks_follow_one_process_with_the_same_global_batch(name, single_runs, tmp_path):
    done = _torchrun([*ARGS, f"method.name={name}", "--out", str(tmp_path / "ddp"), "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_close_runs(tmp_path / "ddp", single_runs / name)
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["versions"]["world_size"] == "2"


def test_two_ranks_killed_mid_task_resume_as_one_process(single_runs, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "die.py"  # torchrun runs a script, not -c
    script.write_text(DIE_AFTER_SAVE)
    killed = _torchrun([*ARGS, "method.name=gdro", "--out", str(out), "--quiet"], script=str(script),
                       env={**ENV, "DIE_AFTER_SAVE": "6"})
    assert killed.returncode != 0
    progress = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)["progress"]
    assert (progress["task"], progress["step"]) == (1, 2)
    done = _single(["resume", str(out), "--quiet"])
    assert done.returncode == 0, done.stderr
    _assert_close_runs(out, single_runs / "gdro")


def test_shards_cover_the_batch_in_order_and_augmentation_is_the_same_per_image():
    positions = np.arange(10, 27)
    sizes = distributed.shard_sizes(len(positions), 3)
    parts = [distributed.shard(positions, r, 3) for r in range(3)]
    assert sizes == [len(p) for p in parts] and np.array_equal(np.concatenate(parts), positions)
    x = torch.rand(17, 3, 8, 8)
    whole = augment(x, "crop_flip", torch.Generator().manual_seed(5))
    start = 0
    for part in parts:
        piece = augment(x[start:start + len(part)], "crop_flip", torch.Generator().manual_seed(5), total=17,
                        start=start)
        torch.testing.assert_close(piece, whole[start:start + len(part)])
        start += len(part)
