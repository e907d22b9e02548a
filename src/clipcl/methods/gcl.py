"""The global contrastive loss with moving-average estimators (gcl) and its class-level DRO reweighting
(gdro, the paper's method)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import distributed
from ..checkpoint import StateError, need_dict, need_int, need_list, need_number
from ..config import MethodCfg
from ..data.images import ConcatImageSet, ImageSet
from ..evaluate import evaluating, image_features
from ..losses import ClassDRO, GlobalContrastiveLoss, PromptContrastiveLoss
from ..memory import ReplayMemory
from .base import Batch, TEXT_CHUNK, check_buffers
from .replay import ER, class_presence


class GCL(ER):
    """Global contrastive loss over D_t U M with moving-average estimators, averaged over samples:
    L = mean_i L_i with L_i the global loss of METHOD.md. method.gcl_form: `pairs` (negatives over all of
    D_t U M, one pair of estimators per sample, temperature detached) or `prompts` (exact image -> text over
    every seen class prompt, one text -> image estimator per class, the model's logit scale learned)."""

    name = "gcl"
    reads = ("sampling", "gamma", "tau", "gcl_form", "gamma_schedule", "gamma_min", "t2i_eps")

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
    reads = (*GCL.reads, "dro", "lam", "beta", "eta", "alpha", "max_weight", "dro_adjust", "sample_mix", "dro_signal",
             "lam_start", "telemetry_every", "class_presence", "probe_per_class", "signal_every")

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
