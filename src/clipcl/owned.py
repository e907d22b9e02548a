"""What clipcl owns on disk: a marker with a manifest in every output folder, and a lock per folder.

- Marker (`.clipcl.json` in the folder): written by clipcl before anything else goes into a folder it creates
  output in (a run, the demo, a sweep, a report). It says which kind of output the folder holds and lists
  every file and sub-folder that clipcl wrote there (`files`), each added *before* it is first written, so
  that a process killed in the middle still leaves its files listed. A folder is recognised as clipcl's by
  this marker alone, never by common names (summary.md, results.json, log.csv copied by hand); --overwrite
  removes only the entries the marker lists.
- Lock (`.clipcl.lock`): an exclusive `flock` on a file holding the holder's pid, host, start time and
  command. A second process on the same folder is refused with who holds it; a lock left by a process that
  died is released by the kernel, so it is taken over safely (the file's content only describes the holder).
- Writes are tracked: while a folder is `track`ed, files.atomic_write adds each file it writes there to the
  folder's marker first (see files.py). Sub-folders clipcl writes into are made with `real_dir`, which
  refuses a planted symbolic link.

Pure Python (json, fcntl, os): the command line uses it before torch is imported.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from .config import ConfigError

MARKER_NAME = ".clipcl.json"
LOCK_NAME = ".clipcl.lock"
META_NAMES = (MARKER_NAME, LOCK_NAME)  # clipcl's own bookkeeping: never counted as content of a folder
KINDS = ("run", "demo", "sweep", "report")
MARKER_SCHEMA = 1
_MARKER_LOCK = threading.Lock()


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------- marker
def read_marker(folder: Path | str) -> dict | None:
    """The marker of folder (a dict with kind and files) or None: absent, a link, unreadable or not clipcl's."""
    path = Path(folder) / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 4 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(data, dict) or data.get("written_by") != "clipcl" or data.get("kind") not in KINDS
            or not isinstance(data.get("files"), list) or not all(_entry_ok(f) for f in data["files"])):
        return None
    return data


def _entry_ok(entry: object) -> bool:
    """An entry of the kind clipcl lists: 'name', 'folder/', 'folder/name' or 'folder/pattern*', never absolute,
    '..' or deeper (a hand-edited marker must not point --overwrite outside its folder)."""
    if not isinstance(entry, str) or not entry or entry.startswith("/") or "\\" in entry or "\x00" in entry:
        return False
    parts = entry[:-1].split("/") if entry.endswith("/") else entry.split("/")
    return len(parts) <= 2 and all(p not in ("", ".", "..") for p in parts) and not (entry.endswith("/") and len(parts) > 1)


def kind_of(folder: Path | str) -> str | None:
    """'run', 'demo', 'sweep' or 'report' when folder holds clipcl's output of that kind, else None."""
    marker = read_marker(folder)
    return marker["kind"] if marker else None


def listed(folder: Path | str) -> set[str]:
    """The names (first path component) the folder's marker lists; empty without a marker."""
    marker = read_marker(folder)
    return {f.split("/", 1)[0] for f in marker["files"]} if marker else set()


def contents(folder: Path | str) -> list[str]:
    """The entries of folder, less clipcl's marker and lock."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in META_NAMES)


def _write_marker(folder: Path, data: dict) -> None:
    from .files import atomic_write

    text = json.dumps(data, indent=1) + "\n"
    atomic_write(folder / MARKER_NAME, lambda f: f.write(text.encode()), fsync=False, track=False)


def create_marker(folder: Path | str, kind: str, files: Iterable[str] = ()) -> None:
    """Write a fresh marker of `kind` listing `files` (the folder must exist)."""
    folder = Path(folder)
    _write_marker(folder, {"written_by": "clipcl", "schema": MARKER_SCHEMA, "kind": kind, "clipcl": _version(),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": sorted(set(files))})


def add_files(folder: Path | str, names: Iterable[str]) -> None:
    """List names in folder's marker (written again only when something is new)."""
    folder = Path(folder)
    with _MARKER_LOCK:  # the threads of a sweep add their cells at once
        marker = read_marker(folder)
        if marker is None:
            return
        new = set(names) - set(marker["files"])
        if new:
            marker["files"] = sorted(set(marker["files"]) | new)
            _write_marker(folder, marker)


