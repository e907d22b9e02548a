"""The methods of docs/METHOD.md, each a small class that owns what differs between methods.

A method owns (the task layer, see the README's Design section):
- what a task trains on (`training_data`), how a batch mixes new data and memory (`batch_positions`, and the
  samples an epoch counts, `epoch_size`);
- its forward: `training_forward(model, images, labels, index, step)` calls `model(images, tokens)` (so a
  DistributedDataParallel wrapper sees the forward) and returns a dict of named terms; the engine sums the
  `*_loss` terms, backpropagates, and logs the rest;
- what happens around a task: `before_task(ctx)` (teachers, estimators) and `after_task(ctx)` (memory update,
  stored logits, weight interpolation), with a TaskContext that holds the model, memory, scenario and device;
- its state (estimators, teachers, telemetry) for checkpoints: tensors and plain values only, and
  `check_state`, which the engine calls on a checkpoint's state before anything is loaded from it.
The engine never names a method and never reads a method's options.

Notation (METHOD.md): z_i normalised image embedding, t_c normalised text embedding of class c, s the
model's logit scale, l_ic = s z_i . t_c the logit of image i for class c, C_<=t the classes seen after task
t, D_t the new data, M the memory.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import StateError, need_dict, need_int, need_list, need_number, need_tensor, need_tensors
from .config import ConfigError, MethodCfg
from .data.images import ConcatImageSet, ImageSet
from .data.scenarios import Scenario
from .evaluate import evaluating, image_features
from .losses import ClassDRO, GlobalContrastiveLoss, PromptContrastiveLoss, clip_loss, weighted_clip_loss
from .memory import ReplayMemory
from .sampling import STREAM_SELECT, concat_positions, seeded, uniform_positions


@dataclass
class TaskContext:
    """What a method may use around a task; explicit, never a global."""

    model: nn.Module  # what the forward goes through (may be a DistributedDataParallel wrapper)
    bundle: object  # models.ClipBundle: the plain model, tokenizer, input size and normalisation
    memory: ReplayMemory
    scenario: Scenario
    device: torch.device
    task: int
    seed: int
    batch_size: int
    eval_batch_size: int
    tokens: torch.Tensor  # token ids [n_classes, L] of every class name (training template), by label
    data_size: int = 0  # samples of the task's training data D_t U M (set by the engine)
    new_size: int = 0  # of which new (D_t): positions below it are new samples
    steps: int = 0  # training steps of the task (set by the engine)
    autocast: bool = False
    rank: int = 0
    world_size: int = 1
    shard_sizes: list[int] | None = None  # several ranks: the rows of the step's global batch each rank holds

    @property
    def n_seen(self) -> int:
        """Classes seen after this task (the candidates of evaluation)."""
        return self.scenario.n_seen(self.task)

    @property
    def n_old(self) -> int:
        """Classes seen before this task (0 for the first task)."""
        return self.scenario.n_seen(self.task - 1) if self.task > 0 else 0


@dataclass
class Batch:
    """What an embedding-level loss sees of one training step."""

    z: torch.Tensor  # normalised image embeddings [B, D]
    text: torch.Tensor  # normalised text embeddings of the batch's distinct classes [U, D]
    inv: torch.Tensor  # row of `text` for each sample [B]
    labels: torch.Tensor  # scenario class labels [B]
    index: torch.Tensor  # stable sample index in D_t U M [B]
    logit_scale: torch.Tensor  # exp of the model's learnable log scale
    step: int  # global step within the task
    prompts: torch.Tensor | None = None  # normalised text embeddings of every seen class [K, D] (gcl_form=prompts)


def clip_forward(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor | None, autocast: bool = False):
    """(z [B, D], t [C, D], scale) through model(images, tokens) (open_clip returns normalised features), the
    model under bf16 autocast when `autocast`; the outputs are float32, so every loss is computed in float32.
    tokens None: the image tower only (t is None)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(images, tokens)
    if isinstance(out, dict):
        out = (out["image_features"], out["text_features"], out["logit_scale"])
    return out[0].float(), None if out[1] is None else out[1].float(), out[2].float()


