"""The command line: clipcl run | demo | report | list."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, CheckpointError
from .config import ConfigError, RunCfg, apply_overrides, load_config, to_dict, valid_keys

DEMO_METHODS = ("zeroshot", "finetune", "er", "gcl", "gdro", "joint")


def _prepare_out(out: Path, overwrite: bool, resume: bool, wipe: bool = True) -> None:
    """Refuse to write into a non-empty folder unless told to resume or overwrite (then, if wipe, empty it)."""
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"--resume: no checkpoint in '{out}' ({CHECKPOINT_NAME} missing). "
                                  "Start the run without --resume.")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder '{out}' is not empty. Use --resume to continue the run in it, "
                              "--overwrite to replace it, or choose another --out.")
        if wipe:
            shutil.rmtree(out)


def run_one(cfg: RunCfg, out: Path, resume: bool = False, quiet: bool = False, trainer=None) -> dict:
    """Run one config into out (library entry point used by run, demo and the study script)."""
    from .engine import Trainer

    trainer = trainer or Trainer(cfg, out)
    results = trainer.run(resume=resume)
    if not quiet:
        m = results["metrics"]
        print(f"{cfg.method.name}: last accuracy {100 * m['last_accuracy']:.1f}%, avg incremental "
              f"{100 * m['avg_incremental_accuracy']:.1f}%, forgetting {100 * m['forgetting']:.1f}% -> {out}")
    return results


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    from .engine import Trainer

    _prepare_out(out, args.overwrite, args.resume, wipe=False)  # refuse early, before the slow part
    # Building the trainer loads the dataset, cuts the scenario and creates the model: every mistake in
    # them surfaces here, before --overwrite deletes the old run.
    trainer = Trainer(cfg, out)
    _prepare_out(out, args.overwrite, args.resume)
    run_one(cfg, out, resume=args.resume, trainer=trainer)
    return 0


def demo_config(overrides: list[str]) -> RunCfg:
    """The embedded demo: fmnist-cil with 10 images per class in memory."""
    return load_config("fmnist-cil", ["memory.per_class=10", *overrides])


def cmd_demo(args: argparse.Namespace) -> int:
    from .report import plot_comparison, summary_table

    out = Path(args.out)
    methods = args.methods.split(",") if args.methods else list(DEMO_METHODS)
    base = demo_config(args.overrides)
    _prepare_out(out, args.overwrite, False)
    runs, start = {}, time.perf_counter()
    for name in methods:
        cfg = apply_overrides(base, [f"method.name={name}"])
        runs[name] = run_one(cfg, out / name)
    table = summary_table(runs)
    header = (f"# clipcl demo: fmnist-cil, {base.memory.per_class} images per class in memory, "
              f"model {base.model.name}, seed {base.seed}\n\n")
    (out / "summary.md").write_text(header + table + f"\nTotal wall time: {time.perf_counter() - start:.0f} s\n")
    plot_comparison(runs, out / "comparison.png")
    print("\n" + table)
    print(f"demo done in {time.perf_counter() - start:.0f} s; results in {out}/<method>/results.json, "
          f"table in {out}/summary.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import load_results, plot_comparison, summary_table

    runs = {}
    for d in args.dirs:
        path = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
        if not path.is_file():
            raise ConfigError(f"no results.json at '{path}'. Give run folders written by 'clipcl run'.")
        runs[path.parent.name] = load_results(path)
    print(summary_table(runs))
    if args.plot:
        plot_comparison(runs, Path(args.plot))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .benchmarks import list_benchmarks
    from .data.datasets import DATASET_DOCS
    from .methods import METHOD_DOCS
    from .models import TINY_MODELS, list_models

    what = args.what
    if what in (None, "methods"):
        print("methods:")
        for k, v in METHOD_DOCS.items():
            print(f"  {k:10s} {v}")
    if what in (None, "datasets"):
        print("datasets:")
        for k, v in DATASET_DOCS.items():
            print(f"  {k:14s} {v}")
    if what in (None, "benchmarks"):
        print("benchmarks (clipcl run NAME):")
        for k, v in list_benchmarks().items():
            print(f"  {k:20s} {v}")
    if what in (None, "models"):
        print("tiny CPU models: " + ", ".join(TINY_MODELS))
        if what == "models":
            print("open_clip architectures: " + ", ".join(m for m in list_models() if m not in TINY_MODELS))
        else:
            print("  ('clipcl list models' for every open_clip architecture)")
    if what == "keys":
        defaults = to_dict(RunCfg())
        for key in valid_keys():
            node = defaults
            for part in key.split("."):
                node = node[part]
            print(f"  {key} = {json.dumps(node)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipcl", description="Continual learning of CLIP with a tiny replay memory.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one config: clipcl run CONFIG [key=value ...] --out DIR")
    r.add_argument("config", help="a YAML file or a shipped benchmark name (clipcl list benchmarks)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.name=gdro memory.per_class=5 seed=1")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="every method on fmnist-cil with 10 images per class in memory")
    d.add_argument("overrides", nargs="*", help="dotted overrides applied to every method's run")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(DEMO_METHODS)}")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(fn=cmd_demo)
    rp = sub.add_parser("report", help="compare finished runs: clipcl report DIR [DIR ...]")
    rp.add_argument("dirs", nargs="+")
    rp.add_argument("--plot", default="", help="also write a comparison plot to this PNG")
    rp.set_defaults(fn=cmd_report)
    ls = sub.add_parser("list", help="models, datasets, benchmarks, methods, config keys")
    ls.add_argument("what", nargs="?", choices=["models", "datasets", "benchmarks", "methods", "keys"])
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one paragraph and exit non-zero, without a traceback."""
    from .engine import Interrupted, NonFiniteLoss

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError) as e:
        print(f"clipcl: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"clipcl: error: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(f"clipcl: {e}; checkpoint written. Continue with: clipcl run ... --out {e.out_dir} --resume "
              "(same config and overrides).", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("clipcl: interrupted before training started; nothing to resume.", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
