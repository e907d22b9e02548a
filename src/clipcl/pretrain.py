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

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, ScenarioCfg, load_config, to_dict

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
    from .errors import Interrupted, NonFiniteLoss
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
        tmp_dir = tempfile.TemporaryDirectory(dir=path.parent, prefix=".pretraining-")
    except OSError as e:
        raise ConfigError(f"cannot write the pretrained-weights cache '{path.parent}' ({e.strerror or e}). Set "
                          "$CLIPCL_CACHE to a writable folder.") from None
    if not quiet:
        print(f"clipcl: pretraining {TAG_PREFIX}{tag} for {model_name} (once; cached in {path})", file=sys.stderr,
              flush=True)
    devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    # the caller's model initialisation must not depend on the cache being warm: its RNG states are kept
    with torch.random.fork_rng(devices=devices), tmp_dir as tmp:
        try:
            trainer = Trainer(cfg, Path(tmp) / "run", progress_bar=False, quiet=True, signals=False)
            results = trainer.run()
            state = trainer.bundle.model.state_dict()
            atomic_write(path, lambda f: torch.save(state, f))
        except (OutputError, NonFiniteLoss, Interrupted) as e:  # its folder is gone: say what happened instead
            raise ConfigError(f"pretraining {TAG_PREFIX}{tag} into '{path.parent}' failed "
                              f"({str(e.strerror if isinstance(e, OSError) else e).split('. ')[0]}); nothing "
                              "was cached. Free space or set $CLIPCL_CACHE, then run the command again.") from None
    if not quiet:
        print(f"clipcl: pretrained {TAG_PREFIX}{tag}: accuracy {100 * results['metrics']['last_accuracy']:.1f}% "
              "on its own domain's test images", file=sys.stderr, flush=True)
    return path
