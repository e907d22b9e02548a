"""The methods of METHOD.md as small objects: what a task trains on, what the loss is, what state they keep.

The training loop (engine.py) is shared: a method never changes how batches flow, only
`training_data` (which images a task trains on), `loss` (a dict of named terms; the engine sums the
`*_loss` entries) and its own checkpointable state.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from .config import ConfigError, MethodCfg
from .data.images import ConcatImageSet, ImageSet
from .data.scenarios import Scenario
from .losses import ClassDRO, GlobalContrastiveLoss, clip_loss


@dataclass
class Batch:
    """What a method's loss sees of one training step."""

    z: torch.Tensor  # normalised image embeddings [B, D]
    text: torch.Tensor  # normalised text embeddings of the batch's distinct classes [U, D]
    inv: torch.Tensor  # row of `text` for each sample [B]
    labels: torch.Tensor  # scenario class labels [B]
    index: torch.Tensor  # stable sample index in D_t U M [B]
    logit_scale: torch.Tensor  # exp of the model's learnable log scale
    step: int  # global step within the task


class Method:
    """Base: fine-tune on the task's own data with the mini-batch CLIP loss (this is `finetune`)."""

    name = "finetune"
    trains = True
    uses_memory = False

    def __init__(self, cfg: MethodCfg):
        self.cfg = cfg
        self.task = 0

    def training_data(self, scenario: Scenario, t: int, memory: ImageSet | None) -> tuple[ImageSet, ImageSet | None]:
        """(new data, memory data) that task t trains on."""
        return scenario[t].train, None

    def before_task(self, t: int, n_samples: int, n_classes: int) -> None:
        """Called when task t starts: n_samples indexed samples (D_t U M), n_classes seen classes."""
        self.task = t

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch."""
        return {"contrastive_loss": clip_loss(batch.z, batch.text, batch.inv, batch.logit_scale)}

    def state_dict(self) -> dict:
        """Estimator states and telemetry, for checkpoints."""
        return {"task": self.task}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.task = state["task"]

    def results(self) -> dict:
        """Extra entries for results.json."""
        return {}


class ZeroShot(Method):
    """Evaluate the model as it is: no training."""

    name = "zeroshot"
    trains = False


class Finetune(Method):
    """Mini-batch CLIP loss on the new task only."""

    name = "finetune"


class ER(Method):
    """Experience replay: mini-batch CLIP loss on new data plus the class-balanced memory."""

    name = "er"
    uses_memory = True

    def training_data(self, scenario, t, memory):
        return scenario[t].train, memory


class Joint(Method):
    """Upper bound: mini-batch CLIP loss on all the training data seen so far."""

    name = "joint"

    def training_data(self, scenario, t, memory):
        return ConcatImageSet([scenario[k].train for k in range(t + 1)]), None


class GCL(ER):
    """Global contrastive loss over D_t U M with moving-average estimators, averaged over samples."""

    name = "gcl"

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.gcl = GlobalContrastiveLoss(0, gamma=cfg.gamma)

    def before_task(self, t, n_samples, n_classes):
        super().before_task(t, n_samples, n_classes)
        self.gcl.reset(n_samples)

    def tau(self, batch: Batch) -> float:
        """The GCL temperature: method.tau, or 1 / the model's logit scale (detached)."""
        return self.cfg.tau or 1.0 / float(batch.logit_scale.detach())

    def sample_weights(self, batch: Batch, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weight of each sample's surrogate: the plain mean over samples with a negative."""
        ok = out["has_negative"].to(out["surrogate"].dtype)
        return ok / ok.sum().clamp_min(1)

    def loss(self, batch):
        self.gcl.to(batch.z.device)
        out = self.gcl(batch.z, batch.text, batch.inv, batch.index, self.tau(batch))
        w = self.sample_weights(batch, out).to(out["surrogate"].dtype)
        return {"gcl_loss": (w * out["surrogate"]).sum(),
                "value": (w * out["loss"].to(w.dtype)).sum().detach()}

    def state_dict(self):
        return {**super().state_dict(), "gcl": {k: v.cpu() for k, v in self.gcl.state_dict().items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.gcl.reset(len(state["gcl"]["log_u1"]))
        self.gcl.load_state_dict(state["gcl"])


class GDRO(GCL):
    """GCL with class-level DRO weights: forgotten (high-loss) classes get weight back."""

    name = "gdro"

    def __init__(self, cfg: MethodCfg):
        super().__init__(cfg)
        self.dro = ClassDRO(0, cfg.dro, cfg.lam, cfg.beta, cfg.eta, cfg.alpha, cfg.max_weight)
        self.telemetry: list[dict] = []  # {"task", "step", "weights": p over the seen classes}

    def before_task(self, t, n_samples, n_classes):
        super().before_task(t, n_samples, n_classes)
        self.dro.reset(n_classes)

    def sample_weights(self, batch, out):
        self.dro.to(batch.z.device)
        ok = out["has_negative"]
        self.dro.update(batch.labels[ok], out["loss"][ok])
        p = self.dro.class_weights()
        if batch.step % self.cfg.telemetry_every == 0:
            self.telemetry.append({"task": self.task, "step": batch.step,
                                   "weights": [round(float(x), 6) for x in p.cpu()]})
        w = torch.zeros(len(batch.labels), dtype=torch.float64, device=batch.z.device)
        w[ok] = self.dro.sample_weights(batch.labels[ok], p)
        return w

    def state_dict(self):
        return {**super().state_dict(), "dro": {k: v.cpu() for k, v in self.dro.state_dict().items()},
                "telemetry": list(self.telemetry)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.dro.reset(len(state["dro"]["v"]))
        self.dro.load_state_dict(state["dro"])
        self.telemetry = list(state["telemetry"])

    def results(self):
        return {"class_weights": self.telemetry}


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
]:
    register(_cls, _doc)


def make_method(cfg: MethodCfg) -> Method:
    """The method named by cfg.name, or a ConfigError listing the known ones."""
    if cfg.name not in METHODS:
        raise ConfigError(f"config key 'method.name' = {cfg.name!r}: unknown method. "
                          f"Known methods: {', '.join(METHODS)}.")
    return METHODS[cfg.name](cfg)

