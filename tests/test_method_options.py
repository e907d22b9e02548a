"""The method options of the second gdro round, each against the exact quantity it computes:
method.t2i_eps (FastCLIP's eps in the prompts form's text -> image term), method.class_presence (weights
unbiased for classes absent from a batch), method.sampling=uniform for gcl/gdro (old and new data alike),
method.dro_signal=probe | oracle (class losses from held-out images) and method.replay_share (ER's memory
weighted by class balancing's share)."""
from __future__ import annotations

import math
from math import comb
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcl import checkpoint
from clipcl.config import ConfigError, MethodCfg, RunCfg, apply_overrides, load_config
from clipcl.engine import Trainer
from clipcl.losses import ClassDRO, PromptContrastiveLoss, clip_loss, weighted_clip_loss
from clipcl.methods import ER, GDRO, class_presence
from clipcl.sampling import concat_positions, uniform_positions
from cli_checks import assert_same_run

TINY = ["scenario.train_per_class=30", "scenario.test_per_class=10", "scenario.n_tasks=2", "optim.epochs=1",
        "optim.batch_size=16", "optim.warmup_steps=1", "memory.per_class=2", "eval.batch_size=64"]


def trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config("fmnist-cil", [*TINY, *overrides])
    return Trainer(cfg, tmp_path / "run", progress_bar=False, quiet=True)


