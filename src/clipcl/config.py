"""Run configuration: frozen dataclasses, YAML loading, dotted overrides and validation.

Every value a run depends on lives here, is validated before any work starts, and is saved
(resolved) with every result and checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class ModelCfg:
    """Which open_clip model to fine-tune."""

    name: str = "clipcl-tiny-rn"
    pretrained: str = ""  # an open_clip pretrained tag ("openai") or a local checkpoint file; "" = random init
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    lock_text: bool = False  # freeze the text tower (LiT-style): class texts stay fixed prototypes
    lock_image: bool = False  # freeze the image tower (only the text tower and the logit scale train)
    channels_last: bool = False  # the image tower and its input in channels-last memory format (convolutions)
    grad_checkpointing: bool = False  # recompute activations in the backward: less memory, more time
    compile: bool = False  # torch.compile the training forward (the first steps are slow while it compiles)


@dataclass(frozen=True)
class ScenarioCfg:
    """The stream of tasks: dataset, protocol, class order and subsampling."""

    dataset: str = "fashion_mnist"
    root: str = ""  # data folder; "" = $CLIPCL_DATA, then the dataset's usual places
    kind: str = "cil"  # cil (class-incremental) | dil (domain-incremental)
    classes_per_task: int = 2
    initial_classes: int = 0  # a larger first task (B50-Inc10 style); 0 = same as classes_per_task
    n_tasks: int = 0  # 0 = as many as the classes (CIL) or domains (DIL) allow
    class_order: str = "seeded"  # seeded | natural | shipped (the dataset's published order, if any)
    order_seed: int = 1993
    classes: tuple[int, ...] = ()  # an explicit class order (dataset label ids); overrides class_order
    domains: tuple[str, ...] = ()  # DIL: the domains in stream order; () = the dataset's default
    train_per_class: int = 0  # keep at most this many training images per class (0 = all)
    test_per_class: int = 0  # likewise for test images
    val_per_class: int = 0  # hold out this many of the kept training images per class as a validation split
    #                         (seeded, removed from training), for choosing hyper-parameters; 0 = no validation split
    download: bool = True  # allow torchvision datasets to download when the files are absent
    skip_bad_images: bool = False  # replace unreadable images by a readable one of the same class and split
    #                               (counted in Dataset.notes) instead of stopping with the file's name
    augment: str = "crop_flip"  # training augmentation: crop_flip (natural images) | shift (small images) | none
    image_size: int = 224  # folder datasets decode to image_size x image_size (shorter side resized, then
    #                        centre-cropped): the model's input size, 224 for ViT-B-16
    decode_workers: int = 4  # processes that decode folder images (0 = decode in the main process)


@dataclass(frozen=True)
class MemoryCfg:
    """The class-balanced replay memory."""

    per_class: int = 10  # images kept per seen class
    total: int = 0  # if > 0: a total budget split equally over the seen classes (overrides per_class)
    bytes: int = 0  # if > 0: a budget in bytes split equally over the seen classes (overrides both)
    codec: str = "raw"  # how images are stored: raw (uint8 pixels) | png (lossless) | jpeg (at `quality`)
    quality: int = 90  # JPEG quality, 1-100
    selection: str = "random"  # random | herding (iCaRL: exemplars whose mean is closest to the class mean)


@dataclass(frozen=True)
class OptimCfg:
    """Optimiser and schedule, restarted at every task."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    epochs: float = 1.0  # passes over the task's new data (fractions allowed)
    batch_size: int = 128
    warmup_steps: int = 10
    grad_clip: float = 1.0
    max_steps: int = 0  # cap on steps per task (0 = no cap)


