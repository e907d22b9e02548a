"""How long a checkpoint takes, and how big it is: the demo model and ViT-B-16.

    .venv/bin/python benchmarks/checkpoint_time.py [--repeats 3] [--dir /tmp] [--skip-vit]

- clipcl-tiny-rn: a real mid-task checkpoint of the Trainer on fmnist-cil (tiny overrides, gdro), after two
  training steps, so it holds AdamW moments, the memory and the estimator states; written by
  Trainer.save_checkpoint (temporary file, fsync, rename).
- ViT-B-16: the architecture with random weights (open_clip, nothing downloaded) plus an AdamW state with both
  moments, written with the same atomic checkpoint.save; this is what every `checkpoint_every` step costs at
  full size.
The median over --repeats writes is printed. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipcl import checkpoint
from clipcl.config import load_config
from clipcl.engine import Trainer

TINY = ["scenario.train_per_class=100", "scenario.test_per_class=50", "scenario.n_tasks=3", "optim.batch_size=32",
        "method.name=gdro", "memory.per_class=5"]


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, path: Path, save_s: float, load_s: float, n_params: int) -> None:
    mb = path.stat().st_size / 2**20
    print(f"{name:58s} {n_params / 1e6:7.1f} M params  {mb:8.1f} MB  save {save_s:6.3f} s  load {load_s:6.3f} s  "
          f"({mb / save_s:6.0f} MB/s)")


def tiny_trainer_checkpoint(folder: Path, repeats: int) -> None:
    """A mid-task checkpoint of the demo model through the Trainer (task 2, memory of task 1 filled)."""
    cfg = load_config("fmnist-cil", TINY)
    tr = Trainer(cfg, folder, progress_bar=False, quiet=True)
    tr.enter_task(0)
    tr.method.after_task(tr.ctx)  # the memory of task 0
    tr.start_task(1)
    for step in range(2):  # AdamW moments and estimator states exist from the first step on
        tr.train_step(tr.batch_positions(step), step)
        tr.progress.step = step + 1
    save_s = statistics.median(tr.save_checkpoint() for _ in range(repeats))
    path = folder / checkpoint.CHECKPOINT_NAME
    load_s = timed(lambda: checkpoint.load(path), repeats)
    n = sum(p.numel() for p in tr.bundle.model.parameters())
    report(f"{cfg.model.name} (Trainer, fmnist-cil tiny, mid-task, AdamW)", path, save_s, load_s, n)


def vit_checkpoint(folder: Path, repeats: int) -> None:
    """ViT-B-16 with random weights and a full AdamW state, saved atomically."""
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # allocates exp_avg and exp_avg_sq for every parameter
    for p in model.parameters():
        p.grad = None
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    path = folder / "vit-b-16.pt"
    save_s = timed(lambda: checkpoint.save(path, state), repeats)
    load_s = timed(lambda: checkpoint.load(path), repeats)
    n = sum(p.numel() for p in model.parameters())
    report("ViT-B-16 (random init, AdamW moments, fp32)", path, save_s, load_s, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--skip-vit", action="store_true", help="only the demo model (ViT-B-16 needs ~3 GB of RAM)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} writes "
          "(temporary file, fsync, rename)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tiny_trainer_checkpoint(Path(tmp) / "tiny", args.repeats)
        if not args.skip_vit:
            vit_checkpoint(Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
