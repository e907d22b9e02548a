"""`clipcl bench`: what a config's model and method cost on this machine, measured, never estimated.

Train images/s (task 2 of the config's stream, memory filled from task 1, the method's own steps), evaluation
images/s, peak memory, the FLOPs of a training step counted by torch.utils.flop_counter, and the model FLOPs
utilisation against the matmul peak measured on the same device (float32 on a CPU, bf16 on a GPU).
"""
from __future__ import annotations

import resource
import tempfile
import time

import numpy as np
import torch

from .config import RunCfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul on the device: the peak a model's step is measured against."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 1  # queue a few on a GPU between synchronisations
    for _ in range(3):
        a @ b
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(reps):
            a @ b
        runs += reps
        _sync(device)
    return 2 * n ** 3 * runs / (time.perf_counter() - start)


def bench(cfg: RunCfg, steps: int = 20, warmup: int = 3) -> dict:
    """The figures of one config; the run's folder is a temporary one, removed afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from .engine import Trainer
    from .evaluate import evaluating, image_features

    with tempfile.TemporaryDirectory(prefix="clipcl-bench-") as tmp:
        tr = Trainer(cfg, tmp, progress_bar=False, quiet=True)
        device = tr.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = 1 if len(tr.scenario) > 1 else 0
        if t:
            tr.enter_task(0)
            tr.method.after_task(tr.ctx)  # memory (and stored logits) of task 0, as after a real task
        tr.start_task(t, steps=steps + warmup + 1)
        tr.bundle.model.train()
        with FlopCounterMode(display=False) as counter:
            pos = tr.batch_positions(0)
            tr.train_step(pos, 0)
        flops_per_image = counter.get_total_flops() / len(pos)
        for step in range(1, warmup + 1):
            tr.train_step(tr.batch_positions(step), step)
        _sync(device)
        n, start = 0, time.perf_counter()
        for step in range(warmup + 1, warmup + 1 + steps):
            pos = tr.batch_positions(step)
            tr.train_step(pos, step)
            n += len(pos)
        _sync(device)
        train_rate = n / (time.perf_counter() - start)
        test = tr.scenario[0].test
        with evaluating(tr.bundle.model):
            image_features(tr.bundle, test.subset(np.arange(min(len(test), cfg.eval.batch_size))),
                           cfg.eval.batch_size, device, tr.autocast)
            _sync(device)
            start = time.perf_counter()
            image_features(tr.bundle, test, cfg.eval.batch_size, device, tr.autocast)
            _sync(device)
            eval_rate = len(test) / (time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        dtype = torch.bfloat16 if tr.autocast else torch.float32
        peak_flops = matmul_peak(device, dtype)
        achieved = train_rate * flops_per_image
        return {
            "model": cfg.model.name, "method": cfg.method.name, "device": str(device),
            "precision": "bf16 autocast" if tr.autocast else "fp32", "threads": torch.get_num_threads(),
            "batch": len(pos), "image_size": tr.bundle.image_size, "steps": steps,
            "train_images_per_second": round(train_rate, 1), "eval_images_per_second": round(eval_rate, 1),
            "eval_over_train": round(eval_rate / train_rate, 2),
            "train_gflop_per_image": float(f"{flops_per_image / 1e9:.6g}"),
            "achieved_tflops": float(f"{achieved / 1e12:.6g}"), "matmul_peak_tflops": float(f"{peak_flops / 1e12:.6g}"),
            "mfu_percent": round(100 * achieved / peak_flops, 1),
            "peak_memory_bytes": int(peak),
            "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process max RSS",
        }


def format_bench(r: dict) -> str:
    """The figures, one per line."""
    return "\n".join([
        f"clipcl bench: {r['model']} / {r['method']} on {r['device']} ({r['precision']}, {r['threads']} threads), "
        f"batch {r['batch']} at {r['image_size']} px",
        f"  train      {r['train_images_per_second']:.1f} images/s ({r['steps']} steps)",
        f"  evaluation {r['eval_images_per_second']:.1f} images/s ({r['eval_over_train']:.2f}x training)",
        f"  FLOPs      {r['train_gflop_per_image']:.4f} GFLOP per training image (forward + backward, "
        "torch.utils.flop_counter)",
        f"  MFU        {r['mfu_percent']:.1f}% ({r['achieved_tflops']:.4f} of {r['matmul_peak_tflops']:.4f} TFLOP/s, "
        "the matmul peak measured here)",
        f"  memory     {r['peak_memory_bytes'] / 2 ** 20:.0f} MiB ({r['peak_memory_kind']})",
    ])
