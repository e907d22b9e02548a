"""Runs grouped over seeds: which runs are averaged together, their statistics, and the report as Markdown.

A group is the runs of one config that differ only in their seed (and in settings that cannot change a
number in R, IGNORED_KEYS). Groups live in benchmark sections: runs whose benchmark settings (report.
BENCHMARK_KEYS), task list, class order, evaluation split or evaluation set sizes differ are in different
sections, so they are never averaged together nor compared. The class order is drawn from
scenario.order_seed, not from the run's seed, so it stays fixed across seeds; runs of one config whose
class orders still differ (another scenario.classes, a dataset whose class names changed) are split into
separate sections, and the report says so.

Pure Python and numpy: the command line builds the tables before torch is imported (only the plots of
html_report import it).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from .config import ConfigError, RunCfg, to_dict, with_defaults
from .report import BENCHMARK_KEYS, gather, markdown_text
from .rundir import RESULTS_NAME

# Config keys that do not change what a run measures: the seed (averaged over), the run's name, where the
# data is read from and whether it may be downloaded, decoding processes, how often a checkpoint is written
# (a resumed run equals an uninterrupted one) and how often the DRO weights are recorded.
IGNORED_KEYS = ("seed", "name", "checkpoint_every", "scenario.root", "scenario.download",
                "scenario.decode_workers", "method.telemetry_every", "log.every", "log.tensorboard", "log.wandb",
                "log.wandb_project")

# (column, metric key); mean_diagonal is computed from R, the others are results["metrics"] entries.
METRICS = (("avg inc. acc.", "avg_incremental_accuracy"), ("last acc.", "last_accuracy"),
           ("forgetting", "forgetting"), ("BWT", "backward_transfer"), ("mean diag", "mean_diagonal"),
           ("future acc.", "future_accuracy"))

DEFAULT_BASELINE = "method.name=er"

# Two-sided 95% quantiles t_{0.975, df} of Student's t distribution, df = 1..30 (standard tables).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_975(df: int) -> float:
    """Student's t quantile t_{0.975, df}: the table for df <= 30, beyond it the Cornish-Fisher expansion

        t = z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2) + (3 z^7 + 19 z^5 + 17 z^3 - 15 z) / (384 df^3)

    with z = 1.959964 the normal quantile (within 1e-4 of the exact value for df > 30).
    """
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, not {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1 in the denominator; None for n = 1) of n values, in %."""

    mean: float
    std: float | None
    n: int


