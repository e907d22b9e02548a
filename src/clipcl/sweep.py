"""`clipcl sweep CONFIG GRID --out DIR`: a grid of runs over any config keys, one after another or N at a time.

A grid file (YAML of at most 1 MiB, duplicate keys refused) has three optional sections:

    # Method study: ...                       <- the first comment line is what 'clipcl list grids' shows
    overrides: [scenario.train_per_class=500]  # applied to every cell
    variants:                                  # label -> overrides; labels may hold spaces
      finetune: [method.name=finetune, memory.per_class=1]   # pins memory.per_class: its grid is not crossed
      er: [method.name=er]
      balanced (gdro dro=none): [method.name=gdro, method.dro=none]
    grid:                                      # key -> values: the cartesian product, last key fastest
      memory.per_class: [1, 2, 5, 10]
      seed: [0, 1, 2, 3, 4]

The cells are every variant (or the config alone, without `variants`) times every combination of the grid's
values. A variant that sets a grid key pins it: the cells that differ only in that key are the same run,
run once (above, finetune has 5 cells, not 20). Each cell's overrides are, in order: `overrides`, those given
on the command line, the variant's, the grid values; a grid key may not also be set in `overrides` or on the
command line (which value would the cell's name then show?).

The cells are counted before they are made: a grid of more than 10,000 cells is refused (`--max-cells N`
raises the limit). Every cell's config is built and validated before anything runs; the first bad key or value
stops the sweep with one line naming the grid file, the cell and the key. Each cell runs as
`python -m clipcl.cli run CONFIG <overrides> --out DIR/<cell> --quiet` in its own process with OMP_NUM_THREADS
(and MKL_NUM_THREADS) set to --threads-per-job, --jobs at a time. Cell folders are named
`<variant>__<key>-<value>__...` (characters other than letters, digits and `._+-` become `_`).

Run again, the same command continues a sweep: a cell whose results.json is complete (and of the same config)
is skipped, one holding a checkpoint is resumed (`--resume`), a folder holding files clipcl did not write is
reported as failed and left alone. A failed cell does not stop the others; its output is kept in
DIR/logs/<cell>.log and its last lines are printed; the sweep exits 1 at the end if any cell failed. Ctrl-C
(or SIGTERM, or SIGHUP) stops the running cells, which write a checkpoint: the same command resumes them.
DIR/sweep.json records the grid, the cells, their status, wall times and command lines.

Pure Python: torch is imported only by the cells' own processes.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

from . import owned, rundir
from .benchmarks import shipped_or_path, titles
from .checkpoint import comparable
from .config import ConfigError, RunCfg, apply_overrides, load_config, overridden, read_yaml, show, to_dict
from .errors import stop_signals
from .files import write_text

GRID_DIR = Path(__file__).parent / "grids"
SECTIONS = ("overrides", "variants", "grid")
SWEEP_FILE = "sweep.json"
LOG_DIR = "logs"
SWEEP_SCHEMA = 1
TAIL_LINES = 12
MAX_CELLS = 10_000  # a larger grid is a typo more often than a plan: each cell is a whole run (--max-cells N)


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: shared overrides, named variants and the axes of the cartesian product."""

    path: str
    overrides: tuple[str, ...] = ()
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (label, overrides), in file order
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key, values), in file order


@dataclass(frozen=True)
class Cell:
    """One run of a sweep."""

    name: str  # its folder under DIR
    variant: str  # the variant's label ("" without variants)
    values: tuple[tuple[str, str], ...]  # grid key -> the value it runs with (pinned ones included), as text
    overrides: tuple[str, ...]  # applied to CONFIG, in this order


# ---------------------------------------------------------------------------------------------- grid files
def list_grids() -> dict[str, str]:
    """Name -> the first comment line of every grid shipped with clipcl."""
    return titles(GRID_DIR)


