"""RAPF (Huang et al., ECCV 2024: class-incremental learning with CLIP by adaptive representation adjustment and
parameter fusion), as its public code does it: a linear adapter on the frozen CLIP's image embeddings, old
classes replayed as Gaussian samples of their stored feature statistics, a hinge loss for the old classes whose
names lie close to a new class's, and a fusion of the adapter's old and new weights after each task. No image is
kept. docs/METHOD.md has the formulas and what differs from the published recipe."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..checkpoint import StateError, need_tensor
from ..config import MethodCfg
from ..evaluate import evaluating, image_features
from ..prompts import class_tokens, text_features
from ..sampling import seeded
from .base import Method, TaskContext, unwrap

TEMPLATE = ("a good photo of a {}.",)  # RAPF's prompt, in training and at evaluation
RIDGE = 1e-4  # added to each class's covariance (RAPF's)
STREAM_RAPF = 31  # the derived random stream of RAPF's per-epoch class order and Gaussian samples


def fuse(w_old: torch.Tensor, w_new: torch.Tensor, mix_bias: float) -> torch.Tensor:
    """RAPF's decomposed parameter fusion: with W_old = U S V^T, P_old = U^T W_old, P_new = U^T W_new,
    M = min(|P_new - P_old| / max |P_new - P_old| + mix_bias, 1) elementwise, W = U (M * P_new + (1 - M) * P_old):
    the entries that moved most in the old weights' left singular basis keep their new value, the others are
    pulled back toward the old one."""
    u, _, _ = torch.linalg.svd(w_old.double())
    p_old, p_new = u.T @ w_old.double(), u.T @ w_new.double()
    d = (p_new - p_old).abs()
    m = (d / d.max().clamp(min=torch.finfo(torch.float64).tiny) + mix_bias).clamp(max=1.0)
    return (u @ (m * p_new + (1 - m) * p_old)).to(w_new.dtype)


class RAPF(Method):
    """A linear adapter on frozen CLIP features, Gaussian replay of old classes, a hinge loss, parameter fusion.

    f(x) = normalise(W x), x the frozen image tower's embedding (before normalisation; W has no bias, so
    normalise(W x) = normalise(W x / |x|)), W [D, D] the method's one trained module. Classes are scored by
    s f . t_c, t_c the normalised text embedding of "a good photo of a {c}." and s the frozen logit scale.
    After task t, each new class c stores mu_c and Sigma_c + 1e-4 I of its training images' x (no augmentation,
    eval mode). A step of task t > 0 trains on
        L = CE(s f([x_B; z_old]) . t^T, [y_B; y_old]) + mean_{(k, j), z ~ N(mu_k, Sigma_k)} relu(f(z) . t_j - f(z) . t_k + margin)
    z_old: 10 beta samples of each of K old classes (rapf_classes), taken in turn from an order of the old classes
    shuffled each epoch; (k, j) the hard pairs, old class k and new class j with |t_j - t_k| < rapf_threshold, 20
    beta samples of k each per step. Task 0: the cross-entropy alone. After each task t > 0 the adapter is
    fused with the one it started from (fuse, rapf_mix_bias).
    """

    name = "rapf"
    reads = ("rapf_threshold", "rapf_mix_bias", "rapf_beta", "rapf_classes", "rapf_margin")

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.adapter: nn.Linear | None = None
        self.means: torch.Tensor | None = None  # [n_classes, D] float32, mu_c
        self.covs: torch.Tensor | None = None  # [n_classes, D, D] float32, Sigma_c + ridge
        self.has: torch.Tensor | None = None  # [n_classes] bool: the classes with statistics
        self.start: torch.Tensor | None = None  # the adapter's weight when the task began (fusion)
        self._text: torch.Tensor | None = None  # RAPF's class texts, encoded once (the text tower is frozen)
        self._chol: dict[int, torch.Tensor] = {}
        self.pairs: torch.Tensor = torch.zeros(0, 2, dtype=torch.int64)  # hard pairs (old k, new j) of the task

    # ----------------------------------------------------------------- what trains
    def setup(self, bundle) -> None:
        self.adapter = nn.Linear(bundle.dim, bundle.dim, bias=False)  # PyTorch's default initialisation, as RAPF

    def trains_parameter(self, name, param) -> bool:
        return False  # both towers and the logit scale stay frozen

    def modules(self):
        return {"adapter": self.adapter}

    # ----------------------------------------------------------------- around a task
    def class_text(self, device: torch.device) -> torch.Tensor:
        """Every class's normalised embedding of RAPF's prompt [n_classes, D]."""
        if self._text is None:
            ctx = self.ctx
            assert ctx is not None
            tokens = class_tokens(ctx.bundle.tokenizer, list(ctx.scenario.classnames), TEMPLATE)
            with torch.no_grad(), evaluating(ctx.bundle.model):
                self._text = text_features(ctx.bundle.model, tokens.to(ctx.device)).float()
        return self._text.to(device)

    def attach(self, ctx: TaskContext) -> None:
        super().attach(ctx)
        self._text = None
        n_old, n_seen = ctx.n_old, ctx.n_seen
        if n_old == 0:
            self.pairs = torch.zeros(0, 2, dtype=torch.int64)
            return
        t = self.class_text(torch.device("cpu"))
        d = torch.cdist(t[:n_old], t[n_old:n_seen])  # [old, new]
        k, j = torch.nonzero(d < self.cfg.rapf_threshold, as_tuple=True)
        self.pairs = torch.stack([k, j + n_old], dim=1)

    def before_task(self, ctx: TaskContext) -> None:
        assert self.adapter is not None
        self.start = self.adapter.weight.detach().clone().cpu() if ctx.task > 0 else None

    def after_task(self, ctx: TaskContext) -> None:
        data = ctx.scenario[ctx.task].train
        with evaluating(ctx.bundle.model):
            x = image_features(ctx.bundle, data, ctx.eval_batch_size, ctx.device, ctx.autocast,
                               normalize=False).float().cpu()
        n_classes = len(ctx.scenario.classnames)
        if self.means is None:
            d = x.shape[1]
            self.means = torch.zeros(n_classes, d)
            self.covs = torch.zeros(n_classes, d, d)
            self.has = torch.zeros(n_classes, dtype=torch.bool)
        labels = torch.as_tensor(data.targets, dtype=torch.int64)
        for c in labels.unique().tolist():
            xc = x[labels == c]
            self.means[c] = xc.mean(0)
            cov = torch.cov(xc.T) if len(xc) > 1 else torch.zeros(x.shape[1], x.shape[1])
            self.covs[c] = cov + RIDGE * torch.eye(x.shape[1])
            self.has[c] = True
        self._chol = {}
        if self.start is not None:
            assert self.adapter is not None
            with torch.no_grad():
                w = self.adapter.weight
                w.copy_(fuse(self.start.to(w.device), w.detach(), self.cfg.rapf_mix_bias))
            self.start = None

    # ----------------------------------------------------------------- the forward
    def _samples(self, classes: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
        """n Gaussian samples N(mu_c, Sigma_c) of each class, in order [len(classes) * n, D]."""
        assert self.means is not None and self.covs is not None
        out = []
        for c in classes:
            if c not in self._chol:
                self._chol[c] = torch.linalg.cholesky(self.covs[c].double()).float()
            eps = torch.randn(n, self.means.shape[1], generator=generator)
            out.append(self.means[c] + eps @ self._chol[c].T)
        return torch.cat(out) if out else torch.zeros(0, self.means.shape[1])

    def training_forward(self, model, images, labels, index, step):
        ctx = self.ctx
        assert ctx is not None
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
            x = unwrap(model).encode_image(images).float()
        text = self.class_text(images.device)
        seen = text[: ctx.n_seen]
        scale = unwrap(model).logit_scale.detach().exp().float()
        f = F.normalize(self.call_module("adapter", x), dim=-1)
        if ctx.shard_sizes is not None:  # the own rows differentiable, the loss that of the global batch
            f = distributed.gather(f, ctx.shard_sizes)
        y = labels
        terms = {}
        n_old = ctx.n_old
        if n_old and self.means is not None:
            per_epoch = max(1, math.ceil(ctx.new_size / ctx.batch_size))
            epoch, b = divmod(step, per_epoch)
            order = torch.randperm(n_old, generator=seeded(ctx.seed, ctx.task, epoch, STREAM_RAPF))
            k = self.cfg.rapf_classes
            drawn = [int(order[(k * b + i) % n_old]) for i in range(k)]
            g = seeded(ctx.seed, ctx.task, step, STREAM_RAPF, 1)
            n_ce, n_hinge = int(10 * self.cfg.rapf_beta), int(20 * self.cfg.rapf_beta)
            z = self._samples(drawn, n_ce, g).to(images.device)
            pairs = self.pairs.tolist()
            zh = self._samples([p[0] for p in pairs], n_hinge, g).to(images.device)
            # every rank draws the same samples: their adapter gradients count once over the ranks
            fz = distributed.shared(F.normalize(self.call_module("adapter", torch.cat([z, zh])), dim=-1))
            f = torch.cat([f, fz[: len(z)]])
            y = torch.cat([labels, torch.as_tensor(drawn, device=labels.device).repeat_interleave(n_ce)])
            if len(zh):
                fh = fz[len(z):]
                own = torch.as_tensor([p[0] for p in pairs], device=fh.device).repeat_interleave(n_hinge)
                near = torch.as_tensor([p[1] for p in pairs], device=fh.device).repeat_interleave(n_hinge)
                terms["hinge_loss"] = F.relu((fh * seen[near]).sum(1) - (fh * seen[own]).sum(1)
                                             + self.cfg.rapf_margin).mean()
        terms = {"ce_loss": F.cross_entropy(scale * f @ seen.t(), y), **terms}
        terms["hard_pairs"] = torch.tensor(float(len(self.pairs)))
        return terms

    # ----------------------------------------------------------------- evaluation
    def classifier(self):
        adapter = self.adapter
        if adapter is None or self.ctx is None:  # before the first task is entered: CLIP's own classifier
            return None
        text = self.class_text(self.ctx.device)

        def scores(z: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                f = F.normalize(adapter(z.to(adapter.weight.dtype)), dim=-1)
                return f @ text[: len(candidates)].to(f.device, f.dtype).t()

        return scores

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "means": self.means, "covs": self.covs, "has": self.has, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.means, self.covs, self.has, self.start = state["means"], state["covs"], state["has"], state["start"]
        self._chol = {}

    def check_state(self, state: dict, model_state: dict[str, torch.Tensor], ctx: TaskContext | None) -> None:
        super().check_state(state, model_state, ctx)
        assert self.adapter is not None
        d = self.adapter.weight.shape[0]
        if (state["means"] is None) != (state["covs"] is None) or (state["means"] is None) != (state["has"] is None):
            raise StateError("method.means", "method.covs and method.has must all be there or all be absent")
        if state["means"] is not None:
            n = need_tensor("method.has", state["has"], dtype=torch.bool, ndim=1).shape[0]
            need_tensor("method.means", state["means"], dtype=torch.float32, shape=(n, d))
            need_tensor("method.covs", state["covs"], dtype=torch.float32, shape=(n, d, d))
            if not (torch.isfinite(state["means"]).all() and torch.isfinite(state["covs"]).all()):
                raise StateError("method.covs", "holds a value that is not finite")
        if state["start"] is not None:
            need_tensor("method.start", state["start"], dtype=torch.float32, shape=(d, d))
        elif ctx is not None and ctx.task > 0:
            raise StateError("method.start", "is None, but a run resumed within a task after the first needs the "
                             "adapter's weight at the task's start (the fusion reads it)")
