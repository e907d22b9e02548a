"""Throughput of the demo model: train images/s per method at the same batch, and evaluation images/s.

    .venv/bin/python benchmarks/throughput.py [--steps 30] [--repeats 3] [key=value ...]

Each method trains task 2 of fmnist-cil (memory filled from task 1) for --steps steps; the methods are
measured in turn, --repeats times, and the median is printed, so a gdro step is compared with an er step
under the same machine load. Figures, not assertions: nothing here fails on a slow machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from clipcl.config import apply_overrides, load_config
from clipcl.engine import Trainer
from clipcl.evaluate import image_features


def train_rate(cfg, steps: int) -> float:
    """Images per second over `steps` training steps of task 1 (after the method's own update from task 0)."""
    tr = Trainer(cfg, "/tmp/clipcl-bench", progress_bar=False, quiet=True)
    tr.enter_task(0)
    tr.method.after_task(tr.ctx)  # memory (and stored logits) of task 0, as after a real task
    tr.start_task(1, steps=steps + 2)  # the lr schedule: warm-up then cosine over the measured steps
    for step in range(2):  # warm-up
        tr.train_step(tr.batch_positions(step), step)
    n, start = 0, time.perf_counter()
    for step in range(2, steps + 2):
        pos = tr.batch_positions(step)
        tr.train_step(pos, step)
        n += len(pos)
    return n / (time.perf_counter() - start)


def loss_ms(cfg, batch_size: int, repeats: int = 200) -> float:
    """Milliseconds of one method's loss (forward + backward to the embeddings) on a fixed batch of embeddings:
    the part of a step that differs between methods, without the model's noise around it. Methods with
    embedding-level estimators (gcl, gdro) run their `loss`; the others, the mini-batch CLIP loss."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from clipcl.losses import clip_loss
    from clipcl.methods import GCL, Batch, make_method

    g = torch.Generator().manual_seed(0)
    n_classes, dim = 10, 128
    labels = torch.arange(2 * batch_size) % n_classes
    method = make_method(cfg.method)
    prompts = isinstance(method, GCL) and cfg.method.gcl_form == "prompts"
    if isinstance(method, GCL):
        method.start_estimators(10_000, n_classes)
        method.ctx = SimpleNamespace(new_size=5_000, data_size=10_000)  # what the negatives' weights read
    else:
        method.loss = lambda b: {"contrastive_loss": clip_loss(b.z, b.text, b.inv, b.logit_scale)}
    times = []
    for step in range(repeats):
        z = F.normalize(torch.randn(2 * batch_size, dim, generator=g), dim=-1).requires_grad_()
        text = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1).requires_grad_()
        index = torch.randint(10_000, (2 * batch_size,), generator=g)
        start = time.perf_counter()
        batch = Batch(z=z, text=text, inv=labels, labels=labels, index=index, logit_scale=torch.tensor(14.3), step=step,
                      prompts=text if prompts else None)
        terms = method.loss(batch)
        sum(v for k, v in terms.items() if k.endswith("_loss")).backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="finetune,er,gcl,gdro")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = load_config("fmnist-cil", args.overrides)
    methods = args.methods.split(",")
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            rates[m].append(train_rate(apply_overrides(base, [f"method.name={m}"]), args.steps))
    print(f"model {base.model.name}, batch {base.optim.batch_size} new (+{base.optim.batch_size} memory for "
          f"replay methods), torch threads {torch.get_num_threads()}")
    print("| method | train images/s (median of %d) | all runs |" % args.repeats)
    print("|---|---|---|")
    for m in methods:
        print(f"| {m} | {statistics.median(rates[m]):.0f} | {', '.join(f'{r:.0f}' for r in rates[m])} |")
    if "er" in rates and "gdro" in rates:
        er, gd = statistics.median(rates["er"]), statistics.median(rates["gdro"])
        print(f"gdro step cost relative to er at the same batch: {100 * (er / gd - 1):+.1f}% time per image "
              "(whole steps: includes the machine's noise)")
        step_ms = 1000 * 2 * base.optim.batch_size / er
        for m in ("er", "gdro"):
            ms = loss_ms(apply_overrides(base, [f"method.name={m}"]), base.optim.batch_size)
            print(f"{m}: loss alone {ms:.2f} ms per step ({100 * ms / step_ms:.1f}% of an er step of {step_ms:.0f} ms)")
    tr = Trainer(base, "/tmp/clipcl-bench", progress_bar=False, quiet=True)
    test = tr.scenario[0].test
    tr.bundle.model.eval()
    image_features(tr.bundle, test.subset(np.arange(100)), base.eval.batch_size, tr.device)
    start = time.perf_counter()
    image_features(tr.bundle, test, base.eval.batch_size, tr.device)
    print(f"evaluation: {len(test) / (time.perf_counter() - start):.0f} images/s (batch {base.eval.batch_size})")


if __name__ == "__main__":
    main()
