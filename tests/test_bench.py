"""clipcl bench: its figures agree with each other and with FLOPs counted independently here."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clipcl.cli import main
from clipcl.config import load_config
from clipcl.losses import clip_loss
from clipcl.models import create
from cli_checks import fail

TINY = ["scenario.train_per_class=40", "scenario.test_per_class=20", "scenario.n_tasks=2", "optim.batch_size=8",
        "method.name=er", "scenario.augment=none"]


def test_bench_figures_are_consistent_and_flops_match_an_independent_count(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "fmnist-cil", *TINY, "--steps", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "train" in capsys.readouterr().out
    assert r["batch"] == 16  # er: 8 new + 8 memory samples a step
    assert r["achieved_tflops"] == pytest.approx(r["train_images_per_second"] * r["train_gflop_per_image"] / 1e3,
                                                 rel=1e-2)
    assert r["mfu_percent"] == pytest.approx(100 * r["achieved_tflops"] / r["matmul_peak_tflops"], abs=0.1)
    assert r["eval_over_train"] == pytest.approx(r["eval_images_per_second"] / r["train_images_per_second"], rel=1e-2)
    # the same model's forward and backward on 16 images and the 4 class texts of task 2's step, counted here
    cfg = load_config("fmnist-cil", TINY)
    bundle = create(cfg.model, "cpu", cfg.scenario, quiet=True)
    images = torch.rand(16, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer([f"a photo of a {c}." for c in ("shirt", "boot", "bag", "coat")])
    with FlopCounterMode(display=False) as counter:
        z, t, scale = bundle.model(images, tokens)
        clip_loss(z, t, torch.arange(16) % 4, scale).backward()
    assert r["train_gflop_per_image"] == pytest.approx(counter.get_total_flops() / 16 / 1e9, rel=0.02)


def test_bench_refuses_a_json_target_in_a_missing_folder(tmp_path, capsys):
    err = fail(["bench", "fmnist-cil", *TINY, "--json", str(tmp_path / "no" / "b.json")], capsys)
    assert "folder that does not exist" in err and not (tmp_path / "no").exists()
