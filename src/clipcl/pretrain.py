"""Tiny pretrained CLIPs made on this machine, so that the paper's regime (fine-tuning a CLIP that already
knows every class) runs on a CPU without downloading weights.

`model.pretrained: clipcl:<tag>` names a recipe below. The first run that needs it pretrains the model (a
`joint` run over the recipe's data, the same training loop as every run) and caches the weights as a plain
state dict; later runs load the cached file through open_clip like any local checkpoint. The cache key
(see `weights`) covers everything that changes the bits, so a changed recipe, device or library makes a new
file. The pretraining reads Fashion-MNIST where the caller's scenario says (scenario.root, download).

Cache folder: $CLIPCL_CACHE, else ~/.cache/clipcl; files under pretrained/.

`clipcl pretrain ROOT --out WEIGHTS.pt` (write_pretrained) makes such a model from a user's image folder: one
`joint` task over every class of ROOT, both towers trained, from FOLDER_DEFAULTS and the command's overrides;
then its zero-shot accuracy on ROOT's test images. WEIGHTS.pt is a plain state dict (`model.pretrained=
WEIGHTS.pt` loads it) and WEIGHTS.json its record (what made it, the accuracy, the file's sha256: the record
is also how clipcl tells later that it wrote the weights file). ROOT may be a recipe tag `clipcl:<tag>`: the
cached weights are copied.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from .config import ConfigError, RunCfg, ScenarioCfg, apply_overrides, load_config, to_dict
from .errors import StoppedEarly, stop_signals

TAG_PREFIX = "clipcl:"
# tag -> (doc, overrides of the fmnist-cil config): everything else as that config ships
RECIPES: dict[str, tuple[str, list[str]]] = {
    "fmnist100": (
        "compositional Fashion-MNIST: 60 of the 100 garment x colour combinations, training images 50,000-59,999, "
        "both towers trained (the text tower learns the colour and garment words)",
        ["name=pretrain-fmnist100", "seed=0", "scenario.dataset=fmnist100_pretrain", "scenario.kind=cil",
         "scenario.classes_per_task=60", "scenario.class_order=natural", "scenario.train_per_class=0",
         "scenario.test_per_class=50", "scenario.augment=shift", "memory.per_class=0", "method.name=joint",
         "model.lock_text=false", "optim.epochs=8", "optim.lr=0.002", "optim.batch_size=128",
         "optim.warmup_steps=20"]),
    "fmnist-washed": (
        "all 10 Fashion-MNIST classes, training images 50,000-59,999 in a washed-out domain (x -> 24 + 9x/10)",
        ["name=pretrain-fmnist-washed", "seed=0", "scenario.dataset=fmnist_pretrain", "scenario.kind=cil",
         "scenario.classes_per_task=10", "scenario.class_order=natural", "scenario.train_per_class=0",
         "scenario.test_per_class=200", "scenario.augment=shift", "memory.per_class=0", "method.name=joint",
         "optim.epochs=8", "optim.lr=0.002", "optim.batch_size=128", "optim.warmup_steps=20"]),
}


TEMPORARY = ".pretraining-"  # + host-pid- + random: a pretraining's own folder, removed when it ends
_TEMPORARY_NAME = re.compile(r"^\.pretraining-(?P<host>.+)-(?P<pid>[0-9]+)-[a-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def _temporary_prefix() -> str:
    return f"{TEMPORARY}{_host()}-{os.getpid()}-"


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process (EPERM), or no way to tell: it may be alive
        return False
    return False


def clear_stale_pretrainings(folder: Path) -> list[str]:
    """Remove the temporary folders that pretrainings killed with SIGKILL (or a power cut) left in folder;
    returns their names.

    Only a folder named the way `weights` names its own (`.pretraining-<host>-<pid>-<random>`), made on this
    host by a process that is gone, is removed. Anything else (another host's pretraining, a live one, a file of that
    name, a link, a folder of an older clipcl without host and pid, every other file) is left as it is.
    """
    removed = []
    host = _host()
    for entry in sorted(Path(folder).iterdir()):
        m = _TEMPORARY_NAME.match(entry.name)
        if not m or m["host"] != host or entry.is_symlink() or not entry.is_dir():
            continue
        if _process_gone(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


LOST = ("nothing was cached and its temporary folder was removed (a pretraining is not resumed: the next run that "
        "needs it starts it again).")
KEPT = "just after its weights were cached in '{}' (the next run that needs them loads them)."


class _Shield:
    """Stop signals that raise StoppedEarly, except inside `with shield:` (there they wait until its end)."""

    def __init__(self, what: str, lost: str = LOST, kept: str = KEPT):
        self.what, self.pending, self.stopping, self.depth = what, None, False, 0
        self.lost, self.kept = lost, kept  # what the stop line says before and after the weights are in place
        self.cached: Path | None = None  # the weights, once renamed into place

    def handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = self.pending or signum
        elif not self.stopping:  # the first signal stops; a repeated one must not cut the clean-up short
            self.stopping = True
            if self.cached is None:
                raise StoppedEarly(signum, f"{self.what}; {self.lost}")
            raise StoppedEarly(signum, f"{self.what}, {self.kept.format(self.cached)}")

    def __enter__(self):
        self.depth += 1
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.depth -= 1
        if not self.depth and self.pending is not None and kind is None:
            signum, self.pending = self.pending, None
            self.handler(signum, None)


@contextlib.contextmanager
def _stop_signals_raise(what: str, lost: str = LOST, kept: str = KEPT):
    """SIGINT, SIGTERM and SIGHUP raise StoppedEarly (see _Shield) in this block, in the main thread."""
    shield = _Shield(what, lost, kept)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, shield.handler) for s in stop_signals()}
    try:
        yield shield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename itself is done
        pass


def cache_dir() -> Path:
    """Where made weights are kept."""
    return Path(os.environ.get("CLIPCL_CACHE") or Path.home() / ".cache" / "clipcl").expanduser()


RECIPE_VERSION = 1  # bump when the pretraining data, its transform or the recipe's code changes


def recipe_config(tag: str, model_name: str, device: str = "cpu", data: ScenarioCfg | None = None):
    """The resolved config that pretrains `tag` for architecture `model_name` on `device`, reading the data
    where `data` (the caller's scenario settings) says (ConfigError for an unknown tag)."""
    if tag not in RECIPES:
        raise ConfigError(f"config key 'model.pretrained' = '{TAG_PREFIX}{tag}': unknown clipcl pretraining. "
                          f"Known: {', '.join(TAG_PREFIX + t for t in RECIPES)}.")
    where = [f"scenario.root={data.root}", f"scenario.download={data.download}"] if data is not None else []
    return load_config("fmnist-cil", [*RECIPES[tag][1], f"model.name={model_name}", "model.pretrained=",
                                      f"device={device}", *where])


def weights(tag: str, model_name: str, device=None, data: ScenarioCfg | None = None, quiet: bool = False) -> Path:
    """The cached weights of recipe `tag` for `model_name`, pretraining them first (on `device`) if needed.

    The cache key covers what changes the bits: the recipe (config, description, RECIPE_VERSION), the device
    type and precision, the thread count, and the clipcl, torch and open_clip versions; the data folder does
    not (the same files give the same weights wherever they are).
    """
    import open_clip
    import torch

    from . import __version__
    from .errors import NonFiniteLoss
    from .files import OutputError, atomic_write

    kind = torch.device(device or "cpu").type
    cfg = recipe_config(tag, model_name, kind, data)
    key = to_dict(cfg)
    key["scenario"].pop("root"), key["scenario"].pop("download")
    blob = json.dumps({"config": key, "recipe": RECIPES[tag][0], "version": RECIPE_VERSION, "clipcl": __version__,
                       "torch": torch.__version__, "open_clip": open_clip.__version__,
                       "threads": torch.get_num_threads()}, sort_keys=True)
    path = cache_dir() / "pretrained" / f"{tag}-{model_name}-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        return path
    from .engine import Trainer

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_pretrainings(path.parent)
    except OSError as e:
        raise ConfigError(f"cannot write the pretrained-weights cache '{path.parent}' ({e.strerror or e}). Set "
                          "$CLIPCL_CACHE to a writable folder.") from None
    if not quiet:
        print(f"clipcl: pretraining {TAG_PREFIX}{tag} for {model_name} (once; cached in {path})", file=sys.stderr,
              flush=True)
    devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    what = f"while pretraining {TAG_PREFIX}{tag}"
    # the caller's model initialisation must not depend on the cache being warm: its RNG states are kept
    with torch.random.fork_rng(devices=devices), _stop_signals_raise(what) as shield:
        tmp = None
        try:
            try:
                tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix()))
            except OSError as e:
                raise ConfigError(f"cannot write the pretrained-weights cache '{path.parent}' ({e.strerror or e}). "
                                  "Set $CLIPCL_CACHE to a writable folder.") from None
            trainer = Trainer(cfg, tmp / "run", progress_bar=False, quiet=True, signals=False)
            results = trainer.run()
            state = trainer.bundle.model.state_dict()
            # written whole inside the temporary folder (a kill mid-write leaves only the folder, which a later
            # pretraining clears), then renamed into place: a reader, or a second process pretraining the same
            # recipe at once, sees no file or a whole one (the last rename wins; both hold the same bits)
            atomic_write(tmp / "weights.pt", lambda f: torch.save(state, f))
            with shield:  # a stop signal now waits until the weights are in place (and then says so)
                try:
                    os.replace(tmp / "weights.pt", path)
                except OSError as e:
                    raise OutputError(e.errno, f"cannot write '{path}' ({e.strerror or e})") from None
                shield.cached = path
                _fsync_folder(path.parent)
        except OutputError as e:  # its folder is gone: say what happened instead
            raise ConfigError(f"pretraining {TAG_PREFIX}{tag} into '{path.parent}' failed ({e.strerror or e}); "
                              "nothing was cached. Free space or set $CLIPCL_CACHE, then run the command again."
                              ) from None
        except NonFiniteLoss as e:
            raise ConfigError(f"pretraining {TAG_PREFIX}{tag} diverged ({str(e).split(': ')[0]}); nothing was "
                              "cached. Its recipe is fixed and trains with finite losses where clipcl is tested: "
                              "report this line with your device and torch version.") from None
        finally:
            if tmp is not None:
                with shield:  # a second signal must not leave half of the folder behind
                    shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"clipcl: pretrained {TAG_PREFIX}{tag}: accuracy {100 * results['metrics']['last_accuracy']:.1f}% "
              "on its own domain's test images", file=sys.stderr, flush=True)
    return path


