"""The method study: does gdro earn its place? finetune, er, class balancing alone (gdro with dro=none, in the
prompts form gdro uses and in the pairs form that was best on validation), the strongest competitor (er with
herding, from competitors_fmnist-cil.md), gcl and gdro, at 1, 2, 5 and 10 images per class, over
seeds 0-4, on the three CPU benchmarks (fmnist-cil and fmnist-pre-cil: the paper's class-incremental setting
from scratch and from a pretrained CLIP; fmnist-dil: domain-incremental).

    .venv/bin/python benchmarks/study.py                          # all three, about an hour on 2 cores
    .venv/bin/python benchmarks/study.py --benchmark fmnist-pre-cil  # one of them
    .venv/bin/python benchmarks/study.py --report-only             # the tables of the runs finished so far

gcl and gdro run with their shipped defaults, which were chosen on a validation split
(benchmarks/results/gdro_ablation2_*.md); the numbers here are on the test images. 1000 training images per
task in every benchmark (scenario.train_per_class=500 for the class-incremental ones, 100 for the
domain-incremental one, whose tasks hold 10 classes), one CPU thread per run, two runs at a time. Writes
benchmarks/results/study_<benchmark>.md (mean ± std, and paired differences on the same seeds with 95%
t-intervals) and the raw numbers as study_<benchmark>.json. Finished runs under benchmarks/out/ are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from competitors import METRICS, paired, value
from memory_study import HERE, mean_std, run_cli, study_args

VARIANTS = {  # label -> overrides
    "finetune": ["method.name=finetune"],
    "er": ["method.name=er"],
    "balanced (gdro dro=none)": ["method.name=gdro", "method.dro=none"],
    "balanced pairs form": ["method.name=gdro", "method.dro=none", "method.gcl_form=pairs"],
    "er (herding)": ["method.name=er", "memory.selection=herding"],
    "gcl": ["method.name=gcl"],
    "gdro": ["method.name=gdro"],
}
BENCHMARKS = {"fmnist-cil": ["scenario.train_per_class=500"], "fmnist-pre-cil": ["scenario.train_per_class=500"],
              "fmnist-dil": ["scenario.train_per_class=100"]}
COMPARISONS = (("gdro", "er"), ("gdro", "balanced (gdro dro=none)"), ("gdro", "balanced pairs form"),
               ("gdro", "er (herding)"), ("gcl", "er"))


def _cells(results: dict, label: str, mem: int, seeds: list[int]) -> list[dict] | None:
    """The runs of one (method, memory size) over the seeds, or None unless all of them finished."""
    key = (lambda s: (label, 1, s)) if label == "finetune" else (lambda s: (label, mem, s))
    runs = [results.get(key(s)) for s in seeds]
    return None if any(r is None for r in runs) else runs


def report(benchmark: str, fixed: list[str], mems: list[int], seeds: list[int], labels: list[str],
           results: dict) -> str:
    lines = [f"# Method study: {benchmark}", "",
             f"Command: `.venv/bin/python benchmarks/study.py --benchmark {benchmark}`", "",
             f"Fixed: {' '.join(fixed)}; seeds {seeds}; 1 CPU thread per run; test split. Mean ± standard "
             "deviation over seeds, in %. finetune keeps no memory (one run per seed, shown in every column).", ""]
    for mem in mems:
        runs = {label: _cells(results, label, mem, seeds) for label in labels}
        runs = {label: r for label, r in runs.items() if r is not None}
        if not runs:
            continue
        lines += [f"## m = {mem} images per class", "", "| method | " + " | ".join(n for n, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for label, rs in runs.items():
            lines.append(f"| {label} | " + " | ".join(mean_std([value(r, k) for r in rs]) for _, k in METRICS) + " |")
        lines += ["", "Paired differences (points; mean [95% interval] over the same seeds)", "",
                  "| comparison | " + " | ".join(n for n, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for a, b in COMPARISONS:
            if a in runs and b in runs:
                lines.append(f"| {a} − {b} | " + " | ".join(
                    paired([value(r, k) for r in runs[a]], [value(r, k) for r in runs[b]]) for _, k in METRICS)
                    + " |")
        lines.append("")
    return "\n".join(lines)


def summary(tables: dict[str, dict], mems: list[int], seeds: list[int]) -> str:
    """One table over benchmarks and memory sizes: the paired differences the method has to win (— where a
    side was not run)."""
    cols = [(a, b, "last_accuracy") for a, b in COMPARISONS] + [("gdro", "er", "mean_diagonal")]
    lines = ["# Method study: summary", "",
             "Command: `.venv/bin/python benchmarks/study.py` (tables per benchmark in study_<benchmark>.md)", "",
             f"Paired differences on the test split, points, mean [95% interval] over seeds {seeds}: last accuracy, "
             "and the mean diagonal for gdro − er.", "",
             "| benchmark | m | " + " | ".join(f"{a} − {b}" + (" (mean diag)" if k == "mean_diagonal" else "")
                                           for a, b, k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for b, results in tables.items():
        for mem in mems:
            cells = []
            for x, y, k in cols:
                rx, ry = _cells(results, x, mem, seeds), _cells(results, y, mem, seeds)
                cells.append("—" if rx is None or ry is None else
                             paired([value(r, k) for r in rx], [value(r, k) for r in ry]))
            if any(c != "—" for c in cells):
                lines.append(f"| {b} | {mem} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report-only", action="store_true", help="write the tables of finished runs, start none")
    known, rest = pre.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args, mems, seeds, labels = study_args(__doc__, "1,2,5,10", list(VARIANTS), benchmark="all")
    if args.seeds == "0,1,2":
        seeds = [0, 1, 2, 3, 4]
    benchmarks = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    jobs = [(b, label, mem, seed) for b in benchmarks for label in labels
            for mem in ([1] if label == "finetune" else mems) for seed in seeds]

    def folder(job) -> Path:
        b, label, mem, seed = job
        slug = label.replace(" ", "").replace("(", "_").replace(")", "").replace("=", "-").replace(",", "")
        return Path(args.out) / f"study-{b}" / f"{slug}_m{mem}_s{seed}"

    def one(job):
        b, label, mem, seed = job
        return run_cli(b, [*BENCHMARKS.get(b, []), *VARIANTS[label], f"memory.per_class={mem}", f"seed={seed}",
                           *args.overrides], folder(job), threads=1)

    if known.report_only:
        results = {}
        for job in jobs:
            done = folder(job) / "results.json"
            if done.is_file() and json.loads(done.read_text()).get("complete"):
                results[job] = json.loads(done.read_text())
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(zip(jobs, pool.map(one, jobs)))
    tables = {}
    for b in benchmarks:
        mine = {(label, mem, seed): r for (bb, label, mem, seed), r in results.items() if bb == b}
        expected = sum(1 for j in jobs if j[0] == b)
        if not mine:
            continue
        if len(mine) < expected:  # --report-only while runs go on: the cells finished over every seed
            print(f"{b}: {len(mine)} of {expected} runs finished; tables of the complete cells only")
        tables[b] = mine
        text = report(b, BENCHMARKS.get(b, []), mems, seeds, labels, mine)
        (HERE / "results" / f"study_{b}.md").write_text(text)
        raw = {f"{label}|m={mem}|seed={seed}": {**r["metrics"], "mean_diagonal": value(r, "mean_diagonal")}
               for (label, mem, seed), r in mine.items()}
        (HERE / "results" / f"study_{b}.json").write_text(json.dumps(raw, indent=1))
        print(text)
    if tables and args.benchmark == "all":
        text = summary(tables, mems, seeds)
        (HERE / "results" / "study_summary.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
