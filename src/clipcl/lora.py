"""LoRA (low-rank adaptation) of open_clip's towers: W <- W + (alpha / r) B A on the attention and MLP
projections, with W frozen, A [r, in] random, B [out, r] zero (so the model starts exactly where it was) and
only A, B (of every adapted matrix) trained.

Made with torch.nn.utils.parametrize rather than peft: open_clip's attention is nn.MultiheadAttention, whose
packed in_proj_weight F.multi_head_attention_forward reads directly (no nn.Linear for peft to wrap; peft's
MultiheadAttention support is marked experimental), while a parametrization adds B A to any weight matrix,
packed or not, in the model's own modules, so DDP, checkpoints and torch.compile see ordinary parameters.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import ConfigError

LORA_SEED = 0  # A's initialisation: a fixed stream, so the same config starts from the same adapters


class LowRankDelta(nn.Module):
    """The parametrization W -> W + scale B A of one weight matrix [out, in]."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        a = torch.empty(rank, in_features)
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default (Kaiming uniform with a = sqrt(5))
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def lora_targets(model: nn.Module, towers: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(name, module, weight attribute) of every matrix LoRA adapts in the given towers ('visual', 'text'):
    each nn.MultiheadAttention's packed in_proj_weight and out_proj, and each nn.Linear (MLP c_fc / c_proj,
    an attention pool's q/k/v/c projections, a ResNet tower's output projection among them). Convolutions and the
    towers' projection matrices that are plain parameters (ViT `proj`, `text_projection`) are left as they are."""
    out = []
    for name, module in model.named_modules():
        tower = "visual" if name.startswith("visual") else "text" if name.startswith(("transformer", "text")) else None
        if tower not in towers:
            continue
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out.append((name, module, "in_proj_weight"))
        elif isinstance(module, nn.Linear):
            out.append((name, module, "weight"))
    return out


def add_lora(model: nn.Module, rank: int, alpha: float = 0.0, towers: tuple[str, ...] = ("visual", "text")) -> int:
    """Freeze every parameter of the model and adapt the target matrices of `towers` with rank-`rank` LoRA
    (scale alpha / rank; alpha 0 means alpha = rank, a scale of 1); returns the number of parameters added."""
    for p in model.parameters():
        p.requires_grad_(False)
    scale = (alpha or rank) / rank
    g = torch.Generator().manual_seed(LORA_SEED)
    added = 0
    targets = lora_targets(model, towers)
    for tower in towers:
        if not any((n.startswith("visual") if tower == "visual" else not n.startswith("visual")) for n, _, _ in targets):
            raise ConfigError(f"config key 'model.lora_rank' = {rank}: the {tower} tower of this model has no "
                              "nn.MultiheadAttention or nn.Linear for LoRA to adapt; lock it (model.lock_"
                              f"{'image' if tower == 'visual' else 'text'}=true) or set model.lora_rank=0.")
    for _, module, attr in targets:
        weight = getattr(module, attr)
        delta = LowRankDelta(weight.shape[0], weight.shape[1], rank, scale, g).to(weight.device)
        parametrize.register_parametrization(module, attr, delta)
        added += delta.A.numel() + delta.B.numel()
    return added


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (model.named_parameters()) is an adapter's A or B."""
    return ".parametrizations." in name and name.rsplit(".", 1)[-1] in ("A", "B")
