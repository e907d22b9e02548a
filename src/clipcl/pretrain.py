"""Tiny pretrained CLIPs made on this machine, so that the paper's regime (fine-tuning a CLIP that already
knows every class) runs on a CPU without downloading weights.

`model.pretrained: clipcl:<tag>` names a recipe below. The first run that needs it pretrains the model (a
`joint` run over the recipe's data, the same training loop as every run) and caches the weights as a plain
state dict; later runs load the cached file through open_clip like any local checkpoint. The cache key is a
hash of the recipe (its resolved config and its description, which names the data transform), the model
name, the clipcl version and the CPU thread count (float sums
depend on it), so a cached file is always the one the recipe gives here, and a changed recipe makes a new one.

Cache folder: $CLIPCL_CACHE, else ~/.cache/clipcl; files under pretrained/.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, load_config, to_dict

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


def recipe_config(tag: str, model_name: str):
    """The resolved config that pretrains `tag` for architecture `model_name` (ConfigError for an unknown tag)."""
    if tag not in RECIPES:
        raise ConfigError(f"config key 'model.pretrained' = '{TAG_PREFIX}{tag}': unknown clipcl pretraining. "
                          f"Known: {', '.join(TAG_PREFIX + t for t in RECIPES)}.")
    return load_config("fmnist-cil", [*RECIPES[tag][1], f"model.name={model_name}", "model.pretrained="])


def weights(tag: str, model_name: str, quiet: bool = False) -> Path:
    """The cached weights of recipe `tag` for `model_name`, pretraining them first if they are not cached."""
    import torch

    from . import __version__
    from .files import atomic_write

    cfg = recipe_config(tag, model_name)
    # the recipe's description names its data transform: a changed transform must change the key
    blob = json.dumps({"config": to_dict(cfg), "recipe": RECIPES[tag][0], "clipcl": __version__,
                       "threads": torch.get_num_threads()}, sort_keys=True)
    path = cache_dir() / "pretrained" / f"{tag}-{model_name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        return path
    from .engine import Trainer

    path.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"clipcl: pretraining {TAG_PREFIX}{tag} for {model_name} (once; cached in {path})", file=sys.stderr,
              flush=True)
    rng = torch.get_rng_state()  # the caller's model initialisation must not depend on the cache being warm
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pretraining-") as tmp:
            trainer = Trainer(cfg, Path(tmp) / "run", progress_bar=False, quiet=True)
            results = trainer.run()
            state = trainer.bundle.model.state_dict()
            atomic_write(path, lambda f: torch.save(state, f))
    finally:
        torch.set_rng_state(rng)
    if not quiet:
        print(f"clipcl: pretrained {TAG_PREFIX}{tag}: accuracy {100 * results['metrics']['last_accuracy']:.1f}% "
              "on its own domain's test images", file=sys.stderr, flush=True)
    return path