def second_task(tr: Trainer) -> Trainer:
    """The trainer at the start of task 1, its memory filled from task 0 (untrained: random selection needs no
    training)."""
    tr.start_task(0)
    tr.method.after_task(tr.ctx)
    tr.progress.task = 1
    tr.start_task(1)
    return tr


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        apply_overrides(RunCfg(), list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------- 1. method.t2i_eps
def _prompt_data(seed=0, B=9, K=3, D=5):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    prompts = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    return z, prompts, torch.arange(B) % K


def _exact_loss(z, prompts, labels, scale, weights, eps, n):
    """mean_i (L1_i + L2_i) / 2, L2_i = log(eps + sum_j w_j exp(a_jc - a_ic) / sum_j w_j) + log n, written out."""
    a = scale * z @ prompts.t()
    total = []
    for i in range(len(labels)):
        c = int(labels[i])
        neg = [j for j in range(len(labels)) if int(labels[j]) != c]
        w = weights[neg] / weights[neg].sum()
        mean = (w * torch.exp(a[neg, c] - a[i, c])).sum()
        total.append((torch.logsumexp(a[i], 0) - a[i, c] + torch.log(eps + mean) + math.log(n)) / 2)
    return torch.stack(total)


def test_t2i_eps_value_by_hand():
    """Two classes, three samples, weights 1: every term written with floats."""
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels, scale, n = torch.tensor([0, 1, 1]), 2.0, 3.0
    a = [[2.0, 0.0], [1.2, 1.6], [0.0, 2.0]]  # scale * z . t
    # class 0's negatives: samples 1, 2 (a_j0 = 1.2, 0); class 1's: sample 0 (a_01 = 0)
    m = {0: (math.exp(1.2) + math.exp(0.0)) / 2, 1: math.exp(0.0)}
    for eps in (1e-14, 1 / n, 0.0):
        out = PromptContrastiveLoss(2, gamma=1.0, eps=eps)(z, prompts, labels, scale, torch.ones(3), n_ref=n)
        e = eps or 1 / n
        want = [math.log(e + m[c] * math.exp(-a[i][c])) + math.log(n) for i, c in enumerate([0, 1, 1])]
        assert out["t2i"].tolist() == pytest.approx(want, rel=1e-12)
        i2t = [math.log(sum(math.exp(x) for x in a[i])) - a[i][c] for i, c in enumerate([0, 1, 1])]
        assert out["loss"].tolist() == pytest.approx([(x + y) / 2 for x, y in zip(i2t, want)], rel=1e-12)
    # eps = 1/n is today's log(1 + n exp(-a_ic) m_c); FastCLIP's 1e-14 differs from it
    today = [math.log1p(n * m[c] * math.exp(-a[i][c])) for i, c in enumerate([0, 1, 1])]
    out = PromptContrastiveLoss(2, gamma=1.0)(z, prompts, labels, scale, torch.ones(3), n_ref=n)
    assert out["t2i"].tolist() == pytest.approx(today, rel=1e-12)
    fast = PromptContrastiveLoss(2, gamma=1.0, eps=1e-14)(z, prompts, labels, scale, torch.ones(3), n_ref=n)
    assert (fast["t2i"] < out["t2i"] - 0.1).all()


@pytest.mark.parametrize("eps", [1e-14, "1/n"])
def test_t2i_eps_surrogate_has_the_gradient_of_the_exact_loss(eps):
    """gamma = 1 and the batch all of the data: the estimator is exact, and so is the surrogate's gradient
    (model and logit scale) and the value."""
    z, prompts, labels = _prompt_data()
    n = 8.0
    eps = 1 / n if eps == "1/n" else eps
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(0.5, 2.0, len(labels), dtype=torch.float64)
    out = PromptContrastiveLoss(3, gamma=1.0, eps=eps)(z, prompts, labels, scale, weights, n_ref=n)
    exact = _exact_loss(z, prompts, labels, scale, weights, eps, n)
    torch.testing.assert_close(out["loss"], exact.detach(), rtol=0, atol=1e-12)
    got = torch.autograd.grad(out["surrogate"].mean(), (z, prompts, scale))
    want = torch.autograd.grad(exact.mean(), (z, prompts, scale))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    # and the surrogate is not that of the other eps: the factor sigma differs
    other = PromptContrastiveLoss(3, gamma=1.0, eps=1e-14 if eps != 1e-14 else 1 / n)
    g_other = torch.autograd.grad(other(z, prompts, labels, scale, weights, n_ref=n)["surrogate"].mean(), z)[0]
    assert (g_other - got[0]).abs().max() > 1e-3


def test_t2i_eps_config():
    assert MethodCfg().t2i_eps == 0.0
    assert "method.t2i_eps" in config_error("method.t2i_eps=-1")
    assert "pairs form" in config_error("method.name=gdro", "method.t2i_eps=1e-14", "method.gcl_form=pairs")
    tr_cfg = apply_overrides(RunCfg(), ["method.name=gcl", "method.t2i_eps=1e-14"])
    from clipcl.methods import GCL
    assert GCL(tr_cfg.method).pgcl.eps == 1e-14


# ---------------------------------------------------------------------- 2. method.class_presence
# 4 classes: the new data holds 3 of class 1 and 9 of class 2 (N = 12), the memory 1 of class 0, 2 of class 3
NEW = np.array([1] * 3 + [2] * 9)
MEM = np.array([0] + [3] * 2)


def test_class_presence_by_hand():
    # concat, B = 4 > |M| = 3: new part hypergeometric, memory with replacement
    pi = class_presence("concat", 4, NEW, MEM, 4)
    want = [1 - (2 / 3) ** 4, 1 - comb(9, 4) / comb(12, 4), 1.0, 1 - (1 / 3) ** 4]
    assert pi.tolist() == pytest.approx(want, rel=1e-12)
    # concat, B = 2 <= |M|: both parts hypergeometric
    pi = class_presence("concat", 2, NEW, MEM, 4)
    want = [1 - comb(2, 2) / comb(3, 2), 1 - comb(9, 2) / comb(12, 2), 1 - comb(3, 2) / comb(12, 2), 1.0]
    assert pi.tolist() == pytest.approx(want, rel=1e-12)
    # uniform, B = 3 of the 15 samples
    pi = class_presence("uniform", 3, NEW, MEM, 4)
    counts = [1, 3, 9, 2]
    assert pi.tolist() == pytest.approx([1 - comb(15 - k, 3) / comb(15, 3) for k in counts], rel=1e-12)
    # no memory, and a class of the stage with no sample: never present
    assert class_presence("concat", 4, NEW, None, 4).tolist() == pytest.approx([0, 1 - comb(9, 4) / comb(12, 4), 1, 0])


def _present(sampler, B, steps, labels, n_new, n_mem):
    """The fraction of the real sampler's steps whose batch holds each class, and each step's positions."""
    batches = [sampler(7, 1, s, B, n_new, n_mem) for s in range(steps)]
    hits = np.array([np.bincount(labels[b], minlength=4) > 0 for b in batches])
    return hits.mean(0), batches


@pytest.mark.parametrize("sampling,B", [("concat", 4), ("concat", 2), ("uniform", 3)])
def test_class_presence_matches_the_real_sampler(sampling, B):
    """B divides the epoch (12 new samples, or 15 for uniform): no batch straddles two epochs, pi is exact."""
    labels = np.concatenate([NEW, MEM])
    sampler = concat_positions if sampling == "concat" else uniform_positions
    steps = 4000
    freq, _ = _present(sampler, B, steps, labels, len(NEW), len(MEM))
    pi = class_presence(sampling, B, NEW, MEM, 4).numpy()
    se = np.sqrt(pi * (1 - pi) / steps)
    assert np.all(np.abs(freq - pi) <= 5 * se + 1e-12), (freq, pi)
    assert np.any((pi > 0.01) & (pi < 0.99))  # a case where classes are often absent


def test_corrected_weights_are_unbiased_for_absent_classes_and_batch_weights_are_not():
    """Fixed per-sample losses, fixed p: the mean over the real sampler's batches of sum_i w_i L_i is
    sum_c p_c Lbar_c with class_presence=corrected, and far from it with the batch weights."""
    labels = np.concatenate([NEW, MEM])
    losses = torch.tensor([0.5, 1.0, 1.5] + [0.1 * k for k in range(9)] + [8.0] + [2.0, 4.0], dtype=torch.float64)
    p = torch.tensor([0.4, 0.2, 0.1, 0.3], dtype=torch.float64)
    lbar = torch.tensor([8.0, 1.0, 0.4, 3.0], dtype=torch.float64)  # the class means over D_t U M
    target = float((p * lbar).sum())
    B, steps = 2, 3000
    _, batches = _present(concat_positions, B, steps, labels, len(NEW), len(MEM))
    pi = class_presence("concat", B, NEW, MEM, 4)
    dro = ClassDRO(4)
    sums = {"batch": [], "corrected": []}
    for b in batches:
        y, loss = torch.as_tensor(labels[b]), losses[torch.as_tensor(b)]
        sums["batch"].append(float((dro.sample_weights(y, p) * loss).sum()))
        sums["corrected"].append(float((dro.sample_weights(y, p, pi) * loss).sum()))
    corrected, batch = np.asarray(sums["corrected"]), np.asarray(sums["batch"])
    se = corrected.std() / np.sqrt(steps)
    assert abs(corrected.mean() - target) < 5 * se
    assert abs(batch.mean() - target) > 6 * se  # class 0 (the highest loss) is absent a third of the time


def test_gdro_corrected_weights_in_training(tmp_path):
    """The engine's task 1: 60 new images (30 each of classes 2, 3), a memory of 2 images of classes 0, 1 (|M| =
    4 < B = 16: drawn with replacement); pi by hand, and the weights of a real batch p_y / (pi_y n_B(y))."""
    tr = second_task(trainer(tmp_path, "method.name=gdro", "method.class_presence=corrected"))
    pi = tr.method.presence
    want = [1 - 0.5 ** 16] * 2 + [1 - comb(30, 16) / comb(60, 16)] * 2
    assert pi.tolist() == pytest.approx(want, rel=1e-12)
    seen = {}
    real = tr.method.sample_weights

    def record(batch, out):
        seen["w"], seen["labels"] = real(batch, out), batch.labels
        seen["p"] = tr.method.dro.class_weights()
        return seen["w"]

    tr.method.sample_weights = record
    tr.train_step(tr.batch_positions(0), 0)
    labels, p = seen["labels"], seen["p"]
    n_b = torch.bincount(labels, minlength=4).to(torch.float64)
    torch.testing.assert_close(seen["w"], p[labels] / (pi[labels] * n_b[labels]))
    assert MethodCfg().class_presence == "batch"
    assert "batch, corrected" in config_error("method.class_presence=unbiased")


# ---------------------------------------------------------------------- 3. method.sampling=uniform for gcl/gdro
@pytest.mark.parametrize("batch", [16, 12])
def test_uniform_sampling_treats_old_and_new_samples_alike(batch, tmp_path):
    """Each epoch of a uniform task is one permutation of D_t U M: its memory share is |M| / (|D_t| + |M|)
    exactly (4 of 64), and gdro's negative weights then count the batch as the stage does."""
    tr = second_task(trainer(tmp_path, "method.name=gdro", "method.sampling=uniform", f"optim.batch_size={batch}"))
    ctx = tr.ctx
    n, m = ctx.new_size, ctx.data_size - ctx.new_size
    assert (n, m) == (60, 4) and ctx.steps == math.ceil((n + m) / batch)  # an epoch counts the memory too
    drawn = np.concatenate([tr.batch_positions(s) for s in range(ctx.steps)])[: n + m]
    assert sorted(drawn.tolist()) == list(range(n + m))
    assert (drawn >= n).sum() / len(drawn) == m / (n + m)
    for step in range(ctx.steps):
        positions = tr.batch_positions(step)
        index = torch.as_tensor(positions)
        w = tr.method.negative_weights(index)
        mem = index >= n
        if mem.any():
            # (negative_weights rounds its two ratios to float32 before widening them: 1e-7)
            assert float(w[mem].sum() / w.sum()) == pytest.approx(m / (n + m), rel=1e-6)
        logged = tr.train_step(positions, step)
        assert logged is not None and math.isfinite(logged["gcl_loss"])


# ---------------------------------------------------------------------- 4. method.dro_signal=probe | oracle
@torch.no_grad()
def held_out_ce(tr: Trainer, images, labels) -> torch.Tensor:
    """The image -> text cross-entropy over the seen class prompts, by hand: eval mode, prepared images."""
    model = tr.bundle.model
    model.eval()
    z = F.normalize(model.encode_image(tr.bundle.prepare_images(images)).float(), dim=-1)
    t = F.normalize(model.encode_text(tr.tokens[: tr.ctx.n_seen]).float(), dim=-1)
    a = model.logit_scale.exp().clamp(max=100) * z @ t.t()
    model.train()
    return torch.logsumexp(a, 1) - a[torch.arange(len(labels)), torch.as_tensor(labels)]


def class_means(labels, values, n):
    labels = torch.as_tensor(labels)
    return torch.stack([values[labels == c].double().mean() for c in range(n)])


def test_probe_images_are_held_out_of_training_and_give_the_old_classes_losses(tmp_path):
    tr = second_task(trainer(tmp_path, "method.name=gdro", "method.dro_signal=probe", "memory.per_class=3",
                             "method.signal_every=2", "method.beta=0.25"))
    method, memory = tr.method, tr.memory.as_imageset()
    probe = method.held_out
    # the last image of each old class is the probe; training sees the other two of each, never the probe
    assert probe.targets.tolist() == [0, 1] and tr.mem.targets.tolist() == [0, 0, 1, 1]
    all_images = memory.load(np.arange(6))
    torch.testing.assert_close(probe.load(np.arange(2)), all_images[[2, 5]], rtol=0, atol=0)
    torch.testing.assert_close(tr.mem.load(np.arange(4)), all_images[[0, 1, 3, 4]], rtol=0, atol=0)
    assert method.from_batch.tolist() == [False, False, True, True]
    assert tr.ctx.data_size == 64 and tr.ctx.steps == 4
    beta, v_old = 0.25, None
    buffers = {k: b.clone() for k, b in tr.bundle.model.named_buffers()}
    for step in range(tr.ctx.steps):
        want = held_out_ce(tr, probe.load(np.arange(2)), probe.targets).double()  # the weights before the step
        positions = tr.batch_positions(step)
        tr.train_step(positions, step)
        v = method.dro.v
        if step == 0:
            v_old = want
            for k, b in tr.bundle.model.named_buffers():  # the probe's forward left BatchNorm's statistics alone
                if k.endswith("num_batches_tracked"):
                    assert int(b) == int(buffers[k]) + 1
        elif step % 2 == 0:
            v_old = (1 - beta) * v_old + beta * want
        torch.testing.assert_close(v[:2], v_old, rtol=1e-5, atol=1e-5)
        assert tr.bundle.model.training
    assert not torch.allclose(method.dro.v[:2], method.train_signal.v[:2], atol=1e-2)  # held-out vs memory losses
    row = method.telemetry[-1]
    assert set(row) == {"task", "step", "weights", "losses", "train_losses"}
    assert row["losses"] == pytest.approx(method.dro.v.tolist(), abs=1e-6)
    assert row["train_losses"] == pytest.approx(method.train_signal.v.tolist(), abs=1e-6)
    assert row["losses"][2:] == row["train_losses"][2:]  # the new classes read their training batches


def test_oracle_reads_the_validation_split_of_every_seen_task(tmp_path):
    tr = second_task(trainer(tmp_path, "method.name=gdro", "method.dro_signal=oracle", "scenario.val_per_class=3"))
    method = tr.method
    val = method.held_out
    assert len(val) == 12 and sorted(set(val.targets.tolist())) == [0, 1, 2, 3]
    assert method.from_batch.tolist() == [False] * 4 and tr.ctx.data_size == tr.ctx.new_size + 4  # all trained on
    want = class_means(val.targets, held_out_ce(tr, val.load(np.arange(len(val))), val.targets), 4)
    tr.train_step(tr.batch_positions(0), 0)
    torch.testing.assert_close(method.dro.v, want, rtol=1e-5, atol=1e-5)
    assert "not a method" in method.results()["diagnostic"]


def test_probe_and_oracle_config_errors():
    assert (MethodCfg().probe_per_class, MethodCfg().signal_every) == (1, 10)
    msg = config_error("method.name=gdro", "method.dro_signal=probe", "memory.per_class=1")
    assert "memory.per_class" in msg and "no image to spare" in msg
    msg = config_error("method.name=gdro", "method.dro_signal=probe", "memory.per_class=2",
                       "method.probe_per_class=2")
    assert "'memory.per_class' = 2" in msg and "at least 3" in msg
    assert "memory.total" in config_error("method.name=gdro", "method.dro_signal=probe", "memory.total=20")
    assert "val_per_class" in config_error("method.name=gdro", "method.dro_signal=oracle")
    assert "gcl_form=prompts" in config_error("method.name=gdro", "method.dro_signal=probe", "method.gcl_form=pairs")
    assert "method.probe_per_class" in config_error("method.probe_per_class=0")
    assert "method.signal_every" in config_error("method.signal_every=0")
    assert "probe, oracle" in config_error("method.dro_signal=heldout")


@pytest.mark.parametrize("extra", [["method.dro_signal=probe", "memory.per_class=3", "method.class_presence=corrected",
                                    "method.t2i_eps=1e-14"],
                                   ["method.dro_signal=oracle", "scenario.val_per_class=2"]])
def test_held_out_signals_resume_bit_exactly(extra, tmp_path, monkeypatch):
    """A run stopped after its checkpoint at task 1 step 1 and resumed ends bit for bit as the uninterrupted one."""
    args = ["method.name=gdro", "checkpoint_every=1", "method.signal_every=2", *extra]
    ref = trainer(tmp_path / "ref", *args)
    ref.run()
    real_save = Trainer.save_checkpoint

    def save_and_stop(self):
        seconds = real_save(self)
        if (self.progress.task, self.progress.step) == (1, 1):
            raise KeyboardInterrupt
        return seconds

    monkeypatch.setattr(Trainer, "save_checkpoint", save_and_stop)
    stopped = trainer(tmp_path / "stopped", *args)
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    state = checkpoint.load(stopped.out_dir / checkpoint.CHECKPOINT_NAME)
    assert (state["progress"]["task"], state["progress"]["step"]) == (1, 1)
    Trainer(stopped.cfg, stopped.out_dir, progress_bar=False, quiet=True).run(resume=True)
    assert_same_run(stopped.out_dir, ref.out_dir)
    assert "losses" in ref.method.telemetry[-1]


# ---------------------------------------------------------------------- 5. method.replay_share
def _clip_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([2, 3, 2, 2, 3, 0, 1, 1])  # 5 new samples (classes 2, 3), 3 memory ones (classes 0, 1)
    index = torch.tensor([4, 9, 0, 7, 11, 60, 61, 62])  # new_size = 60: positions >= 60 are the memory
    classes, inv = torch.unique(labels, return_inverse=True)
    z = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(len(classes), 6, generator=g, dtype=torch.float64), dim=1)
    return z, text, inv, labels, index


