"""Writing output files so that nothing is half-written, followed through a planted link, or lost.

Every file clipcl writes goes through `atomic_write`: the bytes go to a new temporary file in the same
folder (created exclusively, so an existing file or link of that name is never opened), are flushed to
disk, and the temporary file is renamed onto the target. A rename replaces a symlink at the target instead
of writing through it, and a reader sees either the old file or the new one, never a mix.

This module imports nothing heavy: the command line uses it before torch is loaded.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are private (0600)


class OutputError(OSError):
    """A file of the run could not be written; the message names it and says what to do."""


def _describe(path: Path, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        return f"no space left on the device holding '{path}'"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write '{path}'"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot write '{path}' ({e.strerror})"
    return f"cannot write '{path}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


class _Recorded:
    """A binary file that remembers the OSError of a failed write: torch.save turns it into an opaque
    RuntimeError ('unexpected pos ...'), which would hide a full disk from the user."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], fsync: bool = True, track: bool = True) -> None:
    """Call write(file) on a fresh temporary file next to `path`, flush (and fsync) it, rename it onto `path`.

    On any failure the temporary file is removed, `path` keeps its previous content, and OutputError
    (an OSError) names the file and the reason (no space left, no permission, ...). When path lies in a folder
    clipcl tracks (owned.track: a run's, the demo's, a sweep's or a report's folder), it is listed in that
    folder's marker before the first byte is written (track=False: the marker itself).
    """
    path = Path(path)
    if track:
        from . import owned

        try:
            owned.note_write(path)
        except OSError as e:
            raise OutputError(e.errno or errno.EIO, _describe(path.parent / owned.MARKER_NAME, e)) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise OutputError(e.errno, _describe(path, e)) from None
    rec = None
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            rec = _Recorded(f)
            write(rec)  # type: ignore[arg-type]
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            cause = rec.error if rec is not None and rec.error is not None else e
            raise OutputError(getattr(cause, "errno", None) or errno.EIO, _describe(path, cause)) from None
        raise
    if fsync:
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # some file systems cannot fsync a folder; the rename itself is done
            pass


def write_text(path: Path | str, text: str) -> None:
    """A text file, written atomically."""
    atomic_write(path, lambda f: f.write(text.encode()), fsync=False)


def save_figure(fig, path: Path | str, dpi: int = 100) -> None:
    """A matplotlib figure as PNG, written atomically, marked as clipcl's (its 'Software' text chunk), so that
    a later --plot of the same path may replace it and never a PNG of the user's."""
    from . import __version__

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi,
                                             metadata={"Software": f"clipcl {__version__}"}), fsync=False)


def clear_stale_temporaries(folder: Path, names) -> None:
    """Remove the temporary files that atomic_write made for these file names in folder and that a killed
    writer left behind (nothing else: a user's own dot-files are never touched)."""
    for name in names:
        for stale in Path(folder).glob(f".{name}.tmp-*"):
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)
