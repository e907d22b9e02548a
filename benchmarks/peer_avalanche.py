"""Peer benchmark: clipcl's experience replay (`er`) against Avalanche's replay, at equal work.

    .venv/bin/python benchmarks/peer_avalanche.py --setup     # once: the avalanche venv
    .venv/bin/python benchmarks/peer_avalanche.py             # measure and print the ratio
    .venv/bin/python benchmarks/peer_avalanche.py --tasks 3 --steps 80 --repeats 3   # the flags, defaults shown

The same ER experiment runs twice, one side after the other, each in a fresh process on one CPU thread
(OMP_NUM_THREADS=1, torch.set_num_threads(1)):

- clipcl: `clipcl.cli.run_one` (the engine's Trainer, its own loop, sampling, memory and evaluation) on the
  shipped `fmnist-cil` config with the overrides below;
- Avalanche (avalanche-lib 0.6.0): a `SupervisedTemplate` subclass trained with Avalanche's own loop
  (`strategy.train(experience)`), its `ReplayPlugin` with a `ClassBalancedBuffer` storage policy and its
  `ReplayDataLoader`, on a `class_incremental_benchmark` built from the same images.

Equal work (both sides read every value from the one RunCfg this script builds):
- data: Fashion-MNIST through clipcl's loader (`build_scenario`), the first --tasks tasks of fmnist-cil (its
  seeded class order, 2 classes a task), --train-per-class training images per class (512: 1024 a task, 16
  full batches of 64 an epoch on both sides) and --test-per-class test images per class;
- model: clipcl's tiny open_clip `clipcl-tiny-rn` (text tower locked, as fmnist-cil), created by
  `clipcl.models.create` after `torch.manual_seed(seed)`: the same initial weights (their hash is
  compared);
- preprocessing: uint8 28x28 -> `ClipBundle.prepare_images` (3 channels, bicubic to 32 px, CLIP
  normalisation) then the `shift` augmentation of fmnist-cil (`clipcl.augment.augment`, seeded by
  (seed, task, step) on both sides), one call per batch;
- loss: the mini-batch CLIP loss of clipcl's `er` (`clipcl.losses.clip_loss`: images against the text
  embeddings of the batch's distinct class prompts "a photo of a {}.", computed by the same
  `model(images, tokens)` forward);
- optimiser: AdamW with clipcl's parameter groups (weight decay on matrices, none on biases, norms and the
  logit scale), a fresh optimiser each task, lr 0.002 with 10 warm-up steps then cosine to 0 over the task
  (`clipcl.engine.lr_at`), gradient norm clipped at 1.0, logit scale clamped to <= 100 after each step;
- batches: 64 new images plus 64 memory images per step once the memory holds images (clipcl
  `method.sampling=concat`; Avalanche `ReplayPlugin(batch_size=64, batch_size_mem=64)`); --steps steps per
  task on both sides (Avalanche: enough epochs, stopped at --steps iterations);
- memory: --per-class images per class (32), chosen at random after each task (clipcl
  `memory.per_class`; Avalanche `ClassBalancedBuffer(max_size=per_class * classes, adaptive_size=False)`).
  32 and not fmnist-cil's 10: Avalanche's memory loader gives a memory batch of at most the memory's size
  (20 images after task 1 with 10 per class), while clipcl draws 64 with replacement; with 32 per class the
  memory holds >= 64 images whenever it is replayed, so both sides replay 64 images a step;
- evaluation: after each task (not timed), clipcl's zero-shot evaluation (`clipcl.evaluate.accuracy_row`)
  of each side's model on the same test images among the classes seen; the figure is the accuracy on all
  seen test images after the last task.

What is timed: the training loop of each task, summed over tasks, and nothing before it (process start,
imports, data loading, model creation):
- clipcl: `timing.train_seconds` of its results (the engine's loop over the task's steps: batch positions,
  image loading, preprocessing, augmentation, forward, loss, backward, clipping, AdamW step);
- Avalanche: from the first `before_training_epoch` to the last `after_training_epoch` of each experience
  (its DataLoader iteration with sampler, per-sample `__getitem__` and collate, then the same preprocessing,
  forward, loss, backward, clipping, AdamW step, and every plugin callback).
Also shown: each side's whole training call per task (clipcl: `run_one`'s wall time, which also holds its
evaluations and checkpoints; Avalanche: `strategy.train(exp)`, which also holds the dataset adaptation,
dataloader and optimiser set-up and the buffer update).

The Avalanche side runs inside benchmarks/out/avalanche-venv (made by --setup): a venv that sees the main
venv's packages through a .pth file (torch, open_clip, clipcl) and holds avalanche-lib with only the light
packages it needs at import time, installed --no-deps, so there is one torch and the main venv never gets
avalanche-lib. Writes benchmarks/results/peer_avalanche.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / "out" / "avalanche-venv"
WORK = ROOT / "benchmarks" / "out" / "peer_avalanche"
RESULTS = ROOT / "benchmarks" / "results"
# avalanche-lib 0.6.0 without its dependencies, plus what it imports at start-up that the main venv lacks.
# wandb < 0.19 (newer ones import opentelemetry and more) needs protobuf < 6, which tensorboard 2.18's
# generated code accepts (tensorboard 2.21 needs protobuf >= 6.31): both are pinned in the avalanche venv.
AVALANCHE_PACKAGES = (
    "avalanche-lib==0.6.0", "wandb==0.18.7", "protobuf==5.29.6", "tensorboard==2.18.0", "absl-py==2.5.1",
    "dill==0.4.1", "gdown==6.5.1", "requests==2.34.2", "urllib3==2.8.0", "certifi==2026.10.19.post1",
    "charset-normalizer", "idna", "beautifulsoup4==4.15.0", "soupsieve", "pytorchcv==0.0.74",
    "platformdirs==4.14.8", "docker-pycreds==0.4.0", "six==1.17.0", "sentry-sdk==2.75.0", "psutil==7.2.2",
    "gputil==1.4.0", "torchmetrics==1.9.0", "lightning-utilities==0.15.3", "qpsolvers==4.13.0",
    "scipy==1.17.1",
)
PTH_NAME = "_clipcl_main_venv.pth"


def venv_python() -> Path:
    return VENV / "bin" / "python"


# ---------------------------------------------------------------------------------------------- set-up
def setup() -> int:
    """Create the avalanche venv over the main venv's packages and install avalanche-lib there."""
    import sysconfig

    if sys.prefix == sys.base_prefix:
        print("peer_avalanche: run --setup with the main venv's python (.venv/bin/python): the avalanche venv "
              "borrows its packages", file=sys.stderr)
        return 2
    main_site = sysconfig.get_paths()["purelib"]
    base = getattr(sys, "_base_executable", sys.executable)
    if not venv_python().exists():
        print(f"creating {VENV} with {base}", flush=True)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    site = subprocess.run([str(venv_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir, not a bare path: the main venv's own .pth files (clipcl's editable install) must run too.
    # The avalanche venv's site-packages stays first on sys.path, so its pins win over the main venv's.
    (Path(site) / PTH_NAME).write_text(f"import site; site.addsitedir({main_site!r})\n")
    print(f"{Path(site) / PTH_NAME} -> {main_site}", flush=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + list(AVALANCHE_PACKAGES), check=True)
    check = ("import warnings; warnings.simplefilter('ignore'); import torch, clipcl, avalanche;"
             "from avalanche.training.templates import SupervisedTemplate;"
             "from avalanche.training.plugins import ReplayPlugin;"
             "from avalanche.training.storage_policy import ClassBalancedBuffer;"
             "from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark;"
             "print('avalanche', avalanche.__version__, 'torch', torch.__version__, 'from', torch.__file__)")
    done = subprocess.run([str(venv_python()), "-c", check], capture_output=True, text=True)
    if done.returncode:
        print("peer_avalanche: avalanche-lib does not import in the avalanche venv:\n" + done.stderr[-3000:],
              file=sys.stderr)
        return 1
    print(done.stdout.strip())
    if not done.stdout.strip().endswith(str(Path(main_site) / "torch" / "__init__.py")):
        print("peer_avalanche: warning: the avalanche venv's torch is not the main venv's", file=sys.stderr)
    import importlib.util

    if importlib.util.find_spec("avalanche") is not None:
        print("peer_avalanche: warning: the main venv can import avalanche", file=sys.stderr)
    print(f"ready: {VENV}")
    return 0


# ---------------------------------------------------------------------------------------------- shared
def build_cfg(args):
    """The one RunCfg both sides read: fmnist-cil, er, with the benchmark's size and the memory that keeps
    64 + 64 batches on both sides."""
    from clipcl.config import load_config

    per_task = args.train_per_class * 2  # fmnist-cil: 2 classes a task
    epochs = math.ceil(args.steps * args.batch / per_task)  # max_steps binds, whatever the epochs
    return load_config("fmnist-cil", [
        f"seed={args.seed}", "device=cpu", "method.name=er", "method.sampling=concat",
        f"scenario.n_tasks={args.tasks}", f"scenario.train_per_class={args.train_per_class}",
        f"scenario.test_per_class={args.test_per_class}", f"memory.per_class={args.per_class}",
        "memory.selection=random", "memory.codec=raw", f"optim.batch_size={args.batch}",
        f"optim.epochs={epochs}", f"optim.max_steps={args.steps}",
    ])


def state_hash(model) -> str:
    """A hash of a model's state dict (names, shapes, values): equal hashes, equal weights."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(repr(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass


# ---------------------------------------------------------------------------------------------- clipcl side
def run_clipcl(args) -> dict:
    import shutil

    import torch

    from clipcl import __version__
    from clipcl.cli import run_one
    from clipcl.engine import Trainer

    one_thread()
    cfg = build_cfg(args)
    out = WORK / "clipcl-run"
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(cfg, out, progress_bar=False, quiet=True)  # data and model: not timed
    init = state_hash(trainer.bundle.model)
    start = time.perf_counter()
    r = run_one(cfg, out, quiet=True, trainer=trainer)
    wall = time.perf_counter() - start
    tasks = r["timing"]["tasks"]
    return {
        "side": "clipcl", "threads": torch.get_num_threads(), "init_hash": init,
        "versions": {"clipcl": __version__, "torch": torch.__version__},
        "class_order": r["scenario"]["class_order"], "train_sizes": r["scenario"]["train_sizes"],
        "test_sizes": r["scenario"]["test_sizes"],
        "loop_seconds": r["timing"]["train_seconds"],
        "loop_seconds_per_task": [x["train_seconds"] for x in tasks],
        "steps_per_task": [x["steps"] for x in tasks],
        "images_per_task": [x["train_images"] for x in tasks],
        # concat sampling: B new images a step, the rest of the step's images come from the memory
        "new_images_per_task": [x["steps"] * cfg.optim.batch_size for x in tasks],
        "images": sum(x["train_images"] for x in tasks),
        "whole_seconds": wall,
        "whole_note": "run_one wall time: training, the evaluations before and after each task, checkpoints",
        "eval_seconds": sum(x["eval_seconds"] for x in tasks),
        "checkpoint_seconds": sum(x.get("checkpoint_seconds", 0) for x in tasks),
        "memory_per_class": {str(k): v for k, v in r["memory"]["per_class"].items()},
        "accuracy_matrix": r["accuracy_matrix"], "metrics": r["metrics"],
        "train_loss": None,
    }


# ---------------------------------------------------------------------------------------------- avalanche side
def run_avalanche(args) -> dict:
    warnings.simplefilter("ignore")  # requests, bs4 and qpsolvers warn about optional extras at import
    shown = warnings.showwarning  # and ReplayPlugin's call of a deprecated buffer method re-enables its warning

    def quiet_deprecations(message, category, *rest, **kw):
        if not issubclass(category, DeprecationWarning):
            shown(message, category, *rest, **kw)

    warnings.showwarning = quiet_deprecations
    import numpy as np
    import torch
    from torch import nn

    import avalanche
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer
    from avalanche.training.templates import SupervisedTemplate

    from clipcl import __version__
    from clipcl.augment import augment
    from clipcl.data.scenarios import build_scenario
    from clipcl.engine import lr_at
    from clipcl.evaluate import accuracy_row, metrics
    from clipcl.losses import clip_loss
    from clipcl.methods import clip_forward
    from clipcl.models import create
    from clipcl.prompts import DEFAULT_TEMPLATES, class_tokens
    from clipcl.sampling import STREAM_AUGMENT, seeded

    one_thread()
    cfg = build_cfg(args)
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)  # as the Trainer: the model's initialisation is the global generator's first use
    scenario = build_scenario(cfg.scenario, cfg.seed)
    bundle = create(cfg.model, device, cfg.scenario, quiet=True)
    init = state_hash(bundle.model)
    tokens = class_tokens(bundle.tokenizer, list(scenario.classnames), DEFAULT_TEMPLATES)[0]

    class TaskImages(torch.utils.data.Dataset):
        """uint8 images [1, 28, 28] and their labels (clipcl's class order), as clipcl's loader holds them."""

        def __init__(self, images: torch.Tensor, targets: list[int]):
            self.images, self.targets = images, targets

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.images[i], self.targets[i]

    parts = [task.train for task in scenario.tasks]
    images = torch.cat([p.load(np.arange(len(p))) for p in parts])
    targets = [int(y) for p in parts for y in p.targets]
    bench = class_incremental_benchmark({"train": TaskImages(images, targets)},
                                        class_order=list(range(len(scenario.classnames))),
                                        num_classes_per_exp=[len(task.classes) for task in scenario.tasks])

    class ClipModel(nn.Module):
        """The open_clip model as a module of (images, labels): image embeddings, the text embeddings of the
        batch's distinct class prompts, each image's row among them, and the logit scale."""

        def __init__(self, clip: nn.Module, tokens: torch.Tensor):
            super().__init__()
            self.clip = clip
            self.register_buffer("tokens", tokens, persistent=False)

        def forward(self, x, labels):
            classes, inv = torch.unique(labels, return_inverse=True)
            z, text, scale = clip_forward(self.clip, x, self.tokens[classes])
            return z, text, inv, scale

    class ClipLoss(nn.Module):
        """clipcl's mini-batch CLIP loss from the model's output (the labels are already in it)."""

        def forward(self, out, labels):
            z, text, inv, scale = out
            return clip_loss(z, text, inv, scale)

    def adamw(model: nn.Module) -> torch.optim.Optimizer:
        """AdamW with clipcl's parameter groups (engine.Trainer._start_optimizer on the CPU)."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
        rest = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr, foreach=True)

    class ClipReplay(SupervisedTemplate):
        """Avalanche's supervised template with clipcl's preprocessing, CLIP loss and optimiser recipe."""

        def __init__(self, steps: int, **kwargs):
            super().__init__(**kwargs)
            self.steps = steps

        def make_optimizer(self, **kwargs):  # a fresh AdamW each experience, as clipcl each task
            self.optimizer = adamw(self.model)
            self.optimized_param_id = {}  # made: check_model_and_optimizer calls this once an experience

        def _before_training_exp(self, **kwargs):
            self._stop_training = False
            super()._before_training_exp(**kwargs)

        def forward(self):
            x = bundle.prepare_images(self.mb_x)
            x = augment(x, cfg.scenario.augment,
                        seeded(cfg.seed, self.clock.train_exp_counter, self.clock.train_exp_iterations, STREAM_AUGMENT))
            return self.model(x, self.mb_y)

        def optimizer_step(self):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.clock.train_exp_iterations, self.steps, cfg.optim.lr, cfg.optim.warmup_steps)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or math.inf)
            self.optimizer.step()
            with torch.no_grad():
                self.model.clip.logit_scale.clamp_(0, math.log(100))

        def _after_training_iteration(self, **kwargs):
            super()._after_training_iteration(**kwargs)  # the clock counts the iteration here
            if self.clock.train_exp_iterations >= self.steps:
                self.stop_training()

    class Timer(SupervisedPlugin):
        """Wall time of the epochs of each experience, images, new/memory split and the training loss."""

        def __init__(self):
            super().__init__()
            self.loop, self.images, self.new, self.steps, self.loss = [], [], [], [], []

        def before_training_exp(self, strategy, **kwargs):
            self.first = None
            self.images.append(0), self.new.append(0), self.steps.append(0), self.loss.append(0.0)
            self.classes = torch.as_tensor(scenario.tasks[strategy.clock.train_exp_counter].classes)

        def before_training_epoch(self, strategy, **kwargs):
            if self.first is None:
                self.first = time.perf_counter()

        def after_training_iteration(self, strategy, **kwargs):
            y = strategy.mb_y
            self.images[-1] += len(y)
            self.new[-1] += int(torch.isin(y, self.classes).sum())
            self.steps[-1] += 1
            self.loss[-1] += float(strategy.loss.detach())

        def after_training_epoch(self, strategy, **kwargs):
            self.last = time.perf_counter()

        def after_training_exp(self, strategy, **kwargs):
            self.loop.append(self.last - self.first)

    n_classes = len(scenario.classnames)
    storage = ClassBalancedBuffer(max_size=cfg.memory.per_class * n_classes, adaptive_size=False,
                                  total_num_classes=n_classes)
    replay = ReplayPlugin(mem_size=storage.max_size, batch_size=cfg.optim.batch_size,
                          batch_size_mem=cfg.optim.batch_size, storage_policy=storage)
    timer = Timer()
    per_epoch = math.ceil(len(scenario.tasks[0].train) / cfg.optim.batch_size)
    strategy = ClipReplay(
        steps=cfg.optim.max_steps, model=ClipModel(bundle.model, tokens), optimizer=adamw(bundle.model),
        criterion=ClipLoss(), train_mb_size=cfg.optim.batch_size,
        train_epochs=math.ceil(cfg.optim.max_steps / per_epoch), eval_mb_size=cfg.eval.batch_size, device=device,
        plugins=[replay, timer], evaluator=EvaluationPlugin(loggers=[]), eval_every=-1)

    rows, calls, memory = [], [], []
    for t, exp in enumerate(bench.train_stream):
        start = time.perf_counter()
        strategy.train(exp, eval_streams=[], num_workers=0)
        calls.append(time.perf_counter() - start)
        memory.append(len(storage.buffer))
        rows.append(accuracy_row(bundle, scenario, t, cfg.eval.templates, cfg.eval.batch_size, device))  # not timed
    sizes = [len(task.test) for task in scenario.tasks]
    per_class = {}
    for c, group in storage.buffer_groups.items():
        per_class[str(c)] = len(group.buffer)
    return {
        "side": "avalanche", "threads": torch.get_num_threads(), "init_hash": init,
        "versions": {"avalanche": avalanche.__version__, "clipcl": __version__, "torch": torch.__version__},
        "class_order": list(scenario.class_order), "train_sizes": [len(x) for x in parts], "test_sizes": sizes,
        "loop_seconds": sum(timer.loop), "loop_seconds_per_task": timer.loop,
        "steps_per_task": timer.steps, "images_per_task": timer.images, "new_images_per_task": timer.new,
        "images": sum(timer.images),
        "whole_seconds": sum(calls), "whole_seconds_per_task": calls,
        "whole_note": "strategy.train(exp) wall time summed: set-up, the epochs, the buffer update",
        "memory_images_after_task": memory, "memory_per_class": per_class,
        "accuracy_matrix": rows, "metrics": metrics(rows, sizes),
        "train_loss": [s / max(n, 1) for s, n in zip(timer.loss, timer.steps)],
    }