# ------------------------------------------------------------------ clipcl pretrain ROOT --out WEIGHTS.pt
# A tiny CLIP from scratch on small images (the optimiser of the fmnist-washed recipe, both towers trained): key=value
# overrides change any of them, with the syntax and validation of `clipcl run`.
FOLDER_DEFAULTS = ["name=pretrain", "seed=0", "model.name=clipcl-tiny-rn", "model.pretrained=", "model.lock_text=false",
                   "model.lock_image=false", "scenario.dataset=imagefolder", "scenario.kind=cil",
                   "scenario.class_order=natural", "scenario.image_size=32", "scenario.augment=shift",
                   "memory.per_class=0", "method.name=joint", "optim.lr=0.002", "optim.weight_decay=0.05",
                   "optim.epochs=8", "optim.batch_size=128", "optim.warmup_steps=20", "eval.templates=default"]
# what clipcl pretrain sets itself: one joint task over every class of ROOT
FOLDER_FIXED = ("scenario.dataset", "scenario.root", "scenario.kind", "scenario.classes_per_task",
                "scenario.initial_classes", "scenario.n_tasks", "scenario.classes", "scenario.domains", "method.name",
                "model.lora_rank", "model.lora_alpha")  # LoRA's keys: the weights are a plain state dict of model.name
