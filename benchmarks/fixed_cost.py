"""The fixed cost of a run: what a run pays besides training and evaluating (start-up, imports, data and model
set-up, plots, checkpoints, exit), in a fresh process and for a further run in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fixed_cost.py [--repeats 5]

The run: fmnist-cil with one training step per task and 20 test images per class, so that nearly all of its
wall time is fixed cost. Fixed cost = wall time - (training + evaluation seconds recorded in results.json).
Fresh process: `clipcl run` through the installed command, timed from outside. Same process: clipcl.cli.main
called again after a first run (what a library user or a sweep running several configs in one process pays).
Medians over --repeats. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["fmnist-cil", "optim.max_steps=1", "scenario.test_per_class=20", "--quiet"]


def work_seconds(out: Path) -> float:
    r = json.loads((out / "results.json").read_text())
    return sum(t["train_seconds"] + t["eval_seconds"] for t in r["timing"]["tasks"])


def clipcl_command() -> list[str]:
    exe = Path(sys.executable).with_name("clipcl")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "clipcl.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    fresh, imports = [], []
    with tempfile.TemporaryDirectory(prefix="clipcl-fixed-") as tmp:
        out = Path(tmp) / "run"
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            subprocess.run([*clipcl_command(), "run", *RUN, "--out", str(out)], check=True, env=env)
            fresh.append(time.perf_counter() - start - work_seconds(out))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import clipcl.engine"], check=True, env=env)
            imports.append(time.perf_counter() - start)
        from clipcl.cli import main as clipcl_main

        same = []
        for i in range(args.repeats + 1):
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            clipcl_main(["run", *RUN, "--out", str(out)])
            if i:  # the first one pays the imports
                same.append(time.perf_counter() - start - work_seconds(out))
    print(f"fixed cost of a run ({env['OMP_NUM_THREADS']} thread(s); medians of {args.repeats}):")
    print(f"  fresh process (clipcl run)      {statistics.median(fresh):.2f} s  (all: "
          + ", ".join(f"{x:.2f}" for x in fresh) + ")")
    print(f"    of which python + imports     {statistics.median(imports):.2f} s  (python -c 'import clipcl.engine')")
    print(f"  a further run in the process    {statistics.median(same):.2f} s  (all: "
          + ", ".join(f"{x:.2f}" for x in same) + ")")


if __name__ == "__main__":
    main()
