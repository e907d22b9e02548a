"""open_clip models: any registered architecture with a pretrained tag or a local checkpoint,
plus tiny architectures (model_configs/*.json) for CPU runs on 28-32 px images."""
from __future__ import annotations

import functools
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from .config import ConfigError, ModelCfg, ScenarioCfg

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


@functools.cache
def register_tiny_models() -> None:
    """Make the shipped tiny architectures known to open_clip (idempotent)."""
    open_clip.add_model_config(CONFIG_DIR)


def list_models() -> list[str]:
    """Every architecture name open_clip knows, the tiny ones included."""
    register_tiny_models()
    return open_clip.list_models()


def _weights_only_refusal(e: BaseException) -> str | None:
    """What torch.load(weights_only=True) refused in a file (e.g. 'Unsupported global: GLOBAL x.Y was not an
    allowed global by default', 'Unsupported operand 110'), without torch's advice around it; None if not that."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or not ("Weights only load failed" in text or
                                                          "WeightsUnpickler" in text):
        return None
    if "WeightsUnpickler error:" in text:
        core = text.split("WeightsUnpickler error:", 1)[1]
    else:  # torch's paragraphs: its advice, then what it refused, then a link to its documentation
        parts = [part for part in text.split("\n\n") if part.strip()]
        core = parts[1] if len(parts) > 2 else parts[-1]
    return _reason(core.strip().split("\n\n")[0].split(". ")[0]) or "unsupported content"


def _reason(e: BaseException | str, limit: int = 300) -> str:
    """The error's text on one line, without terminal colour codes, cut whole at a sentence or word if long."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split()) or type(e).__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    if cut > limit // 2:
        return text[:cut + 1]
    space = text.rfind(" ", 0, limit)
    return text[:space if space > 0 else limit] + " ..."


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@dataclass
class ClipBundle:
    """A model with what is needed to feed it: tokenizer, input size and normalisation."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = False  # prepared images in channels-last memory format (model.channels_last)
    resize: str = "torch"  # model.resize: torch (in prepare_images) | openclip (in input_images, on the CPU)
    # the model's open_clip preprocessing (size, interpolation, resize_mode, ...: open_clip's PreprocessCfg fields)
    preprocess: dict = field(default_factory=dict, repr=False)
    _steps: list | None = field(default=None, repr=False, compare=False)  # input_images' PIL steps, once built
    # evaluation's image embeddings while the image tower is unchanged (evaluate.task_accuracy)
    eval_features: dict = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        """The width D of the embeddings both towers output (open_clip's embed_dim)."""
        width = getattr(self.model.visual, "output_dim", None)
        if isinstance(width, int):
            return width
        projection = self.model.text_projection
        return int(projection.weight.shape[0] if isinstance(projection, torch.nn.Linear) else projection.shape[1])

    def input_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, C, H, W] on the CPU, as stored -> uint8 RGB at the model's size, made by open_clip's
        own eval transform for this model (model.resize=openclip: its resize and crop steps, i.e. its
        interpolation and resize_mode, on PIL images); unchanged with model.resize=torch, where prepare_images
        resizes floats instead."""
        size = self.image_size
        if self.resize != "openclip" or images.shape[-2:] == (size, size):
            return images
        from PIL import Image

        steps = self._pil_steps()
        out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
        for k, img in enumerate(images.numpy()):
            pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            for step in steps:
                pil = step(pil)
            out[k] = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
        return out

    def _pil_steps(self) -> list:
        """The steps of open_clip.image_transform_v2 (eval) before its ToTensor: resize, crop, mode."""
        if self._steps is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            cfg = PreprocessCfg(**{"size": self.image_size, "mean": self.mean, "std": self.std, **self.preprocess})
            steps = []
            for step in image_transform_v2(cfg, is_train=False).transforms:
                if "ToTensor" in type(step).__name__:
                    break
                steps.append(step)
            self._steps = steps
        return self._steps

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, C, H, W] (C = 1 or 3, any size) -> normalised float input at the model's size."""
        x = images.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def create(cfg: ModelCfg, device: torch.device | str = "cpu", data: ScenarioCfg | None = None,
           quiet: bool = False) -> ClipBundle:
    """Build the model of cfg: random init, an open_clip pretrained tag, a local checkpoint file, or weights
    pretrained here (`clipcl:<tag>`, made on `device` from the data where `data` says: root, download)."""
    register_tiny_models()
    if cfg.name not in open_clip.list_models() and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"config key 'model.name' = {cfg.name!r}: unknown open_clip architecture. "
            f"Tiny CPU models: {', '.join(TINY_MODELS)}; full list: 'clipcl list models'."
        )
    pretrained = cfg.pretrained or None
    if pretrained and pretrained.startswith("clipcl:"):  # made here (pretrain.py), cached after the first run
        from .pretrain import TAG_PREFIX, weights

        pretrained = str(weights(pretrained[len(TAG_PREFIX):], cfg.name, torch.device(device), data, quiet))
    if pretrained and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        if pretrained not in tags:
            raise ConfigError(
                f"config key 'model.pretrained' = {pretrained!r}: neither a file nor a pretrained tag of "
                f"{cfg.name} (tags: {', '.join(tags) or 'none'}). Give a tag or the path of a checkpoint."
            )
    quiet = _DropRandomInitNotice()
    logging.getLogger().addFilter(quiet)  # random init is what the tiny models want, not news
    try:
        model = open_clip.create_model(cfg.name, pretrained=pretrained, device=device)
    except Exception as e:  # a bad file fails in pickle, zip, safetensors or load_state_dict: many types
        refused = _weights_only_refusal(e)  # read with weights_only=True: a pickled object is never built
        found = re.search(r"GLOBAL ([\w.]*\w)", refused or "")  # the class or function it would have built
        if pretrained and Path(pretrained).is_file() and found:
            raise ConfigError(
                f"config key 'model.pretrained' = {pretrained!r}: clipcl refuses this file: it holds pickled "
                f"Python objects ({found[1]}), and loading those could run code. If you trust its source, load "
                "it with torch.load(..., weights_only=False), re-save the model's weights as a plain state dict "
                "(torch.save(model.state_dict(), 'weights.pt'), or a .safetensors file) and give that file."
            ) from None
        reason = refused or _reason(e)  # torch's advice to load with weights_only=False is not for a bad file
        if pretrained and Path(pretrained).is_file():
            raise ConfigError(
                f"config key 'model.pretrained' = {pretrained!r}: this file is not a {cfg.name} checkpoint that "
                f"open_clip can load ({type(e).__name__}: {reason}). Give a state dict of this architecture "
                "(.pt/.bin saved with torch.save, or .safetensors), or check model.name."
            ) from None
        raise ConfigError(
            f"could not load weights for model {cfg.name!r} with pretrained={pretrained!r} ({reason}). "
            "Pretrained tags are downloaded on first use: without network, pass the checkpoint file path."
        ) from None
    finally:
        logging.getLogger().removeFilter(quiet)
    if cfg.lock_text:
        model.lock_text_tower()
    if cfg.lock_image:
        model.lock_image_tower()
    if cfg.lora_rank:  # after the weights are loaded: the adapters start at zero on top of them
        from .lora import add_lora

        add_lora(model, cfg.lora_rank, cfg.lora_alpha,
                 tuple(t for t, locked in (("visual", cfg.lock_image), ("text", cfg.lock_text)) if not locked))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pcfg.get("size", model.visual.image_size)
    if isinstance(size, (tuple, list)):
        size = size[0]
    mean = tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD))
    known = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
    return ClipBundle(model=model, tokenizer=tokenizer, image_size=int(size), mean=mean, std=std, resize=cfg.resize,
                      channels_last=cfg.channels_last, preprocess={k: v for k, v in pcfg.items() if k in known})
