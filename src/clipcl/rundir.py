"""The output folder of a run: what may be written into, and what --overwrite may remove.

Rules (the same for the command line and the Python API):
- a run starts in an empty or new folder; a non-empty one needs `resume` (continue the run in it) or
  `overwrite` (replace it). A folder that holds only what a run wrote before its first checkpoint (it was
  killed, or the disk was full) is that run's, and a new run restarts in it without `overwrite`;
- a folder is clipcl's when it holds clipcl's marker (`.clipcl.json`, see owned.py), which lists every file
  the run wrote; `overwrite` replaces only such a folder, never "", ".", "/", the home folder, the current
  folder or one of its parents, and it removes only the files the marker lists, never a file of the user's
  (a file of the user's with a name the run writes is refused: it would be replaced);
- one process at a time: the folder is locked (owned.FolderLock) from `claim` to the end of the run;
- nothing is removed before every check that can fail has passed: the caller checks the folder
  (`check`), builds everything (config, data, model), then `claim`s the folder, which locks it, checks it
  again, tests that it is writable and only then removes the old run's files.

Pure Python: the command line checks the folder before torch is imported.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import owned
from .config import ConfigError

RESULTS_NAME = "results.json"
CHECKPOINT_NAME = "checkpoint.pt"
# Every file a run writes into its folder (checkpoint.py, report.py and logs.py write them).
RUN_FILES = (RESULTS_NAME, CHECKPOINT_NAME, "accuracy_matrix.csv", "accuracy.png", "accuracy_matrix.png",
             "class_weights.png", "log.csv")
TENSORBOARD_DIR = "tensorboard"  # log.tensorboard: event files (events.out.tfevents.*) in this sub-folder
# What the demo writes beside its runs (one sub-folder per method).
DEMO_FILES = ("summary.md", "comparison.png")


def is_run_folder(folder: Path) -> bool:
    """Whether folder holds a run written by clipcl (finished, stopped or interrupted): its marker says so."""
    return owned.kind_of(folder) == "run"


def is_demo_folder(folder: Path) -> bool:
    """Whether folder holds the demo's output (its marker says so)."""
    return owned.kind_of(folder) == "demo"


def restartable(folder: Path) -> bool:
    """Whether folder holds only what a run wrote before its first checkpoint (killed, or out of disk space):
    that run's folder, which a new run may start again in without --overwrite."""
    folder = Path(folder)
    if not is_run_folder(folder) or (folder / CHECKPOINT_NAME).exists() or (folder / RESULTS_NAME).exists():
        return False
    mine = owned.listed(folder)
    return all(name in mine or name.startswith(".") and name.split(".tmp-")[0].lstrip(".") in mine
               for name in owned.contents(folder))


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


def _writes(demo: bool) -> tuple[str, ...]:
    return DEMO_FILES if demo else (*RUN_FILES, TENSORBOARD_DIR)


def _conflicts(out: Path, demo: bool) -> list[str]:
    """Entries of out that clipcl did not write but whose names it would write (and so replace)."""
    mine = owned.listed(out)
    return [name for name in _writes(demo) if (out / name).exists() or (out / name).is_symlink()
            if name not in mine]


