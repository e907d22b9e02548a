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
    # Another layout sums every convolution in another order: on this project's CPU (AMD EPYC, oneDNN) 0.26% of
    # the weights end more than 1e-4 apart after AdamW (0.1% on others); a wrong computation moves most of them.
    assert_same_training(cl.bundle.model.state_dict(), plain.bundle.model.state_dict(), share_limit=1e-2)


def _counting_encode_text(monkeypatch) -> list[int]:
    """Rows of class texts encoded by open_clip's encode_text, call by call."""
    from open_clip.model import CLIP

    calls: list[int] = []
    original = CLIP.encode_text

    def counted(self, text, normalize=False):
        calls.append(len(text))
        return original(self, text, normalize=normalize)

    monkeypatch.setattr(CLIP, "encode_text", counted)
    return calls


def test_a_frozen_text_tower_is_encoded_once_per_task_with_the_same_training(tmp_path, monkeypatch):
    """model.lock_text: the class texts are encoded once when the task starts, not at every step, and the
    training is the one that encodes them at every step (the cache disabled)."""
    from clipcl.methods import Method

    for method in ("er", "gdro", "lwf"):
        calls = _counting_encode_text(monkeypatch)
        cached = _trained(tmp_path / f"{method}-cached", f"method.name={method}", steps=4)
        assert calls == [len(cached.scenario.classnames)], (method, calls)  # one call over every class
        with monkeypatch.context() as m:
            m.setattr(Method, "frozen_text", lambda self, model, device: None)
            every_step = _trained(tmp_path / f"{method}-plain", f"method.name={method}", steps=4)
        assert len(calls) > 4  # the plain path encodes at every step
        assert_same_training(cached.bundle.model.state_dict(), every_step.bundle.model.state_dict())


def test_a_training_text_tower_is_encoded_at_every_step(tmp_path, monkeypatch):
    calls = _counting_encode_text(monkeypatch)
    tr = _trained(tmp_path, "model.lock_text=false", steps=3)
    assert len(calls) == 3
    assert tr.method.frozen_text(tr.model, tr.device) is None


def _counting_encode_image(monkeypatch) -> list[int]:
    from open_clip.model import CLIP

    calls: list[int] = []
    original = CLIP.encode_image

    def counted(self, image, normalize=False):
        calls.append(len(image))
        return original(self, image, normalize=normalize)

    monkeypatch.setattr(CLIP, "encode_image", counted)
    return calls


def _run(tmp_path: Path, *overrides: str) -> dict:
    cfg = load_config("fmnist-cil", [*TINY, "scenario.n_tasks=3", *overrides])
    return Trainer(cfg, tmp_path, progress_bar=False, quiet=True).run()


def test_evaluation_encodes_each_test_image_once_while_the_image_tower_is_unchanged(tmp_path, monkeypatch):
    """model.lock_image on a ViT (no BatchNorm): the image tower never changes, so each task's test images are
    encoded once in the whole run, and the accuracies are those of encoding them every time."""
    from clipcl import evaluate

    args = ("model.name=clipcl-tiny-vit", "model.lock_text=false", "model.lock_image=true", "eval.batch_size=7")
    calls = _counting_encode_image(monkeypatch)
    cached = _run(tmp_path / "cached", *args)
    test_images = 3 * 2 * 10  # 3 tasks of 2 classes x 10 test images
    eval_calls = [n for n in calls if n <= 7]  # evaluation batches are of 7; training batches of 16 (+16)
    assert sum(eval_calls) == test_images
    with monkeypatch.context() as m:
        m.setattr(evaluate, "eval_image_features", evaluate.image_features)
        plain = _run(tmp_path / "plain", *args)
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    assert cached["accuracy_before_training"] == plain["accuracy_before_training"]


def test_evaluation_encodes_again_when_batchnorm_statistics_change(tmp_path, monkeypatch):
    """model.lock_image on the ResNet: its BatchNorm statistics still move in training, so every row encodes
    the test images again; the matrix equals the uncached one."""
    from clipcl import evaluate

    args = ("model.lock_text=false", "model.lock_image=true")
    cached = _run(tmp_path / "cached", *args)
    with monkeypatch.context() as m:
        m.setattr(evaluate, "eval_image_features", evaluate.image_features)
        plain = _run(tmp_path / "plain", *args)
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    tr = Trainer(load_config("fmnist-cil", [*TINY, *args]), tmp_path / "x", progress_bar=False, quiet=True)
    before = evaluate.image_tower_state(tr.bundle.model)
    tr.start_task(0)
    tr.train_step(tr.batch_positions(0), 0)
    assert evaluate.image_tower_state(tr.bundle.model) != before


def test_evaluation_cache_is_dropped_by_a_fused_optimizer_step(tmp_path, monkeypatch):
    """Fused AdamW (the CUDA path) updates weights without bumping their version counters: the engine drops
    evaluation's features after each step of a training image tower, so R is that of encoding every time."""
    from clipcl import evaluate

    def fused(self):
        params = [p for p in self.bundle.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.optim.lr, fused=True)

    monkeypatch.setattr(Trainer, "_start_optimizer", fused)
    vit = "model.name=clipcl-tiny-vit"  # no BatchNorm: no buffer's version moves in training either
    cached = _run(tmp_path / "cached", vit)
    with monkeypatch.context() as m:
        m.setattr(evaluate, "eval_image_features", evaluate.image_features)
        plain = _run(tmp_path / "plain", vit)
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    assert cached["accuracy_before_training"] == plain["accuracy_before_training"]
