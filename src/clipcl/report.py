"""Result files: results.json, accuracy_matrix.csv, plots, and comparison tables across runs.

Every file goes through clipcl.files (temporary file, then rename), so a half-written file is never seen
and a symlink planted at a target name in the run folder is replaced instead of written through.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
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

    # every text on a plot is plain text: a '$' in a config, method, folder or class name is a dollar sign, not
    # mathtext (whose parse error would stop the report with a traceback)
    matplotlib.rcParams["text.parse_math"] = False
    # a character no installed font has (an emoji, a control character in a name) is drawn as a box; the warning
    # matplotlib prints for each one and each plot says nothing more
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
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


# Characters that Markdown (and the HTML it may hold) gives a meaning: as entities or backslash-escaped they
# read as themselves. Newlines and other control characters are written as escapes (\n, \x1b): they would
# end a table row or a heading, or drive the terminal the table is printed on.
_MARKDOWN = {"\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "`": "\\`"}
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # text direction overrides


def _control(ch: str) -> bool:
    import unicodedata

    return ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def one_line(text: object) -> str:
    """Text from a file made safe for one terminal line: control characters (newlines, escape sequences,
    direction overrides) written as their escapes, everything else as it is."""
    s = str(text)
    return "".join(ch.encode("unicode_escape").decode("ascii") if _control(ch) else ch for ch in s)


def markdown_text(text: object) -> str:
    """Text from a file (a config value, a method, folder, class or variant name) as Markdown that shows it as it
    is: no inline HTML (<, >, & as entities), no table cell break (|) nor code span (`), no line break (control
    characters as escapes), no link or image ('](' broken)."""
    out = []
    for ch in str(text):
        out.append(_MARKDOWN.get(ch) or (ch.encode("unicode_escape").decode("ascii") if _control(ch) else ch))
    return "".join(out).replace("](", "]\\(")


def _pct(v: object) -> str:
    """A fraction as a percentage with one decimal, or a dash where there is no number (yet)."""
    return f"{100 * v:.1f}" if isinstance(v, Real) and not isinstance(v, bool) else "-"


def _count_text(v: object, scale: float = 1) -> str:
    return f"{v / scale:.0f}" if isinstance(v, Real) and not isinstance(v, bool) else "-"


def summary_table(runs: dict[str, dict]) -> str:
    """A Markdown table comparing runs (name -> results dict); names are escaped (markdown_text).

    An incomplete run is marked with the tasks it has done, so a partial number is not mistaken for a final
    one; metrics it has no rows for yet are dashes.
    """
    head = ("| method | avg inc. acc. | last acc. | forgetting | BWT | min diag | mean diag | memory (img / KiB) "
            "| train img/s | train s |")
    lines = [head, "|" + "---|" * 10]
    for name, r in runs.items():
        m, R = r["metrics"], r["accuracy_matrix"]
        name = markdown_text(name)
        if r.get("complete") is False:
            name = f"{name} (incomplete: {len(R)}/{len(r['scenario']['tasks'])} tasks)"
        diag = [R[t][t] for t in range(len(R)) if isinstance(R[t][t], Real)]
        mem, timing = r.get("memory"), r.get("timing")
        memory = (f"{_count_text(mem.get('images'))} / {_count_text(mem.get('bytes'), 1024)}"
                  if isinstance(mem, dict) and mem else "-")
        speed = (f"{_count_text(timing.get('train_images_per_second') or 0)} | "
                 f"{_count_text(timing.get('train_seconds'))}" if isinstance(timing, dict) and timing else "- | -")
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
    if not (isinstance(R, list) and all(isinstance(row, list) for row in R)):
        return f"'accuracy_matrix' is not a list of rows of {n} accuracies"
    return _value_problem(data, n)


# Where a number of a results.json may lie. Accuracies and the accuracy metrics are fractions; forgetting,
# backward transfer and the change of zero-shot accuracy are differences of fractions (negative when a later
# task helped, or hurt).
FRACTION = (0.0, 1.0)
DIFFERENCE = (-1.0, 1.0)
METRIC_RANGES = {"avg_incremental_accuracy": FRACTION, "last_accuracy": FRACTION, "future_accuracy": FRACTION,
                 "forgetting": DIFFERENCE, "backward_transfer": DIFFERENCE, "unseen_change": DIFFERENCE}
COUNT_MAX = 2 ** 63 - 1  # image counts, bytes, parameters, steps: beyond it a count is no count clipcl wrote


def _shown(v: object) -> str:
    """A value as JSON writes it (NaN, Infinity, 1e+308, "0.5", [1]), cut to 40 characters, on one line."""
    try:
        text = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(v)
    return one_line(text if len(text) <= 40 else text[:37] + "...")


def _is_number(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _in(v: object, bounds: tuple[float, float]) -> bool:
    """A finite number within bounds (an integer too large for a float is out of them)."""
    if not _is_number(v):
        return False
    try:
        return math.isfinite(v) and bounds[0] <= v <= bounds[1]  # type: ignore[arg-type]
    except OverflowError:
        return False


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= COUNT_MAX


def _range_text(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:g}, {bounds[1]:g}]"


def _matrix_problems(name: str, M: object, n: int):
    """Problems of a matrix of accuracies: at most n rows (one per task done) of n entries (one per task), each
    a fraction in [0, 1] or null (a task not evaluated)."""
    if not isinstance(M, list):
        yield f"{name} is {_shown(M)}, not a list of rows of {n} accuracies"
        return
    if len(M) > n:
        yield f"{name} has {len(M)} rows, more than the {n} tasks of the scenario"
    for t, row in enumerate(M):
        if not isinstance(row, list):
            yield f"{name}[{t}] is {_shown(row)}, not a row of {n} accuracies"
        elif len(row) != n:
            yield (f"{name}[{t}] has {len(row)} entr{'y' if len(row) == 1 else 'ies'}, not {n} (one per task of "
                   "the scenario)")
        else:
            for j, v in enumerate(row):
                if v is not None and not _in(v, FRACTION):
                    yield f"{name}[{t}][{j}] is {_shown(v)}, not an accuracy (a fraction in [0, 1], or null)"


def _counts_problems(name: str, v: object, n: int | None):
    if not isinstance(v, list) or (n is not None and len(v) != n):
        yield f"{name} is {_shown(v)}, not a list of {n if n is not None else 'the'} image counts"
        return
    for j, x in enumerate(v):
        if not _is_count(x):
            yield f"{name}[{j}] is {_shown(x)}, not a count (an integer >= 0)"


def _section_problems(data: dict, key: str, numbers: dict[str, str]):
    """A section of counts and amounts ('memory', 'timing', 'model'): an object (or null), whose numbers are
    counts ('count': integers >= 0) or amounts ('amount': finite numbers >= 0), each null where unknown."""
    sec = data.get(key)
    if sec is None:
        return
    if not isinstance(sec, dict):
        yield f"{key} is {_shown(sec)}, not an object"
        return
    for field, kind in numbers.items():
        v = sec.get(field)
        if v is None:
            continue
        if kind == "count" and not _is_count(v):
            yield f"{key}.{field} is {_shown(v)}, not a count (an integer >= 0)"
        elif kind == "amount" and not _in(v, (0.0, math.inf)):
            yield f"{key}.{field} is {_shown(v)}, not a finite number >= 0"


def _problems(data: dict, n: int):
    """Every value of a results.json the report reads, checked for its type and range (see _value_problem)."""
    cfg, sc = data["config"], data["scenario"]
    for k in ("method", "memory", "scenario", "eval", "model"):
        if k in cfg and not isinstance(cfg[k], dict):
            yield f"config.{k} is {_shown(cfg[k])}, not an object"
    if "complete" in data and not isinstance(data["complete"], bool):
        yield f"complete is {_shown(data['complete'])}, not true or false"
    for j, name in enumerate(sc["tasks"]):
        if not isinstance(name, str):
            yield f"scenario.tasks[{j}] is {_shown(name)}, not a task name"
    yield from _counts_problems("scenario.test_sizes", sc["test_sizes"], n)
    for key in ("eval_sizes", "train_sizes", "val_sizes"):
        if sc.get(key) is not None:
            yield from _counts_problems(f"scenario.{key}", sc[key], n)
    if sc.get("classnames") is not None:
        names = sc["classnames"]
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            yield f"scenario.classnames is {_shown(names)}, not a list of class names"
    if sc.get("class_order_hash") is not None and not isinstance(sc["class_order_hash"], str):
        yield f"scenario.class_order_hash is {_shown(sc['class_order_hash'])}, not a string"
    yield from _matrix_problems("accuracy_matrix", data["accuracy_matrix"], n)
    if data.get("unseen_matrix") is not None:
        yield from _matrix_problems("unseen_matrix", data["unseen_matrix"], n)
    before = data.get("accuracy_before_training")
    if before is not None:
        if not isinstance(before, list) or len(before) > n:
            yield f"accuracy_before_training is {_shown(before)}, not a list of at most {n} accuracies"
        else:
            for t, v in enumerate(before):
                if v is not None and not _in(v, FRACTION):
                    yield (f"accuracy_before_training[{t}] is {_shown(v)}, not an accuracy (a fraction in [0, 1], "
                           "or null)")
    for key, v in data["metrics"].items():
        bounds = METRIC_RANGES.get(key, (-math.inf, math.inf))
        if v is not None and not _in(v, bounds):
            where = f"in {_range_text(bounds)}" if key in METRIC_RANGES else "finite"
            yield f"metrics.{one_line(key)} is {_shown(v)}, not a number {where} (or null)"
    yield from _section_problems(data, "memory", {"images": "count", "bytes": "count"})
    yield from _section_problems(data, "timing", {"train_seconds": "amount", "train_images_per_second": "amount",
                                                  "peak_memory_bytes": "count"})
    yield from _section_problems(data, "model", {"parameters": "count", "trainable_parameters": "count"})
    timing = data.get("timing")
    if isinstance(timing, dict) and timing.get("tasks") is not None:
        tasks = timing["tasks"]
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and (t.get("steps") is None
                                                                         or _is_count(t["steps"])) for t in tasks):
            yield f"timing.tasks is {_shown(tasks)}, not a list of objects with a count of steps"
    if data.get("versions") is not None and not isinstance(data["versions"], dict):
        yield f"versions is {_shown(data['versions'])}, not an object"
    weights = data.get("class_weights")
    if weights is not None:
        if not isinstance(weights, list):
            yield f"class_weights is {_shown(weights)}, not a list of rows"
            return
        for i, row in enumerate(weights):
            if not (isinstance(row, dict) and _is_count(row.get("task")) and _is_count(row.get("step"))
                    and isinstance(row.get("weights"), list) and row["weights"]):
                yield f"class_weights[{i}] is {_shown(row)}, not a row of a task, a step and class weights"
                continue
            for c, w in enumerate(row["weights"]):
                if not _in(w, FRACTION):
                    yield f"class_weights[{i}].weights[{c}] is {_shown(w)}, not a class weight (a fraction in [0, 1])"


def _value_problem(data: dict, n: int) -> str | None:
    """The first value of a results.json that clipcl could not have written (None if none): accuracies and
    metrics that are not finite or lie outside their range (NaN, 1e308, -0.5, 1.5), strings or booleans where
    numbers go, rows of the wrong length, counts that are negative or not integers."""
    return next(_problems(data, n), None)


def _read_problem(path: Path, e: OSError) -> str:
    """Why a results.json cannot be read and what to do, in words: a link that loops or leads nowhere, no
    permission, ..."""
    link = os.path.islink(path)
    relink = "point the link at a run's results.json, or give the run folder itself"
    if e.errno == errno.ELOOP:
        return (f"'{path}' is a symbolic link that loops (it leads back to itself, directly or through other "
                f"links); {relink}" if link else f"the path '{path}' goes through a symbolic link that loops; {relink}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"no permission to read '{path}' (or to enter a folder above it); make it readable (chmod u+r) or "
                "run clipcl report as a user who may read it")
    if e.errno == errno.ENOENT and link:
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"'{path}' is a symbolic link to '{target}', which does not exist; {relink}"
    if e.errno == errno.ENOENT:
        return f"'{path}' does not exist; {FIX}"
    if e.errno == errno.ENOTDIR:
        return f"'{path}' does not exist (a part of its path is a file, not a folder); {FIX}"
    return f"cannot read '{path}' ({e.strerror or type(e).__name__}); {FIX}"


FIX = "give a results.json written by 'clipcl run' (rerun or --resume the run to write it again)"


def load_results(path: Path) -> dict:
    """Read a results.json; a file that is not one is a ConfigError naming it (never a traceback): unreadable,
    not JSON, not shaped like one, or holding a value clipcl could not have written (_value_problem)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"'{path}' is a folder, not a file; {FIX}")
        if not stat.S_ISREG(mode):  # a pipe or a device would be read forever
            raise ConfigError(f"'{path}' is not a regular file (a pipe, a device or a socket); {FIX}")
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(_read_problem(path, e)) from None
    if not raw.strip():
        raise ConfigError(f"'{path}' is empty; {FIX}")
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # an editor's byte-order mark is still UTF-8
    except UnicodeDecodeError:
        raise ConfigError(f"'{path}' is not UTF-8 text; {FIX}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"'{path}' is not valid JSON ({str(e).splitlines()[0]}); {FIX}") from None
    problem = _shape_problem(data)
    if problem:
        raise ConfigError(f"'{path}' is not a clipcl results.json: {problem}; {FIX}")
    version = data.get("schema_version", 0)  # files written before the field existed are version 0
    if not isinstance(version, int) or isinstance(version, bool) or version > RESULTS_SCHEMA:
        raise ConfigError(f"'{path}' has results schema version {_shown(version)}; this clipcl reads versions 0 "
                          f"to {RESULTS_SCHEMA}. Compare it with the clipcl that wrote it (or a newer one).")
    return data


def _labels(paths: list[Path]) -> list[str]:
    """The shortest path suffix that tells each run apart from the others (a/gdro and b/gdro); two runs whose
    paths still read alike (x/../run through a link) are numbered, so no run is ever dropped from a comparison."""
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


@dataclass
class Gathered:
    """The runs named on the command line, each once: their results.json files (as first given), labels,
    contents, the warnings of collect_runs, and the files given more than once (file -> the other paths)."""

    files: list[Path]
    labels: list[str]
    results: list[dict]
    warnings: list[str]
    repeats: dict[Path, list[Path]]

    def repeat_note(self) -> str | None:
        """One line on the runs given more than once, or None."""
        if not self.repeats:
            return None
        listed = []
        for f, others in self.repeats.items():
            also = list(dict.fromkeys(str(o) for o in others if o != f))
            listed.append(f"'{f}' ({len(others) + 1} times" + (f", also as {', '.join(repr(o) for o in also)})"
                                                               if also else ")"))
        n = len(listed)
        return one_line(f"{n} run{'s were' if n > 1 else ' was'} given more than once (as a folder, its "
                        f"{RESULTS_NAME}, a link or inside two folders given) and {'are' if n > 1 else 'is'} "
                        f"counted once: {'; '.join(listed[:5])}{'; ...' if n > 5 else ''}")


def _identity(file: Path) -> tuple:
    """What makes two paths one file: device and inode (the same file through a link, a hard link, a folder and
    its results.json), else its resolved path."""
    st = os.stat(file)
    return (st.st_dev, st.st_ino) if st.st_ino else ("path", os.path.realpath(file))


def gather(paths: list[str]) -> Gathered:
    """Read the runs named by paths (run folders or results.json files), each file once however often it is
    named. Every file is checked first; any that cannot be used is a ConfigError naming it and the field and
    value at fault (the first such file, with how many more there are): a report never leaves a run out."""
    files, problems = [], []
    for arg in paths:
        p = Path(arg)
        file = p / RESULTS_NAME if p.is_dir() and p.name != RESULTS_NAME else p  # a folder named results.json: no file
        if file is not p and not os.path.lexists(file):
            problems.append(f"no {RESULTS_NAME} in folder '{p}'; give run folders written by 'clipcl run' (or "
                            f"their {RESULTS_NAME} files).")
            continue
        files.append(file)
    unique: dict[tuple, Path] = {}
    repeats: dict[Path, list[Path]] = {}
    for file in files:
        try:
            key: tuple = _identity(file)
        except OSError as e:
            if e.errno == errno.ENOENT and not os.path.islink(file):
                problems.append(f"'{file}' does not exist; give run folders written by 'clipcl run' (or their "
                                f"{RESULTS_NAME} files).")
            else:
                problems.append(_read_problem(file, e))
            continue
        if key in unique:
            repeats.setdefault(unique[key], []).append(file)
        else:
            unique[key] = file
    results = []
    for file in unique.values():
        try:
            results.append(load_results(file))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        more = len(problems) - 1
        raise ConfigError(one_line(problems[0] + (f" ({more} more of the paths given cannot be used either)"
                                                  if more else "")))
    kept = list(unique.values())
    labels = _labels([f.parent if f.name == RESULTS_NAME else f for f in kept])
    runs = dict(zip(labels, results))
    values = {"class orders (scenario.class_order_hash)":
              {label: str(r["scenario"].get("class_order_hash")) for label, r in runs.items()},
              "benchmarks (scenario)": _benchmarks(runs),
              "memory sizes (config.memory)": {label: _memory_size(r) for label, r in runs.items()},
              "evaluation splits (config.eval.split)":
              {label: str((r["config"].get("eval") or {}).get("split", "test")) for label, r in runs.items()},
              "image resizing (config.model.resize)":
              {label: str((r["config"].get("model") or {}).get("resize", "torch")) for label, r in runs.items()}}
    warnings = [one_line(f"the runs use different {what}, so their numbers are not comparable: {text}")
                for what, v in values.items() if (text := _disagreement(v))]
    return Gathered(kept, labels, results, warnings, repeats)


def collect_runs(paths: list[str]) -> tuple[dict[str, dict], list[str]]:
    """The runs to compare (label -> results) and warnings about what makes them not comparable.

    Each path is a run folder or a results.json file; a file named twice (a folder and its results.json, a
    link to either) is one run. Labels are the folder names, lengthened to the shortest distinguishing path
    suffix where two runs share a name. Warnings name the runs that differ in class order, benchmark or memory
    size: their numbers measure different things. A path that is no usable results.json is a ConfigError.
    """
    g = gather(paths)
    return dict(zip(g.labels, g.results)), g.warnings
