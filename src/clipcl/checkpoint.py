"""Checkpoints that survive crashes, hold no code, and are verified before anything is resumed from them.

Saving: atomic (temporary file, fsync, rename; files.atomic_write), so the previous checkpoint stays intact
until the new one is complete and a crash mid-write never loses the last good state.
Loading, in three steps, each refusing with one line that names the file and what is wrong:
1. the bytes: a checkpoint is a zip (torch.save) whose every part carries a CRC-32 of its bytes. `verify`
   checks them all, reading bytes only (nothing is unpickled): a flipped bit, a zeroed block or a truncated
   file anywhere in it is found before any of it is used.
2. the objects: `torch.load(weights_only=True)` unpickles tensors and plain Python values only. A checkpoint
   that holds anything else (a planted pickle that would run code, or a file of an old clipcl that stored
   objects) is refused with its name, never executed. Then the format version and the type of every
   top-level field are checked (`read`).
3. the values: a hand-edited checkpoint (re-saved with torch.save, so its CRCs are valid) is caught by the
   schema check of every field against the live objects of the run that resumes it (engine.Trainer
   .check_state, with ReplayMemory.check_state and Method.check_state): shapes, dtypes, steps, task
   indices, lengths. The helpers below raise StateError(field, what); the trainer turns it into a
   CheckpointError naming the file.
torch is imported when a checkpoint is read or written, so that the command line starts without it.
"""
from __future__ import annotations

import math
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from .config import with_defaults
from .files import atomic_write, clear_stale_temporaries

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 3  # 2: weights-only loading, data fingerprint; 3: the prompts form's estimators, DRO marks
FIELDS = ("format_version", "config", "model", "optimizer", "memory", "method", "progress", "data", "torch_rng",
          "threads", "modules")  # what Trainer.state() writes
# absent in checkpoints of earlier clipcl versions of this format; "modules": the weights of the modules a method
# owns (Method.modules), written only when it owns some
OPTIONAL = ("threads", "modules")
START_AGAIN = "Start the run again in another folder, or with --overwrite."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (OutputError, naming the file, when it cannot be written)."""
    import torch

    path = Path(path)
    atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))
    clear_stale_temporaries(path.parent, [path.name])  # partial files of writers that were killed


# ---------------------------------------------------------------------- 1. the bytes
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local header (30 bytes)
_CHUNK = 16 << 20


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}' is unreadable (truncated or corrupt: {why}). {START_AGAIN}")


def _damaged(path: Path, member: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}' is damaged: its part '{member}' {why}, so what it holds is not "
                           f"what clipcl saved (a disk or copy error, or an edit); nothing is resumed from it. "
                           f"{START_AGAIN}")


def verify(path: Path, tensors: bool = True) -> None:
    """Check the CRC-32 of every part of the checkpoint's zip against its bytes (tensors=False: every part but
    the tensor payloads, i.e. what holds the config), without unpickling anything; CheckpointError naming the
    damaged part. Parts are checked in parallel threads (zlib releases the GIL) over a memory map."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            with zipfile.ZipFile(f) as z:
                infos = [i for i in z.infolist() if tensors or "/data/" not in i.filename]
                stored = [i for i in infos if i.compress_type == zipfile.ZIP_STORED]
                for info in infos:  # torch never compresses; a zip of another writer may
                    if info.compress_type != zipfile.ZIP_STORED:
                        try:
                            with z.open(info) as member:
                                while member.read(_CHUNK):
                                    pass
                        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                            raise _damaged(path, info.filename, f"does not decompress to its checksum ({e})")
            size = os.fstat(f.fileno()).st_size
            if not stored:
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                spans = []
                for info in stored:
                    off = info.header_offset
                    header = m[off:off + _LOCAL_HEADER.size]
                    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                        raise _damaged(path, info.filename, "has a damaged header")
                    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
                    start = off + _LOCAL_HEADER.size + name_len + extra_len
                    end = start + info.compress_size
                    if end > size:
                        raise _damaged(path, info.filename, "ends past the end of the file (truncated)")
                    spans.append((info, start, end))
                with memoryview(m) as view:
                    def crc(span) -> bool:
                        info, start, end = span
                        value = 0
                        for at in range(start, end, _CHUNK):
                            value = zlib.crc32(view[at:min(end, at + _CHUNK)], value)
                        return value == info.CRC

                    workers = max(1, min(8, os.cpu_count() or 1, len(spans)))
                    if workers > 1 and sum(e - s for _, s, e in spans) > 64 << 20:
                        with ThreadPoolExecutor(workers) as pool:
                            good = list(pool.map(crc, spans))
                    else:
                        good = [crc(s) for s in spans]
                bad = [info.filename for (info, _, _), ok in zip(spans, good) if not ok]
                if bad:
                    more = f" (and {len(bad) - 1} other parts)" if len(bad) > 1 else ""
                    raise _damaged(path, bad[0], f"does not match its checksum (CRC-32){more}")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, OverflowError) as e:
        raise _unreadable(path, _first_line(e)) from None