def mean_std(fractions: list[float]) -> Stat:
    """Mean and sample standard deviation of fractions, in %."""
    xs = [100 * x for x in fractions]
    return Stat(statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


@dataclass(frozen=True)
class Difference:
    """Mean paired difference in points with its 95% t-interval (None for a single pair)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def paired_difference(xs: list[float], ys: list[float]) -> Difference:
    """Paired differences d_i = 100 (x_i - y_i) of fractions: d̄ ± t_{0.975, n-1} s_d / sqrt(n), with s_d the
    sample standard deviation of the d_i."""
    d = [100 * (x - y) for x, y in zip(xs, ys, strict=True)]
    m = statistics.mean(d)
    if len(d) < 2:
        return Difference(m, None, None, len(d))
    half = t_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Difference(m, m - half, m + half, len(d))


def format_stat(s: Stat | None, n: int | None = None) -> str:
    """'77.5 ± 1.2' (one value: '77.5'); '(n=2)' added where fewer runs than the group's n have the metric."""
    if s is None:
        return "-"
    text = f"{s.mean:.1f}" if s.std is None else f"{s.mean:.1f} ± {s.std:.1f}"
    return text + (f" (n={s.n})" if n is not None and s.n != n else "")


def format_difference(d: Difference | None) -> str:
    """'+1.2 [-0.3, +2.7]' in points; a single pair has no interval."""
    if d is None:
        return "-"
    if d.low is None or d.high is None:
        return f"{d.mean:+.1f} (1 seed: no interval)"
    return f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


def metric_value(results: dict, key: str) -> float | None:
    """A metric of a run as a fraction (None where it has none); mean_diagonal is the mean of R[t, t]."""
    if key == "mean_diagonal":
        R = results["accuracy_matrix"]
        diag = [R[t][t] for t in range(len(R)) if isinstance(R[t][t], Real)]
        return statistics.mean(diag) if diag else None
    v = results["metrics"].get(key)
    return float(v) if isinstance(v, Real) and not isinstance(v, bool) else None


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """The config as dotted keys (method.name) -> values."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def format_value(v: object) -> str:
    """A config value as written in an override: gdro, 2, 0.001, true, [1, 2]."""
    return v if isinstance(v, str) else json.dumps(v)


@dataclass(frozen=True)
class Run:
    """One results.json: its path, its label (the shortest distinguishing folder path) and its contents."""

    label: str
    path: Path
    results: dict
    cell: tuple[tuple[int, int], str] | None = None  # a sweep's cell: ((sweep, place in it), name without seed)

    @property
    def seed(self) -> object:
        return self.results["config"].get("seed")

    @property
    def complete(self) -> bool:
        """Finished: marked complete (or unmarked, as older files are) with a row of R for every task."""
        r = self.results
        return r.get("complete") is not False and len(r["accuracy_matrix"]) == len(r["scenario"]["tasks"])


@dataclass
class Group:
    """The runs of one config (minus IGNORED_KEYS) in one benchmark; `averaged` holds one complete run per
    seed, `left_out` the others with the reason."""

    label: str
    settings: dict[str, str]
    runs: list[Run]
    averaged: list[Run] = field(default_factory=list)
    left_out: list[tuple[Run, str]] = field(default_factory=list)
    baseline: Group | None = None

    @property
    def seeds(self) -> list[object]:
        return [r.seed for r in self.averaged]

    def values(self, key: str) -> dict[object, float]:
        """seed -> the metric of the averaged run of that seed (runs without it are left out)."""
        out = {}
        for r in self.averaged:
            v = metric_value(r.results, key)
            if v is not None:
                out[r.seed] = v
        return out


@dataclass
class Benchmark:
    """A section of the report: runs that measure the same thing, grouped by config."""

    number: int
    name: str
    description: str
    groups: list[Group]
    label_keys: list[str]  # the config keys the group labels show
    notes: list[str] = field(default_factory=list)


def result_files(paths: list[str]) -> list[Path]:
    """The results.json files named by paths: a file, a run folder, or a folder holding runs at any depth
    (every results.json under it, in sorted order; a run folder's own sub-folders are not searched)."""
    files = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir() and not os.path.lexists(p / RESULTS_NAME):  # a folder's own results.json, even a broken one
            found = []
            for root, dirs, names in os.walk(p):
                dirs.sort()
                if RESULTS_NAME in names:
                    found.append(Path(root) / RESULTS_NAME)
                    dirs.clear()  # a run folder's own sub-folders hold no other runs
            if not found:
                raise ConfigError(f"no {RESULTS_NAME} in folder '{p}' or below; give run folders written by "
                                  f"'clipcl run' (their {RESULTS_NAME} files, or folders holding them).")
            files += sorted(found)
        else:
            files.append(p / RESULTS_NAME if p.is_dir() else p)
    return files


def sweep_cells(run_file: Path) -> dict[str, tuple[int, str]]:
    """The cells of the clipcl sweep whose folder holds this run (folder name -> (place, name without the
    seed): the variant's label and its grid values), or {} when the run is not part of a sweep."""
    record = run_file.parent.parent / "sweep.json"
    if not record.is_file():  # none, or a pipe that would be read forever
        return {}
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        cells = data["cells"] if data.get("clipcl_sweep") else []
        out = {}
        for i, c in enumerate(cells):
            values = " ".join(f"{k}={v}" for k, v in c.get("values", {}).items() if k != "seed")
            out[c["folder"]] = (i, " · ".join(x for x in (c.get("variant") or "", values) if x))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def collect(paths: list[str], quiet: bool = False) -> tuple[dict[str, dict], list[str], list[Run]]:
    """(label -> results of every run, warnings of report.collect_runs, the runs), each run once.

    A results.json reached twice (the same folder given twice, a folder and its results.json, a link to
    either, or a run inside two folders given) is one run; a 'clipcl: note:' line on stderr says so (unless
    quiet). A file that is no usable results.json is a ConfigError naming it (report.gather)."""
    g = gather([str(f) for f in result_files(paths)])
    note = g.repeat_note()
    if note and not quiet:
        print(f"clipcl: note: {note}", file=sys.stderr)
    runs = []
    sweeps: dict[Path, dict[str, tuple[int, str]]] = {}
    for f, label, results in zip(g.files, g.labels, g.results):
        if f.parent.parent not in sweeps:
            sweeps[f.parent.parent] = sweep_cells(f)
        rank = list(sweeps).index(f.parent.parent)  # sweeps in the order given, then their cells' order
        cell = sweeps[f.parent.parent].get(f.parent.name)
        runs.append(Run(label, f, results, ((rank, cell[0]), cell[1]) if cell else None))
    return dict(zip(g.labels, g.results)), g.warnings, runs


def _section_key(r: dict) -> dict[str, object]:
    """What a benchmark is: runs differing in any of these are never averaged together nor compared."""
    sc, cfg_sc = r["scenario"], r["config"].get("scenario") or {}
    return {**{f"scenario.{k}": cfg_sc.get(k) for k in BENCHMARK_KEYS},
            "tasks": tuple(sc["tasks"]),
            "class order": sc.get("class_order_hash"),
            "evaluation split": (r["config"].get("eval") or {}).get("split", "test"),
            "evaluation set sizes": tuple(sc.get("eval_sizes") or sc["test_sizes"])}


def method_reads(r: dict) -> tuple[str, ...] | None:
    """The method.* options the run's method reads: as results.json records them (method_options), else as the
    method's class declares them (runs written before the record), None for a method clipcl does not know."""
    if isinstance(r.get("method_options"), list):
        return tuple(r["method_options"])
    from .config import METHOD_READS
    return METHOD_READS.get(str(r.get("config", {}).get("method", {}).get("name")))


def _settings(r: dict) -> dict[str, str]:
    """The run's settings, keys added since it was written at their defaults (an older run of the same config
    groups with a newer one), and of the method options only those its method reads (a new default of gdro's
    does not split er runs)."""
    reads = method_reads(r)
    return {k: format_value(v) for k, v in flat_config(with_defaults(r["config"])).items() if k not in IGNORED_KEYS
            and (reads is None or not k.startswith("method.") or k == "method.name" or k[7:] in reads)}


def _seed_order(run: Run) -> tuple:
    seed = run.seed
    return (seed is None, seed if isinstance(seed, (int, float)) else 0, str(seed), str(run.path))


def _differing(groups: list[Group]) -> list[str]:
    """The config keys whose values differ between groups: method.name first, then in config order."""
    keys = list(dict.fromkeys(k for g in groups for k in g.settings))
    keys.sort(key=lambda k: k != "method.name")
    # a method option that only some groups' methods read differs only if it differs among those groups
    return [k for k in keys if len({g.settings[k] for g in groups if k in g.settings}) > 1]


def _labels(groups: list[Group]) -> list[str]:
    """Label each group by the fewest differing settings that tell the groups apart (chosen greedily, the one
    that splits most first, method.name on ties), as key=value pairs; a lone method.name is shown as its value,
    a lone group by its method. Returns the keys shown."""
    differing = _differing(groups)

    def distinct(keys: list[str]) -> int:
        return len({tuple(g.settings.get(k) for k in keys) for g in groups})

    chosen: list[str] = []
    while distinct(chosen) < len(groups):  # groups hold distinct settings, so all differing keys suffice
        rest = [k for k in differing if k not in chosen]
        chosen.append(max(rest, key=lambda k: (distinct([*chosen, k]), -differing.index(k))))
    chosen.sort(key=differing.index)
    if _sweep_labels(groups):
        return []  # the sweep's names show no setting: the groups table lists them
    for g in groups:
        if not chosen:
            g.label = g.settings.get("method.name", "run")
        elif chosen == ["method.name"]:
            g.label = g.settings.get("method.name") or "(no method.name)"
        else:
            g.label = " ".join(f"{k}={g.settings.get(k, '(absent)')}" for k in chosen)
    return chosen


def _sweep_labels(groups: list[Group]) -> bool:
    """Groups that are cells of one sweep (over seeds) take its names, 'variant · key=value', in the sweep's
    order, where those names tell them apart; returns whether they did."""
    if not all(r.cell for g in groups for r in g.runs):
        return False
    names = [{r.cell[1] for r in g.runs} for g in groups]  # type: ignore[index]
    if not all(len(n) == 1 for n in names):
        return False
    places = [(min(r.cell[0] for r in g.runs), next(iter(n))) for g, n in zip(groups, names)]  # type: ignore[index]
    if len({name for _, name in places}) < len(groups) or not all(name for _, name in places):
        return False
    for g, (_, name) in zip(groups, places):
        g.label = name
    order = sorted(range(len(groups)), key=lambda i: places[i][0])
    groups[:] = [groups[i] for i in order]
    return True


def _split_runs(g: Group) -> None:
    """One complete run per seed is averaged; incomplete runs and repeats of a seed are listed, not averaged."""
    g.runs.sort(key=_seed_order)
    first: dict[str, Run] = {}
    for run in g.runs:
        r = run.results
        if not run.complete:
            g.left_out.append((run, f"incomplete: {len(r['accuracy_matrix'])}/{len(r['scenario']['tasks'])} tasks"))
        elif json.dumps(run.seed) in first:
            g.left_out.append((run, f"repeats seed {run.seed} of {first[json.dumps(run.seed)].label}"))
        else:
            first[json.dumps(run.seed)] = run
            g.averaged.append(run)


def group_runs(runs: list[Run]) -> list[Benchmark]:
    """Benchmark sections (in the order their first run was given), each with its groups of runs."""
    sections: dict[str, dict[str, Group]] = {}
    keys: dict[str, dict[str, object]] = {}
    for run in runs:
        key = _section_key(run.results)
        skey = json.dumps(key, default=str)
        keys[skey] = key
        settings = _settings(run.results)
        gkey = json.dumps(settings, sort_keys=True)
        groups = sections.setdefault(skey, {})
        groups.setdefault(gkey, Group("", settings, [])).runs.append(run)
    benches = []
    for number, (skey, groups) in enumerate(sections.items(), 1):
        key, members = keys[skey], list(groups.values())
        for g in members:
            _split_runs(g)
        label_keys = _labels(members)
        names = sorted({str(run.results["config"].get("name", "?")) for g in members for run in g.runs})
        order = key["class order"]
        description = (f"{key['scenario.dataset']} {key['scenario.kind']}, {len(key['tasks'])} tasks, class order "
                       f"{str(order)[:8] if order else '?'}, {key['evaluation split']} split")
        benches.append(Benchmark(number, ", ".join(names), description, members, label_keys))
    _note_split_configs(benches, keys)
    return benches


def _note_split_configs(benches: list[Benchmark], keys: dict[str, dict[str, object]]) -> None:
    """A config whose runs landed in several benchmarks (e.g. a class order that changed with the seed) is
    named in each of them, with what differs."""
    where: dict[str, list[tuple[Benchmark, Group, dict]]] = {}
    for bench, key in zip(benches, keys.values()):
        for g in bench.groups:
            where.setdefault(json.dumps(g.settings, sort_keys=True), []).append((bench, g, key))
    for places in where.values():
        if len(places) < 2:
            continue
        differ = [k for k in places[0][2] if len({json.dumps(p[2][k], default=str) for p in places}) > 1]
        numbers = ", ".join(str(b.number) for b, _, _ in places)
        for bench, g, _ in places:
            bench.notes.append(f"the runs of {g.label} have the same config as runs in benchmarks {numbers} but a "
                               f"different {', '.join(differ)}, so they are not averaged together")


def _matches(g: Group, spec: str) -> bool:
    """Whether a group is the one --baseline names: its label, or key=value pairs its config all has."""
    if spec.strip() == g.label:
        return True
    pairs = spec.split()
    if not pairs or not all("=" in p for p in pairs):
        return False
    for p in pairs:
        key, want = p.split("=", 1)
        have = g.settings.get(key)
        if have is None:
            return False
        if have != want:
            try:
                if float(have) != float(want):
                    return False
            except ValueError:
                return False
    return True


def _defaults() -> dict[str, str]:
    return {k: format_value(v) for k, v in flat_config(to_dict(RunCfg())).items() if k not in IGNORED_KEYS}


def choose_baselines(benches: list[Benchmark], spec: str | None) -> None:
    """Set the baseline of each group that does not match spec (default method.name=er): among the groups of
    its benchmark that match spec, the one whose config differs from it in the fewest keys (a key an older
    clipcl did not write counts as its default value); none where two tie. Matching groups are baselines,
    not compared.

    A spec given by the user that matches no group at all is a ConfigError listing the groups."""
    given = spec is not None
    spec = spec if given else DEFAULT_BASELINE
    defaults, found = _defaults(), False
    for bench in benches:
        candidates = [g for g in bench.groups if _matches(g, spec)]
        found = found or bool(candidates)
        if not candidates:
            bench.notes.append(f"no paired differences: no group matches the baseline '{spec}' in this benchmark"
                               + ("" if given else "; choose one with --baseline, e.g. --baseline method.name=gdro"))
            continue
        for g in bench.groups:
            if any(g is c for c in candidates):
                continue
            a = {**defaults, **g.settings}
            dist = [sum(a.get(k) != b.get(k) for k in {*a, *b}) for b in ({**defaults, **c.settings}
                                                                        for c in candidates)]
            nearest = [c for c, d in zip(candidates, dist) if d == min(dist)]
            if len(nearest) == 1:
                g.baseline = nearest[0]
            else:
                bench.notes.append(f"no paired differences for {g.label}: the baselines "
                                   f"{' and '.join(b.label for b in nearest)} are equally close to it")
    if given and not found:
        labels = sorted({g.label for b in benches for g in b.groups})
        raise ConfigError(f"--baseline '{spec}' matches no group; give a group label ({', '.join(labels[:8])}"
                          f"{', ...' if len(labels) > 8 else ''}) or config values, e.g. --baseline method.name=er.")


def averages_over_seeds(benches: list[Benchmark]) -> bool:
    """Whether any group averages two runs or more (else the per-run table says everything)."""
    return any(len(g.averaged) > 1 for b in benches for g in b.groups)


@dataclass
class Table:
    """A table of strings: the same cells in the Markdown and the HTML report."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Section:
    """One benchmark's part of the report."""

    benchmark: Benchmark
    title: str
    notes: list[str]
    tables: list[Table]


@dataclass
class Summary:
    """The whole report: a title, paragraphs on how to read it, a section per benchmark."""

    title: str
    intro: list[str]
    sections: list[Section]


def _shown_metrics(bench: Benchmark) -> list[tuple[str, str]]:
    """Every metric, future accuracy only where a run of the benchmark has it."""
    return [(name, key) for name, key in METRICS if key != "future_accuracy"
            or any(g.values(key) for g in bench.groups)]


def _seed_list(seeds: list[object]) -> str:
    return ", ".join("-" if s is None else str(s) for s in seeds) or "-"


def comparison_table(bench: Benchmark) -> Table:
    """One row per group: mean ± sample std over its seeds of every metric, in %."""
    shown = _shown_metrics(bench)
    rows = []
    for g in bench.groups:
        n = len(g.averaged)
        cells = []
        for _, key in shown:
            values = list(g.values(key).values())
            cells.append(format_stat(mean_std(values) if values else None, n))
        rows.append([g.label, str(n), _seed_list(g.seeds), *cells])
    return Table("Comparison: mean ± standard deviation over seeds (%)",
                 ["group", "n", "seeds", *(name for name, _ in shown)], rows)


def groups_table(bench: Benchmark) -> Table | None:
    """Every setting in which the groups of a benchmark differ, where the labels (the fewest settings that
    tell the groups apart) do not show them all; '(absent)' where a config has no such key (an older clipcl)."""
    differing = _differing(bench.groups)
    if set(differing) == set(bench.label_keys):
        return None
    return Table("Groups: every setting in which they differ", ["group", *differing],
                 [[g.label, *(g.settings.get(k, "(absent)") for k in differing)] for g in bench.groups])


def paired_table(bench: Benchmark) -> Table | None:
    """Each group minus its baseline over the seeds both have: mean difference [95% t-interval], in points."""
    shown = _shown_metrics(bench)
    rows = []
    for g in bench.groups:
        b = g.baseline
        if b is None:
            continue
        cells, common_all = [], [s for s in g.seeds if s in b.seeds]
        for _, key in shown:
            x, y = g.values(key), b.values(key)
            common = [s for s in common_all if s in x and s in y]
            cells.append(format_difference(paired_difference([x[s] for s in common], [y[s] for s in common])
                                           if common else None))
        rows.append([g.label, b.label, str(len(common_all)), _seed_list(common_all) if common_all
                     else "no seed in common", *cells])
    if not rows:
        return None
    return Table("Paired differences with the baseline (points): mean [95% t-interval] over the seeds both have",
                 ["group", "baseline", "n", "seeds", *(name for name, _ in shown)], rows)


def left_out_table(bench: Benchmark) -> Table | None:
    """The runs listed but not averaged: incomplete ones, repeats of a seed."""
    rows = [[run.label, g.label, "-" if run.seed is None else str(run.seed), why]
            for g in bench.groups for run, why in g.left_out]
    return Table("Runs not averaged", ["run", "group", "seed", "why"], rows) if rows else None


def _number(v: object, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, Real) and not isinstance(v, bool) else "-"


def budget_table(bench: Benchmark) -> Table:
    """What each run cost: memory, trained parameters, time, speed, peak memory, device and threads."""
    rows = []
    for g in bench.groups:
        for run in g.runs:
            r = run.results
            mem, timing, versions = r.get("memory") or {}, r.get("timing") or {}, r.get("versions") or {}
            params = (r.get("model") or {}).get("trainable_parameters")
            peak = timing.get("peak_memory_bytes")
            peak_text = (f"{peak / 2 ** 20:.0f} MiB ({timing.get('peak_memory_kind', '?')})"
                         if isinstance(peak, Real) else "-")
            rows.append([run.label, g.label, "-" if run.seed is None else str(run.seed),
                         _number(mem.get("images"), "d"),
                         _number(mem["bytes"] / 1024 if isinstance(mem.get("bytes"), Real) else None, ".0f"),
                         _number(params, ",d"), _number(timing.get("train_seconds"), ".1f"),
                         _number(timing.get("train_images_per_second"), ".0f"), peak_text,
                         str(versions.get("device", "-")), str(versions.get("threads", "-"))])
    return Table("Budget per run", ["run", "group", "seed", "memory images", "memory KiB", "trained parameters",
                                    "train s", "train img/s", "peak memory", "device", "threads"], rows)


def summarize(benches: list[Benchmark]) -> Summary:
    """The report's text and tables (the plots are html_report's)."""
    n_runs = sum(len(g.runs) for b in benches for g in b.groups)
    n_groups = sum(len(b.groups) for b in benches)
    intro = [f"{n_runs} runs in {n_groups} groups and {len(benches)} benchmark{'s' if len(benches) > 1 else ''}. "
             "A group is the runs of one config that differ only in their seed (and in "
             f"{', '.join(k for k in IGNORED_KEYS if k != 'seed')}, which do not change what is measured). "
             "Runs with different benchmark settings, tasks, class orders or evaluation splits are never averaged "
             "together nor compared: each benchmark has its own tables.",
             "Accuracies are in %: mean ± sample standard deviation (n - 1) over the seeds of a group. Paired "
             "differences are group minus baseline in points over the seeds both have, with a 95% Student t "
             "interval (mean ± t(0.975, n - 1) s / sqrt(n)). The baseline of a group is, among the groups matching "
             "--baseline (default method.name=er), the one whose config differs from it in the fewest keys; the "
             "groups matching --baseline are not compared themselves. "
             "Incomplete runs are listed but not averaged."]
    sections = []
    for bench in benches:
        tables = [comparison_table(bench), groups_table(bench), paired_table(bench), left_out_table(bench),
                  budget_table(bench)]
        sections.append(Section(bench, f"Benchmark {bench.number}: {bench.name} ({bench.description})",
                                bench.notes, [t for t in tables if t is not None]))
    return Summary("clipcl report", intro, sections)


@dataclass(frozen=True)
class Figure:
    """A plot of the report: its PNG file (in the report folder) and what it shows."""

    file: str
    caption: str


def _cell(text: str) -> str:
    return markdown_text(text)


def markdown_table(t: Table) -> list[str]:
    """A table as Markdown lines under its '### title'. Tables hold plain text (config values, method, folder
    and variant names as the files have them); every piece is escaped here (report.markdown_text), so no
    inline HTML renders and no cell breaks the table."""
    e = markdown_text
    lines = [f"### {e(t.title)}", "", "| " + " | ".join(map(_cell, t.header)) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in t.rows]
    return lines + ([""] + [e(t.note)] if t.note else []) + [""]


def _alt_text(text: str) -> str:
    """An image's caption inside ![...]: escaped, its brackets too."""
    return markdown_text(text).replace("[", "\\[").replace("]", "\\]")


def split_tables(tables: list[Table]) -> tuple[list[Table], list[Table]]:
    """(the tables shown before the plots, the ones after: the budget, one row per run, goes last)."""
    return ([t for t in tables if not t.title.startswith("Budget")],
            [t for t in tables if t.title.startswith("Budget")])


def to_markdown(summary: Summary, figures: dict[int, list[Figure]] | None = None) -> str:
    """The report as Markdown; figures (benchmark number -> plots) are linked as images beside it. Every text
    is escaped (report.markdown_text): titles, notes and cells hold names from the runs' files."""
    e = markdown_text
    lines = [f"# {e(summary.title)}", ""]
    for p in summary.intro:
        lines += [e(p), ""]
    for s in summary.sections:
        lines += [f"## {e(s.title)}", ""]
        lines += [f"- Note: {e(n)}" for n in s.notes] + ([""] if s.notes else [])
        first, last = split_tables(s.tables)
        for t in first:
            lines += markdown_table(t)
        for f in (figures or {}).get(s.benchmark.number, []):
            lines += [f"![{_alt_text(f.caption)}]({f.file})", ""]
        for t in last:
            lines += markdown_table(t)
    return "\n".join(lines).rstrip("\n") + "\n"