@dataclass(frozen=True)
class MethodCfg:
    """The continual-learning method and its options (METHOD.md)."""

    name: str = "er"
    sampling: str = "concat"  # concat | uniform: how batches mix new data and memory
    gamma: float = 0.9  # GCL moving-average rate
    tau: float = 0.0  # GCL temperature; 0 = 1 / model logit scale (detached)
    dro: str = "kl"  # kl | groupdro | cvar | none
    lam: float = 4.0  # KL-DRO temperature, in units of the class losses (nats in the prompts form; the pairs form's
    #                   losses are in units of tau, about 1/14: lam 0.3 there is about 4 here)
    beta: float = 0.1  # moving-average rate of the class losses
    eta: float = 0.01  # groupdro step size
    alpha: float = 0.5  # cvar: fraction of classes kept
    wise_alpha: float = 0.5  # wiseft: weight of the fine-tuned model (0 = the weights before the task)
    distill_weight: float = 1.0  # lwf, zscl: weight of the distillation; derpp: of the stored-logit term
    distill_temp: float = 2.0  # lwf, zscl: distillation temperature
    label_weight: float = 0.5  # derpp: weight of the memory samples' cross-entropy
    max_weight: float = 0.0  # cap on a class's DRO weight (0 = no cap)
    gamma_schedule: str = "constant"  # constant (gamma) | cosine (FastCLIP: from 1 down to gamma_min over a task)
    gamma_min: float = 0.2  # the last value of the cosine gamma schedule
    dro_adjust: float = 0.0  # group DRO's size adjustment: class losses v_c + dro_adjust / sqrt(n_c), n_c the
    #                          class's samples in D_t U M (small memory classes look worse, get more weight)
    sample_mix: float = 0.0  # w = (1 - sample_mix) w_DRO + sample_mix w_sample: keeps weight on the new task
    gcl_form: str = "prompts"  # prompts: exact image -> text over every seen class prompt, one text -> image
    #                            estimator per class, learned logit scale | pairs: per-sample estimators over
    #                            sample pairs, temperature detached (the first reconstruction)
    dro_signal: str = "auto"  # the class loss DRO weighs: t2i (its text -> image term, new images as negatives;
    #                           prompts form) | loss (the moving average of the whole loss) | excess (over its value
    #                           when the class was last trained) | auto: t2i in the prompts form, loss in pairs
    lam_start: float = 0.0  # > lam: the KL-DRO temperature falls from lam_start to lam over each task (cosine)
    telemetry_every: int = 1  # record the DRO class weights every N steps


@dataclass(frozen=True)
class EvalCfg:
    """Evaluation after each task."""

    templates: str = "default"  # default (one template) | ensemble
    batch_size: int = 512
    split: str = "test"  # test | val: the split R and every metric are computed on (val: tune without the test set)
    unseen: bool = False  # also measure, after each task, the tasks not trained yet among all classes: how much
    #                       of a pretrained model's zero-shot accuracy fine-tuning keeps (unseen_matrix)


@dataclass(frozen=True)
class LogCfg:
    """The per-step log (log.csv, always) and the trackers it also feeds. May change when a run is resumed."""

    every: int = 1  # a row every N training steps of a task (and its last step)
    tensorboard: bool = False  # also write TensorBoard events into <out>/tensorboard (needs the tensorboard package)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package and its login)
    wandb_project: str = "clipcl"


