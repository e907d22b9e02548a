"""Where a training step goes: torch.profiler over a few steps of er and gdro on the demo's model and batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_profile.py [--steps 20] [--out FILE] [key=value ...]

Each method trains task 2 of fmnist-cil (memory filled from task 1), as benchmarks/throughput.py does; after
3 warm-up steps, --steps steps run under torch.profiler. Printed (and written to --out, by default
benchmarks/results/step_profile.md): the step time split into its phases (data loading and augmentation, the
forward, the loss, backward, optimiser) and the operators with the largest self time. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from clipcl.config import apply_overrides, load_config
from clipcl.engine import Trainer

HERE = Path(__file__).resolve().parent
PHASES = ("load", "forward+loss", "backward", "optimizer")


def instrumented_step(tr: Trainer, step: int) -> None:
    """Trainer.train_step split into labelled phases (the same calls, in the same order)."""
    import math

    from clipcl.augment import augment
    from clipcl.engine import lr_at
    from clipcl.sampling import STREAM_AUGMENT, seeded

    cfg, data, opt = tr.cfg, tr.data, tr.optimizer
    pos = tr.batch_positions(step)
    with record_function("load"):
        labels = torch.as_tensor(data.targets[pos])
        index = torch.as_tensor(pos)
        images = tr.bundle.prepare_images(tr.bundle.input_images(data.load(pos)))
        images = augment(images, cfg.scenario.augment, seeded(cfg.seed, 1, step, STREAM_AUGMENT), total=len(pos))
    with record_function("forward+loss"):
        terms = tr.method.training_forward(tr.model, images, labels, index, step)
        loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
    for group in opt.param_groups:
        group["lr"] = lr_at(step, tr._steps, cfg.optim.lr, cfg.optim.warmup_steps)
    opt.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.optim.grad_clip or math.inf)
        opt.step()


def profile_method(base, method: str, steps: int, top: int) -> tuple[str, float, dict[str, float]]:
    cfg = apply_overrides(base, [f"method.name={method}"])
    with tempfile.TemporaryDirectory(prefix="clipcl-profile-") as tmp:
        tr = Trainer(cfg, tmp, progress_bar=False, quiet=True)
        tr.enter_task(0)
        tr.method.after_task(tr.ctx)
        tr.start_task(1, steps=steps + 3)
        tr.bundle.model.train()
        for step in range(3):
            instrumented_step(tr, step)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(3, 3 + steps):
                instrumented_step(tr, step)
        ms = 1000 * (time.perf_counter() - start) / steps  # includes the profiler's own overhead
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1000 / steps for e in events if e.key in PHASES}
    table = events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
    return table, ms, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=20, help="operators listed per method")
    ap.add_argument("--methods", default="er,gdro")
    ap.add_argument("--out", default=str(HERE / "results" / "step_profile.md"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = load_config("fmnist-cil", args.overrides)
    lines = ["# One training step, profiled", "",
             f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/step_profile.py "
             f"--steps {args.steps}{' ' + ' '.join(args.overrides) if args.overrides else ''}`", "",
             f"{datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
             f"{platform.processor() or platform.machine()}; model {base.model.name}, batch {base.optim.batch_size} "
             f"new + {base.optim.batch_size} memory, task 2 of fmnist-cil. Times per step under the profiler "
             "(which adds its own overhead).", "",
             "| method | ms per step | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    tables = []
    for m in args.methods.split(","):
        table, ms, phases = profile_method(base, m, args.steps, args.top)
        lines.append(f"| {m} | {ms:.1f} | " + " | ".join(
            f"{phases.get(p, 0):.1f} ({100 * phases.get(p, 0) / ms:.0f}%)" for p in PHASES) + " |")
        tables += ["", f"## {m}: operators by self time (all {args.steps} steps)", "", "```", table.rstrip(), "```"]
    text = "\n".join(lines + tables) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
