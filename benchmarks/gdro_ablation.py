"""gdro's candidate changes, chosen on a validation split: each option against er, class balancing alone
(dro=none) and gdro as it was, on the same seeds.

    .venv/bin/python benchmarks/gdro_ablation.py --benchmark fmnist-pre-cil [--round 2]
    .venv/bin/python benchmarks/gdro_ablation.py --benchmark fmnist-cil [--round 2]

Round 1: the options on the first form of gdro (dro_adjust, sample_mix, cosine gamma). Round 2: the global
loss fitted to class prompts (gcl_form=prompts: exact image -> text, one text -> image estimator per class,
learned logit scale) and the class losses that try to see forgetting (dro_signal=t2i, excess; lam_start).

Every run holds out 50 training images per class (scenario.val_per_class=50) and computes R and the metrics
on them (eval.split=val): nothing here looks at the test set. 500 training images per class, 2 images per
class in memory, seeds 0-4, one CPU thread per run, two runs at a time. Writes
benchmarks/results/gdro_ablation_<benchmark>.md (mean ± std, and paired differences with 95% t-intervals).
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from competitors import METRICS, paired, value
from memory_study import HERE, PAIRS, mean_std, run_cli, study_args

PROMPTS_R2 = ["method.gcl_form=prompts", "method.lam=0.3", "method.dro_signal=loss"]
ROUND2 = {
    "er": ["method.name=er"],
    "balanced (dro=none)": ["method.name=gdro", *PAIRS, "method.dro=none"],
    "gdro": ["method.name=gdro", *PAIRS],
    # the prompts form at lam 0.3 and the whole loss as DRO's signal (the defaults when this round was made)
    "gcl prompts": ["method.name=gcl", *PROMPTS_R2],
    "balanced prompts": ["method.name=gdro", *PROMPTS_R2, "method.dro=none"],
    "gdro prompts": ["method.name=gdro", *PROMPTS_R2],
    "gdro prompts + signal t2i": ["method.name=gdro", *PROMPTS_R2, "method.dro_signal=t2i"],
    "gdro prompts + signal excess": ["method.name=gdro", *PROMPTS_R2, "method.dro_signal=excess"],
    "gdro prompts + lam_start=3": ["method.name=gdro", *PROMPTS_R2, "method.lam_start=3"],
    # the prompts form's class losses are in nats, the pairs form's in units of tau = 1 / logit scale (about
    # 1/14 here): lam = 0.3 there is about lam = 4 here
    "gdro prompts lam=4": ["method.name=gdro", "method.gcl_form=prompts", "method.dro_signal=loss", "method.lam=4"],
    "gdro prompts + signal t2i lam=4": ["method.name=gdro", "method.gcl_form=prompts", "method.dro_signal=t2i",
                                         "method.lam=4"],
}
VARIANTS = {
    "er": ["method.name=er"],
    "balanced (dro=none)": ["method.name=gdro", *PAIRS, "method.dro=none"],
    "gdro": ["method.name=gdro", *PAIRS],
    "gdro + dro_adjust=1": ["method.name=gdro", *PAIRS, "method.dro_adjust=1.0"],
    "gdro + sample_mix=0.5": ["method.name=gdro", *PAIRS, "method.sample_mix=0.5"],
    "gdro + cosine gamma": ["method.name=gdro", *PAIRS, "method.gamma_schedule=cosine"],
}
FIXED = ["scenario.train_per_class=500", "scenario.val_per_class=50", "eval.split=val"]
FIXED_DIL2 = ["scenario.val_per_class=50", "eval.split=val"]  # round 2 keeps DIL's 200 images per class and domain


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)  # --round is this study's own; study_args has the rest
    pre.add_argument("--round", type=int, choices=(1, 2), default=1)
    known, rest = pre.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    round2 = known.round == 2
    variants = ROUND2 if round2 else VARIANTS
    args, mems, seeds, labels = study_args(__doc__, "2", list(variants))
    if args.seeds == "0,1,2":
        seeds = [0, 1, 2, 3, 4]
    fixed = FIXED_DIL2 if round2 and "dil" in args.benchmark else FIXED
    prefix = "ablation2" if round2 else "ablation"
    jobs = [(label, mem, seed) for label in labels for mem in mems for seed in seeds]

    def one(job):
        label, mem, seed = job
        slug = (label.replace(" ", "").replace("(", "_").replace(")", "").replace("+", "_").replace("=", "-")
                .replace(",", "_"))
        out = Path(args.out) / f"{prefix}-{args.benchmark}" / f"{slug}_m{mem}_s{seed}"
        return run_cli(args.benchmark, [*fixed, *variants[label], f"memory.per_class={mem}", f"seed={seed}",
                                        *args.overrides], out, threads=1)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(one, jobs)))
    lines = [f"# gdro's candidate changes on the validation split: {args.benchmark}", "",
             f"Command: `.venv/bin/python benchmarks/gdro_ablation.py --benchmark {args.benchmark}"
             + (" --round 2" if round2 else "")
             + (f" {' '.join(args.overrides)}" if args.overrides else "") + "`", "",
             f"Fixed: {' '.join(fixed)}; seeds {seeds}; 1 CPU thread per run. Numbers are on the held-out "
             "validation images (eval.split=val), mean ± standard deviation over seeds, in %.", ""]
    for mem in mems:
        runs = {label: [results[(label, mem, s)] for s in seeds] for label in labels}
        lines += [f"## m = {mem}", "", "| variant | " + " | ".join(n for n, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(mean_std([value(r, k) for r in runs[label]])
                                                      for _, k in METRICS) + " |")
        refs = ("er", "balanced (dro=none)", "gdro", "balanced prompts", "gdro prompts") if round2 else (
            "er", "balanced (dro=none)", "gdro")
        for ref in refs:
            if ref not in runs:
                continue
            lines += ["", f"Paired difference with {ref} (points; mean [95% interval] over seeds)", "",
                      "| variant | " + " | ".join(n for n, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
            for label in labels:
                if label != ref:
                    lines.append(f"| {label} − {ref} | " + " | ".join(
                        paired([value(r, k) for r in runs[label]], [value(r, k) for r in runs[ref]])
                        for _, k in METRICS) + " |")
        lines.append("")
    (HERE / "results" / f"gdro_{prefix}_{args.benchmark}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