@dataclass(frozen=True)
class RunCfg:
    """A whole run."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 0  # also checkpoint every N training steps (0 = after each task only)
    skip_nonfinite: bool = False  # skip batches whose loss is not finite (counted) instead of stopping
    model: ModelCfg = field(default_factory=ModelCfg)
    scenario: ScenarioCfg = field(default_factory=ScenarioCfg)
    memory: MemoryCfg = field(default_factory=MemoryCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)

    def __post_init__(self) -> None:
        validate(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.precision": ("auto", "fp32", "bf16"),
    "scenario.kind": ("cil", "dil"),
    "scenario.class_order": ("seeded", "natural", "shipped"),
    "memory.selection": ("random", "herding"),
    "memory.codec": ("raw", "png", "jpeg"),
    "scenario.augment": ("none", "shift", "crop_flip"),
    "method.sampling": ("concat", "uniform"),
    "method.dro": ("kl", "groupdro", "cvar", "none"),
    "method.gamma_schedule": ("constant", "cosine"),
    "method.gcl_form": ("pairs", "prompts"),
    "method.dro_signal": ("auto", "loss", "excess", "t2i"),
    "eval.templates": ("default", "ensemble"),
    "eval.split": ("test", "val"),
    "device": ("auto", "cpu", "cuda"),
}


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {what}")


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of the config is a real number: inf and nan pass every range check and fail much later."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            _check_finite(value, prefix + f.name + ".")
        elif isinstance(value, float):
            _check(math.isfinite(value), prefix + f.name, value, "must be a finite number")


def validate(cfg: RunCfg) -> None:
    """Check values that no type can express; raise ConfigError naming the key.

    Everything that can be checked without data or a model is checked here, so that a bad value fails
    before any work starts (and before --overwrite replaces an old run).
    """
    _check_finite(cfg)
    _check(cfg.seed >= 0, "seed", cfg.seed, "must be 0 or more (seeds are non-negative integers)")
    _check(cfg.scenario.order_seed >= 0, "scenario.order_seed", cfg.scenario.order_seed,
           "must be 0 or more (seeds are non-negative integers)")
    _check(bool(cfg.model.name.strip()), "model.name", cfg.model.name,
           "must name an open_clip architecture ('clipcl list models')")
    _check(bool(cfg.scenario.dataset.strip()), "scenario.dataset", cfg.scenario.dataset,
           "must name a dataset ('clipcl list datasets')")
    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        _check(value in choices, key, value, f"must be one of {', '.join(choices)}")
    s, m, o, me = cfg.scenario, cfg.memory, cfg.optim, cfg.method
    _check(s.classes_per_task >= 1, "scenario.classes_per_task", s.classes_per_task, "must be at least 1")
    for key in ("initial_classes", "n_tasks", "train_per_class", "test_per_class", "val_per_class"):
        _check(getattr(s, key) >= 0, f"scenario.{key}", getattr(s, key), "must be 0 or more")
    _check(s.image_size >= 1, "scenario.image_size", s.image_size, "must be a positive number of pixels")
    _check(s.decode_workers >= 0, "scenario.decode_workers", s.decode_workers, "must be 0 or more")
    _check(len(set(s.classes)) == len(s.classes), "scenario.classes", list(s.classes), "has repeated classes")
    # An explicit data folder that is not there is a typo, not a cue to look elsewhere (or to download).
    _check(not s.root or s.download or Path(s.root).expanduser().is_dir(), "scenario.root", s.root,
           "no such folder (and scenario.download is false). Give the folder that holds the dataset, "
           "or leave scenario.root empty to use $CLIPCL_DATA and the usual places")
    _check(m.per_class >= 0, "memory.per_class", m.per_class, "must be 0 or more (images per class)")
    _check(m.total >= 0, "memory.total", m.total, "must be 0 or more (0 = use memory.per_class)")
    _check(m.bytes >= 0, "memory.bytes", m.bytes, "must be 0 or more (0 = count images, not bytes)")
    _check(1 <= m.quality <= 100, "memory.quality", m.quality, "must be a JPEG quality in 1..100")
    _check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be 0 or more")
    _check(o.epochs > 0, "optim.epochs", o.epochs, "must be positive")
    _check(o.batch_size >= 2, "optim.batch_size", o.batch_size, "must be at least 2 (a contrastive loss needs pairs)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be 0 or more")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be 0 (off) or more")
    _check(o.max_steps >= 0, "optim.max_steps", o.max_steps, "must be 0 (no cap) or more")
    _check(0 < me.gamma <= 1, "method.gamma", me.gamma, "must be in (0, 1]")
    _check(me.tau >= 0, "method.tau", me.tau, "must be 0 (use the model's logit scale) or positive")
    _check(me.lam > 0, "method.lam", me.lam, "must be positive")
    _check(0 < me.beta <= 1, "method.beta", me.beta, "must be in (0, 1]")
    _check(me.eta > 0, "method.eta", me.eta, "must be positive")
    _check(0 < me.alpha <= 1, "method.alpha", me.alpha, "must be in (0, 1]")
    _check(me.max_weight == 0 or 0 < me.max_weight <= 1, "method.max_weight", me.max_weight,
           "must be 0 (no cap) or in (0, 1]")
    _check(0 < me.gamma_min <= 1, "method.gamma_min", me.gamma_min, "must be in (0, 1]")
    _check(me.dro_adjust >= 0, "method.dro_adjust", me.dro_adjust, "must be 0 (off) or more")
    _check(not (me.dro_adjust and me.dro in ("groupdro", "none")), "method.dro_adjust", me.dro_adjust,
           f"adjusts the class losses of dro=kl and dro=cvar; it has no effect with dro={me.dro}. Set it to 0")
    _check(0 <= me.sample_mix <= 1, "method.sample_mix", me.sample_mix, "must be in [0, 1]")
    _check(me.dro_signal != "t2i" or me.gcl_form == "prompts", "method.dro_signal", me.dro_signal,
           "t2i needs method.gcl_form=prompts (the pairs form has no per-class text -> image term)")
    _check(not (me.dro_signal == "excess" and me.dro in ("groupdro", "none")), "method.dro_signal", me.dro_signal,
           f"excess changes the class losses of dro=kl and dro=cvar; it has no effect with dro={me.dro}. "
           "Use dro_signal=auto")
    _check(not (cfg.model.lock_image and cfg.model.lock_text), "model.lock_image", cfg.model.lock_image,
           "with model.lock_text too, nothing but the logit scale would train. Unlock one of the towers")
    _check(me.lam_start == 0 or me.lam_start > me.lam, "method.lam_start", me.lam_start,
           f"must be 0 (off) or above method.lam ({me.lam}): the temperature falls from lam_start to lam")
    _check(not (me.lam_start and me.dro != "kl"), "method.lam_start", me.lam_start,
           f"schedules the KL-DRO temperature; it has no effect with dro={me.dro}. Set it to 0")
    _check(0 <= me.wise_alpha <= 1, "method.wise_alpha", me.wise_alpha, "must be in [0, 1]")
    _check(me.distill_weight >= 0, "method.distill_weight", me.distill_weight, "must be 0 or more")
    _check(me.distill_temp > 0, "method.distill_temp", me.distill_temp, "must be positive")
    _check(me.label_weight >= 0, "method.label_weight", me.label_weight, "must be 0 or more")
    _check(me.telemetry_every >= 1, "method.telemetry_every", me.telemetry_every, "must be at least 1")
    _check(cfg.log.every >= 1, "log.every", cfg.log.every, "must be at least 1 (a row every N steps)")
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be 0 (per task) or more")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be at least 1")
    # Without held-out images a val evaluation would have nothing to measure: every row of R would be empty.
    _check(cfg.eval.split != "val" or s.val_per_class > 0, "eval.split", cfg.eval.split,
           "needs a validation split: set scenario.val_per_class to 1 or more")


def get_value(cfg: Any, dotted: str) -> Any:
    """Value of a dotted key such as 'method.lam'."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-ready dict of a config (tuples become lists)."""
    out = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return [fix(v) for v in x]
        return x

    return fix(out)


