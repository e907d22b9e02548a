"""The report folder of `clipcl report --out`: report.md, a self-contained report.html and the plots.

report.html needs nothing but itself: the plots are embedded as base64 PNG data URIs, the style is inline,
and there is no script and no link to load. Every file is written through clipcl.files (temporary file,
then rename), and the folder may hold nothing but an earlier report's files: a user's file is never
replaced.
"""
from __future__ import annotations

import base64
import errno
import html
from pathlib import Path

import numpy as np

from . import owned
from .config import ConfigError
from .files import OutputError, clear_stale_temporaries, write_text
from .report import _plt, _save, one_line, plot_class_weights, plot_matrix
from .summary import Benchmark, Figure, Group, Run, Summary, Table, split_tables, to_markdown

REPORT_FILES = ("report.md", "report.html")
MARKER = ".clipcl-report"  # written with every report: a folder without it holds no report of clipcl's
FIGURE_PREFIX = "fig-"  # the plots this module writes; earlier ones of that name are replaced or removed


def _ours(p: Path) -> bool:
    """Whether p is a file an earlier report wrote: report.md, report.html, its plots, its marker, or one's
    leftover temporary."""
    if p.is_dir() and not p.is_symlink():
        return False
    name = p.name
    if name.startswith(".") and ".tmp-" in name:  # files.atomic_write's temporary of a killed writer
        name = name[1:name.index(".tmp-")]
    return name in (*REPORT_FILES, MARKER) or (name.startswith(FIGURE_PREFIX) and name.endswith(".png"))


def _legacy(folder: Path) -> bool:
    """A report folder of an earlier clipcl: its old marker file, and nothing but a report's files."""
    return (folder / MARKER).is_file() and all(_ours(p) for p in folder.iterdir() if p.name not in owned.META_NAMES)


def check_out_folder(folder: Path) -> None:
    """Refuse (ConfigError) an --out that is a file, a folder in use by another process, or a folder that is not
    empty and holds anything but an earlier report (recognised by clipcl's marker, which lists its files)."""
    folder = Path(folder).expanduser()
    owned.check_path_length(folder, "--out")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out '{folder}' is a file; give a folder for report.md and report.html (new, or "
                          "holding an earlier report).")
    if not folder.is_dir() or not owned.contents(folder):
        return
    busy = owned.holder(folder)
    if busy:
        raise ConfigError(busy)
    _refuse_foreign(folder)


def _refuse_foreign(folder: Path) -> None:
    """ConfigError when folder holds an entry that no clipcl report wrote (its marker's list, or an earlier
    clipcl's report files)."""
    if owned.kind_of(folder) == "report":
        mine = owned.listed(folder)
        foreign = [name for name in owned.contents(folder) if name not in mine]
    else:
        foreign = [] if _legacy(folder) else owned.contents(folder)
    if foreign:
        raise ConfigError(f"--out '{folder}' holds files a report did not write ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); give a new or empty folder, or one holding "
                          "only an earlier report written by clipcl report.")


def _rows(run: Run) -> np.ndarray:
    """R of a run in %, None as nan."""
    R = run.results["accuracy_matrix"]
    return np.array([[np.nan if v is None else 100 * v for v in row] for row in R], dtype=float)


def _seen(run: Run) -> list[float]:
    """Accuracy on seen data after each task, in %."""
    from .evaluate import seen_accuracy

    sc = run.results["scenario"]
    sizes = sc.get("eval_sizes") or sc["test_sizes"]
    R = run.results["accuracy_matrix"]
    return [100 * seen_accuracy(R, sizes, t) for t in range(len(R))]


def task_forgetting(R: np.ndarray) -> np.ndarray:
    """Forgetting of each task j < T (T the last step): f_j = max_{j <= t < T} R[t, j] - R[T, j]."""
    T = len(R) - 1
    return np.array([np.nanmax(R[j:T, j]) - R[T, j] for j in range(T)], dtype=float)


