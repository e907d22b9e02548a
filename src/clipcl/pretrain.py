"""Tiny pretrained CLIPs made on this machine, so that the paper's regime (fine-tuning a CLIP that already
knows every class) runs on a CPU without downloading weights.

`model.pretrained: clipcl:<tag>` names a recipe below. The first run that needs it pretrains the model (a
`joint` run over the recipe's data, the same training loop as every run) and caches the weights as a plain
state dict; later runs load the cached file through open_clip like any local checkpoint. The cache key
(see `weights`) covers everything that changes the bits, so a changed recipe, device or library makes a new
file. The pretraining reads Fashion-MNIST where the caller's scenario says (scenario.root, download).

Cache folder: $CLIPCL_CACHE, else ~/.cache/clipcl; files under pretrained/.
"""
from __future__ import annotations

import contextlib
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

from .config import ConfigError, ScenarioCfg, load_config, to_dict
from .errors import StoppedEarly, stop_signals

TAG_PREFIX = "clipcl:"
# tag -> (doc, overrides of the fmnist-cil config): everything else as that config ships
RECIPES: dict[str, tuple[str, list[str]]] = {
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


class _Shield:
    """Stop signals that raise StoppedEarly, except inside `with shield:` (there they wait until its end)."""

    def __init__(self, what: str):
        self.what, self.pending, self.stopping, self.depth = what, None, False, 0
        self.cached: Path | None = None  # the weights, once renamed into place

    def handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = self.pending or signum
        elif not self.stopping:  # the first signal stops; a repeated one must not cut the clean-up short
            self.stopping = True
            if self.cached is None:
                raise StoppedEarly(signum, f"{self.what}; nothing was cached and its temporary folder was "
                                           "removed (a pretraining is not resumed: the next run that needs it "
                                           "starts it again).")
            raise StoppedEarly(signum, f"{self.what}, just after its weights were cached in '{self.cached}' (the "
                                       "next run that needs them loads them).")

    def __enter__(self):
        self.depth += 1
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.depth -= 1
        if not self.depth and self.pending is not None and kind is None:
            signum, self.pending = self.pending, None
            self.handler(signum, None)


@contextlib.contextmanager
def _stop_signals_raise(what: str):
    """SIGINT, SIGTERM and SIGHUP raise StoppedEarly (see _Shield) in this block, in the main thread."""
    shield = _Shield(what)
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
