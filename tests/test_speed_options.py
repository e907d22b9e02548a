"""The speed and memory options of the GPU path, where a CPU can check them: they change how, not what."""
from __future__ import annotations

from pathlib import Path

import torch

from clipcl.config import load_config
from clipcl.engine import Trainer
from clipcl.prompts import class_tokens, text_features
from cli_checks import assert_same_training

TINY = ["scenario.train_per_class=30", "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1",
        "optim.batch_size=16", "optim.warmup_steps=1", "memory.per_class=2", "eval.batch_size=64"]


def _trained(tmp_path: Path, *overrides: str, steps: int = 3) -> Trainer:
    tr = Trainer(load_config("fmnist-cil", [*TINY, *overrides]), tmp_path / "run", progress_bar=False, quiet=True)
    tr.start_task(0)
    for step in range(steps):
        tr.train_step(tr.batch_positions(step), step)
    return tr


def test_text_features_in_chunks_equal_one_call(tmp_path):
    tr = _trained(tmp_path, steps=0)
    tokens = class_tokens(tr.bundle.tokenizer, list(tr.scenario.classnames), ("a photo of a {}.", "art of the {}."))
    with torch.no_grad():
        torch.testing.assert_close(text_features(tr.bundle.model, tokens, chunk=3),
                                   text_features(tr.bundle.model, tokens, chunk=10_000), atol=1e-6, rtol=1e-5)


def test_lock_image_trains_the_text_tower_only(tmp_path):
    fresh = _trained(tmp_path / "a", "model.lock_text=false", "model.lock_image=true", steps=0)
    before = {k: v.clone() for k, v in fresh.bundle.model.state_dict().items()}
    tr = _trained(tmp_path / "b", "model.lock_text=false", "model.lock_image=true")
    after = tr.bundle.model.state_dict()
    visual = [k for k in after if k.startswith("visual.") and after[k].is_floating_point()]
    text = [k for k in after if k.startswith(("transformer.", "token_embedding", "text_projection"))]
    assert visual and all(torch.equal(after[k], before[k]) for k in visual if "running" not in k)
    assert any(not torch.equal(after[k], before[k]) for k in text)


def test_channels_last_is_the_same_training_in_another_memory_layout(tmp_path):
    plain = _trained(tmp_path / "a")
    cl = _trained(tmp_path / "b", "model.channels_last=true")
    x = cl.bundle.prepare_images(cl.scenario[0].train.load([0, 1]))
    assert x.is_contiguous(memory_format=torch.channels_last)
    convs = [m.weight for m in cl.bundle.model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert_same_training(cl.bundle.model.state_dict(), plain.bundle.model.state_dict())
