"""gdro's candidate changes, chosen on a validation split: each option against er, class balancing alone
(dro=none) and gdro as it was, on the same seeds.

    .venv/bin/python benchmarks/gdro_ablation.py --benchmark fmnist-pre-cil
    .venv/bin/python benchmarks/gdro_ablation.py --benchmark fmnist-cil

Every run holds out 50 training images per class (scenario.val_per_class=50) and computes R and the metrics
on them (eval.split=val): nothing here looks at the test set. 500 training images per class, 2 images per
class in memory, seeds 0-4, one CPU thread per run, two runs at a time. Writes
benchmarks/results/gdro_ablation_<benchmark>.md (mean ± std, and paired differences with 95% t-intervals).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from competitors import METRICS, paired, value
from memory_study import HERE, mean_std, run_cli, study_args

VARIANTS = {
    "er": ["method.name=er"],
    "balanced (dro=none)": ["method.name=gdro", "method.dro=none"],
    "gdro": ["method.name=gdro"],
    "gdro + dro_adjust=1": ["method.name=gdro", "method.dro_adjust=1.0"],
    "gdro + sample_mix=0.5": ["method.name=gdro", "method.sample_mix=0.5"],
    "gdro + cosine gamma": ["method.name=gdro", "method.gamma_schedule=cosine"],
}
FIXED = ["scenario.train_per_class=500", "scenario.val_per_class=50", "eval.split=val"]


def main() -> None:
    args, mems, seeds, labels = study_args(__doc__, "2", list(VARIANTS))
    if args.seeds == "0,1,2":
        seeds = [0, 1, 2, 3, 4]
    jobs = [(label, mem, seed) for label in labels for mem in mems for seed in seeds]

    def one(job):
        label, mem, seed = job
        slug = label.replace(" ", "").replace("(", "_").replace(")", "").replace("+", "_").replace("=", "-")
        out = Path(args.out) / f"ablation-{args.benchmark}" / f"{slug}_m{mem}_s{seed}"
        return run_cli(args.benchmark, [*FIXED, *VARIANTS[label], f"memory.per_class={mem}", f"seed={seed}",
                                        *args.overrides], out, threads=1)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(one, jobs)))
    lines = [f"# gdro's candidate changes on the validation split: {args.benchmark}", "",
             f"Command: `.venv/bin/python benchmarks/gdro_ablation.py --benchmark {args.benchmark}"
             + (f" {' '.join(args.overrides)}" if args.overrides else "") + "`", "",
             f"Fixed: {' '.join(FIXED)}; seeds {seeds}; 1 CPU thread per run. Numbers are on the held-out "
             "validation images (eval.split=val), mean ± standard deviation over seeds, in %.", ""]
    for mem in mems:
        runs = {label: [results[(label, mem, s)] for s in seeds] for label in labels}
        lines += [f"## m = {mem}", "", "| variant | " + " | ".join(n for n, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(mean_std([value(r, k) for r in runs[label]])
                                                      for _, k in METRICS) + " |")
        for ref in ("er", "balanced (dro=none)", "gdro"):
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
    (HERE / "results" / f"gdro_ablation_{args.benchmark}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
