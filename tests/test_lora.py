"""LoRA on open_clip's towers (model.lora_rank): the exact number of parameters it adds, a model that starts at
the base model's outputs, and a task that trains the adapters and nothing else."""
from __future__ import annotations

import copy

import pytest
import torch

from clipcl.config import ConfigError, ModelCfg, load_config
from clipcl.lora import add_lora, is_lora_parameter
from clipcl.models import create


def test_rank_r_adds_exactly_r_times_in_plus_out_per_adapted_matrix():
    model = create(ModelCfg(name="clipcl-tiny-rn")).model
    total = sum(p.numel() for p in model.parameters())
    added = add_lora(model, rank=4)
    # clipcl-tiny-rn: the image tower's attention pool (q, k, v: 512 x 512; c_proj: 128 x 512) and two text
    # blocks (packed in_proj 384 x 128, out_proj 128 x 128, c_fc 512 x 128, c_proj 128 x 512), by hand
    want = 4 * (3 * (512 + 512) + (512 + 128)) + 2 * 4 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    assert added == want == 31232
    assert sum(p.numel() for p in model.parameters()) == total + want
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want
    assert trainable and all(is_lora_parameter(n) for n in trainable)


@pytest.mark.parametrize("name", ["clipcl-tiny-rn", "clipcl-tiny-vit"])
def test_a_lora_model_starts_at_the_base_models_outputs(name):
    bundle = create(ModelCfg(name=name))
    base = bundle.model.eval()
    lora = copy.deepcopy(base)
    add_lora(lora, rank=8, alpha=16)
    lora.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = bundle.tokenizer(["a photo of a red coat.", "a photo of a blue sandal.", "a bag", "a sneaker"])
    with torch.no_grad():
        assert torch.equal(lora.encode_image(images), base.encode_image(images))
        assert torch.equal(lora.encode_text(tokens), base.encode_text(tokens))
        for module in lora.modules():  # B starts at zero, A does not
            if hasattr(module, "parametrizations"):
                for plist in module.parametrizations.values():
                    assert plist[0].B.abs().sum() == 0 and plist[0].A.abs().sum() > 0


def test_a_task_with_lora_trains_the_adapters_and_leaves_every_other_weight_bit_identical(tmp_path):
    from clipcl.engine import Trainer

    overrides = ["model.lora_rank=4", "scenario.n_tasks=1", "scenario.train_per_class=30",
                 "scenario.test_per_class=10", "optim.epochs=1", "optim.batch_size=16", "optim.warmup_steps=1",
                 "optim.lr=0.01", "memory.per_class=2", "scenario.download=false", "method.name=er"]
    try:
        tr = Trainer(load_config("fmnist-cil", overrides), tmp_path / "run", progress_bar=False, quiet=True)
    except ConfigError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")
    start = {k: v.detach().clone() for k, v in tr.bundle.model.named_parameters()}
    tr.run()
    end = dict(tr.bundle.model.named_parameters())
    assert end.keys() == start.keys()
    adapters = [k for k in end if is_lora_parameter(k)]
    assert adapters and any(not torch.equal(end[k], start[k]) for k in adapters if k.endswith(".B"))
    for k in end:
        if k not in adapters:  # the frozen base weights (parametrizations' originals) and the logit scale
            assert torch.equal(end[k], start[k]), k
    # (a ResNet tower's BatchNorm statistics are buffers: they follow the data in train mode, as with full
    # fine-tuning)


def test_lora_options_are_checked():
    with pytest.raises(ConfigError, match="'model.lora_rank' = -1"):
        load_config("fmnist-cil", ["model.lora_rank=-1"])
    with pytest.raises(ConfigError, match="'model.lora_alpha' = 8.0: scales LoRA"):
        load_config("fmnist-cil", ["model.lora_alpha=8"])
    with pytest.raises(ConfigError, match="lock_text and model.lock_image lock both"):
        load_config("fmnist-cil", ["model.lora_rank=4", "model.lock_text=true", "model.lock_image=true"])
    with pytest.raises(ConfigError, match="method.name=zeroshot trains nothing"):
        load_config("fmnist-cil", ["model.lora_rank=4", "method.name=zeroshot"])
    with pytest.raises(ConfigError, match="method.name=wiseft averages weights"):
        load_config("fmnist-cil", ["model.lora_rank=4", "method.name=wiseft"])
