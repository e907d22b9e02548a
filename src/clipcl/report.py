"""Result files: results.json, accuracy_matrix.csv, plots, and comparison tables across runs.

Every file goes through clipcl.files (temporary file, then rename), so a half-written file is never seen
and a symlink planted at a target name in the run folder is replaced instead of written through.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from numbers import Real
from pathlib import Path

import numpy as np

from .config import ConfigError
from .files import atomic_write, save_figure, write_text
from .rundir import RESULTS_NAME

# The scenario settings that define a benchmark: runs differing in them measure different things.
BENCHMARK_KEYS = ("dataset", "kind", "classes_per_task", "initial_classes", "n_tasks")


RESULTS_SCHEMA = 1  # 0: no version field (earlier clipcl); 1: schema_version recorded. Older versions stay readable


def write_results_json(results: dict, out_dir: Path) -> None:
    """results.json, written atomically and fsynced: it is the record of the run and outlives a crash."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1)
    atomic_write(out_dir / RESULTS_NAME, lambda f: f.write(text.encode()))


def write_outputs(results: dict, out_dir: Path) -> None:
    """results.json, accuracy_matrix.csv and the plots of one run."""
    write_results_json(results, out_dir)
    R = results["accuracy_matrix"]
    # tasks numbered from 1, as in the plots and the progress lines
    lines = ["after_task," + ",".join(f"task{j + 1}" for j in range(len(R[0]) if R else 0))]
    lines += [f"{t + 1}," + ",".join("" if v is None else f"{v:.4f}" for v in row) for t, row in enumerate(R)]
    write_text(out_dir / "accuracy_matrix.csv", "\n".join(lines) + "\n")
    plot_run(results, out_dir)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _cjk_fallback(matplotlib)
    return plt


def _cjk_fallback(matplotlib) -> None:
    """Class names in Chinese, Japanese or Korean render as glyphs, not boxes, when such a font is installed:
    it goes after the default font in the fallback list (matplotlib >= 3.6 falls back glyph by glyph)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    cjk = sorted(n for n in names if any(k in n for k in ("CJK", "WenQuanYi", "Droid Sans Fallback", "Unifont")))
    family = matplotlib.rcParams["font.sans-serif"]
    if cjk and cjk[0] not in family:
        matplotlib.rcParams["font.sans-serif"] = [*family, cjk[0]]


def run_title(results: dict) -> str:
    """'benchmark · method · m=... · seed ...' of a run: what a plot shows, on the plot."""
    cfg = results.get("config", {})
    mem = cfg.get("memory", {})
    if mem.get("total"):
        memory = f"memory {mem['total']} images"
    elif mem.get("bytes"):
        memory = f"memory {mem['bytes']} bytes"
    else:
        memory = f"m={mem.get('per_class', '?')}"
    return (f"{cfg.get('name', '?')} · {cfg.get('method', {}).get('name', '?')} · {memory} · "
            f"seed {cfg.get('seed', '?')}")


def _save(fig, path: Path) -> None:
    """Write a figure atomically and free it even when the write fails (pyplot keeps every open figure)."""
    try:
        save_figure(fig, path, dpi=100)
    finally:
        _plt().close(fig)


def plot_run(results: dict, out_dir: Path) -> None:
    """accuracy.png (accuracy on seen data after each task), accuracy_matrix.png, class_weights.png (gdro)."""
    R = results["accuracy_matrix"]
    name = results["config"]["method"]["name"]
    if R:
        plot_comparison({name: results}, out_dir / "accuracy.png", title=run_title(results))
        M = np.array([[np.nan if v is None else 100 * v for v in row] for row in R], dtype=float)
        plot_matrix(M, f"R[t, j] (%)\n{run_title(results)}", out_dir / "accuracy_matrix.png")
    if results.get("class_weights"):
        plot_class_weights(results, out_dir / "class_weights.png")


def plot_matrix(M: np.ndarray, title: str, path: Path, extra: tuple[float, float] = (1.0, 1.0),
                fontsize: int = 9) -> None:
    """Heatmap of an accuracy matrix in % (nan: no entry), tasks numbered from 1, values written in the cells."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(extra[0] + 0.6 * M.shape[1], extra[1] + 0.5 * M.shape[0]))
    im = ax.imshow(M, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(M):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    ax.set_xticks(range(M.shape[1]), [str(j + 1) for j in range(M.shape[1])])
    ax.set_yticks(range(M.shape[0]), [str(t + 1) for t in range(M.shape[0])])
    ax.set_xlabel("test task j")
    ax.set_ylabel("after training task t")
    ax.set_title(title, fontsize=fontsize)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, path)


