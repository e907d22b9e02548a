"""The pretrained-start benchmarks: a tiny CLIP pretrained here on images the streams never use, cached and
reproducible, and the zero-shot measurements on tasks not trained yet."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipcl import pretrain
from clipcl.cli import main
from clipcl.config import ConfigError, load_config
from clipcl.data.datasets import PRETRAIN_START, fashion_mnist_arrays, fmnist_washed, load_dataset
from clipcl.evaluate import unseen_change
from clipcl.models import create

TINY_RECIPE = ("a tiny test recipe on the washed pretraining block",
               ["name=pretrain-test", "seed=0", "scenario.dataset=fmnist_pretrain", "scenario.classes_per_task=10",
                "scenario.class_order=natural", "scenario.train_per_class=20", "scenario.test_per_class=5",
                "memory.per_class=0", "method.name=joint", "optim.epochs=1", "optim.batch_size=32"])


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPES, "test-tiny", TINY_RECIPE)
    return tmp_path / "cache"


def test_stream_and_pretraining_data_never_overlap():
    cfg = load_config("fmnist-pre-cil").scenario
    x, y = fashion_mnist_arrays(cfg)["train"]
    stream, pre = load_dataset(cfg), load_dataset(load_config("fmnist-cil", ["scenario.dataset=fmnist_pretrain"]).scenario)
    assert len(stream.train) == PRETRAIN_START and len(pre.train) == len(x) - PRETRAIN_START
    # the stream's images are the first block as they are; the pretraining images the rest, washed
    assert torch.equal(stream.train.load(np.arange(len(stream.train)))[:, 0], torch.from_numpy(x[:PRETRAIN_START].copy()))
    washed = fmnist_washed(torch.from_numpy(x[PRETRAIN_START:].copy()).unsqueeze(1))
    assert torch.equal(pre.train.load(np.arange(len(pre.train))), washed)
    assert (stream.train.targets == y[:PRETRAIN_START]).all() and (pre.train.targets == y[PRETRAIN_START:]).all()
    dil = load_dataset(load_config("fmnist-pre-dil").scenario)
    assert all(len(tr) == PRETRAIN_START for tr, _ in dil.domains.values())


def test_washed_domain_is_the_documented_map():
    x = torch.tensor([0, 10, 128, 255], dtype=torch.uint8)
    assert fmnist_washed(x).tolist() == [24, 33, 139, 253]  # 24 + floor(9x/10)


def test_pretrained_weights_are_made_once_then_loaded_from_the_cache(tiny_recipe, monkeypatch):
    cfg = load_config("fmnist-cil", ["model.pretrained=clipcl:test-tiny"]).model
    rng = torch.get_rng_state()
    path = pretrain.weights("test-tiny", cfg.name, quiet=True)
    assert path.is_file() and path.parent == tiny_recipe / "pretrained"
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's initialisation does not see the pretraining
    state = torch.load(path, weights_only=True)
    model = create(cfg).model  # through open_clip, like any local checkpoint
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the cache answers now: no training happens (a Trainer would fail)
    import clipcl.engine

    monkeypatch.setattr(clipcl.engine, "Trainer", None)
    assert pretrain.weights("test-tiny", cfg.name, quiet=True) == path
    assert not list(path.parent.glob(".pretraining-*"))  # the training folder is gone


def test_pretraining_is_reproducible_and_a_changed_recipe_gets_a_new_file(tiny_recipe, monkeypatch):
    first = pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True)
    a = torch.load(first, weights_only=True)
    first.unlink()
    again = pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True)
    b = torch.load(again, weights_only=True)
    assert again == first and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setitem(pretrain.RECIPES, "test-tiny", (TINY_RECIPE[0] + " (x -> 2x)", TINY_RECIPE[1]))
    assert pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True) != first


def test_unknown_pretraining_tag_is_one_clear_error(tmp_path, capsys):
    assert main(["run", "fmnist-cil", "model.pretrained=clipcl:nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "clipcl:nope" in err and "clipcl:fmnist-washed" in err and "Traceback" not in err
    with pytest.raises(ConfigError):
        pretrain.recipe_config("nope", "clipcl-tiny-rn")


def test_unseen_change_by_hand():
    U = [[0.5, 0.6, 0.7], [None, 0.8, 0.4], [None, None, 0.9]]
    # s=1: (0.8-0.6) + (0.4-0.7); s=2: (0.9-0.7)
    assert unseen_change(U) == pytest.approx((0.2 - 0.3 + 0.2) / 3)
    assert unseen_change([[0.5]]) is None


def test_a_run_measures_the_tasks_not_trained_yet(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "fmnist-pre-cil", "model.pretrained=clipcl:test-tiny", "scenario.train_per_class=20",
                 "scenario.test_per_class=10", "scenario.n_tasks=3", "optim.batch_size=16", "method.name=er",
                 "memory.per_class=1", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "results.json").read_text())
    U = r["unseen_matrix"]
    assert len(U) == 3 and all(len(row) == 3 for row in U)
    assert [sum(v is not None for v in row) for row in U] == [3, 2, 1]  # tasks s.. are not trained after s tasks
    assert r["metrics"]["unseen_change"] == pytest.approx(unseen_change(U))
    # before any training, on the first task, 'all classes' and 'seen classes' differ only in candidates
    assert U[0][0] <= r["accuracy_before_training"][0] + 1e-9


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CLIPCL_CACHE", str(blocker / "cache"))
    assert main(["run", "fmnist-pre-cil", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "CLIPCL_CACHE" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_a_failed_pretraining_caches_nothing_and_says_so(tiny_recipe, monkeypatch, capsys):
    import errno

    from clipcl.engine import Trainer
    from clipcl.files import OutputError

    def full_disk(self, resume=False):
        raise OutputError(errno.ENOSPC, "no space left on the device holding 'x'")

    monkeypatch.setattr(Trainer, "run", full_disk)
    with pytest.raises(ConfigError, match="nothing was cached"):
        pretrain.weights("test-tiny", "clipcl-tiny-rn", quiet=True)
    assert not list((tiny_recipe / "pretrained").iterdir())  # no file, no leftover training folder
