"""Atomic checkpoints: write to a temporary file, fsync, rename. The previous checkpoint stays intact
until the new one is complete, so a crash mid-write never loses the last good state."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file next to `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # partial files of writers that were killed
        stale.unlink(missing_ok=True)


def save(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically."""
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def load(path: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint, checking that it is whole, of this format, and (if given) of the same config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}': nothing to resume. Start the run without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}' is unreadable (truncated or corrupt: {e}). "
                              "Restart the run from scratch with --overwrite (this deletes the folder).") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"'{path}' is not a clipcl checkpoint.")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {state['format_version']}, this clipcl "
                              f"reads version {FORMAT_VERSION}. Resume it with the clipcl that wrote it.")
    if config is not None and state.get("config") != config:
        diff = _config_diff(state.get("config") or {}, config)
        raise CheckpointError(f"checkpoint '{path}' was written by a run with another config ({diff}). Resume "
                              "with the same config and overrides, or start a new run in another folder.")
    return state


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _config_diff(va, vb, prefix + key + ".")
            if sub:
                out.append(sub)
        elif va != vb:
            out.append(f"{prefix}{key}: checkpoint {va!r}, now {vb!r}")
    return "; ".join(out)
