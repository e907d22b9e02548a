"""Every piece of checkpointed state survives state_dict -> torch.save -> torch.load -> load_state_dict exactly,
and the restored object behaves identically on the next batch (the premise of bit-exact resumes)."""
import io
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcl.config import MethodCfg
from clipcl.data.images import ImageSet
from clipcl.losses import ClassDRO, GlobalContrastiveLoss
from clipcl.memory import ReplayMemory
from clipcl.methods import GDRO, Batch


def through_file(state):
    """What a checkpoint does to a state: serialise it and read it back."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def assert_same_tree(a, b, path="state"):
    """Nested dicts/lists/tensors equal bit for bit (tensors: same dtype, shape and values)."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def images(n_classes, per_class, seed, classes_offset=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_classes * per_class, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = np.repeat(np.arange(n_classes) + classes_offset, per_class)
    return ImageSet.from_tensor(x, y)


def random_batch(g, n_samples, n_classes, B=12, D=16):
    labels = torch.randint(0, n_classes, (B,), generator=g)
    classes, inv = torch.unique(labels, return_inverse=True)
    z = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(len(classes), D, generator=g), dim=-1)
    index = torch.randint(0, n_samples, (B,), generator=g)
    return z, text, inv, labels, index


@pytest.mark.parametrize("per_class, total, codec", [(3, 0, "raw"), (0, 10, "raw"), (3, 0, "png")])
def test_replay_memory_round_trips_and_continues_identically(per_class, total, codec):
    mem = ReplayMemory(per_class, total, codec=codec)
    mem.update(0, images(2, 7, seed=1), torch.Generator().manual_seed(0))
    mem.update(1, images(3, 7, seed=2, classes_offset=2), torch.Generator().manual_seed(1))
    copy = ReplayMemory(0, 0)
    copy.load_state_dict(through_file(mem.state_dict()))
    assert copy.per_class == per_class and copy.total == total
    assert list(copy.groups) == list(mem.groups)
    assert all(torch.equal(x, y) for k in mem.groups for x, y in zip(copy.groups[k], mem.groups[k]))
    assert copy.codec == codec and copy.nbytes == mem.nbytes
    a, b = mem.as_imageset(), copy.as_imageset()
    assert np.array_equal(a.targets, b.targets) and torch.equal(a.load(np.arange(len(a))), b.load(np.arange(len(b))))
    # the next task's update (draws and shrinking) is the same for both
    for m in (mem, copy):
        m.update(2, images(2, 7, seed=3, classes_offset=5), torch.Generator().manual_seed(2))
    assert_same_tree(copy.state_dict(), mem.state_dict())
    # the restored memory owns its tensors: changing the original leaves the copy alone
    key = next(iter(mem.groups))
    mem.groups[key][0].zero_()
    assert copy.groups[key][0].any()


def test_gcl_estimators_round_trip_and_give_the_same_next_step():
    g = torch.Generator().manual_seed(0)
    n = 40
    gcl = GlobalContrastiveLoss(n, gamma=0.8)
    for _ in range(5):
        z, text, inv, _, index = random_batch(g, n, 5)
        gcl(z, text, inv, index, tau=0.07)
    assert gcl.visited.any() and not gcl.visited.all()  # partly visited: the flags matter
    copy = GlobalContrastiveLoss(0, gamma=0.8)
    copy.reset(n)
    copy.load_state_dict(through_file(gcl.state_dict()))
    assert_same_tree(dict(copy.state_dict()), dict(gcl.state_dict()))
    z, text, inv, _, index = random_batch(g, n, 5)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out1, out2 = gcl(z1, text, inv, index, 0.07), copy(z2, text, inv, index, 0.07)
    assert_same_tree(out1, {k: v for k, v in out2.items()})
    out1["surrogate"].sum().backward()
    out2["surrogate"].sum().backward()
    assert torch.equal(z1.grad, z2.grad)
    assert_same_tree(dict(copy.state_dict()), dict(gcl.state_dict()))
    # sensitivity: an estimator that lost its state gives another surrogate on the same batch
    fresh = GlobalContrastiveLoss(n, gamma=0.8)
    z, text, inv, _, index = random_batch(g, n, 5)
    assert not torch.equal(fresh(z, text, inv, index, 0.07)["surrogate"], gcl(z, text, inv, index, 0.07)["surrogate"])


