"""The one training loop every method shares: tasks, batches, optimiser, evaluation, checkpoints.

Randomness is derived, never carried: the batch order of (task, epoch) and the memory draws of
(task, step) come from generators seeded by (seed, task, epoch/step). A checkpoint therefore only
needs the step counters to continue the exact same stream, and a resumed run matches an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import resource
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, checkpoint, distributed, rundir
from .config import ConfigError, RunCfg, to_dict
from .data.images import ConcatImageSet, ImageSet
from .data.scenarios import Scenario, build_scenario, fingerprint_diff, verify_images
from .errors import Interrupted, NonFiniteLoss, stop_signals
from .evaluate import (accuracy_before_training, accuracy_row, metrics, seen_accuracy, split_of, unseen_change,
                       unseen_row)
from .files import OutputError
from .logs import StepLog
from .augment import augment
from .memory import ReplayMemory
from .methods import Method, OwnedModules, TaskContext, make_method
from .models import ClipBundle, create
from .prompts import DEFAULT_TEMPLATES, class_tokens
from .report import RESULTS_SCHEMA, write_outputs, write_results_json
from .sampling import STREAM_AUGMENT, seeded


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 over the task's steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a usable GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"config key 'device' = {name!r}: {why}. Use device=auto (CUDA when present) or "
                          "device=cpu.")
    return torch.device(name)


def versions(device: torch.device) -> dict[str, str]:
    """Library versions and the device, for results files."""
    import open_clip

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "clipcl": __version__, "device": f"{device.type}: {dev}", "threads": str(torch.get_num_threads()),
            "world_size": str(distributed.world_size())}


def _snapshot(state):
    """A copy of a (nested) state dict that later in-place updates of the live tensors cannot change."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    if isinstance(state, list):  # telemetry: entries are never changed after they are appended
        return [v.clone() if isinstance(v, torch.Tensor) else v for v in state]
    return state


@dataclass
class Progress:
    """Counters and results so far: everything of a run that is not a model, optimiser or memory."""

    task: int = 0  # the task being trained (or next to train)
    step: int = 0  # steps done within that task
    rows: list[list[float | None]] = field(default_factory=list)
    before: list[float | None] = field(default_factory=list)  # accuracy on task t before training on it
    timing: list[dict] = field(default_factory=list)
    nonfinite_skipped: int = 0
    train_seconds: float = 0.0  # within the current task, before the last resume
    images_seen: int = 0  # within the current task
    loss_sum: float = 0.0  # of the logged training loss, within the current task
    loss_steps: int = 0
    unseen: list[list[float | None]] = field(default_factory=list)  # eval.unseen: row s after s tasks trained
    log_id: str = ""  # the run's id for trackers (W&B), drawn when it starts and kept across resumes


