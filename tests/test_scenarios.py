"""Class-incremental splits: disjoint, complete, reproducible order, class names carried."""
import numpy as np
import pytest
import torch

from clipcl.config import ConfigError, ScenarioCfg
from clipcl.data.datasets import Dataset
from clipcl.data.images import ImageSet
from clipcl.data.scenarios import build_scenario, class_order

NAMES = [f"class {i}" for i in range(10)]


def toy_dataset(per_class=6):
    labels = np.repeat(np.arange(10), per_class)
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.as_tensor(labels, dtype=torch.uint8)  # the image knows its dataset label
    tr = ImageSet.from_tensor(images, labels)
    te = ImageSet.from_tensor(images[::2].clone(), labels[::2])
    return Dataset("toy", NAMES, train=tr, test=te)


def test_splits_are_disjoint_complete_and_relabelled():
    cfg = ScenarioCfg(dataset="toy", classes_per_task=3, class_order="seeded", order_seed=1993)
    sc = build_scenario(cfg, dataset=toy_dataset())
    assert [len(t.classes) for t in sc.tasks] == [3, 3, 3, 1]
    seen = [c for t in sc.tasks for c in t.classes]
    assert seen == list(range(10))
    order = class_order(10, cfg)
    assert sorted(order) == list(range(10))
    for t in sc.tasks:
        assert set(np.unique(t.train.targets)) == set(t.classes)
        imgs = t.train.load(np.arange(len(t.train)))
        # scenario label k is dataset class order[k]
        assert (imgs[:, 0, 0, 0].numpy() == np.array(order)[t.train.targets]).all()
    assert sum(len(t.train) for t in sc.tasks) == 60
    assert sc.classnames == tuple(NAMES[c] for c in order)
    assert sc.n_seen(1) == 6


def test_order_is_reproducible_and_seed_dependent():
    a = class_order(10, ScenarioCfg(order_seed=1993))
    assert a == class_order(10, ScenarioCfg(order_seed=1993))
    assert a != class_order(10, ScenarioCfg(order_seed=1))
    assert class_order(10, ScenarioCfg(class_order="natural")) == list(range(10))
    assert class_order(10, ScenarioCfg(classes=(3, 1, 2))) == [3, 1, 2]


def test_explicit_classes_and_hash():
    ds = toy_dataset()
    a = build_scenario(ScenarioCfg(dataset="toy", classes=(4, 2, 7, 9), classes_per_task=2), dataset=ds)
    b = build_scenario(ScenarioCfg(dataset="toy", classes=(2, 4, 7, 9), classes_per_task=2), dataset=ds)
    assert a.classnames == ("class 4", "class 2", "class 7", "class 9")
    assert len(a) == 2 and a.order_hash != b.order_hash


def test_bad_class_ids_and_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="scenario.classes"):
        build_scenario(ScenarioCfg(dataset="toy", classes=(4, 12)), dataset=toy_dataset())
    with pytest.raises(ConfigError, match="classes_per_task"):
        build_scenario(ScenarioCfg(dataset="toy", classes_per_task=11), dataset=toy_dataset())
    with pytest.raises(ConfigError, match="n_tasks"):
        build_scenario(ScenarioCfg(dataset="toy", classes_per_task=5, n_tasks=3), dataset=toy_dataset())


def test_per_class_limit_subsamples_reproducibly():
    cfg = ScenarioCfg(dataset="toy", classes_per_task=5, train_per_class=4)
    a = build_scenario(cfg, seed=0, dataset=toy_dataset())
    b = build_scenario(cfg, seed=0, dataset=toy_dataset())
    assert all(np.bincount(t.train.targets)[list(t.classes)].tolist() == [4] * 5 for t in a.tasks)
    assert all((x.train.index == y.train.index).all() for x, y in zip(a.tasks, b.tasks))
