"""Replay of a class-balanced memory: er (mini-batch CLIP loss on new data + memory), and the
methods that classify memory samples over every seen class: DER++, ER-ACE."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MethodCfg
from ..evaluate import evaluating, image_features
from ..losses import clip_loss, weighted_clip_loss
from ..sampling import STREAM_SELECT, seeded, uniform_positions
from .base import Method, TaskContext


def _log_absent_drawn(total: int, counts: np.ndarray, draws: int) -> np.ndarray:
    """log P(none of a class's `counts` items among `draws` drawn without replacement from `total` items), the
    hypergeometric C(total - n, draws) / C(total, draws), per class; -inf when total - n < draws."""
    out = np.zeros(len(counts))
    for c, n in enumerate(int(x) for x in counts):
        if n == 0:
            continue
        rest = total - n
        out[c] = (math.lgamma(rest + 1) - math.lgamma(rest - draws + 1) - math.lgamma(total + 1)
                  + math.lgamma(total - draws + 1)) if rest >= draws else -math.inf
    return out


def class_presence(sampling: str, batch_size: int, new_targets: np.ndarray, mem_targets: np.ndarray | None,
                   n_classes: int) -> torch.Tensor:
    """pi_c [n_classes] (float64), the probability that class c is in a step's batch as sampling.py draws it:

        pi_c = 1 - prod over the batch's parts of P(c absent from the part), where
        concat:  B new samples of an epoch permutation of D_t (N samples, n_c of class c): a draw of B without
                 replacement, P = C(N - n_c, B) / C(N, B); and B memory samples (|M| samples, m_c of class c),
                 without replacement when |M| >= B (the same hypergeometric), else with replacement,
                 P = (1 - m_c / |M|)^B;
        uniform: B samples of an epoch permutation of D_t U M, P = C(N + |M| - n_c - m_c, B) / C(N + |M|, B).
    A step whose batch straddles two epochs (its samples from the end of one permutation and the start of the
    next) is not one draw without replacement: for those steps (at most one per epoch when B <= N, none when B
    divides the epoch) the hypergeometric is an approximation. B is the global batch (optim.batch_size, all ranks)."""
    new = np.bincount(np.asarray(new_targets, dtype=np.int64), minlength=n_classes)[:n_classes]
    mem = (np.bincount(np.asarray(mem_targets, dtype=np.int64), minlength=n_classes)[:n_classes]
           if mem_targets is not None and len(mem_targets) else np.zeros(n_classes, dtype=np.int64))
    N, M, B = int(new.sum()), int(mem.sum()), batch_size
    if sampling == "uniform":
        log_absent = _log_absent_drawn(N + M, new + mem, B)
    else:
        log_absent = _log_absent_drawn(N, new, B)
        if M:
            log_absent = log_absent + (_log_absent_drawn(M, mem, B) if M >= B else B * np.log1p(-mem / M))
    return torch.as_tensor(-np.expm1(log_absent), dtype=torch.float64)


class ER(Method):
    """Experience replay: L = CLIP(B_t U B_M), B_M drawn from the class-balanced memory (method.sampling:
    `concat` adds B memory samples to B new ones, `uniform` draws from D_t U M alike). After each task the
    memory takes the task's images (memory.selection: random, or iCaRL herding on the model's features).

    method.replay_share=classes weighs the memory samples by class balancing's share of old classes: with S_M =
    n_old / n_seen and S_t = 1 - S_M (the new task's classes over the seen ones), the weighted CLIP loss
        i2t = sum_{i in B_M} S_M / b_M CE_i + sum_{i in B_t} S_t / b_t CE_i
        t2i = sum_{u in B_M} S_M / U_M t2i_u + sum_{u in B_t} S_t / U_t t2i_u
    (b the part's samples, U its distinct classes, t2i_u the mean over class u's images of -log p(j | t_u) among
    the batch images; losses.weighted_clip_loss). A batch with samples of one part only gets the plain loss."""

    name = "er"
    reads = ("sampling", "replay_share")

    def training_forward(self, model, images, labels, index, step):
        if self.cfg.replay_share == "batch":
            return super().training_forward(model, images, labels, index, step)
        z, text, inv, _, scale = self.forward_batch(model, images, labels)
        weights = self.replay_weights(index, inv)
        if weights is None:
            return {"contrastive_loss": clip_loss(z, text, inv, scale)}
        return {"contrastive_loss": weighted_clip_loss(z, text, inv, scale, *weights)}

    def replay_weights(self, index: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w_i2t, w_t2i) of replay_share=classes: clip_loss's per-sample weights (1 / B and 1 / (U n_B(u_i))),
        scaled within the memory part to total n_old / n_seen and within the new part to the rest; None for a
        batch of one part."""
        assert self.ctx is not None
        mem = index >= self.ctx.new_size
        if bool(mem.all()) or not bool(mem.any()):
            return None
        share_mem = self.ctx.n_old / self.ctx.n_seen
        share = torch.where(mem, torch.tensor(share_mem, dtype=torch.float64, device=mem.device),
                            torch.tensor(1.0 - share_mem, dtype=torch.float64, device=mem.device))
        n_u = torch.bincount(inv).to(torch.float64)
        out = []
        for w in (torch.full((len(inv),), 1.0 / len(inv), dtype=torch.float64, device=inv.device),
                  1.0 / (len(n_u) * n_u[inv])):
            part_total = torch.where(mem, w[mem].sum(), w[~mem].sum())
            out.append(w * share / part_total)
        return out[0], out[1]

    def training_data(self, ctx):
        mem = ctx.memory.as_imageset() if len(ctx.memory) else None
        return ctx.scenario[ctx.task].train, mem

    def epoch_size(self, new, mem):
        return len(new) + (len(mem) if mem is not None and self.cfg.sampling == "uniform" else 0)

    def batch_positions(self, ctx, step, new, mem):
        if self.cfg.sampling == "uniform":
            return uniform_positions(ctx.seed, ctx.task, step, ctx.batch_size, len(new), len(mem) if mem else 0)
        return super().batch_positions(ctx, step, new, mem)

    def after_task(self, ctx):
        self.update_memory(ctx)

    def update_memory(self, ctx: TaskContext) -> list:
        """Put the task's images into the memory (features first, for herding); returns the groups added."""
        train = ctx.scenario[ctx.task].train
        features = None
        if ctx.memory.selection == "herding":
            with evaluating(ctx.bundle.model):  # the model after the task, BatchNorm on its running statistics
                features = image_features(ctx.bundle, train, ctx.eval_batch_size, ctx.device, ctx.autocast).cpu()
        return ctx.memory.update(ctx.task, train, seeded(ctx.seed, ctx.task, STREAM_SELECT), features)


class SeenClassReplay(ER):
    """Replay methods that classify memory samples over all seen classes: logits l_ic for c in C_<=t."""

    def seen_logits(self, model, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, n_seen], z, text of the seen classes, scale)."""
        assert self.ctx is not None
        z, text, scale = self.forward(model, images, torch.arange(self.ctx.n_seen))
        return scale * z @ text.t(), z, text, scale


class ERACE(SeenClassReplay):
    """ER with asymmetric cross-entropy (ER-ACE): new samples compete only among the classes present in the
    batch's new samples, memory samples among all seen classes:
        L = mean_{i in B_t} CE(l_i restricted to C(B_t), y_i) + mean_{i in B_M} CE(l_i over C_<=t, y_i).
    Old-class logits get no gradient from new samples, so new data does not push old classes away."""

    name = "er_ace"
    reads = ("sampling",)

    def training_forward(self, model, images, labels, index, step):
        assert self.ctx is not None
        logits, *_ = self.seen_logits(model, images)
        is_new = index < self.ctx.new_size
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[labels[is_new]] = True
        masked = logits.masked_fill(is_new.view(-1, 1) & ~present.view(1, -1), float("-inf"))
        terms = {"new_loss": F.cross_entropy(masked[is_new], labels[is_new]) if is_new.any() else logits.sum() * 0}
        if (~is_new).any():
            terms["replay_loss"] = F.cross_entropy(logits[~is_new], labels[~is_new])
        return terms


class DERpp(SeenClassReplay):
    """DER++ for CLIP: cross-entropy of the new samples over all seen classes (class-incremental DER++), and on
    memory samples the logits stored when they entered the memory (over the classes seen then) and their labels:
        L = mean_{i in B_t} CE(l_i,C_<=t, y_i) + alpha mean_{i in B_M} ||l_i,C_<=k - stored_i||^2 / |C_<=k|
            + beta mean_{i in B_M} CE(l_i,C_<=t, y_i)
    (alpha = method.distill_weight, beta = method.label_weight, k the task that stored i)."""

    name = "derpp"
    reads = ("sampling", "distill_weight", "label_weight")

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.stored: torch.Tensor | None = None  # [|M|, C] stored logits in memory order, nan where none

    def attach(self, ctx):
        super().attach(ctx)
        rows = [x for k in ctx.memory.keys() for x in ctx.memory.aux.get(k, [])]
        width = max((len(r) for r in rows), default=0)
        stored = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            stored[i, : len(r)] = r
        self.stored = stored

    def training_forward(self, model, images, labels, index, step):
        ctx = self.ctx
        assert ctx is not None and self.stored is not None
        logits, *_ = self.seen_logits(model, images)
        is_new = index < ctx.new_size
        terms = {}
        if is_new.any():  # uniform sampling can draw a batch of memory samples only
            terms["new_loss"] = F.cross_entropy(logits[is_new], labels[is_new])
        if (~is_new).any():
            mem_logits = logits[~is_new]
            target = self.stored[(index[~is_new] - ctx.new_size).cpu()].to(logits.device)
            width = min(target.shape[1], mem_logits.shape[1])
            known = ~torch.isnan(target[:, :width])
            diff = (mem_logits[:, :width] - target[:, :width].nan_to_num()) * known
            per_sample = (diff ** 2).sum(1) / known.sum(1).clamp_min(1)  # mean over the classes stored with it
            terms["logit_loss"] = self.cfg.distill_weight * per_sample[known.any(1)].mean()
            terms["label_loss"] = self.cfg.label_weight * F.cross_entropy(mem_logits, labels[~is_new])
        return terms

    @torch.no_grad()
    def after_task(self, ctx):
        added = self.update_memory(ctx)
        with evaluating(ctx.bundle.model) as model:
            text = F.normalize(model.encode_text(ctx.tokens[: ctx.n_seen].to(ctx.device)).float(), dim=-1)
            scale = model.logit_scale.exp().float()
            for key in added:
                z = image_features(ctx.bundle, ctx.memory.group_imageset(key), ctx.eval_batch_size, ctx.device,
                                   ctx.autocast)
                ctx.memory.aux[key] = list((scale * z @ text.t()).cpu())