def _memory(cfg: dict) -> str:
    mem = cfg.get("memory") or {}
    if mem.get("bytes"):
        return f"memory {mem['bytes']} bytes"
    if mem.get("total"):
        return f"memory {mem['total']} images"
    return f"m={mem.get('per_class', '?')}"


def group_title(bench: Benchmark, g: Group) -> str:
    """'benchmark · method · memory · seeds ...' of a group, for plot titles."""
    cfg = g.runs[0].results["config"]
    seeds = ", ".join(str(s) for s in g.seeds) or "none complete"
    return f"{bench.name} · {(cfg.get('method') or {}).get('name', '?')} · {_memory(cfg)} · seeds {seeds}"


def _colours(n: int) -> list:
    """n distinguishable colours: matplotlib's 10 by default, tab20 up to 20, a colormap beyond."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    return [colormaps["tab20"](i) for i in range(n)] if n <= 20 else list(colormaps["turbo"](np.linspace(0, 1, n)))


# Plot layout in inches: a panel's title, its axes, the x label under them, one legend line, the figure width.
TITLE_IN, AXES_IN, XLABEL_IN, LINE_IN, WIDTH_IN = 0.85, 3.2, 0.55, 0.15, 9.0


def _wrap(label: str, width: int = 125) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _panels(plt, legends: list[list[str]]):
    """A figure with one panel per legend, stacked, each with room for its legend under the axes (long group
    labels never cover the data nor squeeze the axes); returns (figure, axes)."""
    blocks = [TITLE_IN + AXES_IN + XLABEL_IN + LINE_IN * sum(label.count("\n") + 1 for label in labels) + 0.15
              for labels in legends]
    height = sum(blocks)
    fig = plt.figure(figsize=(WIDTH_IN, height))
    axes, top = [], height
    for block in blocks:
        bottom = top - TITLE_IN - AXES_IN
        axes.append(fig.add_axes((0.8 / WIDTH_IN, bottom / height, (WIDTH_IN - 1.1) / WIDTH_IN, AXES_IN / height)))
        top -= block
    return fig, axes


def _legend_below(ax, entries: int) -> None:
    if entries:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -XLABEL_IN / AXES_IN), frameon=False,
                  borderaxespad=0)


def _legend_labels(groups: list[Group]) -> list[str]:
    return [_wrap(f"{g.label} (n={len(g.averaged)})") for g in groups]


def shared_title(bench: Benchmark) -> str:
    """'method · memory · seeds' where the plotted groups share them (else what varies), for plot titles."""
    drawn = [g for g in bench.groups if g.averaged]
    cfgs = [g.runs[0].results["config"] for g in drawn]
    methods = sorted({str((c.get("method") or {}).get("name", "?")) for c in cfgs})
    memories = sorted({_memory(c) for c in cfgs})
    seeds = sorted({", ".join(map(str, g.seeds)) for g in drawn})
    return " · ".join([f"method {methods[0]}" if len(methods) == 1 else "methods " + ", ".join(methods),
                       memories[0] if len(memories) == 1 else "memory varies",
                       f"seeds {seeds[0]}" if len(seeds) == 1 else "seeds per group: n in the legend"])


def draw_seen_accuracy(ax, bench: Benchmark) -> None:
    """Accuracy on seen data after each task per group: the mean over seeds, the band from min to max."""
    longest = 0
    drawn = [g for g in bench.groups if g.averaged]
    for g, colour, label in zip(drawn, _colours(len(drawn)), _legend_labels(drawn)):
        S = np.array([_seen(r) for r in g.averaged])
        x = np.arange(1, S.shape[1] + 1)
        longest = max(longest, S.shape[1])
        ax.plot(x, S.mean(0), marker="o", ms=3, color=colour, label=label)
        if len(S) > 1:
            ax.fill_between(x, S.min(0), S.max(0), color=colour, alpha=0.15, lw=0)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on seen data (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(f"Benchmark {bench.number}: {bench.name} ({bench.description})\n{_wrap(shared_title(bench))}\n"
                 "accuracy on seen data: mean over seeds; band: min to max", fontsize=9)
    _legend_below(ax, len(drawn))


def facets(bench: Benchmark) -> dict[str, list[tuple[str, Group]]] | None:
    """Many groups named 'variant · values' (a sweep's cells) over a few values: {values: [(variant, group)]},
    to draw one panel per values with a line per variant; None where one panel reads well enough."""
    drawn = [g for g in bench.groups if g.averaged]
    if len(drawn) <= 8 or not all(" · " in g.label for g in drawn):
        return None
    out: dict[str, list[tuple[str, Group]]] = {}
    for g in drawn:
        variant, rest = g.label.split(" · ", 1)
        out.setdefault(rest, []).append((variant, g))
    return out if 1 < len(out) <= 8 else None


def plot_seen_facets(bench: Benchmark, panels: dict[str, list[tuple[str, Group]]], path: Path) -> None:
    """One panel per cell values (e.g. memory size), a line per variant in the same colour in every panel."""
    plt = _plt()
    variants = list(dict.fromkeys(v for members in panels.values() for v, _ in members))
    colour = dict(zip(variants, _colours(len(variants))))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.6, 3.0 * rows + 1.6), sharey=True, squeeze=False)
    for ax, (values, members) in zip(axes.flat, panels.items()):
        longest = 0
        for variant, g in members:
            S = np.array([_seen(r) for r in g.averaged])
            x = np.arange(1, S.shape[1] + 1)
            longest = max(longest, S.shape[1])
            ax.plot(x, S.mean(0), marker="o", ms=3, color=colour[variant], label=variant)
            if len(S) > 1:
                ax.fill_between(x, S.min(0), S.max(0), color=colour[variant], alpha=0.15, lw=0)
        ax.set_xticks(range(1, longest + 1))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(values, fontsize=9)
        ax.set_xlabel("after task", fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy on seen data (%)", fontsize=8)
    seeds: dict[str, set[int]] = {}
    for members in panels.values():
        for v, g in members:
            seeds.setdefault(v, set()).add(len(g.averaged))
    names = [f"{v} (n={'-'.join(map(str, sorted(seeds[v])))})" for v in variants]
    handles = [plt.Line2D([], [], color=colour[v], marker="o", ms=3) for v in variants]
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(variants)), fontsize=8, frameon=False)
    fig.suptitle(f"Benchmark {bench.number}: {bench.name} ({bench.description})\n{_wrap(shared_title(bench))}\n"
                 "accuracy on seen data: mean over seeds; band: min to max", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * (-(-len(variants) // 4)), 1, 1))
    _save(fig, path)


def plot_seen_accuracy(benches: list[Benchmark], path: Path) -> None:
    """One panel per benchmark: accuracy on seen data after each task, per group (mean, min-max band)."""
    plt = _plt()
    fig, axes = _panels(plt, [_legend_labels([g for g in b.groups if g.averaged]) for b in benches])
    for ax, bench in zip(axes, benches):
        draw_seen_accuracy(ax, bench)
    _save(fig, path)


def _plot_matrix(bench: Benchmark, g: Group, path: Path) -> None:
    """Heatmap of R[t, j] averaged over the group's seeds."""
    stack = np.stack([_rows(r) for r in g.averaged])
    seen = (~np.isnan(stack)).sum(0)  # entries no run has (future tasks in CIL) stay blank
    M = np.where(seen > 0, np.nansum(stack, axis=0) / np.maximum(seen, 1), np.nan)
    plot_matrix(M, f"R[t, j] (%), mean over seeds\n{_wrap(g.label, 60)}\n{_wrap(group_title(bench, g), 60)}", path,
                extra=(2.5, 1.6), fontsize=8)


def _plot_forgetting(bench: Benchmark, path: Path) -> bool:
    """Forgetting of each task, one bar per group (mean over seeds, error bar: sample std); False if no task
    can be forgotten (a single task)."""
    plt = _plt()
    drawn = [(g, np.stack([task_forgetting(_rows(r)) for r in g.averaged])) for g in bench.groups if g.averaged]
    drawn = [(g, F) for g, F in drawn if F.shape[1]]
    if not drawn:
        return False
    n_tasks = max(F.shape[1] for _, F in drawn)
    width = 0.8 / len(drawn)
    labels = _legend_labels([g for g, _ in drawn])
    fig, (ax,) = _panels(plt, [labels])
    for i, ((g, F), colour, label) in enumerate(zip(drawn, _colours(len(drawn)), labels)):
        x = np.arange(1, F.shape[1] + 1) - 0.4 + width * (i + 0.5)
        err = F.std(0, ddof=1) if len(F) > 1 else None
        ax.bar(x, F.mean(0), width, yerr=err, capsize=1, color=colour, error_kw={"lw": 0.6}, label=label)
    ax.set_xticks(range(1, n_tasks + 1))
    ax.set_xlabel("task j (forgotten by the end of the stream)")
    ax.set_ylabel("forgetting max_t R[t, j] - R[T, j] (points)")
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Benchmark {bench.number}: {bench.name} ({bench.description})\n{_wrap(shared_title(bench))}\n"
                 "forgetting per task: mean over seeds; error bars: sample std", fontsize=9)
    _legend_below(ax, len(drawn))
    _save(fig, path)
    return True