def _er(share: str) -> ER:
    method = ER(MethodCfg(name="er", replay_share=share))
    method.ctx = SimpleNamespace(new_size=60, n_old=2, n_seen=6)  # 2 old classes of 6 seen
    return method


def _forward(method, z, text, inv, labels, index, scale):
    method.forward_batch = lambda model, images, labels: (z, text, inv, None, scale)
    return method.training_forward(None, None, labels, index, 0)["contrastive_loss"]


def test_replay_share_classes_by_hand():
    z, text, inv, labels, index = _clip_batch()
    scale = 5.0
    got = float(_forward(_er("classes"), z, text, inv, labels, index, scale))
    s_mem, s_new = 2 / 6, 4 / 6
    logits = [[scale * float(z[i] @ text[u]) for u in range(4)] for i in range(8)]
    mem = [bool(i >= 60) for i in index.tolist()]
    ce = [math.log(sum(math.exp(x) for x in logits[i])) - logits[i][inv[i]] for i in range(8)]
    i2t = (s_mem / 3 * sum(ce[i] for i in range(8) if mem[i]) + s_new / 5 * sum(ce[i] for i in range(8) if not mem[i]))
    t2i = 0.0
    for u in range(4):  # classes 0, 1 (rows 0, 1) in memory, 2, 3 new: each part's classes share its share
        lse = math.log(sum(math.exp(logits[j][u]) for j in range(8)))
        own = [logits[j][u] - lse for j in range(8) if inv[j] == u]
        t2i += (s_mem / 2 if u < 2 else s_new / 2) * -sum(own) / len(own)
    assert got == pytest.approx((i2t + t2i) / 2, rel=1e-12)
    assert got != pytest.approx(float(clip_loss(z, text, inv, scale)), rel=1e-3)  # not the plain loss


