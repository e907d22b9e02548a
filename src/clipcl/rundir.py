"""The output folder of a run: what may be written into, and what --overwrite may remove.

Rules (the same for the command line and the Python API):
- a run starts in an empty or new folder; a non-empty one needs `resume` (continue the run in it) or
  `overwrite` (replace it);
- `overwrite` replaces only a folder that holds a clipcl run (a results.json or checkpoint.pt written by
  clipcl; for the demo, a folder of such runs), never "", ".", "/", the home folder, the current folder
  or one of its parents; and it removes only the files clipcl writes, never a file of the user's;
- nothing is removed before every check that can fail has passed: the caller checks the folder
  (`check`), builds everything (config, data, model), then `claim`s the folder, which tests that it is
  writable and only then removes the old run's files.

Pure Python: the command line checks the folder before torch is imported.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

from .config import ConfigError

RESULTS_NAME = "results.json"
CHECKPOINT_NAME = "checkpoint.pt"
# Every file a run writes into its folder (checkpoint.py and report.py write them).
RUN_FILES = (RESULTS_NAME, CHECKPOINT_NAME, "accuracy_matrix.csv", "accuracy.png", "accuracy_matrix.png",
             "class_weights.png", "log.csv")
TENSORBOARD_DIR = "tensorboard"  # log.tensorboard: event files (events.out.tfevents.*) in this sub-folder
# What the demo writes beside its runs (one sub-folder per method).
DEMO_FILES = ("summary.md", "comparison.png")


def _is_clipcl_results(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "config" in data and "clipcl" in (data.get("versions") or {})


def _is_clipcl_checkpoint(path: Path) -> bool:
    """A torch zip whose pickle mentions format_version: read as bytes, never unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and b"format_version" in z.read(name)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def is_run_folder(folder: Path) -> bool:
    """Whether folder holds a run written by clipcl (finished, stopped or interrupted)."""
    folder = Path(folder)
    return (_is_clipcl_results(folder / RESULTS_NAME) or _is_clipcl_checkpoint(folder / CHECKPOINT_NAME))


def is_demo_folder(folder: Path) -> bool:
    """Whether folder holds the demo's output: a summary.md or a sub-folder that is a clipcl run."""
    folder = Path(folder)
    return (folder / "summary.md").is_file() or any(
        p.is_dir() and not p.is_symlink() and is_run_folder(p) for p in folder.iterdir())


def _protected(out: Path) -> str | None:
    """Why out may never be replaced wholesale, or None."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "the root of the file system"
    if resolved == Path.home().resolve():
        return "your home folder"
    if resolved == cwd:
        return "the current folder"
    if resolved in cwd.parents:
        return "a parent of the current folder"
    return None


def check(out: Path | str, overwrite: bool = False, resume: bool = False, demo: bool = False,
          methods: tuple[str, ...] = ()) -> Path:
    """Check that a run may write into out (no change on disk); returns it as a Path.

    ConfigError names the folder and what to do: an empty name, a file where the folder should be, a
    non-empty folder without resume/overwrite, overwrite of a folder that is not a clipcl run or of a
    protected folder, resume without a checkpoint, resume and overwrite together. For the demo, each
    method's sub-folder is checked as a run folder too.
    """
    if str(out).strip() == "":
        raise ConfigError("--out is empty: give the folder the run should be written to (a new or empty "
                          "folder, e.g. --out runs/my-run).")
    out = Path(out).expanduser()
    if resume and overwrite:
        raise ConfigError(f"--resume and --overwrite together: --resume continues the run in '{out}', "
                          "--overwrite replaces it. Give one of them.")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"is under '{parent}', which is a file"
            raise ConfigError(f"output folder '{out}' {what}. Choose another --out.")
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise ConfigError(f"nothing to resume in '{out}' ({CHECKPOINT_NAME} missing). Start the run "
                              "without --resume.")
        return out
    if not out.exists() or not any(out.iterdir()):
        return out
    for name in methods:
        if (out / name).exists():
            check(out / name, overwrite)
    if not overwrite:
        if demo and is_demo_folder(out):
            raise ConfigError(f"output folder '{out}' is not empty. Use --overwrite to replace the demo output "
                              "in it, or choose another --out.")
        if not demo and is_run_folder(out):
            hint = "--resume to continue the run in it, " if (out / CHECKPOINT_NAME).is_file() else ""
            raise ConfigError(f"output folder '{out}' is not empty. Use {hint}--overwrite to replace the run in "
                              "it, or choose another --out.")
        raise ConfigError(f"output folder '{out}' is not empty and holds no clipcl "
                          f"{'demo output' if demo else 'run'}: choose another --out (clipcl writes runs into "
                          "new or empty folders, and never replaces files it did not write).")
    why = _protected(out)
    if why:
        raise ConfigError(f"--overwrite of '{out}' refused: it is {why}. --overwrite replaces a clipcl run's "
                          "folder only: give the run's own folder, e.g. --out runs/my-run.")
    if not (is_demo_folder(out) if demo else is_run_folder(out)):
        what = "demo output (summary.md or run folders)" if demo else \
            f"run ({RESULTS_NAME} or {CHECKPOINT_NAME} written by clipcl)"
        raise ConfigError(f"--overwrite of '{out}' refused: it is not empty and holds no clipcl {what}; "
                          "--overwrite only replaces clipcl's own output. Choose another --out.")
    return out


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clipcl-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write into output folder '{out}' ({e.strerror or e}). Choose another "
                          "--out, or fix its permissions.") from None


def _remove_run_files(folder: Path) -> list[str]:
    """Remove the files a run writes (links included, never followed); return the names of files kept."""
    for name in RUN_FILES:
        p = folder / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        for stale in folder.glob(f".{name}.tmp-*"):
            if stale.is_symlink() or stale.is_file():
                stale.unlink()
    events = folder / TENSORBOARD_DIR
    if events.is_dir() and not events.is_symlink():
        for p in events.glob("events.out.tfevents.*"):
            if p.is_symlink() or p.is_file():
                p.unlink()
        if not any(events.iterdir()):
            events.rmdir()
    return sorted(p.name for p in folder.iterdir())


def claim(out: Path | str, overwrite: bool = False, resume: bool = False, demo: bool = False,
          methods: tuple[str, ...] = ()) -> list[str]:
    """Check out again, make sure it is writable, and with overwrite remove the old run's files.

    Call it after everything that can fail has been built. Returns the names of the files in the folder
    that clipcl did not write and kept (to tell the user). The demo's method sub-folders are claimed by
    their own runs.
    """
    out = check(out, overwrite, resume, demo, methods)
    _writable(out)
    if resume or not overwrite:
        return []
    if not demo:
        return _remove_run_files(out)
    for name in DEMO_FILES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
    return sorted(p.name for p in out.iterdir() if p.name not in methods)
