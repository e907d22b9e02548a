"""The study in the paper's regime (fmnist100-cil: 100 classes, 10 tasks of 10, a tiny CLIP that knows its
class names, a memory replayed about as rarely as CIFAR-100 B0-Inc10's): does class reweighting help, and
which method should a user pick at 1, 2 and 5 images per class?

    .venv/bin/python benchmarks/regime_study.py                 # every cell, seeds 0-4, two runs at a time
    .venv/bin/python benchmarks/regime_study.py --only core     # er, balancing, gdro, the oracle, finetune
    .venv/bin/python benchmarks/regime_study.py --report-only   # the tables of the runs finished so far
    .venv/bin/python benchmarks/regime_study.py --select        # gdro's options on the validation split
    .venv/bin/python benchmarks/regime_study.py --benchmark fmnist100-dil --only core --memories 2,5
    .venv/bin/python benchmarks/regime_study.py --select prototypes   # prototypes' fusion weight, validation
    .venv/bin/python benchmarks/regime_study.py --select lora         # er + LoRA's learning rate, validation

The pretrained weights are made once by `clipcl pretrain clipcl:fmnist100 --out benchmarks/out/fmnist100-tiny-rn.pt`
(their sha256 is in the table) and every run starts from that file. One CPU thread per run; the same seeds
for every method, so differences are paired (mean and 95% t-interval over seeds). Metrics on the test split;
`--select` runs on the validation split (eval.split=val: 10 training images per class held out) and is
what gdro's defaults were chosen on. `gdro (oracle)` reads validation-split class losses of old tasks: a
diagnostic of the ceiling of class reweighting, not a method. Writes benchmarks/results/regime_<name>.md
and .json; finished runs under benchmarks/out/regime/ are reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from competitors import paired  # noqa: E402

BENCHMARK = "fmnist100-cil"
WEIGHTS = HERE / "out" / "fmnist100-tiny-rn.pt"
# benchmark -> (the name of its tables and run folder, its overrides); fmnist-pre-cil is the 10-class bed of the
# method study (make study), from its own cached pretrained weights and with its text tower locked
BENCHMARKS = {"fmnist100-cil": ("cil", [f"model.pretrained={WEIGHTS}"]),
              "fmnist100-dil": ("dil", [f"model.pretrained={WEIGHTS}"]),
              "fmnist-pre-cil": ("pre_cil", ["scenario.train_per_class=500"])}
# held-out signals read every 4 steps (a task has 16) and move v halfway each time: they follow the forgetting
HELD_OUT = ["method.signal_every=4", "method.beta=0.5"]
NO_MEMORY = {"finetune", "lwf", "wise-ft", "zscl", "prototypes", "rapf"}
# RAPF's published CIFAR-100 B0-Inc10 recipe (linlany/RAPF configs/class/cifar100_10-10.yaml): Adam lr 1e-3, no weight
# decay, 15 epochs, batch 100, no augmentation; its MultiStepLR schedule is not the engine's (docs/METHOD.md)
RAPF = ["method.name=rapf", "scenario.augment=none", "optim.lr=1e-3", "optim.weight_decay=0", "optim.epochs=15",
        "optim.batch_size=100", "optim.warmup_steps=0", "optim.grad_clip=0"]
LORA_LR = "2e-3"  # er + LoRA's learning rate, chosen on the validation split (--select lora; the table in results/)
GROUPS = {  # label -> overrides, by priority
    "core": {
        "finetune": ["method.name=finetune"],
        "er": ["method.name=er"],
        "balanced (gdro dro=none)": ["method.name=gdro", "method.dro=none"],
        "gdro": ["method.name=gdro"],
        "gdro (oracle, lam 1)": ["method.name=gdro", "method.dro_signal=oracle", "method.lam=1", *HELD_OUT],
    },
    "more": {
        "gdro (oracle)": ["method.name=gdro", "method.dro_signal=oracle", *HELD_OUT],
        "er (replay_share=classes)": ["method.name=er", "method.replay_share=classes"],
        "er (herding)": ["method.name=er", "memory.selection=herding"],
        "gcl": ["method.name=gcl"],
        "gdro (probe)": ["method.name=gdro", "method.dro_signal=probe", *HELD_OUT],
        "balanced (uniform)": ["method.name=gdro", "method.dro=none", "method.sampling=uniform"],
    },
    "competitors": {
        "der++": ["method.name=derpp"],
        "er-ace": ["method.name=er_ace"],
        "lwf": ["method.name=lwf"],
        "wise-ft": ["method.name=wiseft"],
        "zscl": ["method.name=zscl"],
        "prototypes": ["method.name=prototypes"],
        "rapf": RAPF,
        "er + LoRA": ["method.name=er", "model.lora_rank=8", f"optim.lr={LORA_LR}"],
        "gdro + LoRA": ["method.name=gdro", "model.lora_rank=8", f"optim.lr={LORA_LR}"],
    },
}
SELECT = {  # gdro's options one at a time from the shipped values, on the validation split, m = 2
    "gdro": [],
    "lam 1": ["method.lam=1"], "lam 16": ["method.lam=16"],
    "t2i_eps 1e-14": ["method.t2i_eps=1e-14"],
    "class_presence corrected": ["method.class_presence=corrected"],
    "sampling uniform": ["method.sampling=uniform"],
    "probe signal": ["method.dro_signal=probe", *HELD_OUT],
    "dro none": ["method.dro=none"],
}
SELECT_LORA = {f"er + LoRA, lr {lr}": ["method.name=er", "model.lora_rank=8", f"optim.lr={lr}"]
               for lr in ("2e-4", "2e-3", "1e-2")}
SELECT_PROTOTYPES = {f"w {w}": [f"method.proto_weight={w}"] for w in (0, 0.25, 0.5, 0.75, 1)}
METRICS = (("avg inc.", "avg_incremental_accuracy"), ("last", "last_accuracy"), ("forgetting", "forgetting"),
           ("mean diag R[t,t]", "mean_diagonal"), ("zero-shot unseen", "future_accuracy"))
COMPARE = (("gdro (oracle, lam 1)", "balanced (gdro dro=none)"), ("gdro (oracle)", "balanced (gdro dro=none)"), ("gdro", "er"), ("gdro", "balanced (gdro dro=none)"),
           ("balanced (gdro dro=none)", "er"), ("er (replay_share=classes)", "er"),
           ("balanced (gdro dro=none)", "er (replay_share=classes)"), ("gdro (probe)", "balanced (gdro dro=none)"),
           ("gcl", "er"), ("gcl", "balanced (gdro dro=none)"), ("er (herding)", "er"),
           ("er (herding)", "balanced (gdro dro=none)"), ("balanced (uniform)", "balanced (gdro dro=none)"),
           ("prototypes", "balanced (gdro dro=none)"), ("prototypes", "er (herding)"), ("der++", "er"),
           ("er-ace", "er"), ("er + LoRA", "er"), ("gdro + LoRA", "gdro"), ("gdro + LoRA", "er + LoRA"))


def value(r: dict, key: str) -> float:
    if key == "mean_diagonal":
        R = r["accuracy_matrix"]
        return statistics.mean(R[t][t] for t in range(len(R)))
    v = r["metrics"].get(key)
    return float("nan") if v is None else v


def run_one(overrides: list[str], out: Path) -> dict:
    done = out / "results.json"
    if done.is_file() and json.loads(done.read_text()).get("complete"):
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "clipcl.cli", "run", BENCHMARK, *BENCHMARKS[BENCHMARK][1], *overrides,
           "--out", str(out), "--overwrite", "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return json.loads(done.read_text())


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def fmt(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def table(title: str, command: str, variants: dict, mems: list[int], seeds: list[int], results: dict,
          compare=COMPARE) -> str:
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:16] if WEIGHTS.is_file() else "?"
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             (f"Benchmark {BENCHMARK} from `{WEIGHTS.name}` (sha256 {sha}...)" if BENCHMARK.startswith("fmnist100")
              else f"Benchmark {BENCHMARK} ({' '.join(BENCHMARKS[BENCHMARK][1])}, its own cached pretrained weights)")
             + f", seeds {seeds}, one CPU thread per "
             "run. Mean ± standard deviation over seeds, in %; paired differences in points, mean [95% "
             "t-interval]. `zero-shot unseen`: accuracy on the tasks not trained yet (future_accuracy). "
             "finetune, lwf, wise-ft, zscl and prototypes keep no memory: the same runs in every m.", ""]
    for mem in mems:
        cells = {}
        for label in variants:
            m = 0 if label in NO_MEMORY else mem
            rs = [results.get((label, m, s)) for s in seeds]
            if all(r is not None for r in rs):
                cells[label] = rs
        if not cells:
            continue
        lines += [f"## m = {mem} images per class", "", "| method | " + " | ".join(n for n, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for label, rs in cells.items():
            lines.append(f"| {label} | " + " | ".join(fmt([value(r, k) for r in rs]) for _, k in METRICS) + " |")
        pairs = [(a, b) for a, b in compare if a in cells and b in cells]
        if pairs:
            lines += ["", "| paired difference | " + " | ".join(n for n, _ in METRICS) + " |",
                      "|---|" + "---|" * len(METRICS)]
            for a, b in pairs:
                lines.append(f"| {a} − {b} | " + " | ".join(
                    paired([value(r, k) for r in cells[a]], [value(r, k) for r in cells[b]]) for _, k in METRICS)
                    + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="core,more,competitors", help="groups to run: core, more, competitors")
    ap.add_argument("--memories", default="2,5,1")
    ap.add_argument("--labels", default="", help="only these methods of the groups (labels, separated by ';')")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--select", nargs="?", const="gdro", default=None, choices=["gdro", "prototypes", "lora"],
                    help="a method's options on the validation split: gdro's (the default), prototypes' weight, "
                         "er + LoRA's learning rate (lora)")
    ap.add_argument("--out", default=str(HERE / "out" / "regime"))
    ap.add_argument("--benchmark", default="fmnist100-cil", choices=list(BENCHMARKS))
    args = ap.parse_args()
    global BENCHMARK
    BENCHMARK = args.benchmark
    kind = BENCHMARKS[BENCHMARK][0]
    if args.select and kind != "cil":
        ap.error("--select chooses gdro's options on fmnist100-cil's validation split; drop --benchmark")
    mems = [int(m) for m in args.memories.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not WEIGHTS.is_file() and not args.report_only:
        subprocess.run([sys.executable, "-m", "clipcl.cli", "pretrain", "clipcl:fmnist100", "--out", str(WEIGHTS)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if args.select == "prototypes":  # no memory, no training: the fusion weight only
        variants = SELECT_PROTOTYPES
        jobs = [(label, 0, s) for s in seeds for label in variants]
        name, extra = "select_prototypes", ["eval.split=val", "method.name=prototypes"]
    elif args.select == "lora":  # er + LoRA's learning rate (rank 8), m = 2
        variants = SELECT_LORA
        jobs = [(label, 2, s) for s in seeds for label in variants]
        name, extra = "select_lora", ["eval.split=val"]
    elif args.select:
        variants = SELECT
        jobs = [(label, 2, s) for s in seeds for label in variants]
        name, extra = "select", ["eval.split=val", "method.name=gdro", "memory.per_class=2"]
    else:
        variants = {k: v for g in args.only.split(",") for k, v in GROUPS[g].items()}
        if args.labels:
            variants = {k: v for k, v in variants.items() if k in args.labels.split(";")}
        jobs = []
        for mem in mems:  # the most telling cells first: every seed of a cell before the next cell
            for label in variants:
                if label == "gdro (probe)" and mem < 2:
                    continue  # a probe needs a memory image to spare
                m = 0 if label in NO_MEMORY else mem
                jobs += [(label, m, s) for s in seeds if (label, m, s) not in jobs]
        name, extra = kind, []
    root = Path(args.out) / name

    def folder(job) -> Path:
        label, m, s = job
        return root / f"{slug(label)}_m{m}_s{s}"

    def one(job):
        label, m, s = job
        mem = [f"memory.per_class={m}"] if m else ["memory.per_class=1"]
        try:
            return job, run_one([*extra, *variants[label], *mem, f"seed={s}"], folder(job))
        except subprocess.CalledProcessError as e:
            print(f"failed: {job} ({e})", file=sys.stderr)
            return job, None

    results = {}
    if args.report_only:
        for job in jobs:
            done = folder(job) / "results.json"
            if done.is_file() and json.loads(done.read_text()).get("complete"):
                results[job] = json.loads(done.read_text())
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            for job, r in pool.map(one, jobs):
                if r is not None:
                    results[job] = r
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regime_study.py" + (
        "" if not args.select else " --select" if args.select == "gdro" else f" --select {args.select}")
    if args.seeds != "0,1,2,3,4":
        cmd += f" --seeds {args.seeds}"
    if kind != "cil":
        cmd += f" --benchmark {BENCHMARK} --only {args.only} --memories {args.memories}"
    if args.select == "prototypes":
        text = table("prototypes' fusion weight on the validation split (fmnist100-cil)", cmd, variants, [0], seeds,
                     results, compare=[(k, "w 0") for k in SELECT_PROTOTYPES if k != "w 0"])
    elif args.select == "lora":
        first = next(iter(SELECT_LORA))
        text = table("er + LoRA's learning rate on the validation split (fmnist100-cil, m = 2, rank 8)", cmd, variants,
                     [2], seeds, results, compare=[(k, first) for k in SELECT_LORA if k != first])
    elif args.select:
        text = table("gdro's options on the validation split (fmnist100-cil, m = 2)", cmd, variants, [2], seeds,
                     results, compare=[(k, "gdro") for k in SELECT if k != "gdro"])
    else:
        text = table(f"The paper's regime: {BENCHMARK}", cmd, variants, mems, seeds, results)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"regime_{name}.md").write_text(text + "\n")
    raw = {f"{label}|m={m}|seed={s}": {**r["metrics"], "mean_diagonal": value(r, "mean_diagonal")}
           for (label, m, s), r in results.items()}
    (HERE / "results" / f"regime_{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