def test_replay_share_batch_is_the_plain_clip_loss_bit_for_bit():
    z, text, inv, labels, index = _clip_batch()
    assert torch.equal(_forward(_er("batch"), z, text, inv, labels, index, 5.0), clip_loss(z, text, inv, 5.0))
    # a batch of new samples only: the plain loss under replay_share=classes too
    new = index < 60
    classes, inv_new = torch.unique(labels[new], return_inverse=True)
    got = _forward(_er("classes"), z[new], text[2:], inv_new, labels[new], index[new], 5.0)
    assert torch.equal(got, clip_loss(z[new], text[2:], inv_new, 5.0))
    # weighted_clip_loss at clip_loss's weights is clip_loss
    n_u = torch.bincount(inv).double()
    w = weighted_clip_loss(z, text, inv, 5.0, torch.full((8,), 1 / 8, dtype=torch.float64), 1 / (4 * n_u[inv]))
    assert float(w) == pytest.approx(float(clip_loss(z, text, inv, 5.0)), rel=1e-12)


def test_replay_share_config():
    assert MethodCfg().replay_share == "batch"
    assert "batch, classes" in config_error("method.replay_share=old")
    assert "domain-incremental" in config_error("method.replay_share=classes", "scenario.kind=dil")


@pytest.mark.parametrize("option, method", [("method.t2i_eps=1e-14", "er"), ("method.class_presence=corrected", "gcl"),
                                            ("method.dro_signal=oracle", "er"), ("method.dro_signal=probe", "derpp"),
                                            ("method.replay_share=classes", "gdro")])