def check(out: Path | str, overwrite: bool = False, resume: bool = False, demo: bool = False,
          methods: tuple[str, ...] = (), locked: bool = False) -> Path:
    """Check that a run may write into out (no change on disk); returns it as a Path.

    ConfigError names the folder and what to do: an empty or too long name, a file where the folder should
    be, a folder in use by another process, a non-empty folder without resume/overwrite, overwrite of a
    folder that is not clipcl's or of a protected folder, a file of the user's that the run would replace,
    resume without a checkpoint or of a folder without clipcl's marker, resume and overwrite together. For
    the demo, each method's sub-folder is checked as a run folder too.
    """
    if str(out).strip() == "":
        raise ConfigError("--out is empty: give the folder the run should be written to (a new or empty "
                          "folder, e.g. --out runs/my-run).")
    out = Path(out).expanduser()
    if resume and overwrite:
        raise ConfigError(f"--resume and --overwrite together: --resume continues the run in '{out}', "
                          "--overwrite replaces it. Give one of them.")
    owned.check_path_length(out, "--out")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"is under '{parent}', which is a file"
            raise ConfigError(f"output folder '{out}' {what}. Choose another --out.")
    if out.is_dir() and not locked:  # locked: this process holds the lock (claim checks again under it)
        busy = owned.holder(out)
        if busy:
            raise ConfigError(busy)
    what = "demo output" if demo else "run"
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            if restartable(out):
                raise ConfigError(f"nothing to resume in '{out}': the run stopped before its first checkpoint. "
                                  f"Start it again with 'clipcl run CONFIG --out {out}' (it restarts in that "
                                  "folder).")
            raise ConfigError(f"nothing to resume in '{out}' ({CHECKPOINT_NAME} missing). Start the run "
                              "without --resume.")
        if not is_run_folder(out):
            raise ConfigError(f"'{out}' holds a {CHECKPOINT_NAME} but no clipcl marker ({owned.MARKER_NAME}): it "
                              "was not written by this clipcl, or was copied without its marker, so clipcl will not "
                              "write into it. Resume it with the clipcl that wrote it, or start a new run.")
        return out
    if not out.exists() or not owned.contents(out):
        return out
    if not demo and restartable(out):
        return out
    for name in methods:
        sub = out / name
        if sub.is_symlink():
            raise ConfigError(f"'{sub}' is a symbolic link: the demo writes each method's run into a folder it "
                              "makes itself. Remove the link, or choose another --out.")
        if sub.exists():
            check(sub, overwrite)
    ours = is_demo_folder(out) if demo else is_run_folder(out)
    if not overwrite:
        if ours and demo:
            raise ConfigError(f"output folder '{out}' is not empty. Use --overwrite to replace the demo output "
                              "in it, or choose another --out.")
        if ours:
            hint = "--resume to continue the run in it, " if (out / CHECKPOINT_NAME).is_file() else ""
            raise ConfigError(f"output folder '{out}' is not empty. Use {hint}--overwrite to replace the run in "
                              "it, or choose another --out.")
        raise ConfigError(f"output folder '{out}' is not empty and holds no clipcl {what}: choose another --out "
                          "(clipcl writes into new or empty folders, and never replaces files it did not write).")
    why = _protected(out)
    if why:
        raise ConfigError(f"--overwrite of '{out}' refused: it is {why}. --overwrite replaces a clipcl run's "
                          "folder only: give the run's own folder, e.g. --out runs/my-run.")
    if not ours:
        raise ConfigError(f"--overwrite of '{out}' refused: it is not empty and holds no clipcl {what} (no "
                          f"{owned.MARKER_NAME} marker of a {what}); --overwrite only replaces clipcl's own output. "
                          "Choose another --out.")
    clash = _conflicts(out, demo)
    if clash:
        raise ConfigError(f"--overwrite of '{out}' refused: it holds {', '.join(repr(c) for c in clash)}, which "
                          f"clipcl did not write and the {what} would replace. Move {'them' if len(clash) > 1 else 'it'}"
                          " away, or choose another --out.")
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


@dataclass
class Claim:
    """A folder claimed for one run (or the demo): locked and tracked until `release`."""

    folder: Path
    kept: list[str] = field(default_factory=list)  # entries clipcl did not write, left in place
    restarted: bool = False  # a run that had stopped before its first checkpoint, started again
    lock: owned.FolderLock | None = None

    def release(self) -> None:
        owned.untrack(self.folder)
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(out: Path | str, overwrite: bool = False, resume: bool = False, demo: bool = False,
          methods: tuple[str, ...] = ()) -> Claim:
    """Lock out, check it again, make sure it is writable, and (overwrite, or a run that stopped before its
    first checkpoint) remove the files the old run's marker lists; then track the folder's writes.

    Call it after everything that can fail has been built. Returns the Claim: `kept` names the entries of the
    folder that clipcl did not write (to tell the user); `release()` unlocks the folder at the end. The demo's
    method sub-folders are claimed by their own runs.
    """
    out = check(out, overwrite, resume, demo, methods)
    _writable(out)
    lock = owned.FolderLock(out, "demo" if demo else "run").acquire()
    try:
        out = check(out, overwrite, resume, demo, methods, locked=True)  # again, now that no other process can change it
        result = Claim(out, lock=lock)
        if not resume:
            kind = "demo" if demo else "run"
            if owned.contents(out) and owned.kind_of(out) == kind:
                result.restarted = not overwrite
                result.kept = [n for n in owned.remove_listed(out, keep=methods) if n not in methods]
            else:
                owned.create_marker(out, kind)
        owned.track(out)
        return result
    except BaseException:
        lock.release()
        raise
