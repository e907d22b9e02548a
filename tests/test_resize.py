"""model.resize=openclip feeds the model exactly what open_clip's own eval transform makes of an image; the
default (torch bicubic on floats) differs, which is why the option exists."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipcl.config import ConfigError, ModelCfg, RunCfg
from clipcl.models import create


def images(n: int, c: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def open_clip_inputs(batch: torch.Tensor, bundle, **preprocess) -> torch.Tensor:
    """What open_clip's eval transform for this preprocessing makes of each image, given as a PIL image."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**{"size": bundle.image_size, "mean": bundle.mean, "std": bundle.std, **preprocess})
    tf = image_transform_v2(cfg, is_train=False)
    out = []
    for img in batch.numpy():
        pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        out.append(tf(pil))
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(3, 13, 13), (3, 20, 27), (1, 28, 28), (3, 60, 41)])
def test_openclip_resize_equals_open_clips_own_transform(shape):
    bundle = create(ModelCfg(name="clipcl-tiny-rn", resize="openclip"))
    batch = images(4, *shape)
    want = open_clip_inputs(batch, bundle)
    got = bundle.prepare_images(bundle.input_images(batch))
    assert got.shape == want.shape == (4, 3, bundle.image_size, bundle.image_size)
    assert torch.allclose(got, want, atol=1e-5)
    # the default resizes floats with torch: not open_clip's inputs (upsampling overshoots, no crop)
    default = create(ModelCfg(name="clipcl-tiny-rn"))
    assert default.input_images(batch) is batch
    if shape[1] == shape[2]:
        assert (default.prepare_images(batch) - want).abs().max() > 0.05


@pytest.mark.parametrize("preprocess", [{"resize_mode": "squash"}, {"interpolation": "bilinear"},
                                        {"resize_mode": "longest", "fill_color": 0}])
def test_openclip_resize_follows_the_models_own_preprocessing(preprocess):
    """SigLIP and timm towers squash, or resize bilinearly: input_images does what the model's config says."""
    from dataclasses import replace

    base = create(ModelCfg(name="clipcl-tiny-rn", resize="openclip"))
    bundle = replace(base, preprocess={**base.preprocess, **preprocess})
    batch = images(3, 3, 20, 27)
    want = open_clip_inputs(batch, bundle, **bundle.preprocess)
    got = bundle.prepare_images(bundle.input_images(batch))
    assert torch.allclose(got, want, atol=1e-5)
    default = open_clip_inputs(batch, base, **base.preprocess)
    assert (got - default).abs().max() > 0.05  # another preprocessing, other inputs: the test can tell


def test_images_already_at_the_models_size_are_left_alone():
    bundle = create(ModelCfg(name="clipcl-tiny-rn", resize="openclip"))
    batch = images(2, 3, bundle.image_size, bundle.image_size)
    assert bundle.input_images(batch) is batch


def test_an_unknown_resize_is_refused():
    with pytest.raises(ConfigError, match="'model.resize' = 'pil': must be one of torch, openclip"):
        RunCfg(model=ModelCfg(resize="pil"))


def test_a_run_with_openclip_resize_trains_and_evaluates_on_its_inputs(tmp_path):
    """The engine and the evaluation both pass through input_images: the run's first batch is what the
    bundle's input_images makes of the stored images."""
    from clipcl.config import load_config
    from clipcl.engine import Trainer

    seen = []
    cfg = load_config("fmnist-cil", ["model.resize=openclip", "scenario.download=false", "scenario.n_tasks=1",
                                     "scenario.train_per_class=8", "scenario.test_per_class=4",
                                     "optim.epochs=1", "optim.batch_size=8", "method.name=finetune"])
    try:
        tr = Trainer(cfg, out_dir=tmp_path / "run", quiet=True)
    except ConfigError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    real = tr.bundle.input_images

    def recording(x):
        import inspect

        seen.append((inspect.stack()[1].function, tuple(x.shape[-2:])))
        return real(x)

    tr.bundle.input_images = recording
    tr.run()
    callers = {f for f, _ in seen}
    assert {"train_step", "image_features"} <= callers  # training and evaluation both take open_clip's inputs
    assert all(size == (28, 28) for _, size in seen)  # the stored images, brought to the model's size there
