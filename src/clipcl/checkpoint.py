"""Checkpoints that survive crashes and can hold no code.

Saving: atomic (temporary file, fsync, rename; files.atomic_write), so the previous checkpoint stays intact
until the new one is complete and a crash mid-write never loses the last good state.
Loading: `torch.load(weights_only=True)`, which unpickles tensors and plain Python values only. A checkpoint
that holds anything else (a planted pickle that would run code, or a file of an old clipcl that stored
objects) is refused with its name, never executed. torch is imported when a checkpoint is read or written,
so that the command line starts without it.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from .files import atomic_write, clear_stale_temporaries

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 3  # 2: weights-only loading, data fingerprint; 3: the prompts form's estimators, DRO marks


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (OutputError, naming the file, when it cannot be written)."""
    import torch

    path = Path(path)
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))
    clear_stale_temporaries(path.parent, [path.name])  # partial files of writers that were killed


def read(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Unpickle a checkpoint file with weights_only=True; CheckpointError for anything else.

    mmap=True maps the tensors instead of reading them: cheap when only the config is wanted.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}': nothing to resume. Start the run without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"'{path}' holds objects other than tensors and plain values (loading it could run code), "
                "so clipcl refuses it. A checkpoint written by clipcl never does: it is not one of this "
                "clipcl's checkpoints. Start the run again in another folder.") from None
        raise CheckpointError(f"checkpoint '{path}' is unreadable (truncated or corrupt: {_first_line(e)}). "
                              "Start the run again in another folder, or with --overwrite.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint '{path}' is unreadable (truncated or corrupt: {_first_line(e)}). "
                              "Start the run again in another folder, or with --overwrite.") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"'{path}' is not a clipcl checkpoint.")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {state['format_version']}, this clipcl "
                              f"reads version {FORMAT_VERSION}: it was written by another clipcl. Resume it with the clipcl that wrote "
                              "it, or start the run again.")
    return state


def load(path: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint, checking that it is whole, of this format, and (if given) of the same config."""
    state = read(path)
    if config is not None and comparable(state.get("config") or {}) != comparable(config):
        diff = _config_diff(comparable(state.get("config") or {}), comparable(config))
        raise CheckpointError(f"checkpoint '{path}' was written by a run with another config ({diff}). Resume "
                              "with 'clipcl resume DIR' (it uses the stored config), or start a new run in "
                              "another folder.")
    return state


RESUME_FREE = ("log",)  # config sections a resumed run may change: they do not change what is trained


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that must not change when a run is resumed."""
    return {k: v for k, v in config.items() if k not in RESUME_FREE}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
