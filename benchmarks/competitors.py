"""Competitors at equal memory: every method on fmnist-cil at 2 and 10 images per class, over 3 seeds.

    .venv/bin/python benchmarks/competitors.py scenario.train_per_class=500      # the committed table

Writes benchmarks/results/competitors_<benchmark>.md (mean ± std over seeds of average incremental accuracy,
last accuracy, forgetting and the mean diagonal R[t, t], in %; then each method's paired difference with gdro
on the same seeds, with a 95% t-interval) and the raw numbers as JSON next to it. Methods that keep no
memory (finetune, joint, lwf, wiseft, zscl) run once per seed and appear in both memory columns. er and gdro
also run without augmentation (scenario.augment=none), to show what augmentation changes. Finished runs are
kept under benchmarks/out/ and reused; two runs go at once, each on one CPU thread (recorded in results).
"""
from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from memory_study import HERE, PAIRS, mean_std, run_cli, study_args

NO_MEMORY = ("finetune", "joint", "lwf", "wiseft", "zscl")
VARIANTS = {  # label -> overrides
    "finetune": ["method.name=finetune"],
    "joint": ["method.name=joint"],
    "lwf": ["method.name=lwf"],
    "wiseft": ["method.name=wiseft"],
    "zscl": ["method.name=zscl"],
    "er": ["method.name=er"],
    "er (herding)": ["method.name=er", "memory.selection=herding"],
    "er_ace": ["method.name=er_ace"],
    "derpp": ["method.name=derpp"],
    "gcl": ["method.name=gcl", *PAIRS],
    "gdro": ["method.name=gdro", *PAIRS],
    "er (no augmentation)": ["method.name=er", "scenario.augment=none"],
    "gdro (no augmentation)": ["method.name=gdro", *PAIRS, "scenario.augment=none"],
}
METRICS = (("avg inc. acc.", "avg_incremental_accuracy"), ("last acc.", "last_accuracy"),
           ("forgetting", "forgetting"), ("mean diag", "mean_diagonal"))
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def value(r: dict, key: str) -> float:
    """A metric of a results dict; the mean diagonal is computed from the accuracy matrix."""
    if key == "mean_diagonal":
        R = r["accuracy_matrix"]
        return statistics.mean(R[t][t] for t in range(len(R)))
    return r["metrics"][key]


def paired(xs: list[float], ys: list[float]) -> str:
    """Mean of x - y over paired seeds with a 95% t-interval, in points."""
    d = [100 * (x - y) for x, y in zip(xs, ys)]
    m = statistics.mean(d)
    if len(d) < 2:
        return f"{m:+.1f}"
    half = T_975.get(len(d) - 1, 1.96) * statistics.stdev(d) / len(d) ** 0.5
    return f"{m:+.1f} [{m - half:+.1f}, {m + half:+.1f}]"


def main() -> None:
    args, mems, seeds, labels = study_args(__doc__, "2,10", list(VARIANTS))
    jobs = [(label, mem, seed) for label in labels for mem in (mems[:1] if label in NO_MEMORY else mems)
            for seed in seeds]
    jobs.sort(key=lambda j: j[0] != "joint")  # the longest runs first, so the two workers end together

    def one(job):
        label, mem, seed = job
        slug = label.replace(" ", "").replace("(", "_").replace(")", "")
        out = Path(args.out) / f"competitors-{args.benchmark}" / f"{slug}_m{mem}_s{seed}"
        return run_cli(args.benchmark, [*VARIANTS[label], f"memory.per_class={mem}", f"seed={seed}",
                                        *args.overrides], out, threads=1)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(one, jobs)))
    runs = {(label, mem): [results[(label, mems[0] if label in NO_MEMORY else mem, s)] for s in seeds]
            for label in labels for mem in mems}
    command = ("`.venv/bin/python benchmarks/competitors.py" + (f" --benchmark {args.benchmark}"
               if args.benchmark != "fmnist-cil" else "") + (f" {' '.join(args.overrides)}" if args.overrides
                                                             else "") + "`")
    any_run = next(iter(results.values()))
    lines = [f"# Competitors at equal memory: {args.benchmark}", "", f"Command: {command}", "",
             f"Seeds {seeds}; {any_run['versions']['threads']} CPU thread per run, clipcl "
             f"{any_run['versions']['clipcl']}, torch {any_run['versions']['torch']}. Mean ± standard deviation "
             "over seeds, in %. Memory methods keep m images per class; finetune, joint, lwf, wiseft and zscl "
             "keep none (one run per seed, shown in both columns). 'mean diag' is the mean of R[t, t]: how well "
             "each new task was learned.", ""]
    for mem in mems:
        lines += [f"## m = {mem} images per class", "",
                  "| method | " + " | ".join(name for name, _ in METRICS) + " | memory (img / KiB) |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        for label in labels:
            rs = runs[(label, mem)]
            cells = [mean_std([value(r, key) for r in rs]) for _, key in METRICS]
            m = rs[0]["memory"]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {m['images']} / {m['bytes'] / 1024:.0f} |")
        lines.append("")
    if "gdro" in labels:
        for mem in mems:
            lines += [f"## Paired difference with gdro, m = {mem} (points; mean [95% interval] over seeds)", "",
                      "| method | " + " | ".join(name for name, _ in METRICS) + " |",
                      "|---|" + "---|" * len(METRICS)]
            ref = runs[("gdro", mem)]
            for label in labels:
                if label != "gdro":
                    cells = [paired([value(r, k) for r in runs[(label, mem)]], [value(r, k) for r in ref])
                             for _, k in METRICS]
                    lines.append(f"| {label} − gdro | " + " | ".join(cells) + " |")
            lines.append("")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"competitors_{args.benchmark}.md").write_text("\n".join(lines))
    raw = {f"{label}|m={mem}": [{"seed": r["config"]["seed"], "mean_diagonal": value(r, "mean_diagonal"),
                                 **r["metrics"]} for r in rs] for (label, mem), rs in runs.items()}
    (res_dir / f"competitors_{args.benchmark}.json").write_text(json.dumps(raw, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
