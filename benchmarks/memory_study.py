"""Memory-size study: finetune, er, gcl, gdro and gdro with dro=none, at 1, 2, 5, 10 images per class,
over 3 seeds. Writes a Markdown table (mean ± std of last accuracy and forgetting, in %) to
benchmarks/results/memory_study_<benchmark>.md, and the raw numbers next to it as JSON.

    .venv/bin/python benchmarks/memory_study.py                      # fmnist-cil
    .venv/bin/python benchmarks/memory_study.py --benchmark fmnist-dil

Finished runs are kept under benchmarks/out/ and skipped when the study is run again, so an interrupted
study continues where it stopped. --jobs N runs N runs at once (each with 2/N torch threads).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# gcl and gdro as they were when this study was made: the pairs form, lam 0.3 (the Fashion-MNIST configs then)
PAIRS = ["method.gcl_form=pairs", "method.lam=0.3"]
VARIANTS = {  # label -> overrides
    "finetune": ["method.name=finetune"],
    "er": ["method.name=er"],
    "gcl": ["method.name=gcl", *PAIRS],
    "gdro": ["method.name=gdro", *PAIRS],
    "gdro (dro=none)": ["method.name=gdro", *PAIRS, "method.dro=none"],
}


def run_cli(benchmark: str, overrides: list[str], out: Path, threads: int = 2) -> dict:
    """One run through the CLI in a fresh process; a complete earlier result in `out` is reused."""
    done = out / "results.json"
    if done.is_file() and json.loads(done.read_text()).get("complete"):
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "clipcl.cli", "run", benchmark, *overrides, "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(done.read_text())


def run(benchmark: str, label: str, mem: int, seed: int, extra: list[str], out_root: Path, threads: int) -> dict:
    """One cell of the study."""
    slug = label.replace(" ", "").replace("(", "_").replace(")", "").replace("=", "-")
    out = out_root / benchmark / f"{slug}_m{mem}_s{seed}"
    return run_cli(benchmark, [*VARIANTS[label], f"memory.per_class={mem}", f"seed={seed}", *extra], out, threads)


def mean_std(xs: list[float]) -> str:
    import statistics

    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def study_args(doc: str, memories: str, methods: list[str], benchmark: str = "fmnist-cil"):
    """The command line every study shares; returns (args, memory sizes, seeds, method labels)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--benchmark", default=benchmark)
    ap.add_argument("--memories", default=memories)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(methods))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    return (args, [int(m) for m in args.memories.split(",")], [int(s) for s in args.seeds.split(",")],
            args.methods.split(","))


def main() -> None:
    args, mems, seeds, labels = study_args(__doc__, "1,2,5,10", list(VARIANTS))
    threads = max(1, 2 // args.jobs)
    jobs = []
    for label in labels:
        for mem in (mems[:1] if label == "finetune" else mems):  # finetune keeps no memory: run once
            for seed in seeds:
                jobs.append((label, mem, seed))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run(args.benchmark, *j, args.overrides, Path(args.out), threads), jobs))
    table: dict[tuple[str, int], list[dict]] = {}
    for (label, mem, seed), r in zip(jobs, results):
        table.setdefault((label, mem), []).append(r)
    lines = [f"# Memory-size study: {args.benchmark}", "",
             f"Command: `.venv/bin/python benchmarks/memory_study.py --benchmark {args.benchmark}"
             + (f" {' '.join(args.overrides)}" if args.overrides else "") + "`", "",
             f"Seeds {seeds}; mean ± standard deviation over seeds, in %. finetune keeps no memory (one run per "
             "seed, repeated in every column). Config: " + args.benchmark + " as shipped.", ""]
    for metric, key in (("Last accuracy (higher is better)", "last_accuracy"),
                        ("Forgetting (lower is better)", "forgetting"),
                        ("Average incremental accuracy", "avg_incremental_accuracy")):
        lines += [f"## {metric}", "", "| method | " + " | ".join(f"m={m}" for m in mems) + " |",
                  "|---|" + "---|" * len(mems)]
        for label in labels:
            cells = []
            for mem in mems:
                runs = table[(label, mems[0] if label == "finetune" else mem)]
                cells.append(mean_std([r["metrics"][key] for r in runs]))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    diag = {label: min(min(r["accuracy_matrix"][t][t] for t in range(len(r["accuracy_matrix"])))
                       for (lb, _), runs in table.items() if lb == label for r in runs) for label in labels}
    lines += ["Smallest diagonal entry R[t, t] over all runs of a method: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in diag.items()), ""]
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"memory_study_{args.benchmark}.md").write_text("\n".join(lines))
    raw = {f"{label}|m={mem}": [{"seed": r["config"]["seed"], **r["metrics"]} for r in runs]
           for (label, mem), runs in table.items()}
    (res_dir / f"memory_study_{args.benchmark}.json").write_text(json.dumps(raw, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