def valid_keys(cls: type = RunCfg, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            keys += valid_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list")
        (inner, _) = typing.get_args(typ)
        return tuple(_coerce(key, v, inner) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number") from None
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
        return str(value)
    return value


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Run 'clipcl list keys' to see every key.")


def from_dict(data: dict[str, Any], cls: type = RunCfg, prefix: str = "") -> Any:
    """Build a (nested) config from a dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + str(key))
        typ = hints[key]
        if is_dataclass(typ):
            kwargs[key] = from_dict(value or {}, typ, prefix + key + ".")
        else:
            kwargs[key] = _coerce(prefix + key, value, typ)
    return cls(**kwargs)


def apply_overrides(cfg: RunCfg, overrides: list[str]) -> RunCfg:
    """Apply 'a.b=value' strings (values parsed as YAML) to a config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example method.name=er)")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise _unknown_key(key)
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise _unknown_key(key)
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return from_dict(data)


def load_config(path_or_name: str | Path, overrides: list[str] | None = None) -> RunCfg:
    """Load a YAML file or a shipped benchmark config by name, then apply overrides."""
    from .benchmarks import config_path

    path = config_path(str(path_or_name))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text file (not UTF-8). Give a YAML file of "
                          "config keys, or a shipped benchmark name ('clipcl list benchmarks').") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}.") from None
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"config file '{path}' is not valid YAML: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    try:
        cfg = from_dict(data)
    except ConfigError as e:  # name the file: the key alone does not say where to fix it
        raise ConfigError(f"in config file '{path}': {e}") from None
    return apply_overrides(cfg, overrides or [])