def test_an_option_of_another_method_is_refused_not_ignored(option, method):
    msg = config_error(f"method.name={method}", option, "scenario.val_per_class=2", "memory.per_class=3")
    assert f"'{option.split('=')[0]}'" in msg and f"method.name={method}" in msg


def test_corrected_presence_is_refused_where_it_is_not_exact():
    msg = config_error("method.name=gdro", "method.class_presence=corrected", "scenario.kind=dil",
                       "scenario.dataset=fmnist_dil")
    assert "sampling=uniform" in msg
    apply_overrides(RunCfg(), ["method.name=gdro", "method.class_presence=corrected", "scenario.kind=dil",
                               "scenario.dataset=fmnist_dil", "method.sampling=uniform"])  # exact there: accepted


def test_every_method_reads_exactly_the_options_config_lists_for_it():
    """config.METHOD_READS (what a torch-free sweep validates and pins with) is each class's `reads`, and a
    method's code reads no method option outside it."""
    import inspect
    import re

    from clipcl import config, methods

    for name, cls in methods.METHODS.items():
        if name == "headonly":  # the tests' own method
            continue
        assert config.METHOD_READS[name] == tuple(cls.reads), name
        used = set(re.findall(r"cfg\.([a-z0-9_]+)", inspect.getsource(cls))) - {"name"}  # its own code
        assert used <= set(cls.reads), f"{name} reads {sorted(used - set(cls.reads))} without declaring them"


def test_an_option_the_method_ignores_is_refused_naming_who_reads_it():
    from clipcl.config import ConfigError, apply_overrides, load_config

    with pytest.raises(ConfigError, match=r"method.lam.*not an option of method.name=er.*gdro reads it"):
        apply_overrides(load_config("fmnist-cil"), ["method.name=er", "method.lam=2"])
    cfg = apply_overrides(load_config("fmnist-cil"), ["method.name=gdro", "method.lam=2"])
    assert cfg.method.lam == 2