def grid_path(name_or_path: str) -> Path:
    """A grid file: an existing path, or the name of a shipped grid."""
    return shipped_or_path(name_or_path, GRID_DIR, "grid", "grid", " ('clipcl list grids')")


def _override_list(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where} must be a list of key=value strings, e.g. [method.name=er, method.lam=2], "
                          f"got {value!r}")
    return tuple(v.strip() for v in value)


def key_of(override: str) -> str:
    """The dotted key of a 'key=value' override."""
    return override.split("=", 1)[0].strip()


def load_grid(name_or_path: str) -> Grid:
    """Read and check the structure of a grid file (the configs it makes are checked by `configs`).

    The file is read as config files are (config.read_yaml): at most 1 MiB, duplicate keys and alias bombs
    refused, naming the file.
    """
    try:
        path = grid_path(name_or_path)
    except OSError as e:  # a name too long for the file system
        raise ConfigError(f"grid '{show(name_or_path)[1:-1]}': {e.strerror or e}. Give a grid YAML file or a shipped "
                          "grid name ('clipcl list grids').") from None
    data = read_yaml(path, "grid") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"grid file '{path}' must hold a mapping with sections {', '.join(SECTIONS)}; "
                          f"got {type(data).__name__}")
    unknown = [str(k) for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"grid file '{path}': unknown section(s) {', '.join(unknown)}; a grid has "
                          f"{', '.join(SECTIONS)} (each optional).")
    overrides = _override_list(f"grid file '{path}': overrides", data.get("overrides"))
    variants_in = data.get("variants") or {}
    if not isinstance(variants_in, dict):
        raise ConfigError(f"grid file '{path}': variants must map labels to lists of key=value overrides, "
                          f"got {variants_in!r}")
    variants = tuple((str(label).strip(), _override_list(f"grid file '{path}': variant '{label}'", ov))
                     for label, ov in variants_in.items())
    if any(not label for label, _ in variants):
        raise ConfigError(f"grid file '{path}': a variant has an empty label; give each variant a name.")
    axes_in = data.get("grid") or {}
    if not isinstance(axes_in, dict):
        raise ConfigError(f"grid file '{path}': grid must map config keys to lists of values, got {axes_in!r}")
    axes = []
    for key, values in axes_in.items():
        if not isinstance(values, list) or not values or any(isinstance(v, dict) for v in values):
            raise ConfigError(f"grid file '{path}': grid key '{key}' must map to a non-empty list of values, "
                              f"e.g. {key}: [0, 1, 2]; got {values!r}")
        axes.append((str(key), tuple(values)))
    shared = {key_of(o) for o in overrides}
    for key, _ in axes:
        if key in shared:
            raise ConfigError(f"grid file '{path}': key '{key}' is both in overrides and in grid; keep it in one "
                              "of them (a variant may pin a grid key).")
    return Grid(str(path), overrides, variants, tuple(axes))


