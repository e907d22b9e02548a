"""The command line: clipcl run | resume | sweep | pretrain | demo | report | list.

Only the light modules (config, rundir, checkpoint names, files, errors) are imported at start-up, so that
`clipcl --help` and every mistake in the command answer at once; torch comes with the commands that train.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from pathlib import Path

from . import owned, rundir
from .checkpoint import CHECKPOINT_NAME, CheckpointError
from .config import ConfigError, RunCfg, apply_overrides, from_dict, load_config, to_dict, valid_keys
from .errors import Interrupted, NonFiniteLoss, StoppedEarly
from .files import OutputError, write_text

DEMO_METHODS = ("zeroshot", "finetune", "er", "gcl", "gdro", "joint")


def run_one(cfg: RunCfg, out: Path, resume: bool = False, quiet: bool = False, trainer=None,
            overwrite: bool = False) -> dict:
    """Run one config into out (library entry point used by run, resume, demo and the study script)."""
    from .engine import Trainer

    trainer = trainer or Trainer(cfg, out, overwrite=overwrite, quiet=quiet)
    results = trainer.run(resume=resume)
    if not trainer.quiet:  # rank 0 of several speaks
        m = results["metrics"]
        print(f"{cfg.method.name}: last accuracy {100 * m['last_accuracy']:.1f}%, avg incremental "
              f"{100 * m['avg_incremental_accuracy']:.1f}%, forgetting {100 * m['forgetting']:.1f}% -> {out}")
    return results


def stored_config(out: Path) -> RunCfg:
    """The resolved config a run stored in its checkpoint (read memory-mapped: only the config is used, and
    only the parts that hold it are verified here; the trainer verifies the whole file before resuming)."""
    from . import checkpoint

    state = checkpoint.read(out / CHECKPOINT_NAME, mmap=True)  # every top-level field there, config a dict
    try:
        return from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{out / CHECKPOINT_NAME}' holds a config this clipcl rejects ({e}). "
                              "Resume it with the clipcl that wrote it.") from None


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # key=value: an override, never a config's name or file


def cmd_run(args: argparse.Namespace) -> int:
    out = rundir.check(args.out, args.overwrite, args.resume)  # refuse early, before the slow part
    if args.config is not None and OVERRIDE.match(args.config) and not Path(args.config).exists():
        args.config, args.overrides = None, [args.config, *args.overrides]  # the first positional is no config
    if args.config is None:
        if not args.resume:
            raise ConfigError("clipcl run needs a config (a YAML file or a benchmark name, 'clipcl list "
                              "benchmarks') before the overrides, e.g. clipcl run fmnist-cil method.name=er --out "
                              "DIR; only --resume may leave it out, to use the run's stored config.")
        from .checkpoint import RESUME_FREE

        fixed = [o for o in args.overrides if o.split("=", 1)[0].strip().split(".")[0] not in RESUME_FREE]
        if fixed:
            free = ", ".join(f"{section}.*" for section in RESUME_FREE)
            raise ConfigError(f"{' '.join(fixed)}: with --resume and no config the run continues with the config "
                              f"stored in its checkpoint, and only {free} may change on resume. Drop the override"
                              f"{'s' if len(fixed) > 1 else ''}, or start a new run in another folder with "
                              f"{'them' if len(fixed) > 1 else 'it'}.")
        cfg = apply_overrides(stored_config(out), args.overrides, whole=False)  # a stored run is not re-judged
    else:
        cfg = load_config(args.config, args.overrides)
    from .engine import Trainer

    # Building the trainer loads and checks the data, cuts the scenario and creates the model: every mistake
    # in them surfaces here, before run() claims the folder (and --overwrite removes the old run's files).
    trainer = Trainer(cfg, out, overwrite=args.overwrite, quiet=args.quiet)
    run_one(cfg, out, resume=args.resume, quiet=args.quiet, trainer=trainer)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    out = rundir.check(args.dir, resume=True)
    cfg = stored_config(out)
    from .engine import Trainer

    run_one(cfg, out, resume=True, quiet=args.quiet, trainer=Trainer(cfg, out, quiet=args.quiet))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep  # subprocesses and threads only: the cells import torch, this process does not

    return sweep.run(args.config, args.grid, args.overrides, Path(args.out), jobs=args.jobs,
                     threads=args.threads_per_job, max_cells=args.max_cells)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from . import pretrain  # light: torch comes with the pretraining

    record = pretrain.write_pretrained(args.root, args.out, args.overrides, args.overwrite, args.quiet)
    if not args.quiet:
        source = record.get("recipe") or record.get("root")
        print(f"clipcl: pretrained {record['model']} on {source} ({len(record['classes'])} classes): zero-shot accuracy "
              f"{100 * record['zero_shot_accuracy']:.1f}% on {record['test_images']} test images -> {args.out} "
              f"(record: {pretrain.record_path(Path(args.out).expanduser()).name})", file=sys.stderr, flush=True)
    return 0


def demo_config(overrides: list[str]) -> RunCfg:
    """The embedded demo: fmnist-cil with 10 images per class in memory."""
    return load_config("fmnist-cil", ["memory.per_class=10", *overrides])


def cmd_demo(args: argparse.Namespace) -> int:
    from .methods import METHOD_DOCS

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else DEMO_METHODS
    unknown = [m for m in methods if m not in METHOD_DOCS]
    if unknown or not methods:
        raise ConfigError(f"--methods {args.methods!r}: unknown method(s) {', '.join(unknown) or '(none given)'}. "
                          f"Known methods: {', '.join(METHOD_DOCS)}.")
    base = demo_config(args.overrides)
    configs = {name: apply_overrides(base, [f"method.name={name}"]) for name in methods}  # all checked first
    out = rundir.check(args.out, args.overwrite, demo=True, methods=methods)
    from .engine import Trainer

    first = Trainer(configs[methods[0]], out / methods[0], overwrite=args.overwrite, quiet=args.quiet)
    with rundir.claim(out, args.overwrite, demo=True, methods=methods) as claimed:  # data and model are fine
        return _demo(args, methods, configs, base, out, first, claimed.kept)


def _demo(args, methods, configs, base, out: Path, first, kept: list[str]) -> int:
    from .engine import Trainer
    from .report import plot_comparison, summary_table

    if kept:
        print(f"clipcl: note: kept {len(kept)} entries of '{out}' that the demo did not write: "
              + ", ".join(kept[:5]), file=sys.stderr)
    runs, start = {}, time.perf_counter()
    for name in methods:
        trainer = first if name == methods[0] else Trainer(configs[name], out / name, overwrite=args.overwrite,
                                                           quiet=args.quiet)
        runs[name] = run_one(configs[name], out / name, quiet=args.quiet, trainer=trainer)
    table = summary_table(runs)
    header = (f"# clipcl demo: fmnist-cil, {base.memory.per_class} images per class in memory, "
              f"model {base.model.name}, seed {base.seed}\n\n")
    write_text(out / "summary.md", header + table + f"\nTotal wall time: {time.perf_counter() - start:.0f} s\n")
    plot_comparison(runs, out / "comparison.png")
    print("\n" + table)
    print(f"demo done in {time.perf_counter() - start:.0f} s; results in {out}/<method>/results.json, "
          f"table in {out}/summary.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .html_report import check_out_folder, plot_seen_accuracy, write_report
    from .report import plot_comparison, summary_table
    from .summary import averages_over_seeds, choose_baselines, collect, group_runs, summarize, to_markdown

    # refused before anything is printed or written: a folder, a missing folder, a link, a file of the user's
    plot = owned.check_output_file(args.plot, "--plot") if args.plot else None
    if args.out:
        check_out_folder(Path(args.out))
    runs, warnings, unique = collect(args.dirs)
    benches = group_runs(unique)
    choose_baselines(benches, args.baseline)
    summary = summarize(benches)
    grouped = averages_over_seeds(benches)
    if grouped:  # groups of seeds: their means, differences and budgets (benchmarks apart, so no warnings)
        print(to_markdown(summary))
    else:  # one run per config: the per-run table, with what makes the runs not comparable
        for w in warnings:
            print(f"clipcl: warning: {w}", file=sys.stderr)
        print(summary_table(runs))
    if plot and grouped:  # an unwritable path is an OutputError, which main reports in one line
        plot_seen_accuracy(benches, plot)
    elif plot:
        plot_comparison(runs, plot)
    if args.out:
        write_report(summary, Path(args.out))
        print(f"clipcl: report in {Path(args.out) / 'report.md'} and report.html", file=sys.stderr)
    return 0


def several_ranks_requested() -> bool:
    """Whether this process is one of several ranks (torchrun sets WORLD_SIZE), without importing torch."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: measure at least 1 training step")
    if several_ranks_requested():
        raise ConfigError("clipcl bench measures one process; run it without torchrun (its figures per rank would "
                          "divide one rank's FLOPs by the global batch)")
    cfg = load_config(args.config, args.overrides)
    if args.json:  # refuse an unwritable or foreign target (a file clipcl did not write) before the slow part
        owned.check_output_file(args.json, "--json")
    from .bench import bench, format_bench

    figures = bench(cfg, steps=args.steps)
    print(format_bench(figures))
    if args.json:
        write_text(Path(args.json).expanduser(), json.dumps({"written_by": "clipcl bench", **figures}, indent=1) + "\n")
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
    if what in (None, "grids"):
        from .sweep import list_grids

        print("grids (clipcl sweep CONFIG NAME):")
        for k, v in list_grids().items():
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


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser; with `intermixed`, its positionals (config, grid, overrides) may come before,
    between or after its options: `clipcl run fmnist-cil --out DIR method.name=er`."""

    intermixed = False
    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True  # parse_known_intermixed_args calls parse_known_args twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipcl", description="Continual learning of CLIP with a tiny replay memory.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Subcommand)
    r = sub.add_parser("run", help="run one config: clipcl run CONFIG [key=value ...] --out DIR")
    r.add_argument("config", nargs="?", help="a YAML file or a shipped benchmark name (clipcl list benchmarks); "
                   "may be left out with --resume")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.name=gdro memory.per_class=5 seed=1")
    r.add_argument("--out", required=True, help="output folder (new or empty)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the clipcl run in --out (only clipcl's files are removed, after every check)")
    r.add_argument("--quiet", action="store_true", help="no progress lines, only warnings and errors")
    r.set_defaults(fn=cmd_run)
    r.intermixed = True
    rs = sub.add_parser("resume", help="continue a stopped run with its stored config: clipcl resume DIR")
    rs.add_argument("dir", help="the run's folder (holding checkpoint.pt)")
    rs.add_argument("--quiet", action="store_true", help="no progress lines, only warnings and errors")
    rs.set_defaults(fn=cmd_resume)
    sw = sub.add_parser("sweep", help="a grid of runs: clipcl sweep CONFIG GRID --out DIR [--jobs N]")
    sw.add_argument("config", help="a YAML file or a shipped benchmark name (clipcl list benchmarks)")
    sw.add_argument("grid", help="a grid YAML file (overrides, variants, grid) or a shipped grid (clipcl list grids)")
    sw.add_argument("overrides", nargs="*", help="dotted overrides for every cell, e.g. scenario.train_per_class=500")
    sw.add_argument("--out", required=True, help="the sweep's folder: one run folder per cell, sweep.json, logs/")
    sw.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    sw.add_argument("--threads-per-job", type=int, default=None,
                    help="OMP_NUM_THREADS of each cell (default: the CPU count divided by --jobs)")
    sw.add_argument("--max-cells", type=int, default=10_000,
                    help="refuse a grid of more cells than this (default 10000; each cell is a whole run)")
    sw.set_defaults(fn=cmd_sweep)
    sw.intermixed = True
    pt = sub.add_parser("pretrain", help="a tiny CLIP that knows an image folder's classes: clipcl pretrain ROOT "
                        "--out WEIGHTS.pt [key=value ...]",
                        description="Pretrain a CLIP from scratch (both towers) on every class of an image folder in "
                        "one joint run, measure its zero-shot accuracy on the folder's test images, and write the "
                        "weights as a plain state dict (load them with model.pretrained=WEIGHTS.pt) with a record "
                        "WEIGHTS.json. Defaults: clipcl-tiny-rn at 32 px, 8 epochs (see README).")
    pt.add_argument("root", metavar="ROOT", help="ROOT/train/<class>/* with ROOT/test/<class>/* (or val/), or a flat "
                    "ROOT/<class>/* (a seeded tenth of each class held out as test); or a shipped recipe clipcl:<tag> "
                    "(its cached weights are copied)")
    pt.add_argument("overrides", nargs="*", help="dotted overrides of the pretraining config, as for clipcl run, e.g. "
                    "optim.epochs=20 model.name=clipcl-tiny-vit scenario.image_size=28")
    pt.add_argument("--out", required=True, metavar="WEIGHTS.pt", help="the weights file to write (a new file); its "
                    "record goes next to it, named with .json")
    pt.add_argument("--overwrite", action="store_true", help="replace weights (and their record) that clipcl pretrain "
                    "wrote there")
    pt.add_argument("--quiet", action="store_true", help="no progress lines, only warnings and errors")
    pt.set_defaults(fn=cmd_pretrain)
    pt.intermixed = True
    b = sub.add_parser("bench", help="train and evaluation images/s, FLOPs, MFU and memory of a config")
    b.add_argument("config", help="a YAML file or a shipped benchmark name (clipcl list benchmarks)")
    b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.name=ViT-B-16 method.name=gdro")
    b.add_argument("--steps", type=int, default=20, help="training steps measured (after 3 of warm-up)")
    b.add_argument("--json", default="", help="also write the figures to this JSON file")
    b.set_defaults(fn=cmd_bench)
    b.intermixed = True
    d = sub.add_parser("demo", help="every method on fmnist-cil with 10 images per class in memory")
    d.add_argument("overrides", nargs="*", help="dotted overrides applied to every method's run")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(DEMO_METHODS)}")
    d.add_argument("--overwrite", action="store_true", help="replace the demo output in --out")
    d.add_argument("--quiet", action="store_true", help="no progress lines, only warnings and errors")
    d.set_defaults(fn=cmd_demo)
    d.intermixed = True
    rp = sub.add_parser("report", help="compare runs, grouped over seeds: clipcl report DIR [DIR ...] [--out FOLDER]")
    rp.add_argument("dirs", nargs="+", help="run folders, results.json files, or folders holding runs at any depth")
    rp.add_argument("--out", default="", help="write report.md, a self-contained report.html and their plots here")
    rp.add_argument("--baseline", default=None, help="the group paired differences are taken against: a group "
                    "label or config values, e.g. method.name=er (the default)")
    rp.add_argument("--plot", default="", help="also write a comparison plot to this PNG")
    rp.set_defaults(fn=cmd_report)
    ls = sub.add_parser("list", help="models, datasets, benchmarks, methods, config keys")
    ls.add_argument("what", nargs="?", choices=["models", "datasets", "benchmarks", "methods", "keys",
                                                     "grids"])
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: a mistake or a stop prints one 'clipcl: error:' line and exits non-zero, no traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError) as e:
        print(f"clipcl: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"clipcl: error: {e}", file=sys.stderr)
        return 3
    except OutputError as e:
        print(f"clipcl: error: {e.strerror or e}", file=sys.stderr)
        return 4
    except (Interrupted, StoppedEarly) as e:
        print(f"clipcl: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("clipcl: interrupted before training started; nothing to resume.", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if "torch" in sys.modules:  # several ranks under torchrun: leave the process group cleanly
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def entry() -> None:
    """The `clipcl` command: main(), then the exit handlers (child processes, progress bars), and an exit that
    skips the interpreter's teardown of torch and open_clip's modules (about a second of every run's fixed
    cost; every file a run writes is written and synced before main returns)."""
    import atexit
    import multiprocessing
    import os

    rc = main()
    if multiprocessing.active_children():  # worker processes still up: the interpreter's own shutdown stops them
        sys.exit(rc)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