def weight_steps(results: dict) -> tuple[np.ndarray, np.ndarray]:
    """(global training step of each recorded class-weight row, the step each task starts at): tasks end to end,
    so method.telemetry_every = 10 puts rows 10 steps apart. Where an earlier task's step count is missing
    (results written by an older clipcl), the rows are numbered as recorded."""
    rows = results["class_weights"]
    steps = [t.get("steps", 0) for t in results.get("timing", {}).get("tasks", [])]
    first = np.concatenate([[0], np.cumsum(steps)]).astype(int)
    x = np.array([first[r["task"]] + r["step"] if r["task"] < len(first) else np.nan for r in rows], dtype=float)
    if np.isnan(x).any():
        x = np.arange(len(rows), dtype=float)
    return x, first


def plot_class_weights(results: dict, path: Path, top: int = 10) -> None:
    """DRO class weights p_c over training steps (tasks end to end, in steps), one line per class; the `top`
    classes with the largest weight are coloured and named, the others grey."""
    plt = _plt()
    rows = results["class_weights"]
    names = results["scenario"]["classnames"]
    n = max(len(r["weights"]) for r in rows)
    W = np.array([r["weights"] + [np.nan] * (n - len(r["weights"])) for r in rows], dtype=float)
    W[W == 0] = np.nan  # a class not visited yet in its stage has no weight to draw
    x, first = weight_steps(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    peak = np.nan_to_num(np.nanmax(np.where(np.isnan(W), -np.inf, W), axis=0), neginf=0.0)
    named = set(np.argsort(-peak, kind="stable")[:top].tolist())
    for c in range(n):
        label = names[c] if c < len(names) else str(c)
        if c in named:
            ax.plot(x, W[:, c], lw=1.2, label=label)
        else:
            ax.plot(x, W[:, c], lw=0.6, color="0.75")
    for t in range(1, len(first) - 1):
        ax.axvline(first[t], color="grey", lw=0.5, ls="--")
    ax.set_xlabel("training step (tasks end to end; dashed lines: a task starts)")
    ax.set_ylabel("class weight p_c")
    rest = f"; {n - len(named)} more classes in grey" if n > len(named) else ""
    ax.set_title(f"DRO class weights{rest}\n{run_title(results)}", fontsize=9)
    ax.legend(fontsize=8, ncol=2, loc="best", title=f"top {len(named)} by largest weight" if rest else None,
              title_fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _pct(v: object) -> str:
    """A fraction as a percentage with one decimal, or a dash where there is no number (yet)."""
    return f"{100 * v:.1f}" if isinstance(v, Real) else "-"


def summary_table(runs: dict[str, dict]) -> str:
    """A Markdown table comparing runs (name -> results dict).

    An incomplete run is marked with the tasks it has done, so a partial number is not mistaken for a final
    one; metrics it has no rows for yet are dashes.
    """
    head = ("| method | avg inc. acc. | last acc. | forgetting | BWT | min diag | mean diag | memory (img / KiB) "
            "| train img/s | train s |")
    lines = [head, "|" + "---|" * 10]
    for name, r in runs.items():
        m, R = r["metrics"], r["accuracy_matrix"]
        if r.get("complete") is False:
            name = f"{name} (incomplete: {len(R)}/{len(r['scenario']['tasks'])} tasks)"
        diag = [R[t][t] for t in range(len(R)) if isinstance(R[t][t], Real)]
        mem, timing = r.get("memory"), r.get("timing")
        memory = f"{mem['images']} / {mem['bytes'] / 1024:.0f}" if mem else "-"
        speed = f"{timing['train_images_per_second'] or 0:.0f} | {timing['train_seconds']:.0f}" if timing else "- | -"
        lines.append(f"| {name} | {_pct(m.get('avg_incremental_accuracy'))} | {_pct(m.get('last_accuracy'))} | "
                     f"{_pct(m.get('forgetting'))} | {_pct(m.get('backward_transfer'))} | "
                     f"{_pct(min(diag, default=None))} | {_pct(float(np.mean(diag)) if diag else None)} | "
                     f"{memory} | {speed} |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: dict[str, dict], path: Path, title: str = "") -> None:
    """Accuracy on seen data after each task, one line per run (runs without a finished task are left out)."""
    from .evaluate import seen_accuracy

    plt = _plt()
    drawn = {name: r for name, r in runs.items() if r["accuracy_matrix"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in drawn.items():
        R = r["accuracy_matrix"]
        sizes = r["scenario"].get("eval_sizes") or r["scenario"]["test_sizes"]
        ax.plot(range(1, len(R) + 1), [100 * seen_accuracy(R, sizes, t) for t in range(len(R))], marker="o", label=name)
    ax.set_xticks(range(1, 1 + max((len(r["accuracy_matrix"]) for r in drawn.values()), default=0)))
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on seen test data (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _shape_problem(data: object) -> str | None:
    """What makes data unlike a results.json written by clipcl (None if nothing): the checks that let the
    table and plots index it without failing."""
    if not isinstance(data, dict):
        kind = {"list": "an array", "str": "a string", "bool": "a boolean", "NoneType": "null"}
        return f"it holds {kind.get(type(data).__name__, 'a number')}, not a JSON object"
    missing = [k for k in ("config", "accuracy_matrix", "scenario", "metrics") if k not in data]
    if missing:
        return "it lacks " + ", ".join(f"'{k}'" for k in missing)
    sc, R = data["scenario"], data["accuracy_matrix"]
    if not (isinstance(data["config"], dict) and isinstance(data["metrics"], dict) and isinstance(sc, dict)):
        return "'config', 'scenario' and 'metrics' are not all objects"
    if not (isinstance(sc.get("tasks"), list) and isinstance(sc.get("test_sizes"), list)
            and len(sc["tasks"]) == len(sc["test_sizes"])):
        return "'scenario' lacks matching 'tasks' and 'test_sizes' lists"
    n = len(sc["tasks"])
    if not (isinstance(R, list) and len(R) <= n and all(
            isinstance(row, list) and len(row) == n and all(v is None or isinstance(v, Real) for v in row)
            for row in R)):
        return f"'accuracy_matrix' is not a list of rows of {n} accuracies"
    return None


def load_results(path: Path) -> dict:
    """Read a results.json; a file that is not one is a ConfigError naming it (never a traceback)."""
    path = Path(path)
    fix = "give a results.json written by 'clipcl run' (rerun or --resume the run to write it again)"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read '{path}' ({e.strerror or type(e).__name__}); {fix}") from None
    if not raw.strip():
        raise ConfigError(f"'{path}' is empty; {fix}")
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # an editor's byte-order mark is still UTF-8
    except UnicodeDecodeError:
        raise ConfigError(f"'{path}' is not UTF-8 text; {fix}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"'{path}' is not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
    problem = _shape_problem(data)
    if problem:
        raise ConfigError(f"'{path}' is not a clipcl results.json: {problem}; {fix}")
    version = data.get("schema_version", 0)  # files written before the field existed are version 0
    if not isinstance(version, int) or version > RESULTS_SCHEMA:
        raise ConfigError(f"'{path}' has results schema version {version!r}; this clipcl reads versions 0 to "
                          f"{RESULTS_SCHEMA}. Compare it with the clipcl that wrote it (or a newer one).")
    return data


def _labels(paths: list[Path]) -> list[str]:
    """The shortest path suffix that tells each run apart from the others (a/gdro and b/gdro); the same path
    given twice is numbered, so no run is ever dropped from a comparison."""
    parts = [Path(os.path.normpath(p.absolute())).parts[1:] or ("/",) for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(q[-d:]) for q, d in zip(parts, depth)]
        owners: dict[str, set[tuple[str, ...]]] = {}
        for label, q in zip(labels, parts):
            owners.setdefault(label, set()).add(q)
        deeper = [i for i, label in enumerate(labels) if len(owners[label]) > 1 and depth[i] < len(parts[i])]
        if not deeper:
            break
        for i in deeper:
            depth[i] += 1
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _disagreement(values: dict[str, str]) -> str | None:
    """'v1 in a, b; v2 in c' when the runs (label -> value) do not all agree, else None."""
    groups: dict[str, list[str]] = {}
    for label, v in values.items():
        groups.setdefault(v, []).append(label)
    return "; ".join(f"{v} in {', '.join(labels)}" for v, labels in groups.items()) if len(groups) > 1 else None


def _benchmarks(runs: dict[str, dict]) -> dict[str, str]:
    """Each run's benchmark, described by only the settings in which the runs differ."""
    def setting(r: dict, key: str) -> object:
        sc = r["config"].get("scenario")
        return sc.get(key) if isinstance(sc, dict) else None

    tasks = {label: r["scenario"]["tasks"] for label, r in runs.items()}
    longest = max(map(len, tasks.values()), default=0)
    # the first task at which the lists part, shown with the task count so distinct lists read differently
    first = next((i for i in range(longest) if len({tuple(t[i:i + 1]) for t in tasks.values()}) > 1), longest)
    described: dict[str, dict[str, str]] = {
        label: {**{k: f"{k}={setting(r, k)}" for k in BENCHMARK_KEYS},
                "tasks": f"{len(tasks[label])} tasks" + (f" (task {first}: {tasks[label][first]})"
                                                          if first < len(tasks[label]) else "")}
        for label, r in runs.items()}
    differing = [k for k in (*BENCHMARK_KEYS, "tasks") if len({d[k] for d in described.values()}) > 1]
    return {label: ", ".join(d[k] for k in differing) for label, d in described.items()}


def _memory_size(r: dict) -> str:
    """The replay memory a run was configured with (a total budget overrides per_class)."""
    mem = r["config"].get("memory")
    if not isinstance(mem, dict):
        return "unknown"
    return f"total={mem['total']}" if mem.get("total") else f"per_class={mem.get('per_class')}"


def collect_runs(paths: list[str]) -> tuple[dict[str, dict], list[str]]:
    """The runs to compare (label -> results) and warnings about what makes them not comparable.

    Each path is a run folder or a results.json file. Labels are the folder names, lengthened to the
    shortest distinguishing path suffix where two runs share a name. Warnings name the runs that differ in
    class order, benchmark or memory size: their numbers measure different things.
    """
    files = []
    for arg in paths:
        p = Path(arg)
        file = p / RESULTS_NAME if p.is_dir() else p
        if not file.is_file():
            where = f"no {RESULTS_NAME} in folder '{p}'" if p.is_dir() else f"'{p}' does not exist"
            raise ConfigError(f"{where}; give run folders written by 'clipcl run' (or their {RESULTS_NAME} files).")
        files.append(file)
    labels = _labels([f.parent if f.name == RESULTS_NAME else f for f in files])
    runs = dict(zip(labels, (load_results(f) for f in files)))
    values = {"class orders (scenario.class_order_hash)":
              {label: str(r["scenario"].get("class_order_hash")) for label, r in runs.items()},
              "benchmarks (scenario)": _benchmarks(runs),
              "memory sizes (config.memory)": {label: _memory_size(r) for label, r in runs.items()},
              "evaluation splits (config.eval.split)":
              {label: str((r["config"].get("eval") or {}).get("split", "test")) for label, r in runs.items()}}
    return runs, [f"the runs use different {what}, so their numbers are not comparable: {text}"
                  for what, v in values.items() if (text := _disagreement(v))]