def remove_listed(folder: Path | str, keep: Iterable[str] = ()) -> list[str]:
    """Remove what the marker lists (files and links, never followed; listed sub-folders only when they are
    real folders whose own contents are all listed), and the temporary files of listed names. Returns the
    names of the entries kept (not written by clipcl). The marker is then rewritten with no files."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return contents(folder)
    keep = set(keep)
    entries = set(marker["files"])
    for entry in sorted(entries, key=lambda e: (-e.count("/"), e.endswith("/"), e)):  # files before their folder
        if entry.split("/", 1)[0] in keep:
            continue
        p = folder / entry
        first = folder / entry.split("/", 1)[0]
        if "/" in entry.rstrip("/") and (first.is_symlink() or not first.is_dir()):
            continue  # a listed sub-folder replaced by a link (or a file): nothing is removed through it
        if "*" in p.name:  # files named by a pattern (TensorBoard's event files), in a real sub-folder only
            if p.parent.is_dir() and not p.parent.is_symlink() and p.parent.resolve().parent == folder.resolve():
                for q in p.parent.glob(p.name):
                    if q.is_symlink() or q.is_file():
                        q.unlink()
            continue
        if entry.endswith("/"):
            if p.is_dir() and not p.is_symlink():
                try:
                    p.rmdir()  # only when empty: what is left in it was not written by clipcl
                except OSError:
                    pass
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
        for stale in p.parent.glob(f".{p.name}.tmp-*") if p.parent.is_dir() and not p.parent.is_symlink() else ():
            if stale.is_symlink() or stale.is_file():
                stale.unlink()
    create_marker(folder, marker["kind"], [e for e in entries if e.split("/", 1)[0] in keep])
    return contents(folder)


# --------------------------------------------------------------------------------------------- tracking
_TRACKED: dict[str, Path] = {}  # resolved folder -> the folder as given, for every folder whose writes are listed


def track(folder: Path | str) -> None:
    """From now on, files.atomic_write lists every file it writes in folder (or below it) in folder's marker."""
    folder = Path(folder)
    _TRACKED[str(folder.resolve())] = folder


def untrack(folder: Path | str) -> None:
    _TRACKED.pop(str(Path(folder).resolve()), None)


def note_write(path: Path) -> None:
    """Called by atomic_write before it writes path: list it in the marker of the tracked folder holding it."""
    if not _TRACKED:
        return
    parent = Path(path).parent.resolve()
    for anc in (parent, *parent.parents):
        folder = _TRACKED.get(str(anc))
        if folder is not None:
            rel = Path(path).parent.resolve().relative_to(anc) / Path(path).name
            parts = rel.parts
            add_files(folder, [*(("/".join(parts[:i]) + "/") for i in range(1, len(parts))), "/".join(parts)])
            return