RECIPE_FREE = ("model.name", "device", "scenario.root", "scenario.download")  # what a recipe's copy may set
MAX_RECORD_BYTES = 16 << 20  # a record lists a config and class names: larger is not one


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def folder_config(root: Path, overrides: list[str]) -> RunCfg:
    """The config that pretrains on the image folder `root`: FOLDER_DEFAULTS, then `overrides` (a ConfigError for
    a key clipcl pretrain sets itself); scenario.classes_per_task is set once the folder's classes are known."""
    fixed = [o for o in overrides if _key(o) in FOLDER_FIXED]
    if fixed:
        them = "them" if len(fixed) > 1 else "it"
        raise ConfigError(f"{' '.join(fixed)}: clipcl pretrain sets {', '.join(_key(o) for o in fixed)} itself (one "
                          f"joint task over every class of ROOT, read from ROOT); leave {them} out.")
    cfg = apply_overrides(RunCfg(), [*FOLDER_DEFAULTS, *overrides])
    # set as a value, not an override: a folder name such as 'true' or '[a]' must not be read as YAML
    return dataclasses.replace(cfg, scenario=dataclasses.replace(cfg.scenario, root=str(root)))


def _record(path: Path) -> dict | None:
    """The record `clipcl pretrain` (or a recipe's cache) wrote at path: a JSON object written_by clipcl, of kind
    pretrained; None for anything else (absent, a link, unreadable, another file)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(data, dict) and data.get("written_by") == "clipcl" and data.get("kind") == "pretrained"
    return data if ok else None


def _sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def record_path(out: Path) -> Path:
    """The record written next to a weights file: the same name with .json."""
    return out.with_suffix(".json")


def check_weights_output(out: Path | str, overwrite: bool) -> tuple[Path, Path]:
    """(weights file, its record) that `clipcl pretrain --out` may write, or a ConfigError naming the file.

    Refused: a folder, a link, a missing folder; a record that clipcl pretrain did not write, or wrote for other
    weights that are still there (w.pt and w.bin share w.json); a weights file its
    record does not describe (sha256), since a state dict carries no mark of who wrote it; and, without
    `overwrite`, weights or a record that clipcl pretrain did write.
    """
    from . import owned

    out = Path(out).expanduser()
    if str(out).strip() == "":
        raise ConfigError("--out is empty: give the name of the weights file to write, e.g. --out weights.pt.")
    owned.check_path_length(out, "--out")
    if out.suffix.lower() == ".json":
        raise ConfigError(f"--out '{out}' ends in .json, the name of the record written next to the weights; give "
                          f"the weights file's name, e.g. '{out.with_suffix('.pt')}'.")
    side = record_path(out)
    record = _record(side)
    if side.is_symlink() or (side.exists() and record is None):
        what = ("a symbolic link" if side.is_symlink() else "a folder" if side.is_dir() else
                "a file clipcl pretrain did not write")
        raise ConfigError(f"'{side}', where clipcl pretrain writes the record of --out '{out}', is {what}; clipcl never "
                          "replaces a file of yours. Choose another --out, or move that one away first.")
    other = record.get("weights") if record else None
    if (isinstance(other, str) and other != out.name and (side.parent / other).exists()
            and not (out.exists() and os.path.samefile(out, side.parent / other))):  # case-insensitive names
        raise ConfigError(f"'{side}', where clipcl pretrain writes the record of --out '{out}', is the record of "
                          f"'{side.parent / other}'; writing it would orphan those weights. Choose an --out with "
                          "another stem, or move those weights and their record away first.")
    if out.is_file() and not out.is_symlink():
        if record is None or record.get("sha256") != _sha256(out):
            why = f"'{side}' records other weights" if record else f"no record '{side}' of it"
            raise ConfigError(f"--out '{out}' exists and was not written by clipcl pretrain ({why}); clipcl never "
                              "replaces a file of yours. Choose another --out, or move that file away first.")
    else:
        owned.check_output_file(out, "--out")  # a folder, a link, a missing folder: said in its words
    if (out.exists() or side.exists()) and not overwrite:
        raise ConfigError(f"--out '{out}' holds weights clipcl pretrain wrote; pass --overwrite to replace them (and "
                          f"'{side.name}'), or choose another --out.")
    return out, side


def _write_pretrained(out: Path, side: Path, overwrite: bool, blob: bytes, record: dict) -> dict:
    """Write the weights `blob` to out, then their record (with the weights' sha256) to side, each atomically;
    returns the record."""
    from .files import OutputError, atomic_write

    check_weights_output(out, overwrite)  # again: a file may have appeared there while the model trained
    record = {**record, "weights": out.name, "sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(out, lambda f: f.write(blob))
    try:
        atomic_write(side, lambda f: f.write(text.encode()))
    except OutputError:  # weights without their record would read as a file of the user's next time
        out.unlink(missing_ok=True)
        raise
    return record


def zero_shot_accuracy(bundle, scenario, cfg: RunCfg, device, autocast: bool = False) -> float:
    """Accuracy on the test images of a one-task scenario among all its classes (eval.templates): the zero-shot
    accuracy a later run's model.pretrained starts from."""
    from .evaluate import unseen_row

    if len(scenario) != 1:
        raise ValueError(f"a pretraining is one task, not {len(scenario)}")
    return unseen_row(bundle, scenario, 0, cfg.eval.templates, cfg.eval.batch_size, device, autocast, split="test")[0]


def write_pretrained(source: str, out: Path | str, overrides: list[str], overwrite: bool = False,
                     quiet: bool = False) -> dict:
    """Pretrain a CLIP on the image folder `source` (or copy the cached weights of a recipe `clipcl:<tag>`) into
    the weights file `out`, a plain state dict, with its record next to it (record_path); returns the record."""
    out, side = check_weights_output(out, overwrite)  # refused before the slow part
    if source.startswith(TAG_PREFIX):
        return _copy_recipe(source[len(TAG_PREFIX):], out, side, overrides, overwrite, quiet)
    root = Path(source).expanduser()
    try:
        found = root.is_dir()
    except OSError:  # a name too long for the file system
        found = False
    if not found:
        raise ConfigError(f"ROOT '{source}' is not a folder. Give an image folder (ROOT/<class>/*, or "
                          "ROOT/train/<class>/* with ROOT/test/<class>/*) or a recipe tag ("
                          + ", ".join(TAG_PREFIX + t for t in RECIPES) + ").")
    return _pretrain_folder(root.absolute(), out, side, overrides, overwrite, quiet)


def _pretrain_folder(root: Path, out: Path, side: Path, overrides: list[str], overwrite: bool, quiet: bool) -> dict:
    """The joint run over root's classes in a temporary folder next to out, then the weights and their record."""
    import io
    import time

    import torch

    from . import __version__
    from .data.datasets import load_dataset
    from .data.scenarios import build_scenario
    from .engine import Trainer
    from .errors import NonFiniteLoss
    from .files import OutputError

    cfg = folder_config(root, overrides)
    ds = load_dataset(cfg.scenario)
    if len(ds.classnames) < 2:
        raise ConfigError(f"'{root}' holds {len(ds.classnames)} class ({', '.join(ds.classnames)}): a CLIP learns to "
                          "tell classes apart, so clipcl pretrain needs at least 2 class folders.")
    cfg = dataclasses.replace(cfg, scenario=dataclasses.replace(cfg.scenario, classes_per_task=len(ds.classnames)))
    scenario = build_scenario(cfg.scenario, cfg.seed, ds)
    if not len(scenario[0].test):
        raise ConfigError(f"'{root}' has no test images to measure the pretrained model on. Put some in "
                          "ROOT/test/<class>/*, or give each class folder of a flat ROOT/<class>/* at least 2 images.")
    try:
        clear_stale_pretrainings(out.parent)
    except OSError:  # cannot list the folder: mkdtemp says what is wrong
        pass
    what = f"while pretraining on '{root}'"
    lost = (f"nothing was written to '{out}' and the temporary training folder was removed (a pretraining is not "
            "resumed: run the command again).")
    with _stop_signals_raise(what, lost, "just after its weights were written to '{}'.") as shield:
        tmp, writing = None, False
        try:
            try:
                tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temporary_prefix()))
            except OSError as e:
                raise ConfigError(f"cannot write the temporary training folder in '{out.parent}' ({e.strerror or e}); "
                                  "choose an --out in a writable folder.") from None
            start = time.perf_counter()
            trainer = Trainer(cfg, tmp / "run", scenario=scenario, quiet=quiet, signals=False)
            results = trainer.run()
            seconds = time.perf_counter() - start
            accuracy = zero_shot_accuracy(trainer.bundle, scenario, cfg, trainer.device, trainer.autocast)
            trainer.close_data()
            buffer = io.BytesIO()
            torch.save(trainer.bundle.model.state_dict(), buffer)
            record = {"written_by": "clipcl", "kind": "pretrained", "model": cfg.model.name,
                      "classes": list(ds.classnames), "zero_shot_accuracy": accuracy,
                      "test_images": len(scenario[0].test), "config": to_dict(cfg), "clipcl": __version__,
                      "root": str(root), "layout": ds.notes.get("layout", "split"),
                      "train_images": len(scenario[0].train), "templates": cfg.eval.templates,
                      "seconds": round(seconds, 1), "train_seconds": results["timing"]["train_seconds"]}
            writing = True  # from here an OutputError names --out or its record, as main reports it
            with shield:  # a stop signal now waits until the weights and their record are in place
                record = _write_pretrained(out, side, overwrite, buffer.getvalue(), record)
                shield.cached = out
        except OutputError as e:  # the training folder's (its folder is gone: say what happened instead)
            if writing:
                raise
            raise ConfigError(f"pretraining on '{root}' failed writing into '{out.parent}' ({e.strerror or e}); "
                              f"nothing was written to '{out}'. Free space, then run the command again.") from None
        except NonFiniteLoss as e:
            raise ConfigError(f"pretraining on '{root}' diverged ({str(e).split(': ')[0]}); nothing was written. "
                              f"Lower optim.lr (now {cfg.optim.lr}) or raise optim.warmup_steps (now "
                              f"{cfg.optim.warmup_steps}), then run the command again.") from None
        finally:
            if tmp is not None:
                with shield:  # a second signal must not leave half of the folder behind
                    shutil.rmtree(tmp, ignore_errors=True)
    return record