def unwrap(model: nn.Module) -> nn.Module:
    """The open_clip model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def text_tower_trains(model: nn.Module) -> bool:
    """Whether any parameter of the text tower (everything outside `visual` but the logit scale and bias)
    gets a gradient."""
    return any(p.requires_grad for n, p in unwrap(model).named_parameters()
               if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias"))


TEXT_CHUNK = 256  # class texts encoded per call: a 1000-class stream is never one batch


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a copy of the model in eval mode with no gradients."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.grad = None
        p.requires_grad_(False)
    return teacher


def distillation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """temp^2 * mean over rows of KL(softmax(teacher / temp) || softmax(student / temp)); 0 when they agree."""
    p = F.log_softmax(teacher_logits / temp, dim=1)
    q = F.log_softmax(student_logits / temp, dim=1)
    return temp ** 2 * (p.exp() * (p - q)).sum(1).mean()


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cpu(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.cpu() for k, v in state.items()}


def check_buffers(field: str, state, module: nn.Module) -> int:
    """A checkpointed state of a module of 1-D buffers of one length (an estimator): the module's buffer names,
    each 1-D and of the module's dtype, all of one length; returns that length (StateError otherwise)."""
    reference = module.state_dict()
    need_dict(field, state, list(reference))
    for k, ref in reference.items():
        need_tensor(f"{field}.{k}", state[k], dtype=ref.dtype, ndim=1)
    lengths = [len(state[k]) for k in reference]
    length = max(lengths, key=lengths.count) if lengths else 0  # the most common: the odd one is named
    for k in reference:
        if len(state[k]) != length:
            raise StateError(f"{field}.{k}", f"must have the length of the other estimates ({length})", state[k])
    return length


def check_weights(field: str, state, model_state: dict[str, torch.Tensor], required: bool, why: str = "") -> None:
    """A checkpointed copy of the model's weights (a teacher, stored weights): None, or the model's tensors."""
    if state is None:
        if required:
            raise StateError(field, f"must hold the model's weights{f' ({why})' if why else ''}", state)
        return
    need_tensors(field, state, model_state)


