"""Weight-space methods: WiSE-FT in a stream (interpolate with the weights before the task)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import MethodCfg
from .base import Method, _cpu, _state_copy, check_weights


class WiSEFT(Method):
    """WiSE-FT in a stream: fine-tune on D_t (L = CLIP(B_t)), then interpolate with the weights before the
    task, theta <- (1 - alpha) theta_before + alpha theta_after (alpha = method.wise_alpha; integer buffers take
    the fine-tuned value). No memory."""

    name = "wiseft"
    reads = ("wise_alpha",)

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.before: dict[str, torch.Tensor] | None = None

    def before_task(self, ctx):
        self.before = _state_copy(ctx.bundle.model)

    def after_task(self, ctx):
        assert self.before is not None
        interpolate(ctx.bundle.model, self.before, self.cfg.wise_alpha)
        self.before = None

    def state_dict(self):
        return {**super().state_dict(), "before": _cpu(self.before)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.before = state["before"]

    def check_state(self, state, model_state, ctx):
        super().check_state(state, model_state, ctx)
        check_weights("method.before", state["before"], model_state, ctx is not None,
                      "the weights before the task, for the interpolation at its end")


@torch.no_grad()
def interpolate(model: nn.Module, other: dict[str, torch.Tensor], alpha: float) -> None:
    """model <- (1 - alpha) other + alpha model, tensor by tensor; alpha 1 keeps model, 0 gives other, exactly."""
    state = model.state_dict()
    for k, v in state.items():
        if v.is_floating_point():
            v.copy_((1 - alpha) * other[k].to(v.device, v.dtype) + alpha * v)