# ---------------------------------------------------------------------------------------------- the orchestrator
def side_command(side: str, args, out: Path) -> list[str]:
    python = sys.executable if side == "clipcl" else str(venv_python())
    flags = ["--tasks", args.tasks, "--steps", args.steps, "--train-per-class", args.train_per_class,
             "--test-per-class", args.test_per_class, "--per-class", args.per_class, "--batch", args.batch,
             "--seed", args.seed]
    return [python, str(Path(__file__).resolve()), "--side", side, "--side-json", str(out), *map(str, flags)]


def run_side(side: str, args, k: int) -> dict:
    out = WORK / f"{side}-{k}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run(side_command(side, args, out), env=env, cwd=ROOT)
    if done.returncode or not out.exists():
        raise SystemExit(f"peer_avalanche: the {side} side failed (exit {done.returncode})")
    r = json.loads(out.read_text())
    r["process_seconds"] = time.perf_counter() - start
    print(f"  {side:9s} run {k + 1}: loop {r['loop_seconds']:.2f} s, {r['images'] / r['loop_seconds']:.0f} img/s, "
          f"last accuracy {100 * r['metrics']['last_accuracy']:.1f}% (process {r['process_seconds']:.0f} s)",
          flush=True)
    return r


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def equal_work_checks(c: dict, a: dict) -> list[str]:
    """What differs between the two sides' work (empty when nothing does)."""
    out = []
    for key in ("init_hash", "class_order", "train_sizes", "test_sizes", "steps_per_task", "images_per_task",
                "new_images_per_task", "threads"):
        if c[key] != a[key]:
            out.append(f"{key}: clipcl {c[key]} vs avalanche {a[key]}")
    if c["memory_per_class"] != a["memory_per_class"]:
        out.append(f"memory per class: clipcl {c['memory_per_class']} vs avalanche {a['memory_per_class']}")
    return out


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report(args, runs: dict[str, list[dict]], command: str) -> tuple[str, dict]:
    cfg = build_cfg(args)
    med = {s: statistics.median(r["loop_seconds"] for r in rs) for s, rs in runs.items()}
    whole = {s: statistics.median(r["whole_seconds"] for r in rs) for s, rs in runs.items()}
    c, a = runs["clipcl"][0], runs["avalanche"][0]
    ratio = med["avalanche"] / med["clipcl"]
    diffs = equal_work_checks(c, a)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = {"torch": c["versions"]["torch"], "avalanche-lib": a["versions"]["avalanche"],
                "clipcl": c["versions"]["clipcl"], "clipcl commit": git_state(), "python": platform.python_version(),
                "cpu": cpu_name(), "threads": f"{c['threads']} (clipcl), {a['threads']} (avalanche)"}
    figures = {
        "command": command, "date": date, "versions": versions,
        "settings": {"tasks": args.tasks, "steps_per_task": args.steps, "train_per_class": args.train_per_class,
                     "test_per_class": args.test_per_class, "memory_per_class": args.per_class,
                     "batch_new": args.batch, "batch_memory": args.batch, "seed": args.seed,
                     "repeats": args.repeats},
        "timed": "training loop of each task summed (see the script's docstring); median over repeats",
        "ratio_avalanche_over_clipcl": ratio,
        "equal_work_differences": diffs,
        "sides": {s: {"loop_seconds_median": med[s], "loop_seconds_runs": [r["loop_seconds"] for r in rs],
                      "images": rs[0]["images"], "images_per_second": rs[0]["images"] / med[s],
                      "whole_seconds_median": whole[s], "whole_note": rs[0]["whole_note"],
                      "last_accuracy": rs[0]["metrics"]["last_accuracy"],
                      "last_accuracy_runs": [r["metrics"]["last_accuracy"] for r in rs],
                      "avg_incremental_accuracy": rs[0]["metrics"]["avg_incremental_accuracy"],
                      "forgetting": rs[0]["metrics"]["forgetting"], "accuracy_matrix": rs[0]["accuracy_matrix"],
                      "steps_per_task": rs[0]["steps_per_task"], "images_per_task": rs[0]["images_per_task"],
                      "new_images_per_task": rs[0]["new_images_per_task"],
                      "loop_seconds_per_task": rs[0]["loop_seconds_per_task"],
                      "memory_per_class": rs[0]["memory_per_class"], "init_hash": rs[0]["init_hash"]}
                  for s, rs in runs.items()},
    }
    if "eval_seconds" in c:
        figures["sides"]["clipcl"]["whole_includes_eval_seconds"] = c["eval_seconds"]
        figures["sides"]["clipcl"]["whole_includes_checkpoint_seconds"] = c["checkpoint_seconds"]
    lines = [
        "# Peer benchmark: clipcl `er` vs Avalanche replay at equal work",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}; torch {versions['torch']}, avalanche-lib {versions['avalanche-lib']}, clipcl "
        f"{versions['clipcl']} (commit {versions['clipcl commit']}), Python {versions['python']}; "
        f"{versions['cpu']}; {versions['threads']} thread(s), one side at a time.",
        "",
        f"Fashion-MNIST (clipcl's loader), {args.tasks} tasks of 2 classes, {args.train_per_class * 2} training "
        f"images a task, {args.steps} steps a task of {args.batch} new + {args.batch} memory images (new only on "
        f"the first task), memory {args.per_class} images per class, tiny CLIP `clipcl-tiny-rn` from the same "
        f"initial weights, CLIP loss, AdamW (lr {cfg.optim.lr}, weight decay {cfg.optim.weight_decay}, "
        f"{cfg.optim.warmup_steps} warm-up steps then cosine, gradient clip {cfg.optim.grad_clip}), augmentation "
        f"`{cfg.scenario.augment}`; {args.repeats} run(s) per side, median.",
        "",
        "| | training-loop s (median; runs) | images | images/s | whole training call s (not equal work) | "
        "last accuracy | avg incremental | "
        "forgetting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in ("clipcl", "avalanche"):
        f = figures["sides"][s]
        runs_s = ", ".join(f"{x:.2f}" for x in f["loop_seconds_runs"])
        lines.append(f"| {s} | {f['loop_seconds_median']:.2f} ({runs_s}) | {f['images']} | "
                     f"{f['images_per_second']:.0f} | {f['whole_seconds_median']:.2f} | {pct(f['last_accuracy'])} | "
                     f"{pct(f['avg_incremental_accuracy'])} | {pct(f['forgetting'])} |")
    lines += [
        "",
        f"**Ratio (Avalanche s / clipcl s, training loop): {ratio:.2f}**",
        "",
        "Timed: the training loop of each task, summed (clipcl: `timing.train_seconds` of `run_one`'s results; "
        "Avalanche: first `before_training_epoch` to last `after_training_epoch` of each experience). Not timed: "
        "process start, imports, data loading, model creation, evaluation. Whole training call: "
        f"clipcl {c['whole_note']} ({c['eval_seconds']:.2f} s evaluation, {c['checkpoint_seconds']:.2f} s "
        f"checkpoints); Avalanche {a['whole_note']}.",
        "",
        "Accuracy: clipcl's zero-shot evaluation (`accuracy_row`) of each side's model on the same "
        f"{sum(c['test_sizes'])} test images, among the classes seen; last = after the last task.",
        "",
        "Equal work checked: initial weights (hash " + c["init_hash"] + "), class order, training and test "
        "sizes, steps, images and new images per task, memory per class, threads: "
        + ("all equal." if not diffs else "DIFFERENCES: " + "; ".join(diffs)),
        "",
        "Per task (clipcl / avalanche): steps " + f"{c['steps_per_task']} / {a['steps_per_task']}, images "
        f"{c['images_per_task']} / {a['images_per_task']}, loop s "
        + f"{[round(x, 2) for x in c['loop_seconds_per_task']]} / {[round(x, 2) for x in a['loop_seconds_per_task']]}.",
        "",
        "Both sides call clipcl's own functions for preprocessing, augmentation, the model forward, the loss "
        "and the learning-rate schedule, so what differs is the training loop, the data pipeline (clipcl: "
        "batched reads of uint8 tensors; Avalanche: sampler, per-sample `__getitem__` through its dataset "
        "layers, collate), the replay memory and the callback machinery. Per step: clipcl "
        f"{1000 * med['clipcl'] / sum(c['steps_per_task']):.1f} ms, Avalanche "
        f"{1000 * med['avalanche'] / sum(a['steps_per_task']):.1f} ms.",
        "",
        "Not equal by construction: which images make each batch (clipcl's seeded epoch stream and per-step "
        "memory draw vs Avalanche's shuffled DataLoader and its cycled memory loader), which memory images are "
        "kept (both uniform at random, different generators), hence the augmentation each image gets; the "
        "accuracies differ by that sampling noise. Avalanche runs with an empty EvaluationPlugin (no metrics, "
        "no loggers) and its loop stops a task with `stop_training()` when --steps is not a whole number of "
        "epochs (then one extra batch is loaded).",
        "",
    ]
    return "\n".join(lines), figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="create benchmarks/out/avalanche-venv and install avalanche-lib")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--steps", type=int, default=80, help="training steps per task (both sides)")
    p.add_argument("--train-per-class", type=int, default=512, help="512: 16 full batches of 64 an epoch")
    p.add_argument("--test-per-class", type=int, default=500)
    p.add_argument("--per-class", type=int, default=32, help="memory images per class")
    p.add_argument("--batch", type=int, default=64, help="new images per step (and memory images per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the median is reported")
    p.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    p.add_argument("--side", choices=["clipcl", "avalanche"], help=argparse.SUPPRESS)
    p.add_argument("--side-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.setup:
        return setup()
    if args.side:
        fn = run_clipcl if args.side == "clipcl" else run_avalanche
        Path(args.side_json).write_text(json.dumps(fn(args)))
        return 0
    if not venv_python().exists():
        print(f"peer_avalanche: no avalanche venv at {VENV}; make it once with: "
              ".venv/bin/python benchmarks/peer_avalanche.py --setup", file=sys.stderr)
        return 2
    if args.per_class * 2 < args.batch:
        print(f"peer_avalanche: warning: a memory of {args.per_class} images per class holds fewer than --batch "
              f"{args.batch} images after the first task: Avalanche's memory batch is then the whole memory, "
              "clipcl's is --batch images drawn with replacement (unequal work)", file=sys.stderr)
    if (args.train_per_class * 2) % args.batch:
        print("peer_avalanche: warning: a task's images are not a whole number of batches: Avalanche's last batch "
              "of each epoch is smaller, clipcl's never is (unequal work)", file=sys.stderr)
    WORK.mkdir(parents=True, exist_ok=True)
    flags = [a for a in (argv if argv is not None else sys.argv[1:])]
    command = " ".join([".venv/bin/python benchmarks/peer_avalanche.py", *flags])
    runs: dict[str, list[dict]] = {"clipcl": [], "avalanche": []}
    print(f"peer_avalanche: {args.repeats} run(s) per side, one at a time, 1 thread each", flush=True)
    for k in range(args.repeats):
        order = ("clipcl", "avalanche") if k % 2 == 0 else ("avalanche", "clipcl")
        for side in order:
            runs[side].append(run_side(side, args, k))
    text, figures = report(args, runs, command)
    print()
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "peer_avalanche.md").write_text(text)
        (RESULTS / "peer_avalanche.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(f"written: {RESULTS / 'peer_avalanche.md'}, {RESULTS / 'peer_avalanche.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
