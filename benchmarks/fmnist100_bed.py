"""Can the fmnist100 bed show what class reweighting does? Prints what the study's questions rest on:

- the pretrained tiny CLIP's zero-shot accuracy on the stream's test images among all 100 classes, on the
  60 combinations its pretraining saw and the 40 it did not, and per word (garment, colour);
- the replay rate (draws of each memory image per step) of every task at m = 1, 2, 5, beside CIFAR-100
  B0-Inc10's with the same batch;
- from finished `gdro (oracle, lam 1)` runs of benchmarks/regime_study.py: the class losses DRO reads at the
  end of each task, on the images trained on (the memory, for old classes) and on held-out validation
  images, and the spread of the weights the oracle gives (the ceiling's lever).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist100_bed.py   # writes benchmarks/results/fmnist100_bed.md
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def zero_shot(weights: Path) -> list[str]:
    from clipcl.config import ModelCfg, ScenarioCfg
    from clipcl.data.compositional import UNSEEN_COMBINATIONS
    from clipcl.data.datasets import load_dataset
    from clipcl.evaluate import candidate_text, image_features
    from clipcl.models import create

    bundle = create(ModelCfg(name="clipcl-tiny-rn", pretrained=str(weights)), "cpu")
    bundle.model.eval()
    cpu = torch.device("cpu")
    lines = ["| test images | all 100 | 60 seen combinations | 40 unseen | garment word | colour word |",
             "|---|---|---|---|---|---|"]
    cil = load_dataset(ScenarioCfg(dataset="fmnist100"))
    sets = {"fmnist100 (CIL stream)": (cil.classnames, cil.test)}
    dil = load_dataset(ScenarioCfg(dataset="fmnist100_dil"))
    sets.update({f"fmnist100_dil {d}": (dil.classnames, te) for d, (_, te) in dil.domains.items()})
    for what, (names, test) in sets.items():
        text = candidate_text(bundle, names, "default", cpu)
        pred = (image_features(bundle, test, 500, cpu) @ text.t()).argmax(1).numpy()
        y = test.targets
        ok, unseen = pred == y, np.isin(y, UNSEEN_COMBINATIONS)
        cells = [ok.mean(), ok[~unseen].mean(), ok[unseen].mean(), (pred // 10 == y // 10).mean(),
                 (pred % 10 == y % 10).mean()]
        lines.append(f"| {what} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
    return lines


def replay() -> list[str]:
    from clipcl.config import load_config
    from clipcl.sampling import replay_rates

    lines = ["| config | m | task 2 | task 5 | task 10 | mean over tasks 2-10 |", "|---|---|---|---|---|---|"]
    for name in ("fmnist100-cil", "cifar100-b0-inc10"):
        for m in (1, 2, 5):
            r = replay_rates(load_config(name, [f"memory.per_class={m}"]))
            lines.append(f"| {name} | {m} | {r[1]:.2f} | {r[4]:.2f} | {r[9]:.3f} | {statistics.mean(r[1:]):.2f} |")
    return lines


def losses(root: Path) -> list[str]:
    runs = sorted(root.glob("gdro__oracle__lam_1_m*_s*/results.json"))
    if not runs:
        return ["(no finished `gdro (oracle, lam 1)` run under " + str(root) + ")"]
    rows: dict[int, list] = {}
    for path in runs:
        r = json.loads(path.read_text())
        m = r["config"]["memory"]["per_class"]
        last = {}
        for entry in r["class_weights"]:
            last[entry["task"]] = entry  # the last record of each task
        for t, e in last.items():
            if t == 0 or "losses" not in e:
                continue
            old = 10 * t  # the old classes: labels below the task's first (10 a task)
            held, trained, w = (np.array([np.nan if x is None else x for x in e[k]], dtype=float)
                                for k in ("losses", "train_losses", "weights"))
            rows.setdefault(m, []).append((np.nanmean(trained[:old]), held[:old].mean(), held[old:].mean(),
                                           w[:old].max() / w[:old].min(), w[:old].sum()))
    lines = ["| m | old classes' loss on images trained on (memory) | on held-out images | new classes' held-out "
             "loss | oracle weight max/min (old) | oracle weight on old classes |", "|---|---|---|---|---|---|"]
    for m, xs in sorted(rows.items()):
        a = np.array(xs)
        lines.append(f"| {m} | {a[:, 0].mean():.3f} | {a[:, 1].mean():.3f} | {a[:, 2].mean():.3f} | "
                     f"{a[:, 3].mean():.1f} | {a[:, 4].mean():.2f} |")
    return lines


def main() -> None:
    torch.set_num_threads(1)
    weights = HERE / "out" / "fmnist100-tiny-rn.pt"
    if not weights.is_file():
        sys.exit(f"{weights} is missing: make it with `clipcl pretrain clipcl:fmnist100 --out {weights}`")
    text = ["# The fmnist100 bed: can it show what class reweighting does?", "",
            "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fmnist100_bed.py`", "",
            "## Zero-shot accuracy of `clipcl:fmnist100` (prompt \"a photo of a {}.\", among all 100 classes)", "",
            *zero_shot(weights), "", "## Replay rate: draws of each memory image per step (batch 64 + 64 memory)",
            "", *replay(), "", "## The class losses DRO acts on (averaged over tasks 2-10 and seeds; nats, image -> "
            "text cross-entropy over the seen classes, at each task's last signal)", "",
            *losses(HERE / "out" / "regime" / "cil"), ""]
    out = HERE / "results" / "fmnist100_bed.md"
    out.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