def _copy_recipe(tag: str, out: Path, side: Path, overrides: list[str], overwrite: bool, quiet: bool) -> dict:
    """The cached weights of recipe `tag` (made first if needed, as `model.pretrained=clipcl:<tag>` does) copied
    to out, with their record."""
    from .engine import resolve_device

    if tag not in RECIPES:
        raise ConfigError(f"ROOT '{TAG_PREFIX}{tag}': unknown clipcl pretraining recipe. Known: "
                          f"{', '.join(TAG_PREFIX + t for t in RECIPES)}; or give an image folder.")
    fixed = [o for o in overrides if _key(o) not in RECIPE_FREE]
    if fixed:
        raise ConfigError(f"{' '.join(fixed)}: the recipe {TAG_PREFIX}{tag} is fixed; only {', '.join(RECIPE_FREE)} "
                          "apply to it. Pretrain an image folder to choose the rest.")
    user = apply_overrides(RunCfg(), overrides)
    device = resolve_device(user.device)
    cached = weights(tag, user.model.name, device, user.scenario, quiet)
    try:
        blob = cached.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the cached weights '{cached}' ({e.strerror or e}); delete the file, and the "
                          "next command that needs them makes them again.") from None
    record = recipe_record(tag, user.model.name, device, user.scenario, cached, blob)
    with _stop_signals_raise(f"while copying {TAG_PREFIX}{tag}", f"nothing was written to '{out}'.",
                             "just after its weights were written to '{}'.") as shield:
        with shield:  # a stop signal waits until the weights and their record are in place
            record = _write_pretrained(out, side, overwrite, blob, record)
            shield.cached = out
    return record


