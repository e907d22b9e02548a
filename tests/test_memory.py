"""ReplayMemory invariants: capacity, balance, reproducibility, byte size, round trip."""
import numpy as np
import pytest
import torch

from clipcl.data.images import ImageSet
from clipcl.memory import ReplayMemory


def make_task(classes, per_class=30, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(classes, per_class)
    images = torch.randint(0, 256, (len(labels), *shape), generator=g, dtype=torch.uint8)
    # stamp the label and position in the image so selections can be traced back
    images[:, 0, 0, 0] = torch.as_tensor(labels, dtype=torch.uint8)
    images[:, 0, 0, 1] = torch.arange(len(labels), dtype=torch.uint8)
    return ImageSet.from_tensor(images, labels)


def test_per_class_capacity_and_balance():
    mem = ReplayMemory(per_class=5)
    for t, classes in enumerate([[0, 1], [2, 3], [4, 5]]):
        mem.update(t, make_task(classes, seed=t), torch.Generator().manual_seed(t))
        counts = mem.counts()
        assert set(counts) == set(range(2 * (t + 1)))
        assert all(n == 5 for n in counts.values())
    # labels of stored images match their group
    s = mem.as_imageset()
    imgs = s.load(np.arange(len(s)))
    assert (imgs[:, 0, 0, 0].numpy() == s.targets).all()


def test_total_budget_shrinks_old_classes_and_never_overflows():
    mem = ReplayMemory(total=20)
    seen = []
    for t, classes in enumerate([[0, 1], [2, 3], [4, 5, 6]]):
        old = {k: v.clone() for k, v in mem.groups.items()}
        mem.update(t, make_task(classes, seed=t), torch.Generator().manual_seed(t))
        seen += classes
        assert len(mem) <= 20
        assert all(n == 20 // len(seen) for n in mem.counts().values())
        for k, v in old.items():  # shrinking keeps a prefix of what was kept before
            assert torch.equal(mem.groups[k], v[: len(mem.groups[k])])


def test_small_class_keeps_what_it_has():
    mem = ReplayMemory(per_class=50)
    mem.update(0, make_task([0, 1], per_class=7), torch.Generator().manual_seed(0))
    assert mem.counts() == {0: 7, 1: 7}


def test_same_seed_same_content_other_seed_other_content():
    def fill(seed):
        mem = ReplayMemory(per_class=4)
        mem.update(0, make_task([0, 1]), torch.Generator().manual_seed(seed))
        return mem.as_imageset().load(np.arange(8))
    assert torch.equal(fill(1), fill(1))
    assert not torch.equal(fill(1), fill(2))


def test_bytes_are_uint8_image_bytes():
    mem = ReplayMemory(per_class=3)
    mem.update(0, make_task([0, 1, 2], shape=(3, 8, 8)), torch.Generator().manual_seed(0))
    assert len(mem) == 9
    assert mem.nbytes == 9 * 3 * 8 * 8
    assert all(x.dtype == torch.uint8 for x in mem.groups.values())


def test_domain_incremental_splits_class_slots_over_tasks():
    mem = ReplayMemory(per_class=5)
    mem.update(0, make_task([0, 1], seed=0), torch.Generator().manual_seed(0))
    mem.update(1, make_task([0, 1], seed=1), torch.Generator().manual_seed(1))
    assert mem.counts() == {0: 5, 1: 5}
    assert len(mem.groups[(0, 0)]) == 2 and len(mem.groups[(1, 0)]) == 3  # the newer domain gets the remainder


def test_state_dict_round_trip():
    mem = ReplayMemory(per_class=3)
    mem.update(0, make_task([0, 1]), torch.Generator().manual_seed(0))
    other = ReplayMemory()
    other.load_state_dict(mem.state_dict())
    assert other.per_class == 3 and other.counts() == mem.counts()
    assert torch.equal(other.as_imageset().load(np.arange(6)), mem.as_imageset().load(np.arange(6)))


def test_negative_size_rejected():
    with pytest.raises(ValueError):
        ReplayMemory(per_class=-1)