@pytest.mark.parametrize("variant", ["kl", "groupdro", "cvar"])
def test_class_dro_round_trips_and_gives_the_same_weights(variant):
    g = torch.Generator().manual_seed(1)
    dro = ClassDRO(6, variant, lam=0.5, beta=0.3, eta=0.2, alpha=0.5, max_weight=0.6)
    for _ in range(4):
        labels = torch.randint(0, 5, (10,), generator=g)  # class 5 never visited
        dro(labels, torch.rand(10, generator=g, dtype=torch.float64) * 3)
    copy = ClassDRO(0, variant, lam=0.5, beta=0.3, eta=0.2, alpha=0.5, max_weight=0.6)
    copy.reset(6)
    copy.load_state_dict(through_file(dro.state_dict()))
    assert_same_tree(dict(copy.state_dict()), dict(dro.state_dict()))
    assert {"v", "log_q", "visited"} <= set(copy.state_dict())
    assert torch.equal(copy.class_weights(), dro.class_weights())
    labels = torch.randint(0, 6, (10,), generator=g)
    losses = torch.rand(10, generator=g, dtype=torch.float64)
    assert torch.equal(copy(labels, losses), dro(labels, losses))
    assert_same_tree(dict(copy.state_dict()), dict(dro.state_dict()))


FORM = "pairs"  # which form gdro_batch builds batches for (set by the test)


def gdro_batch(g, step, n_samples=30, n_classes=4):
    z, text, inv, labels, index = random_batch(g, n_samples, n_classes)
    if FORM == "prompts":  # every class's prompt, rows by label
        prompts = F.normalize(torch.randn(n_classes, text.shape[1], generator=g), dim=-1)
        return Batch(z=z.requires_grad_(), text=prompts, inv=labels, labels=labels, index=index,
                     logit_scale=torch.tensor(14.0, requires_grad=True), step=step, prompts=prompts)
    return Batch(z=z.requires_grad_(), text=text, inv=inv, labels=labels, index=index,
                 logit_scale=torch.tensor(14.0), step=step)


@pytest.mark.parametrize("form", ["pairs", "prompts"])
def test_gdro_method_round_trip_restores_identical_behaviour(form, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(sys.modules[__name__], "FORM", form)
    cfg = MethodCfg(name="gdro", gamma=0.7, lam=0.5, beta=0.2, gcl_form=form)
    context = SimpleNamespace(new_size=20, data_size=30, steps=10)  # positions 20-29 are the memory
    method = GDRO(cfg)
    method.ctx = context
    method.task = 1
    method.start_estimators(30, 4)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        method.loss(gdro_batch(g, step))
    state = through_file(method.state_dict())
    copy = GDRO(cfg)
    copy.ctx = context
    copy.load_state_dict(state)
    assert_same_tree(copy.state_dict(), method.state_dict())
    assert copy.task == 1 and len(copy.telemetry) == 6

    batch = gdro_batch(g, 6)
    twin = Batch(**{**vars(batch), "z": batch.z.detach().clone().requires_grad_()})
    a, b = method.loss(batch), copy.loss(twin)
    assert torch.equal(a["gcl_loss"], b["gcl_loss"]) and torch.equal(a["gcl_value"], b["gcl_value"])
    a["gcl_loss"].backward()
    b["gcl_loss"].backward()
    assert torch.equal(batch.z.grad, twin.z.grad)
    assert_same_tree(copy.state_dict(), method.state_dict())
    assert copy.results() == method.results()

    # sensitivity: a method started afresh on the same task computes another loss on the same batch
    fresh = GDRO(cfg)
    fresh.ctx = context
    fresh.start_estimators(30, 4)
    batch = gdro_batch(g, 7)
    twin = Batch(**{**vars(batch), "z": batch.z.detach().clone().requires_grad_()})
    assert not torch.equal(fresh.loss(twin)["gcl_loss"], method.loss(batch)["gcl_loss"])
