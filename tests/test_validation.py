"""Validation splits: held out of training, seeded, disjoint from train, and what evaluation reads with split=val."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcl.config import ConfigError, EvalCfg, RunCfg, ScenarioCfg, apply_overrides
from clipcl.data.datasets import Dataset
from clipcl.data.images import ImageSet
from clipcl.data.scenarios import build_scenario, class_incremental, class_order, fingerprint_diff
from clipcl.evaluate import accuracy_before_training, accuracy_row

NAMES = [f"class {i}" for i in range(10)]


def toy_dataset(per_class: int = 8, counts: dict[int, int] | None = None) -> Dataset:
    """10 classes in memory; pixel (0,0,0) is the dataset label and (0,0,1) a unique image id.

    counts overrides the number of training images of some classes (to make them too small).
    """
    sizes = [(counts or {}).get(c, per_class) for c in range(10)]
    labels = np.repeat(np.arange(10), sizes)
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.as_tensor(labels, dtype=torch.uint8)
    images[:, 0, 0, 1] = torch.arange(len(labels), dtype=torch.uint8)
    test_labels = np.repeat(np.arange(10), 3)
    test = torch.zeros(len(test_labels), 1, 2, 2, dtype=torch.uint8)
    test[:, 0, 0, 0] = torch.as_tensor(test_labels, dtype=torch.uint8)
    test[:, 0, 0, 1] = 200 + torch.arange(len(test_labels), dtype=torch.uint8)
    return Dataset("toy", NAMES, train=ImageSet.from_tensor(images, labels),
                   test=ImageSet.from_tensor(test, test_labels), notes={"warnings": []})


def toy_domains() -> Dataset:
    """Three domains of 10 classes, 6 training and 2 test images per class, images unique across domains."""
    domains = {}
    for k, d in enumerate(("a", "b", "c")):
        labels = np.repeat(np.arange(10), 6)
        train = torch.full((60, 1, 2, 2), k, dtype=torch.uint8)
        train[:, 0, 0, 0] = torch.as_tensor(labels, dtype=torch.uint8)
        train[:, 0, 0, 1] = torch.arange(60, dtype=torch.uint8)
        test = train[::3].clone()
        domains[d] = (ImageSet.from_tensor(train, labels), ImageSet.from_tensor(test, labels[::3]))
    return Dataset("toy_dil", NAMES, domains=domains)


CIL = dict(dataset="toy", classes_per_task=3)
DIL = dict(dataset="toy_dil", kind="dil")


def scenario(val_per_class: int = 0, seed: int = 0, ds=None, **kw):
    kw = {**CIL, **kw}
    ds = ds or (toy_domains() if kw.get("kind") == "dil" else toy_dataset())
    return build_scenario(ScenarioCfg(**kw, val_per_class=val_per_class), seed=seed, dataset=ds)


def per_class(images: ImageSet) -> dict[int, int]:
    labels, counts = np.unique(images.targets, return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


# ------------------------------------------------------------------ the split
@pytest.mark.parametrize("kw", [CIL, dict(CIL, train_per_class=5), DIL], ids=["cil", "cil-limited", "dil"])
def test_val_and_train_are_disjoint_and_make_up_the_training_data(kw):
    base, split = scenario(0, **kw), scenario(2, **kw)
    for b, s in zip(base.tasks, split.tasks):
        assert len(b.val) == 0
        assert not set(s.train.index.tolist()) & set(s.val.index.tolist())
        assert sorted(np.concatenate([s.train.index, s.val.index]).tolist()) == sorted(b.train.index.tolist())
        pairs = sorted(zip(np.concatenate([s.train.index, s.val.index]).tolist(),
                           np.concatenate([s.train.targets, s.val.targets]).tolist()))
        assert pairs == sorted(zip(b.train.index.tolist(), b.train.targets.tolist()))  # labels travel along
        assert (s.test.index == b.test.index).all()  # the test set is untouched
        assert (np.diff(s.train.index) > 0).all() and (np.diff(s.val.index) > 0).all()  # image order kept


@pytest.mark.parametrize("kw", [CIL, DIL], ids=["cil", "dil"])
def test_val_holds_exactly_val_per_class_images_of_every_class(kw):
    sc, base = scenario(3, **kw), scenario(0, **kw)
    for s, b in zip(sc.tasks, base.tasks):
        assert per_class(s.val) == {c: 3 for c in s.classes}
        assert per_class(s.train) == {c: n - 3 for c, n in per_class(b.train).items()}
        imgs = s.val.load(np.arange(len(s.val)))  # the loaded pixels are those of the held-out images
        assert (np.asarray(sc.class_order)[s.val.targets] == imgs[:, 0, 0, 0].numpy()).all()


def test_the_split_is_seeded_by_the_run_seed():
    a, b, c = scenario(2, seed=0), scenario(2, seed=0), scenario(2, seed=1)
    assert all((x.val.index == y.val.index).all() and (x.train.index == y.train.index).all()
               for x, y in zip(a.tasks, b.tasks))
    assert any(not np.array_equal(x.val.index, z.val.index) for x, z in zip(a.tasks, c.tasks))


def held_out_by_dataset_class(sc) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for task in sc.tasks:
        for i, y in zip(task.val.index.tolist(), task.val.targets.tolist()):
            out.setdefault(int(sc.class_order[y]), set()).add(i)
    return out


def test_a_class_holds_out_the_same_images_whatever_the_class_order():
    a = held_out_by_dataset_class(scenario(2, classes=(0, 1, 2, 3), classes_per_task=2))
    b = held_out_by_dataset_class(scenario(2, classes=(3, 2, 1, 0), classes_per_task=1))
    assert a == b and sorted(a) == [0, 1, 2, 3] and all(len(v) == 2 for v in a.values())


@pytest.mark.parametrize("train_per_class", [0, 5])
def test_no_validation_split_leaves_the_scenario_as_it_was(train_per_class):
    """The subsampling generator is not touched by the validation draw: old runs see the same data."""
    ds, seed = toy_dataset(), 3
    cfg = ScenarioCfg(**CIL, train_per_class=train_per_class, test_per_class=2)
    rng = np.random.default_rng(seed + 7919)  # what build_scenario did before validation splits existed
    tr, te = ds.train.per_class_limit(train_per_class, rng), ds.test.per_class_limit(2, rng)
    old = class_incremental(tr, te, NAMES, class_order(10, cfg), cfg.classes_per_task)
    for keep in (0, 2):  # and holding out validation images does not change which images are subsampled
        new = build_scenario(ScenarioCfg(**CIL, train_per_class=train_per_class, test_per_class=2,
                                         val_per_class=keep), seed=seed, dataset=ds)
        for o, n in zip(old.tasks, new.tasks):
            assert (o.test.index == n.test.index).all()
            if keep == 0:
                assert (o.train.index == n.train.index).all() and (o.train.targets == n.train.targets).all()
            else:
                assert sorted(np.concatenate([n.train.index, n.val.index]).tolist()) == o.train.index.tolist()


def test_a_class_with_too_few_images_keeps_one_for_training_and_warns():
    ds = toy_dataset(counts={4: 2, 7: 1})
    sc = build_scenario(ScenarioCfg(**CIL, classes=tuple(range(10)), val_per_class=3), dataset=ds)
    train = {c: n for t in sc.tasks for c, n in per_class(t.train).items()}
    val = {c: n for t in sc.tasks for c, n in per_class(t.val).items()}
    assert train[4] == 1 and val[4] == 1  # 2 images: one kept, one held out
    assert train[7] == 1 and 7 not in val  # 1 image: kept for training, none held out
    assert train[0] == 5 and val[0] == 3
    (line,) = [w for w in sc.notes["warnings"] if "val_per_class" in w]
    assert "2 classes" in line and "'class 4' of task 1 (2 images)" in line and "'class 7'" in line
    assert ds.notes["warnings"] == []  # the dataset's own notes are not written to
    assert not [w for w in scenario(3).notes.get("warnings", []) if "val_per_class" in w]


# ------------------------------------------------------------------ fingerprints
def test_the_fingerprint_covers_the_validation_split():
    fp0, fp2 = scenario(0).fingerprint(), scenario(2).fingerprint()
    assert fp0["val_sizes"] == [0] * 4 and fp2["val_sizes"] == [6, 6, 6, 2]
    assert all(isinstance(h, str) and len(h) == 16 for h in fp2["val_hashes"])
    assert fp0 != fp2 and fp0 != scenario(1).fingerprint()
    assert "training images 24 -> 18" in fingerprint_diff(fp0, fp2)
    assert fingerprint_diff(fp2, scenario(2).fingerprint()) == ""
    other = scenario(2, seed=1).fingerprint()
    assert other["val_sizes"] == fp2["val_sizes"] and other["val_hashes"] != fp2["val_hashes"]
    assert "the validation images differ (same count)" in fingerprint_diff(fp2, other)
    # only the val keys changed (train kept the same size and hash): the diff still says so
    diff = fingerprint_diff(fp2, {**fp2, "val_hashes": other["val_hashes"]})
    assert diff.startswith("task 0 (") and diff.endswith("the validation images differ (same count)")
    assert "training" not in diff


def test_a_fingerprint_saved_before_validation_splits_still_matches():
    fp = scenario(0).fingerprint()
    old = {k: v for k, v in fp.items() if not k.startswith("val_")}
    assert fingerprint_diff(old, fp) == "" and fingerprint_diff(fp, old) == ""
    assert "validation images 0 -> 6" in fingerprint_diff(old, {**scenario(2).fingerprint(), "train_sizes":
                                                                  fp["train_sizes"], "train_hashes": fp["train_hashes"]})


# ------------------------------------------------------------------ config
def test_val_evaluation_needs_a_validation_split():
    with pytest.raises(ConfigError, match=r"'eval.split' = 'val'.*scenario\.val_per_class"):
        RunCfg(eval=EvalCfg(split="val"))
    with pytest.raises(ConfigError, match="scenario.val_per_class"):
        apply_overrides(RunCfg(), ["eval.split=val"])
    cfg = apply_overrides(RunCfg(), ["eval.split=val", "scenario.val_per_class=2"])
    assert cfg.eval.split == "val" and cfg.scenario.val_per_class == 2
    assert RunCfg().eval.split == "test" and RunCfg().scenario.val_per_class == 0
    with pytest.raises(ConfigError, match=r"'scenario.val_per_class' = -1: must be 0 or more"):
        apply_overrides(RunCfg(), ["scenario.val_per_class=-1"])
    with pytest.raises(ConfigError, match=r"'eval.split' = 'train': must be one of test, val"):
        apply_overrides(RunCfg(), ["eval.split=train"])


# ------------------------------------------------------------------ evaluation
class StubModel(torch.nn.Module):
    """Embeds an image as the one-hot of its dataset label and a class text as the one-hot of its number.

    Every image id it encodes is recorded, so a test can see which images an evaluation read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x[:, 0, 0, 1].long().tolist()
        return F.one_hot(x[:, 0, 0, 0].long(), 10).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], 10).float()