class Method:
    """Base: fine-tune on the task's own data with the mini-batch CLIP loss (this is `finetune`).

        L = CLIP(B_t): cross-entropy of each image over the batch's class texts, and of each class text over
        the batch's images (losses.clip_loss), B_t a batch of D_t.
    """

    name = "finetune"
    trains = True

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether some trainable parameter gets no gradient from this method's loss (several ranks: DDP must
        then look for them every step)."""
        return False

    def __init__(self, cfg: MethodCfg):
        self.cfg = cfg
        self.task = 0
        self.ctx: TaskContext | None = None
        self._texts: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # frozen text towers' class texts, this task

    # ----------------------------------------------------------------- data
    def training_data(self, ctx: TaskContext) -> tuple[ImageSet, ImageSet | None]:
        """(new data, memory data) that task ctx.task trains on."""
        return ctx.scenario[ctx.task].train, None

    def epoch_size(self, new: ImageSet, mem: ImageSet | None) -> int:
        """Samples that make one epoch (optim.epochs counts these)."""
        return len(new)

    def batch_positions(self, ctx: TaskContext, step: int, new: ImageSet, mem: ImageSet | None) -> np.ndarray:
        """Sample positions in D_t U M (memory after the new data) of one step."""
        return concat_positions(ctx.seed, ctx.task, step, ctx.batch_size, len(new), len(mem) if mem else 0)

    # ----------------------------------------------------------------- around a task
    def attach(self, ctx: TaskContext) -> None:
        """Called whenever the engine enters a task, fresh or resumed: the context of the task."""
        self.ctx = ctx
        self.task = ctx.task
        self._texts = {}  # encoded again at the task's first step: the model may have changed between tasks

    def before_task(self, ctx: TaskContext) -> None:
        """Called once when task ctx.task starts (not on a resume within it)."""

    def after_task(self, ctx: TaskContext) -> None:
        """Called once when task ctx.task has been trained, before it is evaluated."""

    # ----------------------------------------------------------------- the forward
    def batch_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's distinct classes and each sample's row among them."""
        return torch.unique(labels, return_inverse=True)

    def frozen_text(self, model: nn.Module, device: torch.device) -> torch.Tensor | None:
        """Every class's normalised text embedding [n_classes, D] when the model's text tower does not train
        (model.lock_text, or a teacher), encoded once per task and per model; None when it trains."""
        assert self.ctx is not None, "attach() a TaskContext first"
        base = unwrap(model)
        cached = self._texts.get(id(base))
        if cached is not None and cached[0] is base:
            return cached[1]
        if text_tower_trains(base):
            return None
        tokens = self.ctx.tokens.to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.ctx.autocast):
            text = torch.cat([base.encode_text(tokens[i:i + TEXT_CHUNK], normalize=True).float()
                              for i in range(0, len(tokens), TEXT_CHUNK)])
        self._texts[id(base)] = (base, text)
        return text

    def forward(self, model: nn.Module, images: torch.Tensor, classes: torch.Tensor):
        """(z, t, scale) of model(images, class texts of `classes`) under the run's autocast; float32 outputs.

        A text tower that does not train is not run at every step: its class texts come from frozen_text.
        With several ranks, `images` is this rank's shard and z comes back for the whole global batch (the own
        rows differentiable), t and scale with their gradients divided by the world size: every rank computes
        the loss of the global batch, and the gradients summed over the ranks are those of one process.
        """
        assert self.ctx is not None, "attach() a TaskContext first"
        frozen = self.frozen_text(model, images.device)
        if frozen is not None:
            z, _, scale = clip_forward(model, images, None, self.ctx.autocast)
            t = frozen[classes.to(frozen.device)]
        else:
            tokens = self.ctx.tokens[classes.cpu()].to(images.device)
            z, t, scale = clip_forward(model, images, tokens, self.ctx.autocast)
        if self.ctx.shard_sizes is not None:
            z, t, scale = distributed.gather(z, self.ctx.shard_sizes), distributed.shared(t), distributed.shared(scale)
        return z, t, scale

    def forward_batch(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward for the batch's class texts and the texts of classes 0..extra-1: (z, text of the batch's
        classes, each sample's row among them, text of the extra classes, scale)."""
        classes, inv = self.batch_classes(labels)
        n = len(classes)
        if extra:
            classes = torch.cat([classes, torch.arange(extra, device=classes.device)])
        z, text, scale = self.forward(model, images, classes)
        return z, text[:n], inv, text[n:], scale

    def training_forward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                         step: int) -> dict[str, torch.Tensor]:
        """Named terms of one batch (images already prepared and augmented); `*_loss` terms are summed."""
        z, text, inv, _, scale = self.forward_batch(model, images, labels)
        return {"contrastive_loss": clip_loss(z, text, inv, scale)}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Estimator states, teachers and telemetry, for checkpoints (tensors and plain values only)."""
        return {"task": self.task}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.task = state["task"]

    def check_state(self, state: dict, model_state: dict[str, torch.Tensor], ctx: TaskContext | None) -> None:
        """Raise checkpoint.StateError, naming the field ('method.gcl.log_u1'), unless `state` is what
        state_dict() of this method can have written. Called on a checkpoint's state before anything is loaded.

        model_state: the model's tensors (teachers and stored weights have its keys, shapes and dtypes). ctx: the
        context of the task the run resumes within (data_size, new_size and steps filled in), None when it
        resumes between tasks (before_task starts the next one afresh) or after the last. Subclasses check
        their own entries after calling this.
        """
        need_dict("method", state, list(self.state_dict()))
        need_int("method.task", state["task"], ctx.task if ctx else 0, ctx.task if ctx else None,
                 "the task the run resumes within" if ctx else "")

    def step_state(self) -> dict:
        """The part of the state a training step changes (estimators, telemetry): the engine restores it when
        it skips a non-finite batch. Teachers and stored weights are not in it (no step changes them)."""
        return {}

    def load_step_state(self, state: dict) -> None:
        """Restore what step_state returned."""

    def results(self) -> dict:
        """Extra entries for results.json."""
        return {}


class ZeroShot(Method):
    """Evaluate the model as it is: no training."""

    name = "zeroshot"
    trains = False


class Finetune(Method):
    """Mini-batch CLIP loss on the new task only: L = CLIP(B_t)."""

    name = "finetune"


class Joint(Method):
    """Upper bound: L = CLIP(B) with B drawn from all the training data seen so far, D_1 U ... U D_t."""

    name = "joint"

    def training_data(self, ctx):
        return ConcatImageSet([ctx.scenario[k].train for k in range(ctx.task + 1)]), None


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


class GCL(ER):
    """Global contrastive loss over D_t U M with moving-average estimators, averaged over samples:
    L = mean_i L_i with L_i the global loss of METHOD.md. method.gcl_form: `pairs` (negatives over all of
    D_t U M, one pair of estimators per sample, temperature detached) or `prompts` (exact image -> text over
    every seen class prompt, one text -> image estimator per class, the model's logit scale learned)."""

    name = "gcl"

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.gcl = GlobalContrastiveLoss(0, gamma=cfg.gamma)
        self.pgcl = PromptContrastiveLoss(0, gamma=cfg.gamma, eps=cfg.t2i_eps)

    @property
    def leaves_parameters_unused(self) -> bool:
        return self.cfg.gcl_form == "pairs" or bool(self.cfg.tau)  # a fixed or detached temperature: logit scale

    def before_task(self, ctx):
        self.start_estimators(ctx.data_size, ctx.n_seen)

    def start_estimators(self, n_samples: int, n_classes: int) -> None:
        """Forget the estimators: a stage over n_samples indexed samples and n_classes seen classes starts."""
        self.gcl.reset(n_samples)
        self.pgcl.reset(n_classes)

    def tau(self, batch: Batch) -> float:
        """The GCL temperature: method.tau, or 1 / the model's logit scale (detached)."""
        return self.cfg.tau or 1.0 / float(batch.logit_scale.detach())

    def sample_weights(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weight of each sample's surrogate: the plain mean over samples with a negative."""
        ok = out["has_negative"].to(out["surrogate"].dtype)
        return ok / ok.sum().clamp_min(1)

    def training_forward(self, model, images, labels, index, step):
        assert self.ctx is not None
        if self.cfg.gamma_schedule == "cosine":  # FastCLIP: trust the batch at first, average more later
            g0 = self.cfg.gamma_min
            gamma = g0 + (1 - g0) * 0.5 * (1 + math.cos(math.pi * step / max(self.ctx.steps, 1)))
            self.gcl.gamma = self.pgcl.gamma = gamma
        if self.cfg.gcl_form == "prompts":
            n = self.ctx.n_seen
            z, prompts, scale = self.forward(model, images, torch.arange(n))
            inv = labels
            batch = Batch(z=z, text=prompts, inv=inv, labels=labels, index=index, logit_scale=scale, step=step,
                          prompts=prompts)
        else:
            z, text, inv, _, scale = self.forward_batch(model, images, labels)
            batch = Batch(z=z, text=text, inv=inv, labels=labels, index=index, logit_scale=scale, step=step)
        return self.loss(batch)

    def negative_weights(self, index: torch.Tensor) -> torch.Tensor:
        """Each batch sample's share of D_t U M over its share of the batch (new and memory samples apart), so
        that a batch-weighted mean estimates the mean over D_t U M whatever the batch mix."""
        assert self.ctx is not None
        new = index < self.ctx.new_size
        n_new, n_mem = int(new.sum()), int((~new).sum())
        size_new, size_mem = self.ctx.new_size, self.ctx.data_size - self.ctx.new_size
        w = torch.where(new, size_new / max(n_new, 1), size_mem / max(n_mem, 1)).to(torch.float64)
        return w.clamp_min(1e-12)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The weighted GCL surrogate of a batch of embeddings (its gradient estimates that of the loss)."""
        if batch.prompts is not None:
            self.pgcl.to(batch.z.device)
            scale = 1.0 / self.cfg.tau if self.cfg.tau else batch.logit_scale.clamp(max=100.0)
            out = self.pgcl(batch.z, batch.prompts, batch.labels, scale, self.negative_weights(batch.index),
                            n_ref=float(len(batch.labels)))
        else:
            self.gcl.to(batch.z.device)
            out = self.gcl(batch.z, batch.text, batch.inv, batch.index, self.tau(batch))
        w = self.sample_weights(batch, out).to(out["surrogate"].dtype)
        return {"gcl_loss": (w * out["surrogate"]).sum(),
                "gcl_value": (w * out["loss"].to(w.dtype)).sum().detach()}

    def state_dict(self):
        return {**super().state_dict(), "gcl": {k: v.cpu() for k, v in self.gcl.state_dict().items()},
                "pgcl": {k: v.cpu() for k, v in self.pgcl.state_dict().items()}}

    def step_state(self):
        return self.state_dict()

    def load_step_state(self, state):
        self.load_state_dict(state)

    def check_state(self, state, model_state, ctx):
        super().check_state(state, model_state, ctx)
        samples = check_buffers("method.gcl", state["gcl"], self.gcl)
        classes = check_buffers("method.pgcl", state["pgcl"], self.pgcl)
        if ctx is not None and samples != ctx.data_size:
            raise StateError("method.gcl.log_u1", f"must hold one estimate per training sample of task {ctx.task} "
                             f"({ctx.data_size})", state["gcl"]["log_u1"])
        if ctx is not None and classes != ctx.n_seen:
            raise StateError("method.pgcl.log_u", f"must hold one estimate per class seen by task {ctx.task} "
                             f"({ctx.n_seen})", state["pgcl"]["log_u"])

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.gcl.reset(len(state["gcl"]["log_u1"]))
        self.gcl.load_state_dict(state["gcl"])
        self.pgcl.reset(len(state["pgcl"]["log_u"]))
        self.pgcl.load_state_dict(state["pgcl"])


class GDRO(GCL):
    """GCL with class-level DRO weights: L = sum_i w_i L_i with w_i = p_{y_i} / (n_B(y_i) sum_{c in B} p_c),
    p the DRO weights of the seen classes (method.dro): forgotten (high-loss) classes get weight back. The class
    loss p reads (method.dro_signal): each sample's text -> image term in the prompts form, its whole loss in the
    pairs form, or its excess over the class's value when last trained. Options: method.dro_adjust (class losses
    read as v_c + C / sqrt(n_c)), method.sample_mix a (w <- (1 - a) w + a w_mean, w_mean the plain mean over
    samples with a negative), method.class_presence=corrected (w_i = p_{y_i} / (pi_{y_i} n_B(y_i)), pi the chance
    that a class is in a batch: class_presence()).

    Held-out signals (dro_signal=probe | oracle): every method.signal_every steps, a no-grad forward in eval mode on
    held-out images gives each image's image -> text cross-entropy over every seen class prompt (the
    classification loss, the quantity forgetting raises), whose class means are folded into v (rate beta):
      probe   the last method.probe_per_class images of each old class's memory, held out of training
              (training_data returns the memory without them; a class of one image keeps it and has no probe);
      oracle  the validation split of every seen task: a DIAGNOSTIC, NOT A METHOD (a continual learner does not
              keep held-out labelled data of old tasks); it measures the ceiling of class reweighting.
    A class without held-out images (probe: the new task's classes) reads the same cross-entropy from its
    training batches, every step. The telemetry rows then also hold v ("losses") and the moving average of the
    training batches' cross-entropy of every class ("train_losses"): held-out beside memory losses."""

    name = "gdro"

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.dro = ClassDRO(0, cfg.dro, cfg.lam, cfg.beta, cfg.eta, cfg.alpha, cfg.max_weight, cfg.dro_adjust,
                            excess=cfg.dro_signal == "excess")
        self.signal = cfg.dro_signal if cfg.dro_signal != "auto" else ("t2i" if cfg.gcl_form == "prompts" else "loss")
        self.held_out_signal = self.signal in ("probe", "oracle")
        # the training batches' image -> text loss per class, beside the held-out one (telemetry only)
        self.train_signal = ClassDRO(0, "none", beta=cfg.beta)
        self.telemetry: list[dict] = []  # {"task", "step", "weights": p over the seen classes[, "losses", ...]}
        self.presence: torch.Tensor | None = None  # pi_c of the task (class_presence=corrected), from its data
        self.held_out: ImageSet | None = None  # the images of the held-out signal of the task
        self.from_batch: torch.Tensor | None = None  # [n_seen] classes with no held-out image: v from batches

    def start_estimators(self, n_samples, n_classes):
        super().start_estimators(n_samples, n_classes)
        self.dro.reset(n_classes)
        self.train_signal.reset(n_classes)

    # ----------------------------------------------------------------- data
    def split_memory(self, memory: ReplayMemory) -> tuple[ImageSet | None, ImageSet | None]:
        """(memory trained on, probe images) of dro_signal=probe: the last min(probe_per_class, n_c - 1) images
        of each class in memory order (herding: the least representative), so every class keeps one to train."""
        if not len(memory):
            return None, None
        mem = memory.as_imageset()
        probe = []
        for c in np.unique(mem.targets):
            pos = np.flatnonzero(mem.targets == c)
            probe.extend(pos[len(pos) - min(self.cfg.probe_per_class, len(pos) - 1):].tolist())
        held = np.zeros(len(mem), dtype=bool)
        held[probe] = True
        return mem.subset(np.flatnonzero(~held)), (mem.subset(np.flatnonzero(held)) if held.any() else None)

    def training_data(self, ctx):
        if self.signal != "probe":
            return super().training_data(ctx)
        return ctx.scenario[ctx.task].train, self.split_memory(ctx.memory)[0]

    def attach(self, ctx):
        super().attach(ctx)
        if self.cfg.class_presence == "corrected":  # a function of the task's data: no state to checkpoint
            new, mem = self.training_data(ctx)
            self.presence = class_presence(self.cfg.sampling, ctx.batch_size, new.targets,
                                           mem.targets if mem is not None else None, ctx.n_seen)
        if self.held_out_signal:
            if self.signal == "probe":
                self.held_out = self.split_memory(ctx.memory)[1]
            else:
                val = ConcatImageSet([ctx.scenario[k].val for k in range(ctx.task + 1)])
                self.held_out = val if len(val) else None
            from_batch = torch.ones(ctx.n_seen, dtype=torch.bool)
            if self.held_out is not None:
                from_batch[torch.as_tensor(np.unique(self.held_out.targets))] = False
            self.from_batch = from_batch

    # ----------------------------------------------------------------- the held-out signal
    @torch.no_grad()
    def held_out_losses(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(labels, image -> text cross-entropy [n]) of the held-out images under the current model: eval mode
        (BatchNorm on its running statistics; the mode restored after), no gradient, the run's autocast, the
        images prepared as evaluation prepares them (no augmentation), the training template's class prompts and
        the logit scale the loss uses. Several ranks: each computes it on the same images with the same weights,
        and rank 0's values are broadcast (on CPUs BatchNorm statistics are per rank)."""
        ctx = self.ctx
        assert ctx is not None
        if self.held_out is None:
            return None
        base = ctx.bundle.model
        with evaluating(base):
            z = image_features(ctx.bundle, self.held_out, ctx.eval_batch_size, ctx.device, ctx.autocast)
            text = self.frozen_text(base, ctx.device)
            if text is None:
                tokens = ctx.tokens[: ctx.n_seen].to(ctx.device)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
                    text = torch.cat([base.encode_text(tokens[i:i + TEXT_CHUNK], normalize=True).float()
                                      for i in range(0, len(tokens), TEXT_CHUNK)])
            text = text[: ctx.n_seen]
            scale = 1.0 / self.cfg.tau if self.cfg.tau else base.logit_scale.exp().float().clamp(max=100.0)
        labels = torch.as_tensor(self.held_out.targets, device=z.device)
        a = scale * z @ text.t()
        ce = torch.logsumexp(a, dim=1) - a.gather(1, labels.view(-1, 1)).squeeze(1)
        if distributed.active():
            torch.distributed.broadcast(ce, 0)
        return labels, ce

    def training_forward(self, model, images, labels, index, step):
        if self.held_out_signal and step % self.cfg.signal_every == 0:
            held = self.held_out_losses()
            if held is not None:
                self.dro.to(held[1].device)
                self.dro.update(*held)
        return super().training_forward(model, images, labels, index, step)

    def before_task(self, ctx):
        super().before_task(ctx)
        new, mem = self.training_data(ctx)
        labels = np.concatenate([new.targets, mem.targets if mem is not None else np.zeros(0, np.int64)])
        self.dro.set_sizes(torch.as_tensor(np.bincount(labels, minlength=ctx.n_seen)[: ctx.n_seen]))

    def after_task(self, ctx):
        self.dro.mark_trained(torch.as_tensor(ctx.scenario[ctx.task].classes, dtype=torch.long))
        super().after_task(ctx)

    def sample_weights(self, batch, out):
        self.dro.to(batch.z.device)
        if self.cfg.lam_start:  # from near-uniform (the new task keeps its weight) to the DRO weights
            assert self.ctx is not None
            frac = 0.5 * (1 + math.cos(math.pi * batch.step / max(self.ctx.steps, 1)))
            self.dro.lam = self.cfg.lam + (self.cfg.lam_start - self.cfg.lam) * frac
        ok = out["has_negative"]
        if self.held_out_signal:  # the classes without held-out images read their training batches' i2t
            assert self.from_batch is not None, "attach() a TaskContext first"
            self.train_signal.to(batch.z.device)
            self.train_signal.update(batch.labels[ok], out["i2t"][ok])
            keep = ok & self.from_batch.to(batch.z.device)[batch.labels]
            self.dro.update(batch.labels[keep], out["i2t"][keep])
        else:
            signal = out["t2i"] if self.signal == "t2i" else out["loss"]
            self.dro.update(batch.labels[ok], signal[ok])
        p = self.dro.class_weights()
        if batch.step % self.cfg.telemetry_every == 0:
            row = {"task": self.task, "step": batch.step, "weights": [round(float(x), 6) for x in p.cpu()]}
            if self.held_out_signal:
                row["losses"] = _class_values(self.dro)
                row["train_losses"] = _class_values(self.train_signal)
            self.telemetry.append(row)
        presence = None
        if self.cfg.class_presence == "corrected":
            assert self.presence is not None, "attach() a TaskContext first"
            presence = self.presence
        w = torch.zeros(len(batch.labels), dtype=torch.float64, device=batch.z.device)
        w[ok] = self.dro.sample_weights(batch.labels[ok], p, presence)
        if self.cfg.sample_mix:  # a share of the plain sample mean: the new task keeps its weight
            plain = ok.to(torch.float64) / ok.sum().clamp_min(1)
            w = (1 - self.cfg.sample_mix) * w + self.cfg.sample_mix * plain
        return w

    def state_dict(self):
        state = {**super().state_dict(), "dro": {k: v.cpu() for k, v in self.dro.state_dict().items()},
                 "telemetry": list(self.telemetry)}
        if self.held_out_signal:
            state["train_signal"] = {k: v.cpu() for k, v in self.train_signal.state_dict().items()}
        return state

    def check_state(self, state, model_state, ctx):
        super().check_state(state, model_state, ctx)
        classes = check_buffers("method.dro", state["dro"], self.dro)
        if classes != len(state["pgcl"]["log_u"]):
            raise StateError("method.dro.v", f"must hold one weight per class of the estimators ("
                             f"{len(state['pgcl']['log_u'])})", state["dro"]["v"])
        if self.held_out_signal and check_buffers("method.train_signal", state["train_signal"],
                                                  self.train_signal) != classes:
            raise StateError("method.train_signal.v", f"must hold one value per class of the estimators ({classes})",
                             state["train_signal"]["v"])
        keys = ["task", "step", "weights"] + (["losses", "train_losses"] if self.held_out_signal else [])
        for i, entry in enumerate(need_list("method.telemetry", state["telemetry"])):
            need_dict(f"method.telemetry[{i}]", entry, keys)
            need_int(f"method.telemetry[{i}].task", entry["task"])
            need_int(f"method.telemetry[{i}].step", entry["step"])
            for j, w in enumerate(need_list(f"method.telemetry[{i}].weights", entry["weights"])):
                need_number(f"method.telemetry[{i}].weights[{j}]", w)
            for key in keys[3:]:
                values = need_list(f"method.telemetry[{i}].{key}", entry[key], len(entry["weights"]),
                                   "one per class weight")
                for j, v in enumerate(values):
                    need_number(f"method.telemetry[{i}].{key}[{j}]", v, none=True)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.dro.reset(len(state["dro"]["v"]))
        self.dro.load_state_dict(state["dro"])
        if self.held_out_signal:
            self.train_signal.reset(len(state["train_signal"]["v"]))
            self.train_signal.load_state_dict(state["train_signal"])
        self.telemetry = list(state["telemetry"])

    def results(self):
        out: dict = {"class_weights": self.telemetry}
        if self.signal == "oracle":
            out["diagnostic"] = ("method.dro_signal=oracle: a diagnostic, not a method. The DRO class losses were "
                                 "read from the validation split of every seen task, held-out labelled data of old "
                                 "tasks that a continual learner does not keep: this run measures the ceiling of "
                                 "class reweighting.")
        return out


def _class_values(dro: ClassDRO) -> list[float | None]:
    """v of every class of the stage, rounded for results.json; None for a class not visited yet."""
    return [round(float(x), 6) if seen else None for x, seen in zip(dro.v.cpu(), dro.visited.cpu())]


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


class WiSEFT(Method):
    """WiSE-FT in a stream: fine-tune on D_t (L = CLIP(B_t)), then interpolate with the weights before the
    task, theta <- (1 - alpha) theta_before + alpha theta_after (alpha = method.wise_alpha; integer buffers take
    the fine-tuned value). No memory."""

    name = "wiseft"

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


METHODS: dict[str, type[Method]] = {}
METHOD_DOCS: dict[str, str] = {}


def register(cls: type[Method], doc: str) -> type[Method]:
    """Make a method available by its name."""
    METHODS[cls.name] = cls
    METHOD_DOCS[cls.name] = doc
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
]:
    register(_cls, _doc)


def make_method(cfg: MethodCfg) -> Method:
    """The method named by cfg.name, or a ConfigError listing the known ones."""
    if cfg.name not in METHODS:
        raise ConfigError(f"config key 'method.name' = {cfg.name!r}: unknown method. "
                          f"Known methods: {', '.join(METHODS)}.")
    return METHODS[cfg.name](cfg)