# ---------------------------------------------------------------------------------------------- cells
def value_text(value: Any) -> str:
    """A grid value as the text of a key=value override that reads back (as YAML) to the same value."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", part).strip("_") or "_"


def folder_name(variant: str, values: tuple[tuple[str, str], ...]) -> str:
    """`<variant>__<key>-<value>__...`, filesystem-safe; a very long name is cut and ends with its hash."""
    parts = ([_safe(variant)] if variant else []) + [f"{key}-{_safe(text)}" for key, text in values]
    name = "__".join(parts).lstrip(".-_") or "base"  # never hidden, never read as an option
    if len(name) > 150:
        name = name[:140] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def _pinned(grid: Grid, v_over: tuple[str, ...]) -> dict[str, str]:
    """Grid key -> the value text a variant pins it to."""
    grid_keys = {key for key, _ in grid.axes}
    pinned = {}
    for o in v_over:
        if key_of(o) in grid_keys:
            raw = o.split("=", 1)[1]
            try:
                pinned[key_of(o)] = value_text(yaml.safe_load(raw) if raw.strip() else "")
            except yaml.YAMLError:
                pinned[key_of(o)] = raw
    return pinned


def _unread(grid: Grid, overrides: tuple[str, ...], pinned: dict[str, str]) -> dict[str, str]:
    """Grid method options that the method a variant names (method.name=...) does not read, pinned at their
    defaults: crossing er with method.lam's values would make copies of one run (config.validate refuses such a
    value on a method that ignores it)."""
    from .config import METHOD_READS, MethodCfg
    names = [o.split("=", 1)[1].strip() for o in overrides if key_of(o) == "method.name"]
    name = pinned.get("method.name", names[-1] if names else None)
    if name is None:
        return {}
    reads = METHOD_READS.get(name)
    if reads is None:
        return {}
    default = MethodCfg()
    return {key: value_text(getattr(default, key[7:])) for key, _ in grid.axes
            if key.startswith("method.") and key != "method.name" and key not in pinned and hasattr(default, key[7:])
            and key[7:] not in reads}


def _axis_texts(grid: Grid) -> list[list[str]]:
    """Each axis's distinct value texts, in file order (a repeated value makes the same cells)."""
    return [list(dict.fromkeys(value_text(v) for v in values)) for _, values in grid.axes]


def count_cells(grid: Grid) -> int:
    """How many cells expand() makes, counted without making them: per variant, the product of the lengths of
    the axes it does not pin."""
    texts = _axis_texts(grid)
    total = 0
    for _, v_over in (grid.variants or (("", ()),)):
        pinned = _pinned(grid, v_over)
        pinned.update(_unread(grid, (*grid.overrides, *v_over), pinned))
        total += math.prod(len(t) for (key, _), t in zip(grid.axes, texts) if key not in pinned)
    return total


def check_size(grid: Grid, max_cells: int = MAX_CELLS) -> int:
    """The number of cells, or a ConfigError when it is above max_cells (before anything is expanded)."""
    n = count_cells(grid)
    if n > max_cells:
        axes = " x ".join(f"{len(t)} {key}" for (key, _), t in zip(grid.axes, _axis_texts(grid)))
        parts = ([f"{len(grid.variants)} variants"] if grid.variants else []) + ([axes] if axes else [])
        raise ConfigError(f"grid file '{grid.path}' makes {n:,} cells ({' times '.join(parts)}), more than the limit "
                          f"of {max_cells:,}: each cell is a whole run. Shorten the grid's lists, or pass "
                          f"--max-cells {n} to run them all.")
    return n


def expand(grid: Grid, extra: list[str] | tuple[str, ...] = (), max_cells: int = MAX_CELLS) -> list[Cell]:
    """The cells of a grid (variants outer, then the grid's product), pinned duplicates removed.

    The cells are counted first (count_cells): a grid of more than max_cells is refused before any is made.
    """
    grid_keys = [key for key, _ in grid.axes]
    for o in extra:
        if key_of(o) in grid_keys:
            raise ConfigError(f"override '{o}' on the command line sets '{key_of(o)}', which grid '{grid.path}' "
                              "varies; remove it from the command line or from the grid.")
    check_size(grid, max_cells)
    texts = _axis_texts(grid)
    cells, seen = [], {}
    for label, v_over in (grid.variants or (("", ()),)):
        pinned = _pinned(grid, v_over)
        pinned.update(_unread(grid, (*grid.overrides, *extra, *v_over), pinned))
        for combo in itertools.product(*texts):
            values = tuple((key, pinned.get(key, text)) for key, text in zip(grid_keys, combo))
            if (label, values) in seen:
                continue
            free = [f"{key}={text}" for key, text in values if key not in pinned]
            cell = Cell(folder_name(label, values), label, values, (*grid.overrides, *extra, *v_over, *free))
            seen[(label, values)] = cell
            cells.append(cell)
    names: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in names or cell.name in (SWEEP_FILE, LOG_DIR):
            other = names.get(cell.name)
            what = (f"cells {_describe(other)} and {_describe(cell)} both get" if other else
                    f"cell {_describe(cell)} gets")
            raise ConfigError(f"grid file '{grid.path}': {what} the folder name '{cell.name}' (names keep only "
                              "letters, digits and ._+-); rename a variant.")
        names[cell.name] = cell
    return cells


