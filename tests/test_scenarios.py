"""Class-incremental splits: disjoint, complete, reproducible order, class names carried."""
import numpy as np
import pytest
import torch

from clipcl.config import ConfigError, RunCfg, ScenarioCfg
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


def test_an_order_file_gives_its_label_ids_in_its_order(tmp_path):
    ds = toy_dataset()
    f = tmp_path / "order.txt"
    f.write_text("# my order\n7, 2 9\n0 1 3 4 5 6 8  # the rest\n")
    sc = build_scenario(ScenarioCfg(dataset="toy", classes_per_task=5, class_order=str(f)), dataset=ds)
    assert list(sc.class_order) == [7, 2, 9, 0, 1, 3, 4, 5, 6, 8]
    imgs = sc.tasks[0].train.load(np.arange(len(sc.tasks[0].train)))
    assert (imgs[:, 0, 0, 0].numpy() == np.array(sc.class_order)[sc.tasks[0].train.targets]).all()
    (tmp_path / "order.yaml").write_text("- 3\n- 1\n- 2\n")  # a YAML (or JSON) list reads too; a subset is a stream
    assert class_order(10, ScenarioCfg(class_order=str(tmp_path / "order.yaml"))) == [3, 1, 2]
    (tmp_path / "order.json").write_text("[4, 0]")
    assert class_order(10, ScenarioCfg(class_order=str(tmp_path / "order.json"))) == [4, 0]


@pytest.mark.parametrize("text,said", [(None, "no such file"), ("3 1 x", "'x' is not a class index"),
                                       ("3 1 3", "class 3 twice"), ("3 10", "[10]"), ("# none\n", "no class index"),
                                       ("2 -1", "'-1' is not a class index")])
def test_a_bad_order_file_is_one_error_naming_it(tmp_path, text, said):
    f = tmp_path / "order.txt"
    if text is not None:
        f.write_text(text)
    with pytest.raises(ConfigError) as e:
        class_order(10, ScenarioCfg(class_order=str(f)))
    assert "scenario.class_order" in str(e.value) and str(f) in str(e.value) and said in str(e.value)
    if text is not None:
        assert f.read_text() == text  # read, never touched


def test_order_names_are_checked_before_any_data():
    with pytest.raises(ConfigError, match="'scenario.class_order' = 'sedeed': must be one of seeded"):
        RunCfg(scenario=ScenarioCfg(class_order="sedeed"))
    RunCfg(scenario=ScenarioCfg(class_order="orders/c100.txt"))  # a path: read when the scenario is built
    with pytest.raises(ConfigError, match="'continual-clip': that is CIFAR-100's order"):
        class_order(10, ScenarioCfg(dataset="toy", class_order="continual-clip"))
    with pytest.raises(ConfigError, match="'scenario.classes' holds class 2 twice"):
        class_order(10, ScenarioCfg(classes=(2, 1, 2)))


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
