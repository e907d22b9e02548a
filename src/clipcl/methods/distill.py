"""Methods with a frozen teacher: LwF (distil the previous model's logits) and ZSCL (distil the initial
model, ensemble weights). No memory."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import need_int
from ..config import MethodCfg
from ..losses import clip_loss
from .base import Method, TaskContext, _cpu, _state_copy, check_weights, distillation, frozen_copy
from .averaging import interpolate


class Teacher(Method):
    """A method with a frozen teacher model; its weights are checkpointed and rebuilt when the task is entered."""

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.teacher: nn.Module | None = None
        self._teacher_state: dict[str, torch.Tensor] | None = None  # loaded, waiting for attach()

    def attach(self, ctx):
        super().attach(ctx)
        if self._teacher_state is not None:
            self.teacher = frozen_copy(ctx.bundle.model)
            self.teacher.load_state_dict(self._teacher_state)
            self._teacher_state = None

    def state_dict(self):
        state = self.teacher.state_dict() if self.teacher is not None else self._teacher_state
        return {**super().state_dict(), "teacher": _cpu(state)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.teacher, self._teacher_state = None, state["teacher"]

    def needs_teacher(self, ctx: TaskContext | None) -> bool:
        """Whether a run resuming within ctx's task must have a teacher (before_task made one)."""
        return False

    def check_state(self, state, model_state, ctx):
        super().check_state(state, model_state, ctx)
        check_weights("method.teacher", state["teacher"], model_state, self.needs_teacher(ctx),
                      f"the teacher of task {ctx.task}" if ctx else "")


class LwF(Teacher):
    """Learning without Forgetting, for CLIP: fine-tune on D_t and distil the previous model's logits over the
    old classes, L = CLIP(B_t) + lambda T^2 mean_i KL(softmax(l^old_i,C_<t / T) || softmax(l_i,C_<t / T)),
    l^old from the model as it was before task t (lambda = method.distill_weight, T = method.distill_temp).
    No memory."""

    name = "lwf"
    reads = ("distill_weight", "distill_temp")

    def before_task(self, ctx):
        self.teacher = frozen_copy(ctx.bundle.model) if ctx.task > 0 else None

    def needs_teacher(self, ctx):
        return ctx is not None and ctx.task > 0

    def training_forward(self, model, images, labels, index, step):
        ctx = self.ctx
        assert ctx is not None
        n_old = ctx.n_old if self.teacher is not None else 0
        z, text, inv, old_text, scale = self.forward_batch(model, images, labels, extra=n_old)
        terms = {"contrastive_loss": clip_loss(z, text, inv, scale)}
        if n_old:
            with torch.no_grad():
                tz, ttext, tscale = self.forward(self.teacher, images, torch.arange(n_old))
            kd = distillation(tscale * tz @ ttext.t(), scale * z @ old_text.t(), self.cfg.distill_temp)
            terms["distill_loss"] = self.cfg.distill_weight * kd
        return terms


class ZSCL(Teacher):
    """ZSCL (zero-shot continual learning), without extra data: fine-tune on D_t and distil the initial
    model's image and text features on reference images, then ensemble weights after each task.

        L = CLIP(B_t) + lambda (KD_img + KD_txt),
        KD_img = T^2 mean_i KL(softmax(l^0_i / T) || softmax(l_i / T)) over the reference texts C_<=t,
        KD_txt = the same over the batch images for each reference text (the transposed logits),
    l^0 from the initial model, the batch's images as reference images (no reference dataset), the seen class
    names as reference texts. Weight ensemble: after task t, theta <- (k theta_avg + theta) / (k + 1) with
    theta_avg the average of the initial weights and every earlier task's result (k = t + 1 members).
    No memory."""

    name = "zscl"
    reads = ("distill_weight", "distill_temp")

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.average: dict[str, torch.Tensor] | None = None  # the weight ensemble so far (None: the teacher's)
        self.members = 0

    def before_task(self, ctx):
        if self.teacher is None:  # the first task: the initial model
            self.teacher = frozen_copy(ctx.bundle.model)
            self.members = 1

    def training_forward(self, model, images, labels, index, step):
        ctx = self.ctx
        assert ctx is not None and self.teacher is not None
        z, text, inv, ref_text, scale = self.forward_batch(model, images, labels, extra=ctx.n_seen)
        terms = {"contrastive_loss": clip_loss(z, text, inv, scale)}
        with torch.no_grad():
            tz, ttext, tscale = self.forward(self.teacher, images, torch.arange(ctx.n_seen))
        student, teacher = scale * z @ ref_text.t(), tscale * tz @ ttext.t()
        temp = self.cfg.distill_temp
        kd = distillation(teacher, student, temp) + distillation(teacher.t(), student.t(), temp)
        terms["distill_loss"] = self.cfg.distill_weight * kd
        return terms

    def after_task(self, ctx):
        assert self.teacher is not None
        average = self.average if self.average is not None else _state_copy(self.teacher)
        interpolate(ctx.bundle.model, average, 1.0 / (self.members + 1))
        self.average = _state_copy(ctx.bundle.model)
        self.members += 1

    def state_dict(self):
        return {**super().state_dict(), "average": _cpu(self.average), "members": self.members}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.members, self.average = int(state["members"]), state["average"]

    def needs_teacher(self, ctx):
        return ctx is not None  # the initial model, from the first task on

    def check_state(self, state, model_state, ctx):
        super().check_state(state, model_state, ctx)
        need_int("method.members", state["members"], 1 if ctx is not None else 0, None, "the weight ensemble's size")
        check_weights("method.average", state["average"], model_state, False)