def _describe(cell: Cell) -> str:
    return "'" + " ".join(([cell.variant] if cell.variant else []) + [f"{k}={t}" for k, t in cell.values]) + "'"


def configs(config: str, grid: Grid, cells: list[Cell], extra: list[str] | tuple[str, ...] = (),
            stream: TextIO | None = None) -> dict[str, RunCfg]:
    """Every cell's validated config (name -> RunCfg); the first mistake is a ConfigError naming where it is.

    About 0.3 ms a cell (10,000 cells: 3 s on one core); with a stream, a grid of 1,000 cells or more says so
    first, and every 10 seconds how far the check is.
    """
    base = load_config(config)
    try:
        apply_overrides(base, list(grid.overrides), whole=False)
    except ConfigError as e:
        raise ConfigError(f"grid file '{grid.path}', overrides: {e}") from None
    apply_overrides(base, list(extra), whole=False)  # a command-line mistake reads as in 'clipcl run'
    data = to_dict(base)
    if stream is not None and len(cells) >= 1000:
        print(f"clipcl sweep: checking the configs of {len(cells):,} cells ...", file=stream, flush=True)
    out, start = {}, time.monotonic()
    said = start
    for k, cell in enumerate(cells):
        try:
            out[cell.name] = overridden(data, cell.overrides)
        except ConfigError as e:
            raise ConfigError(f"grid file '{grid.path}', cell '{cell.name}': {e}") from None
        if stream is not None and time.monotonic() - said > 10:
            said = time.monotonic()
            print(f"clipcl sweep: checked {k + 1:,} of {len(cells):,} cells ({duration(said - start)})", file=stream,
                  flush=True)
    return out


# ---------------------------------------------------------------------------------------------- one cell
def cell_state(folder: Path, cfg: RunCfg) -> tuple[str, str]:
    """What to do with a cell's folder: (run | resume | overwrite | skip | refuse, why)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return "refuse", f"'{folder}' is not a folder; move it away or choose another --out"
    if not folder.exists() or not any(folder.iterdir()):
        return "run", ""
    results = folder / rundir.RESULTS_NAME
    if rundir.is_run_folder(folder):
        try:
            r = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
        except (OSError, ValueError):
            r = {}
        if isinstance(r, dict) and r.get("complete") is True:
            if comparable(r.get("config") or {}) == comparable(to_dict(cfg)):  # the log settings may differ
                return "skip", "finished earlier"
            return "refuse", (f"'{folder}' holds a finished run of another config ({_config_diff(r.get('config'), cfg)}"
                              "); move it away to run this cell")
        if (folder / rundir.CHECKPOINT_NAME).is_file():
            return "resume", "stopped earlier"
        return "overwrite", "a clipcl run without a checkpoint: started again"
    names = sorted(p.name for p in folder.iterdir())
    return "refuse", (f"'{folder}' holds files clipcl did not write ({', '.join(names[:5])}"
                      f"{', ...' if len(names) > 5 else ''}); left alone: move them or choose another --out")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_diff(stored: Any, cfg: RunCfg) -> str:
    a, b = _flat(stored or {}), _flat(to_dict(cfg))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys[:3]) + \
        (", ..." if len(keys) > 3 else "")


def cell_command(config: str, overrides: tuple[str, ...], out: Path, action: str) -> list[str]:
    """The command line that runs (or resumes, or restarts) one cell."""
    flag = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(action, [])
    return [sys.executable, "-m", "clipcl.cli", "run", config, *overrides, "--out", str(out), "--quiet", *flag]


def duration(seconds: float) -> str:
    """'42s', '3m 20s', '1h 05m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _tail(path: Path, start: int, n: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-n:]