# ---------------------------------------------------------------------- 2. the objects
def read(path: Path, mmap: bool = False, verify_tensors: bool | None = None) -> dict[str, Any]:
    """Verify a checkpoint's bytes, unpickle it with weights_only=True and check its format version and the
    type of every top-level field; CheckpointError for anything else.

    mmap=True maps the tensors instead of reading them: cheap when only the config is wanted. The CRCs of the
    tensor payloads are then not checked either (verify_tensors defaults to `not mmap`): whoever uses the
    tensors reads the checkpoint again with mmap=False.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}': nothing to resume. Start the run without --resume.")
    tensors = not mmap if verify_tensors is None else verify_tensors
    verify(path, tensors=tensors)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"'{path}' holds objects other than tensors and plain values (loading it could run code), "
                "so clipcl refuses it. A checkpoint written by clipcl never does: it is not one of this "
                "clipcl's checkpoints. Start the run again in another folder.") from None
        raise _unreadable(path, _first_line(e)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, AttributeError,
            KeyError, IndexError) as e:
        raise _unreadable(path, _first_line(e)) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"'{path}' is not a clipcl checkpoint.")
    version = state["format_version"]
    if not is_int(version):
        raise CheckpointError(
            f"checkpoint '{path}' has format version {show(version)} in its field 'format_version', where clipcl "
            f"writes a whole number: it was edited, or not written by clipcl. This clipcl reads version "
            f"{FORMAT_VERSION}; nothing is resumed from it. {START_AGAIN}")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {version}, this clipcl reads version "
                              f"{FORMAT_VERSION}: it was written by another clipcl. Resume it with the clipcl that "
                              "wrote it, or start the run again.")
    try:
        check_fields(state, values=tensors)
    except StateError as e:
        raise invalid(path, e) from None
    return state


def check_fields(state: dict[str, Any], values: bool = True) -> None:
    """The top-level fields: all there, none unknown, each of its type; the CPU generator state and the thread
    count in full (they need no live object; values=False: the generator state's bytes are not looked at, as
    for a read of the config whose tensors were not verified). StateError naming the field."""
    import torch

    missing = [k for k in FIELDS if k not in state and k not in OPTIONAL]
    if missing:
        raise StateError(missing[0], "is missing")
    unknown = sorted(str(k) for k in state if k not in FIELDS)
    if unknown:
        raise StateError(unknown[0], f"is not a field clipcl writes (it writes {', '.join(FIELDS)})")
    for key in ("config", "model", "memory", "method", "progress", "data"):
        need_dict(key, state[key])
    if "modules" in state:
        need_dict("modules", state["modules"])
    if state["optimizer"] is not None:
        need_dict("optimizer", state["optimizer"])
    rng = state["torch_rng"]
    need_tensor("torch_rng", rng, dtype=torch.uint8, shape=tuple(torch.get_rng_state().shape))
    try:
        if values:
            torch.Generator().set_state(rng)
    except (RuntimeError, ValueError, TypeError) as e:
        raise StateError("torch_rng", f"is not a state of torch's CPU generator ({_first_line(e)})") from None
    if "threads" in state:
        need_int("threads", state["threads"], 1, None, "a thread count")


def load(path: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint, checking that it is whole, of this format, and (if given) of the same config."""
    state = read(path)
    if config is not None and comparable(state["config"]) != comparable(config):
        diff = _config_diff(comparable(state["config"]), comparable(config))
        raise CheckpointError(f"checkpoint '{path}' was written by a run with another config ({diff}). Resume "
                              "with 'clipcl resume DIR' (it uses the stored config), or start a new run in "
                              "another folder.")
    return state


