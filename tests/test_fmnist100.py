"""The compositional Fashion-MNIST benchmarks (fmnist100-cil, fmnist100-dil) and their pretraining data:
class names, order, splits and sizes exact; pretraining and stream images disjoint; the replay rate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipcl.config import ScenarioCfg, load_config
from clipcl.data import build_scenario
from clipcl.data import compositional as C
from clipcl.data.datasets import PRETRAIN_START, fashion_mnist_arrays, load_dataset
from clipcl.sampling import concat_positions, replay_rates, uniform_positions


@pytest.fixture(scope="module")
def fmnist():
    try:
        return fashion_mnist_arrays(ScenarioCfg(download=False))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not installed ({e})")


@pytest.fixture(scope="module")
def stream(fmnist):
    return load_dataset(ScenarioCfg(dataset="fmnist100", download=False))


def test_class_names_are_every_colour_garment_pair_by_label():
    assert len(C.CLASSNAMES) == 100 == len(set(C.CLASSNAMES))
    colours, garments = list(C.COLOURS), list(C.GARMENTS)
    for label, name in enumerate(C.CLASSNAMES):
        assert name == f"{colours[label % 10]} {garments[label // 10]}"
    assert C.CLASSNAMES[4 * 10 + 0] == "red coat" and C.CLASSNAMES[5 * 10 + 5] == "blue sandal"


def test_pretraining_combinations_are_a_latin_design_of_sixty():
    seen = np.zeros((10, 10), dtype=int)
    for c in C.PRETRAIN_COMBINATIONS:
        seen[c // 10, c % 10] += 1
    assert seen.sum() == 60 and seen.max() == 1
    assert (seen.sum(1) == 6).all() and (seen.sum(0) == 6).all()  # each garment in 6 colours, each colour on 6
    assert sorted(C.PRETRAIN_COMBINATIONS + C.UNSEEN_COMBINATIONS) == list(range(100))


def test_painting_is_grey_level_times_the_jittered_colour():
    grey = torch.tensor([[[0, 255], [128, 51]]], dtype=torch.uint8)
    rgb = torch.tensor([[220, 40, 3]], dtype=torch.uint8)
    out = C.paint(grey, rgb)
    for ch, c in enumerate((220, 40, 3)):
        want = [[round(g * c / 255) for g in row] for row in ((0, 255), (128, 51))]
        assert out[0, ch].tolist() == want
    rgb = C.paint_colours(np.array([0, 0, 9]), np.array([5, 6, 5]))
    assert (rgb[0] != rgb[1]).any()  # two images of one colour are painted differently
    red, white = np.array(C.COLOURS["red"]), np.array(C.COLOURS["white"])
    assert (np.abs(rgb[0].astype(int) - np.rint(red * 0.875)) <= 45).all()  # 0.75-1 brightness, +-12 tint
    again = C.paint_colours(np.array([0, 9]), np.array([5, 5]))
    assert (again[0] == rgb[0]).all() and (again[1] == rgb[2]).all()  # fixed by the image's own index


def test_stream_sizes_are_exact_and_colours_balanced_within_each_garment(fmnist, stream):
    ytr, yte = fmnist["train"][1][:PRETRAIN_START], fmnist["test"][1]
    assert len(stream.train) == PRETRAIN_START and len(stream.test) == len(yte)
    assert (stream.train.targets // 10 == ytr).all() and (stream.test.targets // 10 == yte).all()
    for labels, garments in ((stream.train.targets, ytr), (stream.test.targets, yte)):
        counts = np.bincount(labels, minlength=100).reshape(10, 10)
        for g in range(10):
            n = int((garments == g).sum())
            assert sorted(counts[g].tolist()) == sorted(n // 10 + (k < n % 10) for k in range(10))
    assert (np.bincount(stream.test.targets, minlength=100) == 100).all()


def test_what_validation_knows_of_the_datasets_matches_them(fmnist, stream):
    from clipcl import config

    for name in ("fmnist100", "fmnist100_dil", "fmnist100_pretrain"):
        ds = stream if name == "fmnist100" else load_dataset(ScenarioCfg(dataset=name, download=False))
        images = ds.train if ds.train is not None else next(iter(ds.domains.values()))[0]
        assert config.DATASET_FACTS[name] == (tuple(images.load([0]).shape[1:]), len(ds.classnames))


def test_pretraining_and_stream_images_are_disjoint(fmnist, stream):
    pre = load_dataset(ScenarioCfg(dataset="fmnist100_pretrain", download=False))
    assert pre.classnames == [C.CLASSNAMES[c] for c in C.PRETRAIN_COMBINATIONS]
    pre_src, stream_src = pre.train.store.source[pre.train.index], stream.train.store.source[stream.train.index]
    assert len(np.intersect1d(pre_src, stream_src)) == 0
    assert pre_src.min() == PRETRAIN_START and len(pre_src) == len(fmnist["train"][1]) - PRETRAIN_START
    dil = load_dataset(ScenarioCfg(dataset="fmnist100_dil", download=False))
    blocks = [tr.store.source[tr.index] for tr, _ in dil.domains.values()]
    assert all(len(np.intersect1d(b, pre_src)) == 0 for b in blocks)
    for i in range(len(blocks)):  # every domain trains on images of its own
        for j in range(i):
            assert len(np.intersect1d(blocks[i], blocks[j])) == 0
    # the pretraining sees only its 60 combinations: map its labels back and check the garment of every image
    full = np.array(C.PRETRAIN_COMBINATIONS)[pre.train.targets]
    assert (full // 10 == fmnist["train"][1][pre_src]).all()


def test_cil_config_cuts_ten_tasks_of_ten_classes_in_a_seeded_order(fmnist):
    cfg = load_config("fmnist100-cil", ["scenario.download=false"])
    sc = build_scenario(cfg.scenario, cfg.seed)
    want = np.random.default_rng(1993).permutation(100).tolist()
    assert list(sc.class_order) == want and len(sc) == 10
    assert list(sc.classnames) == [C.CLASSNAMES[c] for c in want]  # labels follow the stream's order
    for t, task in enumerate(sc.tasks):
        assert list(task.classes) == list(range(10 * t, 10 * t + 10))
        for split, n in ((task.train, 50), (task.val, 10), (task.test, 30)):
            assert len(split) == 10 * n
            assert (np.bincount(split.targets, minlength=100)[10 * t: 10 * t + 10] == n).all()
        assert len(np.intersect1d(task.train.index, task.val.index)) == 0
    # siblings land in different tasks: no task holds more than 4 colours of one garment
    for t in range(10):
        garments = np.bincount(np.array(want[10 * t: 10 * t + 10]) // 10, minlength=10)
        assert garments.max() <= 4


def test_dil_domains_have_their_own_class_frequencies(fmnist):
    dil = load_dataset(ScenarioCfg(dataset="fmnist100_dil", download=False))
    assert list(dil.domains) == list(C.DIL_DOMAINS)
    freqs = []
    for d, (tr, te) in enumerate(dil.domains.values()):
        want = C.domain_frequencies(d)
        assert want.max() == C.DIL_MOST and want.min() == C.DIL_FEWEST
        src = np.arange(d * C.DIL_BLOCK, (d + 1) * C.DIL_BLOCK)
        labels = 10 * fmnist["train"][1][src].astype(np.int64) + C.assign_colours(fmnist["train"][1][src], 10 + d)
        have = np.bincount(labels, minlength=100)
        assert (np.bincount(tr.targets, minlength=100) == np.minimum(want, have)).all()
        assert (np.bincount(te.targets, minlength=100) == 100).all()
        freqs.append(want)
    corr = np.corrcoef(np.array(freqs, dtype=float))
    assert np.abs(corr[np.triu_indices(5, 1)]).max() < 0.5  # a class frequent in one domain is not in all


def test_replay_rate_matches_cifar100_b0_inc10_and_the_sampler(fmnist):
    cfg = load_config("fmnist100-cil", ["memory.per_class=5", "scenario.download=false"])
    ours = replay_rates(cfg)
    cifar = replay_rates(load_config("cifar100-b0-inc10", ["memory.per_class=5"]))
    assert ours[0] == 0 == cifar[0]
    assert ours[-1] == pytest.approx(64 / 450)  # each memory image drawn 0.14 times a step in the last task
    for a, b in zip(ours[1:], cifar[1:]):
        assert 0.5 <= a / b <= 2  # within 2x of CIFAR-100 B0-Inc10 with the same batch, task by task
    assert max(ours[4:]) <= 1.0  # at most about once a step from task 5 on
    # the rates come from the config alone: they must be the real stream's, task by task
    sc = build_scenario(cfg.scenario, cfg.seed)
    old = np.cumsum([0] + [len(task.classes) for task in sc.tasks])[:-1]
    sizes = [(len(task.train), 5 * int(o)) for task, o in zip(sc.tasks, old)]
    assert ours == pytest.approx([64 / n_mem if n_mem else 0.0 for _, n_mem in sizes])
    # and the sampler draws exactly that: count the memory draws of 200 steps of the last task
    n_new, n_mem = sizes[-1]
    draws = np.zeros(n_mem)
    for step in range(200):
        pos = concat_positions(0, 9, step, cfg.optim.batch_size, n_new, n_mem)
        mem = pos[pos >= n_new] - n_new
        assert len(np.unique(mem)) == len(mem) == 64  # without replacement: each image at most once a step
        np.add.at(draws, mem, 1)
    assert draws.sum() / 200 / n_mem == pytest.approx(ours[-1])
    uniform = replay_rates(load_config("fmnist100-cil", ["memory.per_class=5", "method.sampling=uniform"]))
    assert uniform[-1] == pytest.approx(64 / (n_new + n_mem))
    counts = np.zeros(n_new + n_mem)
    steps = (n_new + n_mem) // 64 * 4  # four epochs of D_t U M
    for step in range(steps):
        np.add.at(counts, uniform_positions(0, 9, step, 64, n_new, n_mem), 1)
    assert counts[n_new:].sum() / steps / n_mem == pytest.approx(uniform[-1], rel=0.02)


@pytest.mark.slow
def test_pretraining_on_sixty_combinations_composes_the_forty_it_never_saw(fmnist, stream, tmp_path):
    """The recipe's pretraining, shortened: both towers learn the words, and the unseen combinations' zero-shot
    accuracy (among all 100 classes) is far above chance: the text tower composes "colour garment"."""
    from clipcl.engine import Trainer
    from clipcl.evaluate import candidate_text, image_features
    from clipcl.pretrain import RECIPES

    torch.manual_seed(0)
    cfg = load_config("fmnist-cil", [*RECIPES["fmnist100"][1], "model.pretrained=", "device=cpu",
                                     "scenario.download=false", "scenario.train_per_class=100", "optim.epochs=3"])
    trainer = Trainer(cfg, tmp_path / "run", progress_bar=False, quiet=True, signals=False)
    text_before = {k: v.clone() for k, v in trainer.bundle.model.state_dict().items()
                   if k.startswith(("transformer.", "token_embedding", "text_projection"))}
    trainer.run()
    bundle = trainer.bundle
    bundle.model.eval()
    after = bundle.model.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in text_before.items())  # the text tower trained
    unseen = np.flatnonzero(np.isin(stream.test.targets, C.UNSEEN_COMBINATIONS))
    test = stream.test.subset(unseen[::4])  # 1,000 images of the 40 combinations pretraining never saw
    cpu = torch.device("cpu")
    text = candidate_text(bundle, stream.classnames, "default", cpu)
    pred = (image_features(bundle, test, 500, cpu) @ text.t()).argmax(1).numpy()
    accuracy = float((pred == test.targets).mean())
    assert accuracy > 0.10, accuracy  # chance among 100 classes is 1%
    assert float((pred % 10 == test.targets % 10).mean()) > 0.5  # the colour word is read on unseen pairs