def tensor_bytes(x) -> int:
    """Bytes of every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def say(line: str) -> None:
    """One line on stderr, flushed: progress must reach logs of runs without a terminal (nohup, SLURM, CI)."""
    print(line, file=sys.stderr, flush=True)


class Trainer:
    """Runs a config's whole stream of tasks, writing checkpoints and results into out_dir.

    Everything that can fail on bad input (config, device, data and its images, model) is built and checked
    here, before anything is written. `run()` then claims out_dir: a new or empty folder, the folder of this
    run with `resume=True`, or an old clipcl run's folder with `overwrite=True` (its files are replaced; see
    rundir.py). A non-empty folder is refused otherwise.
    """

    def __init__(self, cfg: RunCfg, out_dir: Path | str, scenario: Scenario | None = None,
                 progress_bar: bool | None = None, overwrite: bool = False, quiet: bool = False,
                 signals: bool = True):
        self.cfg = cfg
        self.signals = signals  # catch SIGINT/SIGTERM/SIGHUP to checkpoint and stop (off for a nested run)
        self.out_dir = Path(out_dir)
        self.overwrite, self.quiet = overwrite, quiet
        self.device = resolve_device(cfg.device)
        if distributed.requested():  # torchrun: one process per device, rank 0 writes and speaks
            if self.device.type == "cuda":
                self.device = torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
                torch.cuda.set_device(self.device)
            distributed.init(self.device.type)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if cfg.optim.batch_size < self.world:
            raise ConfigError(f"config key 'optim.batch_size' = {cfg.optim.batch_size}: the global batch is split over "
                              f"the {self.world} ranks, so it needs at least one sample per rank. Raise it to "
                              f"{self.world} or more, or start fewer ranks.")
        self.main = self.rank == 0
        quiet = self.quiet = quiet or not self.main
        torch.manual_seed(cfg.seed)  # model initialisation is the one use of the global generator
        self.scenario = scenario or build_scenario(cfg.scenario, cfg.seed)
        checked = verify_images(self.scenario)  # a corrupt file stops the run here, not in the middle of it
        if checked["files"] and not quiet:
            say(f"clipcl: checked {checked['files']} image files in {checked['seconds']:.1f} s")
        for warning in self.scenario.notes.get("warnings", []) if self.main else []:
            say(f"clipcl: warning: {warning}")
        self.fingerprint = self.scenario.fingerprint()
        if not self.main:  # rank 0 builds first: a pretrained cache is made once, then read by the others
            distributed.barrier()
        self.bundle: ClipBundle = create(cfg.model, self.device, cfg.scenario, quiet)
        if self.main:
            distributed.barrier()
        self.method: Method = make_method(cfg.method)
        self.method.setup(self.bundle)
        for name, p in self.bundle.model.named_parameters():  # what the method does not train is frozen
            if p.requires_grad and not self.method.trains_parameter(name, p):
                p.requires_grad_(False)
        # the modules the method owns: on the device, in the optimiser, under DDP, in the checkpoint
        self.owned = OwnedModules(self.method.modules()).to(self.device)
        self.method.owned = self.owned
        m = cfg.memory
        self.memory = ReplayMemory(m.per_class, m.total, m.bytes, m.codec, m.quality, m.selection)
        self.model = self.bundle.model  # what the forward goes through: the model, or its DDP wrapper
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            if any(p.requires_grad for p in self.bundle.model.parameters()):
                if self.device.type == "cuda":  # BatchNorm over the global batch, as one process would compute it
                    self.bundle.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.bundle.model)
                self.model = DistributedDataParallel(self.bundle.model, device_ids=ids,
                                                     find_unused_parameters=self.method.leaves_parameters_unused)
            if any(p.requires_grad for p in self.owned.parameters()):  # averaged over the ranks as the model's
                self.method.owned = DistributedDataParallel(self.owned, device_ids=ids, find_unused_parameters=True)
        self.progress = Progress()
        self.optimizer: torch.optim.Optimizer | None = None
        self._image_tower_trains = any(p.requires_grad for n, p in self.bundle.model.named_parameters()
                                       if n.startswith("visual."))
        self.autocast = self.device.type == "cuda" and cfg.model.precision in ("auto", "bf16")
        if self.device.type == "cuda":  # TF32 for what runs outside bf16 autocast (the fp32 losses, AdamW)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.model.compile:
            self.model = torch.compile(self.model)
        self.tokens = class_tokens(self.bundle.tokenizer, list(self.scenario.classnames), DEFAULT_TEMPLATES)[0]
        self.log = StepLog(cfg.log, self.out_dir, to_dict(cfg), cfg.name, enabled=self.main)  # checks it can
        self.progress_bar = progress_bar
        self._checkpointed: tuple[int, int] | None = None  # (task, step) of the last checkpoint written
        self._signal: int | None = None
        self._steps = 0  # training steps of the current task
        self.ctx: TaskContext | None = None  # the current task's context, data and step count (enter_task)
        self.new: ImageSet | None = None
        self.mem: ImageSet | None = None
        self.data: ImageSet | None = None

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything that changes during a run, for a checkpoint."""
        return {
            "config": to_dict(self.cfg),
            "model": self.bundle.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "memory": self.memory.state_dict(),
            "method": self.method.state_dict(),
            **({"modules": self.owned.state_dict()} if self.owned.parts else {}),
            "progress": vars(self.progress).copy(),
            "data": self.fingerprint,
            "torch_rng": torch.get_rng_state(),
            "threads": torch.get_num_threads(),
        }

    def save_checkpoint(self) -> float:
        """Write the checkpoint atomically; returns the seconds it took."""
        start = time.perf_counter()
        if self.main:  # every rank holds the same state
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write(lambda: checkpoint.save(self.out_dir / checkpoint.CHECKPOINT_NAME, self.state()))
        self._checkpointed = (self.progress.task, self.progress.step)
        return time.perf_counter() - start

    def _write(self, write) -> None:
        """Run a write of the run's files; a failure (disk full, permissions) says what is kept and how to go on."""
        try:
            write()
        except OutputError as e:
            if self._checkpointed is None:
                kept = "no checkpoint had been written yet, so there is nothing to resume; start the run again"
            else:
                task, step = self._checkpointed
                kept = (f"the last complete checkpoint (at task {task} step {step}) is kept: free space or fix "
                        f"permissions, then continue with: clipcl resume {self.out_dir}")
            raise OutputError(e.errno, f"{e.strerror}; {kept}") from None

    def load_checkpoint(self) -> None:
        """Restore the state of the last checkpoint in out_dir.

        Nothing is applied before all of it is checked: its bytes (the zip's CRCs) and format (checkpoint.load),
        its config and data against this run's, and every field against this trainer's objects (check_state).
        Anything else is a CheckpointError naming the file and the field, with this trainer unchanged.
        """
        path = self.out_dir / checkpoint.CHECKPOINT_NAME
        state = checkpoint.load(path, to_dict(self.cfg))
        try:
            changed = fingerprint_diff(state["data"], self.fingerprint)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            raise checkpoint.invalid(path, checkpoint.StateError("data", "is not a data fingerprint clipcl writes")
                                     ) from None
        if changed:
            raise checkpoint.CheckpointError(
                f"the data changed since the run in '{self.out_dir}' started ({changed}); resuming would train "
                "on other data. Restore the data the run started on, or start a new run in another folder.")
        try:
            self.check_state(state)
        except checkpoint.StateError as e:
            raise checkpoint.invalid(path, e) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:  # a form unforeseen
            raise checkpoint.CheckpointError(
                f"checkpoint '{path}' does not hold a valid clipcl state ({type(e).__name__}: "
                f"{checkpoint._first_line(e)}); nothing is resumed from it. {checkpoint.START_AGAIN}") from None
        try:
            self.bundle.model.load_state_dict(state["model"])
            if self.owned.parts:
                self.owned.load_state_dict(state["modules"])
            self.bundle.eval_features.clear()
            self.memory.load_state_dict(state["memory"])
            self.method.load_state_dict(state["method"])
            self.progress = Progress(**state["progress"])
            self._checkpointed = (self.progress.task, self.progress.step)
            torch.set_rng_state(state["torch_rng"])
            if state["optimizer"] is not None:
                self._start_optimizer()
                self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[union-attr]
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"checkpoint '{path}' could not be loaded ({type(e).__name__}: {checkpoint._first_line(e)}); "
                f"nothing is resumed from it. {checkpoint.START_AGAIN}") from None
        threads = state.get("threads", torch.get_num_threads())
        if threads != torch.get_num_threads() and self.main:  # CPU kernels split sums by thread: other roundings
            say(f"clipcl: warning: the checkpoint was written with {threads} CPU threads, this process has "
                f"{torch.get_num_threads()}: the resumed run will not match an uninterrupted one bit for bit (set "
                f"OMP_NUM_THREADS={threads} for that).")

    def check_state(self, state: dict) -> None:
        """Check every field of a checkpoint's state (as checkpoint.read returns it) against this trainer's
        live objects, applying none of it: checkpoint.StateError names the first field that this run cannot
        have written. The model's tensors (keys, shapes, dtypes), the progress (task and step in range, rows,
        accuracies, timings, counters), AdamW's state, the memory and the method's state (their check_state)."""
        C = checkpoint
        model_state = self.bundle.model.state_dict()
        C.need_tensors("model", state["model"], model_state)
        if self.owned.parts or "modules" in state:  # the method's own modules: exactly the live ones' tensors
            if "modules" not in state:
                raise C.StateError("modules", f"is missing: method {self.cfg.method.name!r} owns "
                                   f"{', '.join(self.owned.parts)}, whose weights a checkpoint of it holds")
            C.need_tensors("modules", state["modules"], self.owned.state_dict())
        n = len(self.scenario)
        p = C.need_dict("progress", state["progress"], [f.name for f in dataclasses.fields(Progress)],
                        optional=("log_id",))  # log_id: absent in checkpoints of earlier clipcl versions
        task = C.need_int("progress.task", p["task"], 0, n, f"the run has {n} tasks")
        n_classes = len(self.scenario.classnames)
        self.memory.check_state(state["memory"], [self.scenario[k].classes for k in range(task)], n_classes)
        memory = ReplayMemory(self.memory.per_class, self.memory.total, self.memory.bytes, self.memory.codec,
                              self.memory.quality, self.memory.selection)
        memory.load_state_dict(state["memory"])  # a scratch copy: the sizes of the task resumed depend on it
        ctx = self._task_context(task, memory) if task < n else None
        steps = ctx.steps if ctx is not None else 0
        step = C.need_int("progress.step", p["step"], 0, steps,
                          f"task {task} has {steps} steps" if ctx is not None else "the run has done all its tasks")
        self._check_progress(p, task, step)
        self._check_optimizer(state["optimizer"], step)
        self.method.check_state(state["method"], model_state, ctx if step > 0 else None)

    def _task_context(self, t: int, memory: ReplayMemory) -> TaskContext:
        """Task t's context as enter_task would set it up with `memory` (sizes and steps filled in), without
        attaching the method or touching this trainer's memory: for checking a checkpoint before it is applied."""
        live, self.memory = self.memory, memory
        try:
            ctx = self.context(t)
            new, mem = self.method.training_data(ctx)
            ctx.new_size, ctx.data_size = len(new), len(new) + (len(mem) if mem is not None else 0)
            ctx.steps = self.total_steps(t)
        finally:
            self.memory = live
        return ctx

    def _check_progress(self, p: dict, task: int, step: int) -> None:
        """The Progress fields of a checkpoint at (task, step): lengths consistent with them, types, ranges."""
        C, n = checkpoint, len(self.scenario)

        def accuracies(field: str, values, none: bool = True) -> None:
            for j, a in enumerate(values):
                C.need_number(f"{field}[{j}]", a, 0.0, 1.0, none=none)

        def matrix(field: str, rows, length: int, why: str) -> None:
            for i, row in enumerate(C.need_list(field, rows, length, why)):
                accuracies(f"{field}[{i}]", C.need_list(f"{field}[{i}]", row, n, f"one entry per task of the {n}"))

        matrix("progress.rows", p["rows"], task, f"one accuracy row per task trained: {task}")
        if self.cfg.eval.unseen:
            matrix("progress.unseen", p["unseen"], min(task + 1, n), "one row before training and after each task "
                   "but the last")
        else:
            C.need_list("progress.unseen", p["unseen"], 0, "eval.unseen is off")
        before = C.need_list("progress.before", p["before"])
        started = (task + 1,) if step > 0 else (task, min(task + 1, n))  # before_task's accuracy comes first
        if len(before) not in started:
            raise C.StateError("progress.before", f"must hold {task + 1 if step > 0 else task} accuracies (one per "
                               f"task started)", before)
        accuracies("progress.before", before)
        timing = C.need_list("progress.timing", p["timing"], task, f"one entry per task trained: {task}")
        for i, entry in enumerate(timing):
            field = f"progress.timing[{i}]"
            C.need_dict(field, entry)
            for key in ("task", "train_seconds", "eval_seconds", "steps", "train_images", "train_images_per_second"):
                if key not in entry:
                    raise C.StateError(f"{field}.{key}", "is missing")
            C.need_int(f"{field}.task", entry["task"], i, i)
            C.need_int(f"{field}.steps", entry["steps"])
            C.need_int(f"{field}.train_images", entry["train_images"])
            for key in ("train_seconds", "eval_seconds", "checkpoint_seconds", "train_images_per_second"):
                if key in entry:
                    C.need_number(f"{field}.{key}", entry[key], 0.0, none=key == "train_images_per_second")
        C.need_int("progress.nonfinite_skipped", p["nonfinite_skipped"])
        C.need_int("progress.images_seen", p["images_seen"])
        C.need_int("progress.loss_steps", p["loss_steps"], 0, step if step > 0 else None,
                   "logged steps of the task so far" if step > 0 else "")
        C.need_number("progress.train_seconds", p["train_seconds"], 0.0)
        C.need_number("progress.loss_sum", p["loss_sum"])
        if "log_id" in p:
            C.need_str("progress.log_id", p["log_id"])

    def _check_optimizer(self, state: dict | None, step: int) -> None:
        """AdamW's state of a checkpoint at `step` of a task: None between tasks, else the groups and moments of
        the optimiser this trainer builds (parameter indices, shapes, dtypes, step counts)."""
        C = checkpoint
        if state is None:
            if step > 0:
                raise C.StateError("optimizer", f"is None, but a run resumed within a task (at step {step}) needs "
                                   "AdamW's state (its moments)")
            return
        live = self.optimizer
        try:
            self._start_optimizer()
            reference = self.optimizer
        finally:
            self.optimizer = live
        assert reference is not None
        ref = reference.state_dict()
        params = [q for group in reference.param_groups for q in group["params"]]
        C.need_dict("optimizer", state, ["state", "param_groups"])
        groups = C.need_list("optimizer.param_groups", state["param_groups"], len(ref["param_groups"]),
                             "AdamW's parameter groups for this model")
        for i, (group, want) in enumerate(zip(groups, ref["param_groups"])):
            field = f"optimizer.param_groups[{i}]"
            C.need_dict(field, group)
            for key in ("params", "lr", "betas", "eps", "weight_decay"):
                if key not in group:
                    raise C.StateError(f"{field}.{key}", "is missing")
            if list(C.need_list(f"{field}.params", group["params"])) != want["params"]:
                span = f"{want['params'][0]} to {want['params'][-1]}" if want["params"] else "none"
                raise C.StateError(f"{field}.params", f"must list this model's parameters of the group ({span})",
                                   group["params"])
            C.need_number(f"{field}.lr", group["lr"], 0.0)
            C.need_number(f"{field}.eps", group["eps"], 0.0)
            for j, b in enumerate(C.need_list(f"{field}.betas", group["betas"], 2)):
                C.need_number(f"{field}.betas[{j}]", b, 0.0, 1.0)
            if group["weight_decay"] != want["weight_decay"]:
                raise C.StateError(f"{field}.weight_decay", f"differs from the run's config ({want['weight_decay']})",
                                   group["weight_decay"])
        moments = C.need_dict("optimizer.state", state["state"])
        for k, entry in moments.items():
            if not C.is_int(k) or not 0 <= k < len(params):
                raise C.StateError("optimizer.state", f"holds the key {k!r}, not a parameter index from 0 to "
                                   f"{len(params) - 1}", moments)
            field, param = f"optimizer.state[{k}]", params[k]
            C.need_dict(field, entry, ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"], optional=("max_exp_avg_sq",))
            for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if name in entry:
                    C.need_tensor(f"{field}.{name}", entry[name], dtype=param.dtype, shape=tuple(param.shape),
                                  why=f"as parameter {k}")
            count = entry["step"]
            if isinstance(count, torch.Tensor):
                count = float(C.need_tensor(f"{field}.step", count, shape=(), floating=True))
            C.need_number(f"{field}.step", count, 0.0, float(step) if step > 0 else None)
            if count != int(count):
                raise C.StateError(f"{field}.step", "must count whole steps", count)

    # ------------------------------------------------------------------ pieces
    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of everything the optimiser updates: the model's trainable parameters, then those
        of the method's own modules ('modules.<name>.<parameter>')."""
        return ([(n, p) for n, p in self.bundle.model.named_parameters() if p.requires_grad]
                + [(f"modules.{n}", p) for n, p in self.owned.named_parameters() if p.requires_grad])

    def _start_optimizer(self) -> None:
        params = self.trained_parameters()
        decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
        rest = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
        fused = self.device.type == "cuda"  # one kernel for the whole update on a GPU; foreach on the CPU
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.cfg.optim.lr, foreach=None if fused else True, fused=fused or None)

    def context(self, t: int) -> TaskContext:
        """The context a method gets for task t (data sizes are filled in by enter_task)."""
        cfg = self.cfg
        return TaskContext(model=self.model, bundle=self.bundle, memory=self.memory, scenario=self.scenario,
                           device=self.device, task=t, seed=cfg.seed, batch_size=cfg.optim.batch_size,
                           eval_batch_size=cfg.eval.batch_size, tokens=self.tokens, autocast=self.autocast,
                           rank=self.rank, world_size=self.world)

    def task_data(self, t: int) -> tuple[ImageSet, ImageSet | None]:
        """(new data, memory data) task t trains on, as its method chooses (memory None when it has none)."""
        return self.method.training_data(self.context(t))

    def total_steps(self, t: int) -> int:
        """Training steps of task t."""
        if not self.method.trains:
            return 0
        new, mem = self.task_data(t)
        steps = math.ceil(self.cfg.optim.epochs * self.method.epoch_size(new, mem) / self.cfg.optim.batch_size)
        return min(steps, self.cfg.optim.max_steps) if self.cfg.optim.max_steps else steps

    def enter_task(self, t: int) -> None:
        """Set up task t where the run stands in it: its context and data, its step count, the method attached."""
        ctx = self.context(t)
        self.new, self.mem = self.method.training_data(ctx)
        self.data = ConcatImageSet([self.new, self.mem]) if self.mem is not None else self.new
        ctx.data_size, ctx.new_size = len(self.data), len(self.new)
        self.ctx = ctx
        self._steps = ctx.steps = self.total_steps(t)
        self.method.attach(ctx)

    def start_task(self, t: int, steps: int | None = None) -> None:
        """Begin task t at its first step: context and data, the method's before_task, a fresh optimiser.

        `steps` overrides the task's length (what optim.epochs gives), e.g. for a benchmark of a few steps.
        """
        self.enter_task(t)
        if steps is not None:
            self._steps = self.ctx.steps = steps  # type: ignore[union-attr]
        assert self.ctx is not None
        self.progress.task, self.progress.step = t, 0
        if self.method.trains:
            self.method.before_task(self.ctx)
            self._start_optimizer()
        p = self.progress
        p.train_seconds, p.images_seen, p.loss_sum, p.loss_steps = 0.0, 0, 0.0, 0

    def batch_positions(self, step: int) -> np.ndarray:
        """Sample positions in the current task's D_t U M of one step, as the method mixes them."""
        assert self.ctx is not None and self.new is not None, "enter_task() first"
        return self.method.batch_positions(self.ctx, step, self.new, self.mem)

    def train_step(self, positions: np.ndarray, step: int) -> dict[str, float] | None:
        """One optimiser step on the current task's samples at `positions`; returns the logged values, or None
        for a skipped non-finite batch."""
        model, opt, cfg, data, ctx = self.model, self.optimizer, self.cfg, self.data, self.ctx
        assert opt is not None and data is not None and ctx is not None, "start_task() first"
        labels = torch.as_tensor(data.targets[positions], device=self.device)  # of the global batch
        index = torch.as_tensor(positions, device=self.device)
        mine, start = positions, 0
        if self.world > 1:  # this rank loads, augments and encodes its shard; the method gathers the embeddings
            ctx.shard_sizes = distributed.shard_sizes(len(positions), self.world)
            start = sum(ctx.shard_sizes[: self.rank])
            mine = positions[start:start + ctx.shard_sizes[self.rank]]
        raw = self.bundle.input_images(data.load(mine))
        if self.device.type == "cuda":  # page-locked: the copy overlaps with the GPU's work
            raw = raw.pin_memory()
        images = self.bundle.prepare_images(raw.to(self.device, non_blocking=True))
        images = augment(images, cfg.scenario.augment, seeded(cfg.seed, self.progress.task, step, STREAM_AUGMENT),
                         total=len(positions), start=start)
        # The forward updates the method's estimators and the model's BatchNorm statistics; a skipped batch
        # must leave them as they were, or one nan batch would poison them for the rest of the task.
        before = ((_snapshot(self.method.step_state()), _snapshot(dict(self.bundle.model.named_buffers())))
                  if cfg.skip_nonfinite else None)
        terms = self.method.training_forward(model, images, labels, index, step)  # autocast is the method's
        losses = [v for k, v in terms.items() if k.endswith("_loss")]
        if not losses:
            raise RuntimeError(f"method {cfg.method.name!r} returned no '*_loss' term at step {step} "
                               f"(terms: {', '.join(terms) or 'none'})")
        loss = sum(losses)
        if not torch.isfinite(loss):
            return self._nonfinite(step, terms, before)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, self._steps, cfg.optim.lr, cfg.optim.warmup_steps)
        opt.zero_grad(set_to_none=True)
        (loss * self.world).backward()  # DDP averages over the ranks: times W, the sum of their parts
        # A finite loss can still have inf/nan gradients; stepping on them would put nan into the weights
        # (and into the next checkpoint). max_norm=inf measures without clipping.
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trained_parameters()], cfg.optim.grad_clip or math.inf)
        if not torch.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            return self._nonfinite(step, {**terms, "grad_norm": norm}, before)
        opt.step()
        if self._image_tower_trains:  # fused AdamW does not bump version counters: forget evaluation's features
            self.bundle.eval_features.clear()
        with torch.no_grad():  # CLIP's clamp: a logit scale above 100 destabilises training
            self.bundle.model.logit_scale.clamp_(0, math.log(100))
        logged = {k: float(v.detach()) for k, v in terms.items()}
        # the loss shown: the method's own values where its training terms are surrogates (gcl, gdro)
        values = [v for k, v in logged.items() if k.endswith("_value")]
        return {**logged, "loss": sum(values) if values else float(loss.detach())}

    def _nonfinite(self, step: int, terms: dict[str, torch.Tensor], before: tuple[dict, dict] | None) -> None:
        """Skip (and count) a non-finite batch when skip_nonfinite, else raise NonFiniteLoss."""
        if before is not None:
            self.progress.nonfinite_skipped += 1
            method_state, buffers = before
            self.method.load_step_state(method_state)
            with torch.no_grad():
                for name, b in self.bundle.model.named_buffers():
                    b.copy_(buffers[name])
            return None
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        what = "gradient" if "grad_norm" in terms else "loss"
        if self._checkpointed is None:
            kept = "No checkpoint had been written yet"
        else:
            kept = (f"The last good checkpoint (at task {self._checkpointed[0]} step {self._checkpointed[1]}) "
                    "is kept")
        raise NonFiniteLoss(f"non-finite {what} at task {self.progress.task} step {step}: {detail}. {kept}; "
                            "lower optim.lr, or set skip_nonfinite=true to skip (and count) such batches.")

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def run(self, resume: bool = False) -> dict:
        """Train and evaluate every task; returns the results dict (also written to out_dir).

        The folder is claimed first (rank 0): locked against other processes until the run ends, and every
        file written into it listed in its marker (rundir.py, owned.py)."""
        claimed = rundir.claim(self.out_dir, self.overwrite, resume) if self.main else None
        try:
            distributed.barrier()  # the folder is claimed (and checked) before any rank reads a checkpoint from it
            if claimed is not None and claimed.restarted:
                say(f"clipcl: note: '{self.out_dir}' held a run that stopped before its first checkpoint; "
                    "starting it again there")
            if claimed is not None and claimed.kept:
                kept = claimed.kept
                say(f"clipcl: note: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} in '{self.out_dir}' that "
                    "clipcl did not write: " + ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else ""))
            return self._run(resume)
        finally:
            if claimed is not None:
                claimed.release()

    def _run(self, resume: bool) -> dict:
        if resume:
            self.load_checkpoint()
        if not self.progress.log_id:  # a new run (or one from before the field): a new id, never an old run's
            self.progress.log_id = uuid.uuid4().hex[:16]
        self.log.open(self.global_step() if resume else None, self.progress.log_id)
        handlers = {}
        if sys.platform != "win32" and self.signals:
            try:
                handlers = {s: signal.signal(s, self._on_signal) for s in stop_signals()}  # SIGHUP too
            except ValueError:  # not the main thread: leave signals alone
                handlers = {}
        try:
            while self.progress.task < len(self.scenario):
                self._run_task(self.progress.task)
        finally:
            self.log.close()
            self.close_data()
            for s, h in handlers.items():
                signal.signal(s, h)
        results = self.results(complete=True)
        if self.main:
            self._write(lambda: write_outputs(results, self.out_dir))
        distributed.barrier()
        return results

    def _check_signal(self) -> None:
        if self.world > 1:  # every rank stops at the same step, whichever got the signal
            if distributed.any_rank(self._signal is not None, self.device) and self._signal is None:
                self._signal = signal.SIGTERM
        if self._signal is not None:
            self.save_checkpoint()
            raise Interrupted(self._signal, self.out_dir)

    def _run_task(self, t: int) -> None:
        cfg, p = self.cfg, self.progress
        if cfg.eval.unseen and len(p.unseen) == t == 0:  # zero-shot accuracy of the model as it starts
            p.unseen.append(self._unseen_row(0))
        if len(p.before) == t:
            p.before.append(accuracy_before_training(self.bundle, self.scenario, t, cfg.eval.templates,
                                                     cfg.eval.batch_size, self.device, self.autocast,
                                                     split=cfg.eval.split, scores=self.method.classifier()))
        if p.step == 0:
            self.start_task(t)
        else:  # resumed within the task: the optimiser and the method's state came from the checkpoint
            self.enter_task(t)
        assert self.ctx is not None
        self.bundle.model.train()
        bar = tqdm(total=self._steps, initial=p.step, desc=f"{cfg.method.name} task {t + 1}/{len(self.scenario)}",
                   disable=not self.main or self.progress_bar is False or (self.progress_bar is None and not sys.stderr.isatty()),
                   leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        seconds_before = p.train_seconds
        first = self.global_step() - p.step  # the global step of the task's first step
        every = cfg.log.every
        while p.step < self._steps:
            positions = self.batch_positions(p.step)
            step_start = time.perf_counter()
            logged = self.train_step(positions, p.step)
            step_seconds = time.perf_counter() - step_start
            p.step += 1
            p.images_seen += len(positions)
            p.train_seconds = seconds_before + time.perf_counter() - start
            if logged is not None:
                p.loss_sum += logged["loss"]
                p.loss_steps += 1
                if (p.step - 1) % every == 0 or p.step == self._steps:
                    self.log.step(first + p.step - 1, t, p.step - 1, logged,
                                  lr_at(p.step - 1, self._steps, cfg.optim.lr, cfg.optim.warmup_steps),
                                  len(positions) / max(step_seconds, 1e-9))
                bar.set_postfix(loss=f"{logged['loss']:.3f}", img_s=f"{p.images_seen / max(p.train_seconds, 1e-9):.0f}")
            bar.update(1)
            if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0 and p.step < self._steps:
                self.save_checkpoint()
            self._check_signal()
        bar.close()
        if self.world > 1:  # BatchNorm statistics of rank 0 everywhere: the ranks evaluate and select alike
            with torch.no_grad():
                for b in self.bundle.model.buffers():
                    torch.distributed.broadcast(b, 0)
        self.method.after_task(self.ctx)  # memory update, stored logits, weight interpolation
        eval_start = time.perf_counter()
        p.rows.append(accuracy_row(self.bundle, self.scenario, t, cfg.eval.templates, cfg.eval.batch_size,
                                   self.device, self.autocast, split=cfg.eval.split, scores=self.method.classifier()))
        if cfg.eval.unseen and t + 1 < len(self.scenario):
            p.unseen.append(self._unseen_row(t + 1))
        p.timing.append({"task": t, "train_seconds": round(p.train_seconds, 3),
                         "eval_seconds": round(time.perf_counter() - eval_start, 3), "steps": self._steps,
                         "train_images": p.images_seen,
                         "train_images_per_second": round(p.images_seen / p.train_seconds, 1) if p.train_seconds else None})
        self.log.task_end(max(first + self._steps - 1, 0), t, seen_accuracy(p.rows, self.eval_sizes(), t))
        p.task, p.step = t + 1, 0
        self.optimizer = None
        ckpt_seconds = self.save_checkpoint()
        p.timing[-1]["checkpoint_seconds"] = round(ckpt_seconds, 3)
        if p.task < len(self.scenario) and self.main:  # the rows so far, readable while the run goes on
            self._write(lambda: write_results_json(self.results(complete=False), self.out_dir))
        self._task_line(t)
        self._check_signal()

    def _unseen_row(self, trained: int) -> list[float | None]:
        cfg = self.cfg
        return unseen_row(self.bundle, self.scenario, trained, cfg.eval.templates, cfg.eval.batch_size, self.device,
                          self.autocast, split=cfg.eval.split, scores=self.method.classifier())

    def close_data(self) -> None:
        """Stop the scenario's image-decoding processes (started again on demand if the data is read later)."""
        from .data.images import FileStore

        stores = {id(s.store): s.store for task in self.scenario.tasks for s in (task.train, task.test, task.val)}
        for store in stores.values():
            if isinstance(store, FileStore):
                store.close()

    def global_step(self) -> int:
        """Training steps done so far in the run, tasks end to end (the step axis of logs and plots)."""
        return sum(x.get("steps", 0) for x in self.progress.timing) + self.progress.step

    def eval_sizes(self) -> list[int]:
        """Images per task of the split R is computed on (eval.split): the weights of the seen accuracy."""
        return [len(split_of(task, self.cfg.eval.split)) for task in self.scenario.tasks]

    def _task_line(self, t: int) -> None:
        """'task t/T: loss, accuracy on seen classes, img/s, elapsed' on stderr, terminal or not."""
        if self.quiet:
            return
        p, sizes = self.progress, self.eval_sizes()
        timing = p.timing[-1]
        loss = f"train loss {p.loss_sum / p.loss_steps:.4f}" if p.loss_steps else "no training"
        speed = f", {timing['train_images_per_second']:.0f} img/s" if timing["train_images_per_second"] else ""
        elapsed = sum(x["train_seconds"] + x["eval_seconds"] + x.get("checkpoint_seconds", 0) for x in p.timing)
        say(f"clipcl: {self.cfg.method.name} task {t + 1}/{len(self.scenario)}: {loss}, accuracy on seen classes "
            f"{100 * seen_accuracy(p.rows, sizes, t):.1f}%{speed}, elapsed {elapsed:.0f} s")

    # ------------------------------------------------------------------ results
    def results(self, complete: bool) -> dict:
        """The results dict: config, accuracy matrix, metrics, timings, memory, versions, telemetry."""
        p, sc = self.progress, self.scenario
        sizes = self.eval_sizes()
        train_s = sum(x["train_seconds"] for x in p.timing)
        train_n = sum(x["train_images"] for x in p.timing)
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {
            "schema_version": RESULTS_SCHEMA,
            "complete": complete,
            "config": to_dict(self.cfg),
            "scenario": {"kind": sc.kind, "classnames": list(sc.classnames), "class_order": list(sc.class_order),
                         "class_order_hash": sc.order_hash, "tasks": [t.name for t in sc.tasks],
                         "train_sizes": [len(t.train) for t in sc.tasks],
                         "test_sizes": [len(t.test) for t in sc.tasks], "val_sizes": [len(t.val) for t in sc.tasks],
                         "eval_split": self.cfg.eval.split, "eval_sizes": sizes},
            "accuracy_matrix": p.rows,
            "accuracy_before_training": p.before,
            "metrics": {**metrics(p.rows, sizes, p.before),
                        **({"unseen_change": unseen_change(p.unseen)} if self.cfg.eval.unseen else {})},
            **({"unseen_matrix": p.unseen} if self.cfg.eval.unseen else {}),
            "timing": {"tasks": p.timing, "train_seconds": round(train_s, 3),
                       "train_images_per_second": round(train_n / train_s, 1) if train_s else None,
                       "peak_memory_bytes": int(peak),
                       "peak_memory_kind": "cuda allocated" if self.device.type == "cuda" else "process max RSS"},
            "model": {"name": self.cfg.model.name,
                      "parameters": sum(p.numel() for p in self.bundle.model.parameters())
                      + sum(p.numel() for p in self.owned.parameters()),  # the method's own modules' too
                      "trainable_parameters": sum(p.numel() for _, p in self.trained_parameters())
                      if self.method.trains else 0},
            "memory": {"images": len(self.memory), "bytes": self.memory.nbytes,
                       # what else the method keeps between tasks: its state's tensors (teachers, statistics,
                       # stored logits) and its own modules' weights
                       "method_state_bytes": tensor_bytes(self.method.state_dict()) + tensor_bytes(self.owned.state_dict()),
                       "per_class": self.memory.counts()},
            "nonfinite_skipped": p.nonfinite_skipped,
            "data_notes": sc.notes,
            "data_fingerprint": self.fingerprint,
            "versions": versions(self.device),
            "method_options": list(self.method.reads),  # the method.* keys it reads (the report groups on them)
            **self.method.results(),
        }
