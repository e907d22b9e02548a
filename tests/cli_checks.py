"""Checks shared by the tests: one clean error line, files left as they were, two runs equal bit for bit."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from clipcl import checkpoint
from clipcl.cli import main

# `python -c DIE_AFTER_SAVE clipcl-args...`: clipcl, killed (SIGKILL) right after its $DIE_AFTER_SAVE-th checkpoint
DIE_AFTER_SAVE = """
import os, signal, sys
from clipcl import checkpoint
real_save, calls = checkpoint.save, [0]
def save_then_die(path, state):
    real_save(path, state)
    calls[0] += 1
    if calls[0] == int(os.environ["DIE_AFTER_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save_then_die
from clipcl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def fail(argv, capsys, code=2) -> str:
    """Run the CLI expecting failure with `code`; returns the one 'clipcl: error:' line (no traceback)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("clipcl: error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (links as their target name), for byte-for-byte comparisons."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = b"->" + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """Same accuracy matrix (and metrics), same final weights, memory and method state, bit for bit."""
    r, ref = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert r["complete"] and ref["complete"]
    assert r["accuracy_matrix"] == ref["accuracy_matrix"]
    assert r["metrics"] == ref["metrics"]
    assert r.get("class_weights") == ref.get("class_weights")  # gdro's telemetry of every step, resumed ones too
    assert r["nonfinite_skipped"] == ref["nonfinite_skipped"] == 0
    a, b = (checkpoint.load(d / checkpoint.CHECKPOINT_NAME) for d in (out, reference))
    assert a["model"].keys() == b["model"].keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model tensor {k} differs"
    assert_same_state(a["memory"], b["memory"], "memory")
    assert_same_state(a["method"], b["method"], "method")  # estimators, teachers, stored logits, telemetry
    assert a["progress"]["rows"] == b["progress"]["rows"] and a["progress"]["task"] == len(a["progress"]["rows"])


def assert_same_state(a, b, where: str) -> None:
    """Nested dicts and lists of tensors and plain values, equal bit for bit (nan equal to nan)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))), \
            f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_training(a: dict, b: dict, share_limit: float = 1e-3) -> None:
    """Two model state dicts trained alike up to float rounding (another summation order: ranks, memory layout).

    AdamW divides by the root of the squared gradients, so a near-zero gradient whose rounding differs can move
    its weight by up to a step (lr): a handful of weights may differ by that much. A wrong computation (half a
    batch's gradient, another input) moves most weights by steps, and fails both bounds.
    """
    diff = torch.cat([(v.float() - b[k].float()).abs().flatten() for k, v in a.items() if v.is_floating_point()])
    assert float(diff.mean()) < 1e-5, f"mean weight difference {float(diff.mean()):.3g}"
    share = float((diff > 1e-4).float().mean())
    assert share < share_limit, f"{100 * share:.3f}% of the weights differ by more than 1e-4"
