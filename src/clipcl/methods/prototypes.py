"""Frozen-feature methods: class prototypes of the image features fused with the text classifier (SimpleCIL /
NCM on CLIP). The backbone never trains, so it never forgets; what a task adds is one mean feature per class."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import StateError, need_tensor
from ..config import MethodCfg
from ..evaluate import evaluating, image_features
from .base import Method, TaskContext


class Prototypes(Method):
    """Class prototypes fused with the text classifier; no training.

    After task t, for each class c of D_t: S_c += sum_{i in D_t, y_i = c} z_i and n_c += |{i: y_i = c}| (z_i the
    normalised image embedding of the frozen model, eval mode, no augmentation); p_c = normalise(S_c / n_c), so
    in a domain-incremental stream a class's prototype is the mean over every domain seen. Evaluation scores
        l_ic = (1 - w) z_i . t_c + w z_i . p_c   when every candidate class has a prototype,
    and z_i . t_c (CLIP's zero-shot classifier) when some has none (the accuracy before a task is trained, the
    unseen rows): image-prototype cosines are far larger than image-text ones, so a class with a prototype
    would draw the images of a class without. w = method.proto_weight (1: a nearest-class-mean classifier on
    CLIP's features; 0: zero-shot CLIP).
    """

    name = "prototypes"
    reads = ("proto_weight",)
    trains = False

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.sums: torch.Tensor | None = None  # [n_classes, D] float32, S_c
        self.counts: torch.Tensor | None = None  # [n_classes] int64, n_c

    def after_task(self, ctx: TaskContext) -> None:
        data = ctx.scenario[ctx.task].train
        with evaluating(ctx.bundle.model):
            z = image_features(ctx.bundle, data, ctx.eval_batch_size, ctx.device, ctx.autocast).float().cpu()
        n_classes = len(ctx.scenario.classnames)
        if self.sums is None:
            self.sums = torch.zeros(n_classes, z.shape[1], dtype=torch.float32)
            self.counts = torch.zeros(n_classes, dtype=torch.int64)
        labels = torch.as_tensor(data.targets, dtype=torch.int64)
        self.sums.index_add_(0, labels, z)
        self.counts += torch.bincount(labels, minlength=n_classes)

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(p [n_classes, D], has [n_classes] bool): the normalised prototypes and which classes have one."""
        if self.sums is None or self.counts is None:
            return None
        has = self.counts > 0
        p = F.normalize(self.sums / self.counts.clamp(min=1).unsqueeze(1).float(), dim=-1)
        return p, has

    def classifier(self):
        made = self.prototypes()
        if made is None:
            return None
        p, has = made
        w = self.cfg.proto_weight

        def scores(z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            n = len(text)  # the candidates: scenario labels 0..n-1
            logits = z @ text.t()
            if not bool(has[:n].all()):  # image-prototype cosines run far above image-text ones: a class with a
                return logits  # prototype would draw the images of one without, so the text classifier alone
            return (1 - w) * logits + w * (z @ p[:n].to(z.device, z.dtype).t())

        return scores

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sums, self.counts = state.get("sums"), state.get("counts")

    def check_state(self, state: dict, model_state: dict[str, torch.Tensor], ctx: TaskContext | None) -> None:
        super().check_state(state, model_state, ctx)
        sums, counts = state.get("sums"), state.get("counts")
        if (sums is None) != (counts is None):
            raise StateError("method.sums", "and method.counts must both be there or both be absent")
        if sums is None:
            return
        need_tensor("method.counts", counts, dtype=torch.int64, ndim=1)
        need_tensor("method.sums", sums, dtype=torch.float32, ndim=2)
        if sums.shape[0] != counts.shape[0]:
            raise StateError("method.sums", f"has {sums.shape[0]} rows for {counts.shape[0]} class counts")
        if (counts < 0).any():
            raise StateError("method.counts", f"holds a negative count ({int(counts.min())})")
        if not torch.isfinite(sums).all():
            raise StateError("method.sums", "holds a value that is not finite")