def recipe_record(tag: str, model_name: str, device, data: ScenarioCfg | None, cached: Path, blob: bytes) -> dict:
    """The record of recipe `tag`'s cached weights (bytes `blob` of the file `cached`), with their zero-shot
    accuracy on the recipe's test split: measured once by loading the file, then kept next to it (record_path)."""
    import torch

    from . import __version__
    from .data.scenarios import build_scenario
    from .files import OutputError, atomic_write
    from .models import create

    digest = hashlib.sha256(blob).hexdigest()
    kept = _record(record_path(cached))
    if kept is not None and kept.get("sha256") == digest:
        return kept
    device = torch.device(device)
    cfg = recipe_config(tag, model_name, device.type, data)
    scenario = build_scenario(cfg.scenario, cfg.seed)
    bundle = create(dataclasses.replace(cfg.model, pretrained=str(cached)), device, cfg.scenario, quiet=True)
    autocast = device.type == "cuda" and cfg.model.precision in ("auto", "bf16")  # as the pretraining measured it
    record = {"written_by": "clipcl", "kind": "pretrained", "model": model_name,
              "classes": list(scenario.classnames), "zero_shot_accuracy": zero_shot_accuracy(bundle, scenario, cfg,
                                                                                           device, autocast),
              "test_images": len(scenario[0].test), "config": to_dict(cfg), "clipcl": __version__,
              "recipe": TAG_PREFIX + tag, "templates": cfg.eval.templates, "weights": cached.name, "sha256": digest}
    text = json.dumps(record, indent=1) + "\n"
    try:
        atomic_write(record_path(cached), lambda f: f.write(text.encode()))
    except OutputError:  # the record only saves a later copy this evaluation
        pass
    return record
