"""Every method at m = 1, 2, 5 images per class, 5 seeds, on fmnist100-cil (100 classes, a tiny CLIP that knows
its class names) and fmnist-pre-cil (the 10-class bed): last accuracy, average incremental accuracy, forgetting,
mean diagonal R[t,t], trained parameters and the bytes kept between tasks; the strongest method at each m and
gdro's paired distance from it.

    .venv/bin/python benchmarks/every_method.py     # after the runs of regime_study.py (below)

The runs are regime_study.py's, reused from benchmarks/out/regime/ (cil: fmnist100-cil; pre_cil: fmnist-pre-cil):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regime_study.py --only core,more,competitors
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regime_study.py --benchmark fmnist-pre-cil --only core,more,competitors \
        --labels "finetune;er;balanced (gdro dro=none);gdro;er (herding);gcl;der++;er-ace;lwf;wise-ft;zscl;prototypes;er + LoRA;gdro + LoRA"
A cell missing seeds is left out of the table (and named under it). Bytes kept: the replay memory's bytes plus
the method's state between tasks (teachers, stored logits, prototypes, its own modules: results.json's
memory.method_state_bytes, or the same count read from the run's final checkpoint for runs written before that
field). Writes benchmarks/results/every_method.md.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from competitors import paired  # noqa: E402
from regime_study import GROUPS, NO_MEMORY, slug, value  # noqa: E402

LABELS = ["finetune", "er", "er (herding)", "balanced (gdro dro=none)", "gcl", "gdro", "der++", "er-ace", "lwf",
          "wise-ft", "zscl", "prototypes", "rapf", "er + LoRA", "gdro + LoRA"]
BENCHES = (("fmnist100-cil", "cil"), ("fmnist-pre-cil", "pre_cil"))
MEMS, SEEDS = (1, 2, 5), (0, 1, 2, 3, 4)
METRICS = (("last", "last_accuracy"), ("avg inc.", "avg_incremental_accuracy"), ("forgetting", "forgetting"),
           ("mean diag", "mean_diagonal"))


def state_bytes(folder: Path, r: dict) -> int:
    """The bytes the method keeps between tasks (its state's tensors and its own modules)."""
    if "method_state_bytes" in r.get("memory", {}):
        return int(r["memory"]["method_state_bytes"])
    from clipcl import checkpoint
    from clipcl.engine import tensor_bytes
    state = checkpoint.load(folder / checkpoint.CHECKPOINT_NAME)
    return tensor_bytes(state["method"]) + tensor_bytes(state.get("modules", {}))


def size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def load(root: Path, label: str, m: int) -> list[tuple[Path, dict]] | None:
    m = 0 if label in NO_MEMORY else m
    out = []
    for s in SEEDS:
        folder = root / f"{slug(label)}_m{m}_s{s}"
        done = folder / "results.json"
        if not done.is_file():
            return None
        r = json.loads(done.read_text())
        if not r.get("complete"):
            return None
        out.append((folder, r))
    return out


def main() -> None:
    assert all(any(label in g for g in GROUPS.values()) for label in LABELS)
    lines = ["# Every method at m = 1, 2, 5 (5 seeds)", "", "Command: `.venv/bin/python benchmarks/every_method.py`"
             " (the runs: its docstring). Mean ± standard deviation over seeds 0-4, in %; paired differences in "
             "points, mean [95% t-interval]. One CPU thread per run. Trained: parameters the optimiser updates "
             "(0: no training). Kept: bytes kept between tasks, replay images plus the method's state (teachers, "
             "stored logits, prototypes); finetune, lwf, wise-ft, zscl, prototypes and rapf keep no image, so their "
             "runs are the same at every m. er + LoRA and gdro + LoRA: rank 8, lr 2e-3 (chosen on fmnist100-cil's "
             "validation split; on fmnist-pre-cil 10x its full fine-tuning lr, as on fmnist100-cil).", ""]
    for bench, name in BENCHES:
        root = HERE / "out" / "regime" / name
        for m in MEMS:
            cells = {label: rs for label in LABELS if (rs := load(root, label, m)) is not None}
            missing = [label for label in LABELS if label not in cells]
            lines += [f"## {bench}, m = {m}", ""]
            if not cells:
                lines += ["(no complete cell yet)", ""]
                continue
            lines += ["| method | " + " | ".join(n for n, _ in METRICS) + " | trained | kept |",
                      "|---|" + "---|" * (len(METRICS) + 2)]
            for label, rs in cells.items():
                stats = []
                for _, key in METRICS:
                    xs = [100 * value(r, key) for _, r in rs]
                    stats.append(f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}")
                trained = rs[0][1]["model"]["trainable_parameters"] if label != "prototypes" else 0
                kept = statistics.mean(r["memory"]["bytes"] + state_bytes(f, r) for f, r in rs)
                lines.append(f"| {label} | " + " | ".join(stats) + f" | {trained:,} | {size(kept)} |")
            best = max(cells, key=lambda k: statistics.mean(value(r, "last_accuracy") for _, r in cells[k]))
            lines.append("")
            lines.append(f"Strongest in last accuracy: **{best}**.")
            for other in ("gdro", "balanced (gdro dro=none)", "er"):
                if other in cells and other != best:
                    lines.append(f"- {other} − {best}: " + paired(
                        [value(r, "last_accuracy") for _, r in cells[other]],
                        [value(r, "last_accuracy") for _, r in cells[best]]))
            if missing:
                lines.append(f"\nNot complete yet (left out): {', '.join(missing)}.")
            lines.append("")
    out = HERE / "results" / "every_method.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