class StubBundle:
    def __init__(self) -> None:
        self.model = StubModel()

    def prepare_images(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def input_images(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[int(re.findall(r"\d+", t)[-1])] for t in texts])


def ids(images: ImageSet) -> list[int]:
    return sorted(images.load(np.arange(len(images)))[:, 0, 0, 1].long().tolist())


def test_accuracy_row_reads_the_split_it_is_given():
    sc, bundle, cpu = scenario(2), StubBundle(), torch.device("cpu")
    last = len(sc) - 1
    assert accuracy_row(bundle, sc, last, "default", 7, cpu, split="val") == [1.0] * len(sc)
    assert sorted(bundle.model.seen) == sorted(i for t in sc.tasks for i in ids(t.val))
    bundle.model.seen = []
    accuracy_row(bundle, sc, last, "default", 7, cpu)  # test is the default
    assert sorted(bundle.model.seen) == sorted(i for t in sc.tasks for i in ids(t.test))
    assert min(bundle.model.seen) >= 200  # test images only
    bundle.model.seen = []
    assert accuracy_row(bundle, sc, 0, "default", 7, cpu, split="val")[1:] == [None] * (len(sc) - 1)
    assert sorted(bundle.model.seen) == ids(sc[0].val)  # CIL: future tasks are not evaluated
    bundle.model.seen = []
    assert accuracy_before_training(bundle, sc, 1, "default", 7, cpu, split="val") == 1.0
    assert sorted(bundle.model.seen) == ids(sc[1].val)
    with pytest.raises(ValueError, match="'train'"):
        accuracy_row(bundle, sc, 0, "default", 7, cpu, split="train")


def test_a_run_evaluated_on_validation_reports_validation_metrics(tmp_path):
    """End to end: eval.split=val computes R and every metric on the held-out training images."""
    import json

    from clipcl.cli import main
    from clipcl.evaluate import metrics

    out = tmp_path / "run"
    assert main(["run", "fmnist-cil", "scenario.train_per_class=30", "scenario.test_per_class=10",
                 "scenario.val_per_class=5", "eval.split=val", "scenario.n_tasks=2", "optim.batch_size=16",
                 "method.name=er", "memory.per_class=2", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "results.json").read_text())
    sc = r["scenario"]
    assert sc["eval_split"] == "val" and sc["val_sizes"] == [10, 10] and sc["eval_sizes"] == [10, 10]
    assert sc["train_sizes"] == [50, 50] and sc["test_sizes"] == [20, 20]
    assert r["metrics"] == metrics(r["accuracy_matrix"], sc["eval_sizes"], r["accuracy_before_training"])
    # the accuracies are fractions of 10 validation images (20 test images would allow halves of tenths)
    assert all(round(10 * v, 6) == int(round(10 * v)) for row in r["accuracy_matrix"] for v in row if v is not None)