def _open_log(path: Path) -> int:
    """The cell's log, appended to (never through a planted link)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o666)


# ---------------------------------------------------------------------------------------------- the sweep
class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def run(config: str, grid_name: str, overrides: list[str], out: Path | str, jobs: int = 1,
        threads: int | None = None, command: Callable[..., list[str]] = cell_command,
        stream: TextIO | None = None, max_cells: int = MAX_CELLS) -> int:
    """Check every cell, then run the grid into out; returns the exit status (0, 1 if a cell failed, 128+signal).

    `command(config, overrides, folder, action)` builds each cell's command line (tests replace it). A grid of more
    than max_cells cells is refused before it is expanded (the CLI's --max-cells).
    """
    stream = stream or sys.stderr
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least 1 cell at a time")
    threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // jobs)
    if threads < 1:
        raise ConfigError(f"--threads-per-job {threads}: give each cell at least 1 thread")
    if max_cells < 1:
        raise ConfigError(f"--max-cells {max_cells}: allow at least 1 cell")
    grid = load_grid(grid_name)
    cells = expand(grid, overrides, max_cells)
    cfgs = configs(config, grid, cells, overrides, stream)
    config_arg = str(Path(config).expanduser().resolve()) if Path(config).expanduser().is_file() else config
    out = Path(out).expanduser()
    if str(out).strip() != "":
        owned.check_path_length(out, "--out")
    if str(out).strip() == "" or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out '{out}' is not a folder; give the folder the sweep's runs go into.")
    _check_folder(out)
    _writable(out)
    lock = owned.FolderLock(out, "sweep").acquire()  # one sweep at a time in a folder
    try:
        _check_folder(out, locked=True)  # again, under the lock
        if owned.kind_of(out) != "sweep":
            owned.create_marker(out, "sweep")
        owned.track(out)
        owned.add_files(out, [f"{LOG_DIR}/", f"{LOG_DIR}/*.log"])
        owned.real_dir(out / LOG_DIR, "cell logs")
        return _sweep(config_arg, grid, cells, cfgs, overrides, out, jobs, threads, command, stream)
    finally:
        owned.untrack(out)
        lock.release()


def _check_folder(out: Path, locked: bool = False) -> None:
    """Refuse a sweep folder in use by another process, or not empty without clipcl's sweep marker."""
    if not out.is_dir():
        return
    busy = None if locked else owned.holder(out)
    if busy:
        raise ConfigError(busy)
    if owned.contents(out) and owned.kind_of(out) != "sweep":
        raise ConfigError(f"--out '{out}' is not empty and holds no clipcl sweep (no {owned.MARKER_NAME} marker of a "
                          "sweep): clipcl sweep writes its cells, sweep.json and logs/ only into a new or empty folder, "
                          "or one of its own sweeps. Choose another --out.")
    record = out / SWEEP_FILE
    if record.is_symlink() or (record.exists() and not _is_sweep_record(record)):
        raise ConfigError(f"'{record}' exists and was not written by clipcl sweep; choose another --out.")


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create '{out}' ({e.strerror or e}); choose another --out.") from None


def _sweep(config_arg: str, grid: Grid, cells: list[Cell], cfgs: dict[str, RunCfg], overrides: list[str], out: Path,
           jobs: int, threads: int, command: Callable[..., list[str]], stream: TextIO) -> int:
    """Run the cells of a checked grid in the sweep's locked folder."""
    record = out / SWEEP_FILE

    status: dict[str, dict[str, Any]] = {}
    for cell in cells:
        action, why = cell_state(out / cell.name, cfgs[cell.name])
        status[cell.name] = {
            "folder": cell.name, "variant": cell.variant, "values": dict(cell.values), "overrides": list(cell.overrides),
            "action": action, "status": {"skip": "skipped", "refuse": "refused"}.get(action, "pending"),
            "note": why, "command": shlex.join(command(config_arg, cell.overrides, out / cell.name, action))
            if action in ("run", "resume", "overwrite") else None,
            "exit_code": None, "wall_s": None, "log": f"{LOG_DIR}/{cell.name}.log"}
    todo = [c for c in cells if status[c.name]["status"] == "pending"]
    counts = {a: sum(1 for s in status.values() if s["action"] == a) for a in ("skip", "resume", "refuse")}
    meta = {"clipcl_sweep": SWEEP_SCHEMA, "config": config_arg, "grid_file": grid.path,
            "grid": {"overrides": list(grid.overrides), "variants": {k: list(v) for k, v in grid.variants},
                     "grid": {k: list(v) for k, v in grid.axes}},
            "command_line_overrides": list(overrides), "jobs": jobs, "threads_per_job": threads,
            "started": _now(), "finished": None}
    lock = threading.Lock()

    def save() -> None:
        write_text(record, json.dumps({**meta, "cells": list(status.values())}, indent=1) + "\n")

    save()
    print(f"clipcl sweep: {len(cells)} cells in '{out}': {counts['skip']} finished earlier (skipped), "
          f"{counts['resume']} to resume, {len(todo) - counts['resume']} to start, {counts['refuse']} refused; "
          f"{jobs} at a time, {threads} thread(s) each", file=stream, flush=True)
    for name, s in status.items():
        if s["action"] == "refuse":
            print(f"clipcl sweep: cell {name} refused: {s['note']}", file=stream, flush=True)

    done = [len(cells) - len(todo)]
    walls: list[float] = []
    running: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}

    def finish(cell: Cell, **changes: Any) -> None:
        """Record how a cell ended and print its progress line (under the lock)."""
        s = status[cell.name]
        s.update(changes)
        done[0] += 1
        _progress(stream, done[0], len(cells), cell.name, s, walls, len(todo) - _ended(status), jobs)
        save()

    def one(cell: Cell) -> None:
        s, folder, log = status[cell.name], out / cell.name, out / LOG_DIR / f"{cell.name}.log"
        with lock:
            if stopping.is_set():
                return
        start = time.monotonic()
        try:
            if (out / LOG_DIR).is_symlink() or folder.is_symlink():  # planted since the sweep started
                raise OSError(errno.ELOOP, "a symbolic link was planted there; clipcl does not write through it")
            owned.add_files(out, [f"{cell.name}/"])
            fd = _open_log(log)
            os.write(fd, f"== {_now()} clipcl sweep: {s['command']}\n".encode())
            offset = os.lseek(fd, 0, os.SEEK_END)  # the tail shown on failure is this attempt's output only
        except OSError as e:
            with lock:
                finish(cell, status="failed", note=f"cannot write its log '{log}' ({e.strerror or e})")
            return
        try:
            with lock:
                if stopping.is_set():
                    return
                proc = subprocess.Popen(command(config_arg, cell.overrides, folder, s["action"]), env=env,
                                        stdin=subprocess.DEVNULL, stdout=fd, stderr=fd)
                running[cell.name] = proc
                s["status"] = "running"
                save()
            code = proc.wait()
        finally:
            os.close(fd)
        wall = round(time.monotonic() - start, 1)
        with lock:
            running.pop(cell.name, None)
            if code == 0:
                walls.append(wall)
                finish(cell, exit_code=code, wall_s=wall, status="resumed" if s["action"] == "resume" else "finished")
            else:
                finish(cell, exit_code=code, wall_s=wall, status="interrupted" if stopping.is_set() else "failed",
                       note="\n".join(_tail(log, offset)))

    stopped = 0
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers belong to the main thread
    handlers = {sig: signal.getsignal(sig) for sig in stop_signals()} if in_main else {}
    for sig in handlers:  # SIGINT raises KeyboardInterrupt already; a kill or a closed terminal stops alike
        if sig != signal.SIGINT:
            signal.signal(sig, _raise_stop)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="clipcl-sweep")
    try:
        futures = [pool.submit(one, cell) for cell in todo]
        try:
            wait(futures)
        except (KeyboardInterrupt, _Stop) as e:
            stopped = getattr(e, "signum", signal.SIGINT)
            for sig in handlers:  # a second Ctrl-C must not leave the cells without the sweep waiting for them
                signal.signal(sig, signal.SIG_IGN)
            with lock:
                stopping.set()
                procs = list(running.values())
            print(f"\nclipcl sweep: stopping {len(procs)} running cell(s); each writes a checkpoint first ...",
                  file=stream, flush=True)
            for proc in procs:  # a Ctrl-C or hang-up at a terminal reached them already; a kill of the sweep alone did not
                try:
                    proc.send_signal(stopped)
                except OSError:
                    pass
            wait(futures)
        for f in futures:
            f.result()  # an unexpected error in a worker is a bug: let it show
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for sig, handler in handlers.items():
            if handler is not None:  # None: installed from C, cannot be put back from Python
                signal.signal(sig, handler)
        with lock:
            for s in status.values():
                if s["status"] in ("pending", "running"):
                    s["status"] = "not started" if s["status"] == "pending" else "interrupted"
            meta["finished"] = _now()
            save()
    return _summary(stream, out, status, stopped)


