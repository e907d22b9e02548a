"""The small search that chose the method's defaults (lambda, beta, gamma, tau, learning rate), on
Fashion-MNIST only (fmnist-cil with 500 training images per class as in the memory-size study, 2 images per class
in memory, seeds 0 and 1). One option is varied at a
time around the shipped defaults; the table goes to benchmarks/results/search_defaults.md.

    .venv/bin/python benchmarks/search_defaults.py [--jobs 2]

The learning rate is searched for er and gdro alike, so that the baselines get the same care.
"""
from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor

from memory_study import HERE, run_cli

GRID = [
    ("er", "lr=0.001", ["method.name=er", "optim.lr=0.001"]),
    ("er", "lr=0.002 (default)", ["method.name=er"]),
    ("er", "lr=0.004", ["method.name=er", "optim.lr=0.004"]),
    ("gdro", "lam=1 (METHOD.md default)", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=1.0"]),
    ("gdro", "lr=0.004", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=1.0", "optim.lr=0.004"]),
    ("gdro", "lam=0.1", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=0.1"]),
    ("gdro", "lam=0.3 (chosen)", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=0.3"]),
    ("gdro", "lam=3", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=3"]),
    ("gdro", "lam=0.3 max_weight=0.3", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=0.3", "method.max_weight=0.3"]),
    ("gdro", "lam=0.3 max_weight=0.2", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=0.3", "method.max_weight=0.2"]),
    ("gdro", "beta=0.5", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=1.0", "method.beta=0.5"]),
    ("gdro", "gamma=0.5", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=1.0", "method.gamma=0.5"]),
    ("gdro", "tau=0.03", ["method.name=gdro", "method.gcl_form=pairs", "method.lam=1.0", "method.tau=0.03"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--memory", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("overrides", nargs="*", default=["scenario.train_per_class=500"],
                    help="overrides for every run (default: scenario.train_per_class=500, the study's setting)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(m, lab, ov, s) for m, lab, ov in GRID for s in seeds]
    threads = max(1, 2 // args.jobs)

    def one(job):
        m, lab, ov, s = job
        slug = f"{m}_{lab.split(' ')[0].replace('=', '-')}_{'_'.join(lab.split(' ')[1:2]).replace('=', '-')}"
        out = HERE / "out" / "search" / f"{slug}_m{args.memory}_s{s}"
        return run_cli("fmnist-cil", [*ov, f"memory.per_class={args.memory}", f"seed={s}", *args.overrides], out,
                       threads)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    rows = {}
    for (m, lab, _, _), r in zip(jobs, results):
        rows.setdefault((m, lab), []).append(r)
    lines = ["# Default search (Fashion-MNIST only)", "",
             f"Command: `.venv/bin/python benchmarks/search_defaults.py {' '.join(args.overrides)}`; fmnist-cil with "
             f"those overrides, memory {args.memory} images per class, seeds {seeds}; mean over seeds, in %. "
             "One option varied at a time; 'min diagonal' is the smallest R[t, t] over all tasks and seeds.", "",
             "| method | setting | last acc. | forgetting | avg inc. acc. | min diagonal |", "|---|---|---|---|---|---|"]
    for (m, lab), rs in rows.items():
        def mean(key):
            return 100 * statistics.mean(r["metrics"][key] for r in rs)
        diag = 100 * min(r["accuracy_matrix"][t][t] for r in rs for t in range(len(r["accuracy_matrix"])))
        lines.append(f"| {m} | {lab} | {mean('last_accuracy'):.1f} | {mean('forgetting'):.1f} | "
                     f"{mean('avg_incremental_accuracy'):.1f} | {diag:.1f} |")
    out = HERE / "results" / "search_defaults.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
