"""The hooks for a method's own modules (Method.setup, trains_parameter, modules): what the method does not
train stays bit-identical, its module is in the optimiser and the checkpoint, resumes bit-exactly after a
SIGKILL, and under two gloo ranks its gradients are those of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import owned_method  # noqa: F401  (registers 'headonly')
from clipcl import checkpoint
from clipcl.config import apply_overrides, load_config
from clipcl.engine import Trainer
from cli_checks import DIE_AFTER_SAVE
from test_distributed import _torchrun

TESTS = Path(__file__).resolve().parent
TINY = ["model.name=clipcl-tiny-vit", "scenario.train_per_class=32", "scenario.test_per_class=10",
        "scenario.n_tasks=2", "optim.epochs=1", "optim.batch_size=16", "optim.warmup_steps=1", "optim.lr=0.01",
        "memory.per_class=2", "eval.batch_size=64", "method.name=headonly"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
# clipcl's CLI with the test method registered (a script, as torchrun runs one)
CLI = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import owned_method\n"


def _trainer(tmp_path, *extra) -> Trainer:
    cfg = apply_overrides(load_config("fmnist-cil"), [*TINY, *extra])
    return Trainer(cfg, tmp_path / "run", quiet=True, progress_bar=False)


def test_only_the_owned_module_trains_and_is_counted(tmp_path):
    trainer = _trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.bundle.model.state_dict().items()}
    head = {k: v.clone() for k, v in trainer.owned.state_dict().items()}
    results = trainer.run()
    after = trainer.bundle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every model weight bit-identical
    moved = [k for k, v in trainer.owned.state_dict().items() if not torch.equal(v, head[k])]
    assert sorted(moved) == ["parts.head.bias", "parts.head.weight"]
    d = trainer.bundle.dim
    assert results["model"]["trainable_parameters"] == d * d + d
    assert results["memory"]["method_state_bytes"] == 4 * (d * d + d)  # the head's float32 weights
    # what the optimiser updates: the head's parameters and nothing else
    assert [n for n, _ in trainer.trained_parameters()] == ["modules.parts.head.weight", "modules.parts.head.bias"]


def test_the_owned_classifier_is_what_evaluation_scores(tmp_path):
    trained = _trainer(tmp_path).run()
    state = checkpoint.load(tmp_path / "run" / checkpoint.CHECKPOINT_NAME)
    assert set(state["modules"]) == {"parts.head.weight", "parts.head.bias"}
    # the same frozen model scored by the text classifier alone (zeroshot) differs: the head is what evaluation used
    plain = apply_overrides(load_config("fmnist-cil"), [*TINY[:-1], "method.name=zeroshot"])
    zeroshot = Trainer(plain, tmp_path / "zs", quiet=True, progress_bar=False).run()
    assert trained["accuracy_matrix"] != zeroshot["accuracy_matrix"]
    assert trained["metrics"]["last_accuracy"] > zeroshot["metrics"]["last_accuracy"]


def test_a_checkpoint_without_the_modules_is_refused(tmp_path):
    trainer = _trainer(tmp_path, "checkpoint_every=1")
    trainer.run()
    state = checkpoint.load(tmp_path / "run" / checkpoint.CHECKPOINT_NAME)
    del state["modules"]
    with pytest.raises(checkpoint.StateError, match="modules"):
        _trainer(tmp_path / "other").check_state(state)


def _cli(args, env=None, script=CLI + "from clipcl.cli import main\nsys.exit(main(sys.argv[1:]))\n"):
    return subprocess.run([sys.executable, "-c", script, *args], env=env or ENV, capture_output=True, text=True,
                          timeout=600)


def test_the_owned_module_resumes_bit_exactly_after_sigkill(tmp_path):
    args = ["run", "fmnist-cil", *TINY, "checkpoint_every=1", "--quiet"]
    whole = _cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    killed = _cli([*args, "--out", str(tmp_path / "cut")], env={**ENV, "DIE_AFTER_SAVE": "3"},
                  script=CLI + DIE_AFTER_SAVE)
    assert killed.returncode != 0
    assert checkpoint.load(tmp_path / "cut" / checkpoint.CHECKPOINT_NAME)["progress"]["step"] > 0  # mid-task
    resumed = _cli(["resume", str(tmp_path / "cut"), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = (checkpoint.load(tmp_path / x / checkpoint.CHECKPOINT_NAME) for x in ("whole", "cut"))
    assert all(torch.equal(a["modules"][k], b["modules"][k]) for k in a["modules"])
    ra, rb = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("whole", "cut"))
    assert ra["accuracy_matrix"] == rb["accuracy_matrix"]


def test_two_gloo_ranks_average_the_owned_gradients_as_one_process(tmp_path):
    args = ["run", "fmnist-cil", *TINY, "--quiet"]
    one = _cli([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    script = tmp_path / "cli.py"
    script.write_text(CLI + "from clipcl.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    two = _torchrun([*args, "--out", str(tmp_path / "two")], script=str(script), env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (checkpoint.load(tmp_path / x / checkpoint.CHECKPOINT_NAME)["modules"] for x in ("one", "two"))
    for k in a:  # a rank that summed instead of averaging (or saw half the batch) moves the head by whole steps
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert not torch.equal(a["parts.head.bias"], torch.zeros_like(a["parts.head.bias"]))  # the head did train
    assert json.loads((tmp_path / "two" / "results.json").read_text())["versions"]["world_size"] == "2"
