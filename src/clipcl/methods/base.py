"""The Method interface (the methods of docs/METHOD.md are small classes that own what differs between
methods), the task context, and the methods without memory or teacher: finetune, joint, zero-shot.

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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..checkpoint import StateError, need_dict, need_int, need_tensor, need_tensors
from ..config import MethodCfg
from ..data.images import ConcatImageSet, ImageSet
from ..data.scenarios import Scenario
from ..losses import clip_loss
from ..memory import ReplayMemory
from ..sampling import concat_positions


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


class OwnedModules(nn.Module):
    """The modules a method owns (Method.modules), as one module: the engine moves it, trains, checkpoints and
    DDP-wraps it whole; forward(name, *args) runs one of them, so a DDP wrapper of it sees the method's calls."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def forward(self, name: str, *args):
        return self.parts[name](*args)


class Method:
    """Base: fine-tune on the task's own data with the mini-batch CLIP loss (this is `finetune`).

        L = CLIP(B_t): cross-entropy of each image over the batch's class texts, and of each class text over
        the batch's images (losses.clip_loss), B_t a batch of D_t.
    """

    name = "finetune"
    trains = True
    # the method.* options (config.MethodCfg) this method reads: validated, recorded and grouped on only for it;
    # the others must keep their defaults when it runs (config.validate)
    reads: tuple[str, ...] = ()

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether some trainable parameter gets no gradient from this method's loss (several ranks: DDP must
        then look for them every step)."""
        return False

    def __init__(self, cfg: MethodCfg):
        self.cfg = cfg
        self.owned: nn.Module | None = None  # the engine's handle on modules(): see call_module
        self.task = 0
        self.ctx: TaskContext | None = None
        self._texts: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # frozen text towers' class texts, this task

    # ----------------------------------------------------------------- what trains
    def setup(self, bundle) -> None:
        """Called once, after the model is built and before anything reads trains_parameter or modules: build the
        modules the method owns (their sizes may depend on the model, e.g. its embedding width bundle.dim, never
        on the data). Model initialisation is over: a method seeds its own generator for its weights."""

    def trains_parameter(self, name: str, param: nn.Parameter) -> bool:
        """Whether the method trains the model parameter `name` (among those the model's options leave trainable:
        model.lock_*, model.lora_rank). The engine freezes the others before it builds the optimiser."""
        return True

    def modules(self) -> dict[str, nn.Module]:
        """The modules the method owns (an adapter, a head, prompt vectors), by name. The engine puts them on the
        run's device, trains their parameters that require a gradient with the model's (the same AdamW, lr and
        weight-decay groups), averages their gradients over the ranks under DDP, and saves and restores their
        weights in the checkpoint ('modules'). In the forward, call them through call_module (it goes through
        the DDP wrapper); at evaluation, directly."""
        return {}

    def call_module(self, name: str, *args):
        """modules()[name](*args) through the engine's handle (a DistributedDataParallel wrapper with several
        ranks): the way a training forward must call an owned module."""
        assert self.owned is not None, "the engine sets the handle on the owned modules"
        return self.owned(name, *args)

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

    # ----------------------------------------------------------------- evaluation
    def classifier(self):
        """The classifier evaluation ranks the candidate classes with: a function scores(z, text) -> [N, C] (z the
        normalised image embeddings [N, D], text the candidates' prompt embeddings [C, D], scenario labels
        0..C-1; evaluate.Scores), or None for CLIP's own z @ text^T over the prompt templates (eval.templates).
        Called before every evaluation; every rank must return the same classifier."""
        return None


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
