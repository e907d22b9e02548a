"""ReplayMemory invariants: capacity, balance, reproducibility, byte size, round trip, compression, byte
budgets, herding."""
import io

import numpy as np
import pytest
import torch

from clipcl.data.images import ImageSet
from PIL import Image

from clipcl.memory import ReplayMemory, decode, encode, herding_order


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
        old = {k: list(v) for k, v in mem.groups.items()}
        mem.update(t, make_task(classes, seed=t), torch.Generator().manual_seed(t))
        seen += classes
        assert len(mem) <= 20
        assert all(n == 20 // len(seen) for n in mem.counts().values())
        for k, v in old.items():  # shrinking keeps a prefix of what was kept before
            assert all(a is b for a, b in zip(mem.groups[k], v[: len(mem.groups[k])]))
            assert len(mem.groups[k]) <= len(v)


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
    assert all(x.dtype == torch.uint8 and x.shape == (3, 8, 8) for g in mem.groups.values() for x in g)


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


def smooth_task(classes, per_class=12, size=16, channels=3, seed=0):
    """Natural-looking images (smooth gradients plus a little noise): what codecs are made for."""
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(classes, per_class)
    ramp = torch.linspace(0, 1, size)
    base = (ramp.view(1, 1, -1) * ramp.view(1, -1, 1) * 200).expand(len(labels), channels, size, size)
    noise = torch.randint(0, 20, (len(labels), channels, size, size), generator=g)
    images = (base + noise + torch.as_tensor(labels).view(-1, 1, 1, 1) * 5).clamp(0, 255).to(torch.uint8)
    return ImageSet.from_tensor(images, labels)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_memory_decodes_exactly_and_counts_its_bytes(channels):
    data = smooth_task([0, 1], channels=channels)
    mem = ReplayMemory(per_class=4, codec="png")
    mem.update(0, data, torch.Generator().manual_seed(0))
    raw = ReplayMemory(per_class=4)
    raw.update(0, data, torch.Generator().manual_seed(0))  # same draws, stored raw
    s, r = mem.as_imageset(), raw.as_imageset()
    assert torch.equal(s.load(np.arange(8)), r.load(np.arange(8)))  # lossless
    assert (s.targets == r.targets).all()
    # the byte count is exactly the PNG files' sizes, and each is a real PNG file
    files = [x for k in mem.keys() for x in mem.groups[k]]
    assert mem.nbytes == sum(len(x) for x in files)
    for x in files:
        with Image.open(io.BytesIO(x.numpy().tobytes())) as img:
            assert img.format == "PNG" and img.size == (16, 16)


def test_jpeg_memory_decodes_within_tolerance_and_is_smaller():
    data = smooth_task([0, 1, 2], size=32)
    mem = ReplayMemory(per_class=3, codec="jpeg", quality=90)
    mem.update(0, data, torch.Generator().manual_seed(0))
    raw = ReplayMemory(per_class=3)
    raw.update(0, data, torch.Generator().manual_seed(0))
    a = mem.as_imageset().load(np.arange(9)).float()
    b = raw.as_imageset().load(np.arange(9)).float()
    assert (a - b).abs().mean() < 6  # JPEG at quality 90 on 32x32 noisy gradients
    assert mem.nbytes == sum(x.numel() for g in mem.groups.values() for x in g)
    assert mem.nbytes < raw.nbytes


def test_byte_budget_fits_more_compressed_images():
    data = smooth_task([0, 1], per_class=40, size=32)
    budget = 2 * 3 * 32 * 32 * 3  # three raw images per class
    raw = ReplayMemory(bytes=budget)
    raw.update(0, data, torch.Generator().manual_seed(0))
    assert raw.counts() == {0: 3, 1: 3} and raw.nbytes <= budget
    jpeg = ReplayMemory(bytes=budget, codec="jpeg", quality=75)
    jpeg.update(0, data, torch.Generator().manual_seed(0))
    assert jpeg.nbytes <= budget and min(jpeg.counts().values()) > 3
    for c in (0, 1):  # each class stays within its half of the budget
        assert sum(x.numel() for (t, k), g in jpeg.groups.items() if k == c for x in g) <= budget // 2
    # a new task halves every class's share: old groups shrink to a prefix that fits
    before = {k: list(v) for k, v in jpeg.groups.items()}
    jpeg.update(1, smooth_task([2, 3], per_class=40, size=32, seed=1), torch.Generator().manual_seed(1))
    assert jpeg.nbytes <= budget
    for k, v in before.items():
        kept = jpeg.groups.get(k, [])
        assert all(a is b for a, b in zip(kept, v)) and sum(x.numel() for x in kept) <= budget // 4


def test_codec_round_trip_helpers():
    img = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(decode(encode(img, "png"), 3), img)
    assert torch.equal(decode(encode(img, "raw"), 3), img)
    grey = img[:1]
    assert torch.equal(decode(encode(grey, "png"), 1), grey)


def test_herding_picks_the_sample_that_brings_the_mean_closest_step_by_step():
    # hand-made: class mean is (1, 1) / |.|; the points are already unit vectors
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    mu = f.mean(0)  # (0.6, 0.6)
    order = list(herding_order(f))
    # step 1: the single point closest to mu: (0.6,0.8) and (0.8,0.6) tie at distance 0.2; argmin takes the first
    assert order[0] == 2
    # step 2: the mean of {p2, x} closest to mu: x = (0.8, 0.6) gives exactly (0.7, 0.7)
    #   (0.7,0.7) vs mu (0.6,0.6): 0.02; x = (1,0): (0.8,0.4) -> 0.08; x = (0,1): (0.3,0.9) -> 0.18
    assert order[1] == 3
    # brute force every step: the chosen sample minimises || mu - mean(chosen + x) || among the rest
    chosen = []
    for i in order:
        rest = [j for j in range(4) if j not in chosen]
        dists = {j: float(((mu - f[chosen + [j]].mean(0)) ** 2).sum()) for j in rest}
        assert dists[i] == min(dists.values())
        chosen.append(i)
    assert sorted(order) == [0, 1, 2, 3]


def test_herding_memory_keeps_the_herding_prefix():
    data = make_task([0, 1], per_class=10)
    features = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))
    mem = ReplayMemory(per_class=3, selection="herding")
    mem.update(0, data, torch.Generator().manual_seed(0), features=features)
    for c in (0, 1):
        pos = np.flatnonzero(data.targets == c)
        want = list(herding_order(features[torch.as_tensor(pos)]))[:3]
        stored = [int(x[0, 0, 1]) for x in mem.groups[(0, c)]]  # the position stamp of each stored image
        assert stored == [int(pos[i]) for i in want]
    with pytest.raises(ValueError, match="features"):
        ReplayMemory(per_class=3, selection="herding").update(0, data, torch.Generator())


def test_aux_tensors_shrink_with_their_images_and_round_trip():
    mem = ReplayMemory(total=8)
    added = mem.update(0, make_task([0, 1]), torch.Generator().manual_seed(0))
    for k in added:
        mem.aux[k] = [torch.tensor([float(k[1]), float(i)]) for i in range(len(mem.groups[k]))]
    mem.update(1, make_task([2, 3], seed=1), torch.Generator().manual_seed(1))  # 4 -> 2 per class
    assert all(len(mem.aux[k]) == len(mem.groups[k]) == 2 for k in [(0, 0), (0, 1)])
    other = ReplayMemory()
    other.load_state_dict(mem.state_dict())
    assert other.aux.keys() == mem.aux.keys()
    assert all(torch.equal(a, b) for k in mem.aux for a, b in zip(mem.aux[k], other.aux[k]))