def draw_figures(summary: Summary, folder: Path) -> dict[int, list[Figure]]:
    """Write every plot into folder; benchmark number -> its figures, in the order they are shown."""
    figures: dict[int, list[Figure]] = {}
    for s in summary.sections:
        bench, b = s.benchmark, s.benchmark.number
        out = figures.setdefault(b, [])
        if not any(g.averaged for g in bench.groups):
            continue
        name = f"{FIGURE_PREFIX}b{b}-seen-accuracy.png"
        panels = facets(bench)
        if panels:
            plot_seen_facets(bench, panels, folder / name)
        else:
            plot_seen_accuracy([bench], folder / name)
        out.append(Figure(name, f"Benchmark {b}: accuracy on seen data after each task (mean over seeds, band "
                                "from min to max)"))
        name = f"{FIGURE_PREFIX}b{b}-forgetting.png"
        if _plot_forgetting(bench, folder / name):
            out.append(Figure(name, f"Benchmark {b}: forgetting per task (mean over seeds, error bars: sample std)"))
        for i, g in enumerate(bench.groups, 1):
            if g.averaged:
                name = f"{FIGURE_PREFIX}b{b}-g{i}-matrix.png"
                _plot_matrix(bench, g, folder / name)
                out.append(Figure(name, f"Benchmark {b}, {g.label}: accuracy matrix R[t, j], mean over seeds "
                                        f"{', '.join(map(str, g.seeds))}"))
        for i, g in enumerate(bench.groups, 1):
            weighted = [r for r in g.averaged or g.runs if r.results.get("class_weights")]
            if weighted:
                name = f"{FIGURE_PREFIX}b{b}-g{i}-class-weights.png"
                plot_class_weights(weighted[0].results, folder / name)
                out.append(Figure(name, f"Benchmark {b}, {g.label}: DRO class weights over training steps, run "
                                        f"{weighted[0].label} (seed {weighted[0].seed})"))
    return figures


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #1a1a1a; background: #fff; line-height: 1.45; }
h1 { border-bottom: 2px solid #3b6ea5; padding-bottom: .2em; }
h2 { margin-top: 2em; color: #24476b; border-bottom: 1px solid #ccd; }
h3 { margin-top: 1.4em; font-size: 1.05em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #bbc; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { background: #e8eef6; }
.text { text-align: left; white-space: normal; min-width: 10em; max-width: 30em; }
div.wide { overflow-x: auto; }
tbody tr:nth-child(even) { background: #f6f8fb; }
p.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: .4em .8em; }
figure { display: inline-block; margin: .5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #dde; }
figcaption { font-size: .85em; color: #444; max-width: 640px; }
"""


TEXT_COLUMNS = ("group", "baseline", "run", "why", "device")  # left-aligned and wrapped; numbers are not


def _html_table(t: Table) -> list[str]:
    e = html.escape
    cls = ['' if h not in TEXT_COLUMNS else ' class="text"' for h in t.header]
    out = [f"<h3>{e(t.title)}</h3>", '<div class="wide"><table>',
           "<thead><tr>" + "".join(f"<th{c}>{e(h)}</th>" for c, h in zip(cls, t.header)) + "</tr></thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td{c}>{e(v)}</td>" for c, v in zip(cls, row)) + "</tr>" for row in t.rows]
    out += ["</tbody>", "</table></div>"]
    return out + ([f"<p>{e(t.note)}</p>"] if t.note else [])


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(summary: Summary, figures: dict[int, list[Figure]], folder: Path) -> str:
    """The report as one HTML page with its plots embedded (read from folder), its style inline."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(summary.title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{e(summary.title)}</h1>"]
    out += [f"<p>{e(p)}</p>" for p in summary.intro]
    for s in summary.sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        out += [f'<p class="note">Note: {e(n)}</p>' for n in s.notes]
        first, last = split_tables(s.tables)
        for t in first:
            out += _html_table(t)
        for f in figures.get(s.benchmark.number, []):
            out.append(f'<figure><img src="{_data_uri(folder / f.file)}" alt="{e(f.caption)}">'
                       f"<figcaption>{e(f.caption)}</figcaption></figure>")
        for t in last:
            out += _html_table(t)
    return "\n".join(out + ["</body>", "</html>"]) + "\n"


def _write_problem(folder: Path, e: OSError, creating: bool) -> str:
    """One line on why the report could not be written into folder: a read-only file system, a full disk, ..."""
    reasons = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space is left on the device",
               errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "no permission",
               errno.EPERM: "no permission", errno.ENOTDIR: "a part of its path is a file, not a folder",
               errno.ENAMETOOLONG: "its name is too long"}
    reason = reasons.get(e.errno or 0) or e.strerror or type(e).__name__
    if isinstance(e, OutputError) and e.errno not in reasons:  # files' message names the file and the reason
        reason = e.strerror or str(e)
    what = "create the report folder" if creating else "write the report into"
    return f"cannot {what} '{folder}': {reason}; give --out a folder you can write to"


def write_report(summary: Summary, folder: Path) -> None:
    """folder/report.md, folder/report.html and the plots (check_out_folder first, before anything else).

    A folder that cannot be made or written (a read-only file system, a full disk, no permission) is an
    OutputError naming it and the reason, never a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(e.errno or errno.EIO, one_line(_write_problem(folder, e, creating=True))) from None
    try:
        _write_report(summary, folder)
    except OSError as e:  # OutputError too: the folder named, with the reason in words
        raise OutputError(e.errno or errno.EIO, one_line(_write_problem(folder, e, creating=False))) from None


def _write_report(summary: Summary, folder: Path) -> None:
    with owned.FolderLock(folder, "report"):  # one report at a time; its files listed in the folder's marker
        _refuse_foreign(folder)  # again, under the lock
        if owned.kind_of(folder) != "report":  # new, or an earlier clipcl's report (its files adopted)
            owned.create_marker(folder, "report", owned.contents(folder) if _legacy(folder) else ())
        owned.track(folder)
        try:
            clear_stale_temporaries(folder, REPORT_FILES)
            figures = draw_figures(summary, folder)
            write_text(folder / "report.md", to_markdown(summary, figures))
            write_text(folder / "report.html", to_html(summary, figures, folder))
        finally:
            owned.untrack(folder)
        current = {f.file for fs in figures.values() for f in fs}
        mine = owned.listed(folder)
        for p in folder.glob(f"{FIGURE_PREFIX}*.png"):  # an earlier report's plots that this one does not have
            if p.name not in current and p.name in mine and (p.is_file() or p.is_symlink()):
                p.unlink()
