"""The prototypes method (frozen CLIP, class-mean image features fused with the text classifier) and the hook
it uses: a method may bring the classifier that evaluation ranks classes with."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipcl.checkpoint import StateError
from clipcl.config import ConfigError, load_config
from clipcl.engine import Trainer
from clipcl.evaluate import candidate_text, evaluating, image_features

TINY = ["scenario.train_per_class=30", "scenario.test_per_class=10", "scenario.n_tasks=3", "optim.epochs=1",
        "optim.batch_size=16", "optim.warmup_steps=1", "memory.per_class=2", "eval.batch_size=64",
        "scenario.download=false"]


def run(tmp_path: Path, *overrides: str) -> Trainer:
    try:
        cfg = load_config("fmnist-cil", [*TINY, *overrides])
        tr = Trainer(cfg, tmp_path / "_".join(o.replace("=", "-") for o in overrides), progress_bar=False,
                     quiet=True)
    except ConfigError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    tr.run()
    return tr


def hand_prototypes(tr: Trainer) -> torch.Tensor:
    """normalise(mean of the frozen model's normalised features of each class's training images)."""
    protos = []
    with evaluating(tr.bundle.model):
        for task in tr.scenario.tasks:
            z = image_features(tr.bundle, task.train, 64, tr.device)
            for c in task.classes:
                protos.append(F.normalize(z[torch.as_tensor(task.train.targets == c)].mean(0), dim=0))
    return torch.stack(protos)


def test_prototypes_are_the_class_means_and_the_backbone_never_changes(tmp_path):
    try:
        start = Trainer(load_config("fmnist-cil", [*TINY, "method.name=prototypes"]), tmp_path / "start",
                        progress_bar=False, quiet=True).bundle.model.state_dict()
    except ConfigError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    start = copy.deepcopy(start)
    tr = run(tmp_path, "method.name=prototypes")
    for k, v in tr.bundle.model.state_dict().items():
        assert torch.equal(v, start[k]), k  # nothing trains: the backbone is the one it started with
    p, has = tr.method.prototypes()
    assert has.all() and len(p) == len(tr.scenario.classnames)
    torch.testing.assert_close(p, hand_prototypes(tr), atol=1e-5, rtol=1e-5)


def test_the_method_classifier_changes_evaluation_for_that_method_only(tmp_path):
    zero = run(tmp_path, "method.name=zeroshot")
    text_only = run(tmp_path, "method.name=prototypes", "method.proto_weight=0")
    assert text_only.progress.rows == zero.progress.rows  # w = 0 is CLIP's own classifier, exactly
    ncm = run(tmp_path, "method.name=prototypes", "method.proto_weight=1")
    assert ncm.progress.rows != zero.progress.rows
    # before a task is trained its classes have no prototype: the text classifier alone, i.e. zero-shot
    assert ncm.progress.before == zero.progress.before and ncm.progress.before[1] is not None
    # w = 1 is a nearest-class-mean classifier: R[t][j] by hand, over the classes seen after task t
    p = hand_prototypes(ncm)
    with evaluating(ncm.bundle.model):
        for t in range(len(ncm.scenario)):
            for j in range(t + 1):
                test = ncm.scenario[j].test
                z = image_features(ncm.bundle, test, 64, ncm.device)
                n = ncm.scenario.n_seen(t)
                want = float(((z @ p[:n].t()).argmax(1).numpy() == test.targets).mean())
                assert ncm.progress.rows[t][j] == pytest.approx(want)
    half = run(tmp_path, "method.name=prototypes", "method.proto_weight=0.5")  # a fusion: by hand, the last row
    text = candidate_text(half.bundle, half.scenario.classnames, "default", half.device)
    with evaluating(half.bundle.model):
        test = half.scenario[0].test
        z = image_features(half.bundle, test, 64, half.device)
        want = float(((0.5 * z @ text.t() + 0.5 * z @ p.t()).argmax(1).numpy() == test.targets).mean())
    assert half.progress.rows[-1][0] == pytest.approx(want)


def test_prototypes_resume_from_their_state_and_bad_states_are_named(tmp_path):
    tr = run(tmp_path, "method.name=prototypes")
    state = tr.method.state_dict()
    fresh = type(tr.method)(tr.cfg.method)
    fresh.check_state(state, tr.bundle.model.state_dict(), None)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.prototypes(), tr.method.prototypes()))
    bad = {**state, "sums": state["sums"][:-1]}
    with pytest.raises(StateError, match="method.sums"):
        fresh.check_state(bad, tr.bundle.model.state_dict(), None)
    bad = {**state, "counts": -state["counts"]}
    with pytest.raises(StateError, match="method.counts"):
        fresh.check_state(bad, tr.bundle.model.state_dict(), None)


def test_proto_weight_is_checked_and_belongs_to_prototypes():
    with pytest.raises(ConfigError, match="'method.proto_weight' = 1.5: must be in"):
        load_config("fmnist-cil", ["method.name=prototypes", "method.proto_weight=1.5"])
    with pytest.raises(ConfigError, match="'method.proto_weight' = 0.2: .*method.name=er"):
        load_config("fmnist-cil", ["method.name=er", "method.proto_weight=0.2"])