def real_dir(path: Path | str, what: str = "folder") -> Path:
    """Make (or keep) a real folder at path, refusing a symbolic link planted there (OutputError)."""
    from .files import OutputError

    path = Path(path)
    if path.is_symlink():
        raise OutputError(errno.ELOOP, f"'{path}' is a symbolic link: clipcl writes its {what} only into a folder "
                                       "it makes itself. Remove the link (or move it away) and run again.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from .files import _describe

        raise OutputError(e.errno or errno.EIO, _describe(path, e)) from None
    if path.is_symlink() or not path.is_dir():
        raise OutputError(errno.ENOTDIR, f"'{path}' is not a folder: clipcl writes its {what} into a folder "
                                         "it makes itself. Move it away and run again.")
    return path


# --------------------------------------------------------------------------------------------- lock
def _describe_holder(info: dict | None) -> str:
    if not info:
        return "another clipcl process"
    when = info.get("since", "")
    cmd = info.get("command", "")
    return (f"clipcl (pid {info.get('pid')} on {info.get('host')}{', since ' + when if when else ''}"
            f"{', ' + repr(cmd) if cmd else ''})")


def _read_info(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "null")
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _try_lock(fd: int) -> bool:
    """An exclusive lock without waiting, tried a few times over 0.2 s: another process's `holder` probe holds
    a shared lock for an instant, which must not read as a folder in use."""
    import fcntl

    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            time.sleep(0.05)
    return False


class FolderLock:
    """An exclusive lock on a folder for the life of a run, sweep, demo or report (see the module doc)."""

    def __init__(self, folder: Path | str, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Take the lock (the folder must exist); ConfigError naming the holder when another process has it."""
        if self._fd is not None:
            return self
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ConfigError(f"'{self.path}' is a symbolic link: clipcl's lock file is never a link. "
                                      "Remove it and run again.") from None
                from .files import OutputError, _describe

                raise OutputError(e.errno or errno.EIO, _describe(self.path, e)) from None
            if not _try_lock(fd):
                info = _read_info(fd)
                os.close(fd)
                raise ConfigError(busy_message(self.folder, info)) from None
            try:  # the file we locked is still the one at the path (a releasing holder may have removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"written_by": "clipcl", "pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}
            try:  # who holds it: information only (a full disk leaves it empty, the lock holds all the same)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(info) + "\n").encode())
            except OSError:
                pass
            self._fd = fd
            return self
        raise ConfigError(busy_message(self.folder, None))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # removed while still locked: a waiting process re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def busy_message(folder: Path, info: dict | None) -> str:
    return (f"'{folder}' is in use by {_describe_holder(info)}: two processes must not write one folder. Wait "
            "for it to finish (or stop it), or choose another --out.")


def holder(folder: Path | str) -> str | None:
    """Who holds folder's lock now (a description), or None; changes nothing on disk."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return busy_message(Path(folder), _read_info(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- single files
def _png_software(path: Path) -> str | None:
    """The tEXt 'Software' value of a PNG file, read as bytes (None when absent or not a PNG)."""
    import struct

    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            for _ in range(64):
                head = f.read(8)
                if len(head) < 8:
                    return None
                size, kind = struct.unpack(">I4s", head)
                if kind == b"IDAT" or size > 1 << 20:
                    return None
                body = f.read(size)
                f.read(4)
                if kind == b"tEXt" and body.startswith(b"Software\x00"):
                    return body.split(b"\x00", 1)[1].decode("latin-1")
    except OSError:
        return None
    return None


def written_by_clipcl(path: Path | str) -> bool:
    """Whether an existing single output file (a --plot PNG, a --json file) carries clipcl's mark."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    if (_png_software(path) or "").startswith("clipcl"):
        return True
    try:
        if path.stat().st_size > 16 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("written_by", "")).startswith("clipcl")


def check_output_file(path: Path | str, flag: str) -> Path:
    """Refuse (ConfigError) an output file path that clipcl may not write: a folder, a missing folder, a link,
    or an existing file that clipcl did not write (clipcl never replaces a file of the user's)."""
    path = Path(path).expanduser()
    if str(path).strip() == "":
        raise ConfigError(f"{flag} is empty: give a file name.")
    check_path_length(path, flag)
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"{flag} '{path}' is a folder; give a file name in it.")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} '{path}' is in a folder that does not exist ('{path.parent}'); create the folder "
                          "or choose another path.")
    if path.is_symlink():
        raise ConfigError(f"{flag} '{path}' is a symbolic link; clipcl does not replace it. Give the path of a new "
                          "file.")
    if path.exists() and not written_by_clipcl(path):
        raise ConfigError(f"{flag} '{path}' exists and was not written by clipcl; clipcl never replaces a file of "
                          "yours. Give the path of a new file, or remove that one first.")
    return path


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except (OSError, ValueError):  # too long a name, or a missing folder: not there
        return False


def check_path_length(path: Path | str, flag: str) -> None:
    """Refuse a path whose names or total length the file system cannot hold (before anything is created)."""
    path = Path(path).expanduser()
    absolute = Path(os.path.abspath(path))
    existing = next((p for p in (absolute, *absolute.parents) if _exists(p)), Path(absolute.anchor))
    try:
        name_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
        path_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    room = 64  # the longest name clipcl writes below it (temporary files included)
    shown = str(path) if len(str(path)) <= 80 else str(path)[:60] + "..." + str(path)[-15:]
    for part in absolute.parts:
        if len(part.encode()) > name_max:
            raise ConfigError(f"{flag} '{shown}': the name '{part[:40]}...' is {len(part.encode())} bytes long, and "
                              f"this file system allows {name_max}. Choose a shorter name.")
    if len(str(absolute).encode()) + room > path_max:
        raise ConfigError(f"{flag} '{shown}' is {len(str(absolute).encode())} bytes long as an absolute path; with "
                          f"the files written in it that exceeds this system's limit of {path_max}. Choose a "
                          "shorter path.")


__all__ = ["MARKER_NAME", "LOCK_NAME", "META_NAMES", "read_marker", "kind_of", "listed", "contents",
           "create_marker", "add_files", "remove_listed", "track", "untrack", "note_write", "real_dir",
           "FolderLock", "holder", "busy_message", "written_by_clipcl", "check_output_file", "check_path_length"]