RESUME_FREE = ("log",)  # config sections a resumed run may change: they do not change what is trained


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that must not change when a run is resumed, with the keys added since it was written
    at their defaults (config.with_defaults): a run of an older clipcl resumes under a newer one."""
    return {k: v for k, v in with_defaults(config).items() if k not in RESUME_FREE}


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


# ---------------------------------------------------------------------- 3. the values: schema checks
_NO_VALUE = object()


class StateError(ValueError):
    """A field of a checkpoint's state that is not what clipcl writes: `field` is its dotted path
    (progress.step, model.visual.conv1.weight, method.gcl.log_u1), `what` says what is wrong."""

    def __init__(self, field: str, what: str, value: Any = _NO_VALUE):
        self.field = field
        self.what = what if value is _NO_VALUE else f"= {show(value)}: {what}"
        super().__init__(f"field '{field}' {self.what}")


def invalid(path: Path, e: StateError) -> CheckpointError:
    """The one-line error of a checkpoint whose state fails the schema check."""
    return CheckpointError(f"checkpoint '{path}' does not hold a valid clipcl state: {e}. It was damaged or "
                           f"edited after clipcl wrote it, so nothing is resumed from it. {START_AGAIN}")


def show(x: Any) -> str:
    """A short description of a value for a message: 3, '3' (a string), a float64 tensor of shape [4]."""
    import torch

    if isinstance(x, bool):
        return f"{x} (a boolean)"
    if isinstance(x, str):
        text = x if len(x) <= 40 else x[:37] + "..."
        return f"{text!r} (a string)"
    if isinstance(x, (int, float)) or x is None:
        return repr(x)
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {list(x.shape)}"
    if isinstance(x, (list, tuple)):
        plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in x)
        return repr(x) if plain and len(repr(x)) <= 40 else f"a {type(x).__name__} of {len(x)} items"
    if isinstance(x, dict):
        return f"a dict of {len(x)} items"
    return f"a {type(x).__name__}"


def is_int(x: Any) -> bool:
    """A whole number (an int, never a bool)."""
    return isinstance(x, int) and not isinstance(x, bool)


def need_int(field: str, x: Any, lo: int | None = 0, hi: int | None = None, why: str = "") -> int:
    """x, an int in [lo, hi] (either bound None: open)."""
    if not is_int(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        if lo is not None and lo == hi:
            raise StateError(field, f"must be {lo}" + (f" ({why})" if why else ""), x)
        if lo is not None and hi is not None:
            span = f"from {lo} to {hi}"
        elif lo is not None:
            span = f"{lo} or more"
        else:
            span = f"{hi} or less" if hi is not None else ""
        raise StateError(field, f"must be a whole number {span}".rstrip() + (f" ({why})" if why else ""), x)
    return x


def need_number(field: str, x: Any, lo: float | None = None, hi: float | None = None, none: bool = False) -> None:
    """x, a finite int or float in [lo, hi] (or None, when none=True)."""
    if x is None and none:
        return
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not ok or (lo is not None and x < lo) or (hi is not None and x > hi):
        span = (f" from {lo} to {hi}" if lo is not None and hi is not None else f" of {lo} or more" if lo is not None
                else "")
        raise StateError(field, f"must be a finite number{span}" + (" or None" if none else ""), x)


def need_str(field: str, x: Any) -> None:
    if not isinstance(x, str):
        raise StateError(field, "must be a string", x)


def need_dict(field: str, x: Any, keys: Iterable[str] | None = None, optional: Iterable[str] = ()) -> dict:
    """x, a dict; with `keys`, holding exactly those (plus any of `optional`)."""
    if not isinstance(x, dict):
        raise StateError(field, "must be a dict", x)
    if keys is not None:
        keys, optional = list(keys), set(optional)
        missing = [k for k in keys if k not in x and k not in optional]
        if missing:
            raise StateError(f"{field}.{missing[0]}", "is missing")
        unknown = [k for k in x if k not in keys]
        if unknown:
            raise StateError(f"{field}.{unknown[0]}", f"is not one clipcl writes here (it writes "
                                                       f"{', '.join(map(str, keys))})")
    return x


def need_list(field: str, x: Any, length: int | None = None, why: str = "") -> list:
    """x, a list (or a tuple), of `length` items when given."""
    if not isinstance(x, (list, tuple)):
        raise StateError(field, "must be a list", x)
    if length is not None and len(x) != length:
        raise StateError(field, f"must hold {length} item{'' if length == 1 else 's'}" + (f" ({why})" if why else ""),
                         x)
    return list(x)


def need_tensor(field: str, x: Any, dtype=None, shape: tuple | None = None, ndim: int | None = None,
                floating: bool = False, why: str = ""):
    """x, a tensor of that dtype, shape (or number of dimensions), or of a floating dtype."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise StateError(field, "must be a tensor", x)
    want = []
    if dtype is not None and x.dtype != dtype:
        want.append(f"of dtype {str(dtype).replace('torch.', '')}")
    if floating and not x.is_floating_point():
        want.append("of a floating dtype")
    if shape is not None and tuple(x.shape) != tuple(shape):
        want.append(f"of shape {list(shape)}")
    if ndim is not None and x.ndim != ndim:
        want.append(f"of {ndim} dimension{'s' if ndim != 1 else ''}")
    if want:
        raise StateError(field, f"must be a tensor {' and '.join(want)}" + (f" ({why})" if why else ""), x)
    return x


def need_tensors(field: str, x: Any, reference: dict, why: str = "the model's") -> None:
    """x, a dict of tensors with exactly the keys of `reference`, each of the same shape and dtype."""
    if not isinstance(x, dict):
        raise StateError(field, "must be a dict of tensors", x)
    missing = [k for k in reference if k not in x]
    if missing:
        raise StateError(f"{field}.{missing[0]}", f"is missing ({why} tensors are all needed"
                                                  + (f"; {len(missing) - 1} more are missing" if len(missing) > 1
                                                     else "") + ")")
    unknown = [k for k in x if k not in reference]
    if unknown:
        raise StateError(f"{field}.{unknown[0]}", f"is not one of {why} tensors")
    for k, ref in reference.items():
        need_tensor(f"{field}.{k}", x[k], dtype=ref.dtype, shape=tuple(ref.shape), why=f"as {why}")
