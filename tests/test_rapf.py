"""RAPF (methods/rapf.py) against the quantities it is defined by: the fusion formula, the stored class
statistics (hand-computed means and covariances of the frozen features), the hard pairs (brute force over the
text embeddings), and a backbone that never moves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcl.config import ConfigError, apply_overrides, load_config
from clipcl.engine import Trainer
from clipcl.methods.rapf import RIDGE, fuse

TINY = ["model.name=clipcl-tiny-vit", "scenario.train_per_class=16", "scenario.test_per_class=8",
        "scenario.n_tasks=2", "optim.epochs=1", "optim.batch_size=16", "optim.warmup_steps=0", "optim.lr=0.001",
        "eval.batch_size=64", "method.name=rapf", "scenario.augment=none", "method.rapf_threshold=2.0"]


def test_fusion_is_the_masked_mix_in_the_old_left_singular_basis():
    g = torch.Generator().manual_seed(0)
    w_old, w_new = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    u = torch.linalg.svd(w_old.double())[0]
    d = (u.T @ (w_new - w_old).double()).abs()
    m = torch.clamp(d / d.max() + 0.6, max=1.0)
    want = w_old.double() + u @ (m * (u.T @ (w_new - w_old).double()))  # W_old + U (M * U^T (W_new - W_old))
    torch.testing.assert_close(fuse(w_old, w_new, 0.6).double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fuse(w_old, w_new, 1.0), w_new, atol=1e-5, rtol=1e-5)  # mask 1: all new
    assert not torch.allclose(fuse(w_old, w_new, 0.0), w_new, atol=1e-3)  # a floor below 1 pulls entries back


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = apply_overrides(load_config("fmnist-cil"), TINY)
    trainer = Trainer(cfg, tmp_path_factory.mktemp("rapf") / "run", quiet=True, progress_bar=False)
    before = {k: v.clone() for k, v in trainer.bundle.model.state_dict().items()}
    results = trainer.run()
    return trainer, before, results


def test_only_the_adapter_trains_and_no_image_is_kept(trained):
    trainer, before, results = trained
    after = trainer.bundle.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    d = trainer.bundle.dim
    assert results["model"]["trainable_parameters"] == d * d
    assert results["memory"]["images"] == 0
    n_seen = trainer.scenario.n_seen(len(trainer.scenario) - 1)
    # the bytes kept: a mean and a covariance per class of the stream (float32), the adapter, the has flags
    assert results["memory"]["method_state_bytes"] == 4 * (n_seen * (d + d * d)) + n_seen + 4 * d * d


def test_class_statistics_are_the_mean_and_covariance_of_the_frozen_features(trained):
    trainer, _, _ = trained
    method, bundle = trainer.method, trainer.bundle
    for t in range(len(trainer.scenario)):
        data = trainer.scenario[t].train
        labels = np.asarray(data.targets)
        with torch.no_grad():
            bundle.model.eval()
            x = bundle.model.encode_image(bundle.prepare_images(bundle.input_images(data.load(np.arange(len(data))))))
        for c in np.unique(labels):
            xc = x[torch.as_tensor(labels == c)].double()
            mean = xc.mean(0)
            cov = (xc - mean).T @ (xc - mean) / (len(xc) - 1) + RIDGE * torch.eye(x.shape[1], dtype=torch.float64)
            torch.testing.assert_close(method.means[c].double(), mean, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(method.covs[c].double(), cov, atol=1e-4, rtol=1e-4)
    assert bool(method.has.all())


def test_hard_pairs_are_the_old_new_pairs_closer_than_the_threshold(trained):
    trainer, _, _ = trained
    method = trainer.method
    text = method.class_text(torch.device("cpu"))
    n_old, n_seen = trainer.scenario.n_seen(0), trainer.scenario.n_seen(1)
    for threshold in (0.3, 0.6, 2.0):
        method.cfg = method.cfg.__class__(**{**vars(method.cfg), "rapf_threshold": threshold})
        trainer.enter_task(1)
        want = {(k, j) for k in range(n_old) for j in range(n_old, n_seen)
                if float((text[k] - text[j]).norm()) < threshold}
        assert {tuple(p) for p in method.pairs.tolist()} == want
    assert len(want) == n_old * (n_seen - n_old)  # threshold 2: every pair of unit vectors


def test_the_adapter_is_what_evaluation_scores(trained):
    trainer, _, _ = trained
    method = trainer.method
    z = F.normalize(torch.randn(5, trainer.bundle.dim), dim=-1)
    scores = method.classifier()(z, torch.zeros(4, trainer.bundle.dim))
    want = F.normalize(z @ method.adapter.weight.detach().T, dim=-1) @ method.class_text(z.device)[:4].T
    torch.testing.assert_close(scores, want)


def test_rapf_options_are_checked_and_its_own():
    base = load_config("fmnist-cil")
    with pytest.raises(ConfigError, match="method.rapf_mix_bias"):
        apply_overrides(base, ["method.name=rapf", "method.rapf_mix_bias=1.5"])
    with pytest.raises(ConfigError, match="not an option of method.name=er"):
        apply_overrides(base, ["method.name=er", "method.rapf_margin=0.2"])
    with pytest.raises(ConfigError, match="model.lora_rank"):
        apply_overrides(base, ["method.name=rapf", "model.lora_rank=4"])
