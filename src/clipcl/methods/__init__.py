"""The methods of docs/METHOD.md, one module per family, and their registry.

base (the Method interface, finetune, joint, zero-shot and the task context), replay (er, der++, er-ace),
gcl (gcl, gdro), distill (lwf, zscl), averaging (wise-ft), prototypes (frozen features), rapf (a published CLIP method). `make_method(cfg)` builds the method cfg names;
`register(cls, doc)` adds one.
"""
from __future__ import annotations

from ..config import METHOD_READS, ConfigError, MethodCfg
from .averaging import WiSEFT, interpolate
from .base import (TEXT_CHUNK, Batch, Finetune, Joint, Method, OwnedModules, TaskContext, ZeroShot, check_buffers, check_weights,
                   clip_forward, distillation, frozen_copy, text_tower_trains, unwrap)
from .distill import ZSCL, LwF, Teacher
from .gcl import GCL, GDRO
from .prototypes import Prototypes
from .rapf import RAPF
from .replay import ER, ERACE, DERpp, SeenClassReplay, class_presence

__all__ = ["TEXT_CHUNK", "Batch", "DERpp", "ER", "ERACE", "Finetune", "GCL", "GDRO", "Joint", "LwF", "METHODS",
           "METHOD_DOCS", "Method", "OwnedModules", "Prototypes", "RAPF", "SeenClassReplay", "TaskContext", "Teacher", "WiSEFT", "ZSCL", "ZeroShot",
           "check_buffers", "check_weights", "class_presence", "clip_forward", "distillation", "frozen_copy",
           "interpolate", "make_method", "register", "text_tower_trains", "unwrap"]

METHODS: dict[str, type[Method]] = {}
METHOD_DOCS: dict[str, str] = {}


def register(cls: type[Method], doc: str) -> type[Method]:
    """Make a method available by its name."""
    METHODS[cls.name] = cls
    METHOD_DOCS[cls.name] = doc
    METHOD_READS.setdefault(cls.name, tuple(cls.reads))  # the shipped ones are in config already
    return cls


for _cls, _doc in [
    (ZeroShot, "evaluate the model as it is, no training"),
    (Finetune, "mini-batch CLIP loss on the new task only (forgets)"),
    (ER, "mini-batch CLIP loss on new data + class-balanced memory"),
    (GCL, "global contrastive loss with moving-average estimators on new data + memory"),
    (GDRO, "GCL reweighted per class by distributionally robust optimisation (the paper's method)"),
    (Joint, "mini-batch CLIP loss on all data seen so far (upper bound)"),
    (LwF, "fine-tune + distil the previous model's logits over old classes (no memory)"),
    (WiSEFT, "fine-tune, then interpolate with the weights before the task (method.wise_alpha; no memory)"),
    (ZSCL, "fine-tune + distil the initial model on the batch images, weight ensemble (no memory)"),
    (DERpp, "DER++: cross-entropy over seen classes + stored logits and labels of the memory"),
    (ERACE, "ER with asymmetric cross-entropy: new samples compete only among new classes"),
    (Prototypes, "frozen CLIP: class-mean image features fused with the text classifier (SimpleCIL / NCM; "
                 "method.proto_weight; no training, no memory)"),
    (RAPF, "RAPF (ECCV 2024): linear adapter on frozen CLIP features, Gaussian replay of class statistics, hinge "
           "loss on hard pairs, parameter fusion (no image memory)"),
]:
    register(_cls, _doc)


def make_method(cfg: MethodCfg) -> Method:
    """The method named by cfg.name, or a ConfigError listing the known ones."""
    if cfg.name not in METHODS:
        raise ConfigError(f"config key 'method.name' = {cfg.name!r}: unknown method. "
                          f"Known methods: {', '.join(METHODS)}.")
    return METHODS[cfg.name](cfg)