def _ended(status: dict[str, dict[str, Any]]) -> int:
    """How many of the cells that were to run have ended (in any way)."""
    return sum(1 for s in status.values() if s["action"] in ("run", "resume", "overwrite")
               and s["status"] in ("finished", "resumed", "failed", "interrupted"))


def _progress(stream: TextIO, done: int, total: int, name: str, s: dict, walls: list[float], left: int,
              jobs: int) -> None:
    wall = duration(s["wall_s"] or 0)
    what = {"finished": "done", "resumed": "resumed, done"}.get(s["status"])
    if what is None:
        what = f"{s['status'].upper()}" + (f" (exit {s['exit_code']})" if s["exit_code"] is not None else "")
    eta = duration(sum(walls) / len(walls) * left / jobs) if walls else "?"
    eta = "0s" if left == 0 else eta
    print(f"[{done}/{total}] {name} {what} ({wall}) — ETA {eta}", file=stream, flush=True)
    if s["status"] == "failed" and s["note"]:
        print("    " + s["note"].replace("\n", "\n    "), file=stream, flush=True)


def _summary(stream: TextIO, out: Path, status: dict[str, dict[str, Any]], stopped: int) -> int:
    bad = {n: s for n, s in status.items() if s["status"] in ("failed", "refused")}
    n = {k: sum(1 for s in status.values() if s["status"] == k)
         for k in ("finished", "resumed", "skipped", "interrupted", "not started")}
    print(f"clipcl sweep: {n['finished'] + n['resumed']} cell(s) run ({n['resumed']} resumed), {n['skipped']} "
          f"finished earlier, {len(bad)} failed" + (f", {n['interrupted']} interrupted, {n['not started']} not "
                                                     "started" if stopped else "") + f"; record in {out / SWEEP_FILE}",
          file=stream, flush=True)
    for name, s in bad.items():
        why = f"exit {s['exit_code']}, log {out / s['log']}" if s["status"] == "failed" else s["note"]
        print(f"  failed: {name} ({why})", file=stream, flush=True)
    if stopped:
        print("clipcl sweep: stopped; run the same command again to resume the interrupted cells.", file=stream,
              flush=True)
        return 128 + stopped
    print(f"Report: clipcl report {shlex.quote(str(out))}", flush=True)
    return 1 if bad else 0


def _is_sweep_record(path: Path) -> bool:
    try:
        return "clipcl_sweep" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
