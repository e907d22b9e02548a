"""The README's method-study table: paired differences of last accuracy (and gdro − er of the mean diagonal)
between the cells of the `make study` sweeps, including the comparisons `clipcl report` does not make by
default (against class balancing and against er with herding, which itself matches the baseline er).

    .venv/bin/python benchmarks/method_study_table.py [--out benchmarks/results/method_study_summary.md]

Reads benchmarks/out/sweep-<benchmark>/ (sweep.json and the runs) for fmnist-cil, fmnist-pre-cil and
fmnist-dil; the statistics are clipcl.summary's (paired by seed, 95% Student t intervals).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipcl.summary import format_difference, paired_difference

HERE = Path(__file__).resolve().parent
COMPARISONS = (("gdro", "er"), ("gdro", "balanced (gdro dro=none)"), ("gdro", "balanced pairs form"),
               ("gdro", "er (herding)"), ("gcl", "er"))


def mean_diagonal(r: dict) -> float:
    R = r["accuracy_matrix"]
    return sum(R[t][t] for t in range(len(R))) / len(R)


def runs(folder: Path) -> dict[tuple[str, int, int], dict]:
    """(variant, images per class, seed) -> results of every cell of a sweep."""
    out = {}
    for c in json.loads((folder / "sweep.json").read_text())["cells"]:
        r = json.loads((folder / c["folder"] / "results.json").read_text())
        out[(c["variant"], int(r["config"]["memory"]["per_class"]), int(r["config"]["seed"]))] = r
    return out


def table(root: Path, benchmarks: list[str], mems: list[int], seeds: list[int]) -> str:
    lines = ["| benchmark | m | " + " | ".join(f"{a} − {b}" for a, b in COMPARISONS) + " | gdro − er (mean diag) |",
             "|---|---|" + "---|" * (len(COMPARISONS) + 1)]
    for b in benchmarks:
        res = runs(root / f"sweep-{b}")
        for m in mems:
            cells = [format_difference(paired_difference([res[(x, m, s)]["metrics"]["last_accuracy"] for s in seeds],
                                                         [res[(y, m, s)]["metrics"]["last_accuracy"] for s in seeds]))
                     for x, y in COMPARISONS]
            cells.append(format_difference(paired_difference([mean_diagonal(res[("gdro", m, s)]) for s in seeds],
                                                             [mean_diagonal(res[("er", m, s)]) for s in seeds])))
            lines.append(f"| {b} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(HERE / "out"))
    ap.add_argument("--out", default=str(HERE / "results" / "method_study_summary.md"))
    args = ap.parse_args()
    text = table(Path(args.root), ["fmnist-cil", "fmnist-pre-cil", "fmnist-dil"], [1, 2, 5, 10], [0, 1, 2, 3, 4])
    head = ("# Method study: paired differences of last accuracy, points, mean [95% interval] over seeds 0-4\n\n"
            "Command: `.venv/bin/python benchmarks/method_study_table.py` (after `make study`)\n\n")
    Path(args.out).write_text(head + text)
    print(text)


if __name__ == "__main__":
    main()
