"""Run configuration: frozen dataclasses, YAML loading, dotted overrides and validation.

Every value a run depends on lives here, is validated before any work starts, and is saved
(resolved) with every result and checkpoint.

Validation also holds the limits (MAX_*): seeds every generator takes, integers that fit an int64, batch sizes,
image sizes and process counts with a sane maximum, a training batch that fits the memory available, and a
replay budget that holds at least one image. Config and grid files are read with `Loader`: at most 1 MiB,
duplicate keys refused (naming the key and its lines), and aliases that expand to more than a million values
(an alias bomb) or refer to themselves refused; every such refusal is one line naming the file.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------- limits
# Values beyond these are mistakes (a stray exponent, a missing unit), refused at validation with one line
# rather than met later as an overflow, an allocator error or a machine swapping itself to a halt.
MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding (np.random.seed, RandomState) takes 0..2**32-1, torch 0..2**64-1
MAX_INT = 2 ** 63 - 1  # every integer fits an int64 (numpy and torch index and count in int64)
MAX_BATCH = 2 ** 18  # 262,144 images a step: above the largest published CLIP batches (OpenAI 32k, LAION 160k)
MAX_IMAGE_SIZE = 4096  # decoded folder images (CLIP models take 224-448 px; 4096 px is 50 MB an image)
MAX_DECODE_WORKERS = 512  # decoding processes (each is a fork of the run; more than any machine's cores)
MAX_YAML_BYTES = 2 ** 20  # a config or grid file holds a few keys: 1 MiB is far more than any needs
MAX_YAML_VALUES = 1_000_000  # YAML values after aliases are expanded (a 1 MiB file holds about 350,000)
MIN_ENCODED_BYTES = {"png": 67, "jpeg": 300}  # no PNG file is smaller (signature + IHDR + IDAT + IEND); PIL's
#                                               JPEGs carry 600+ bytes of tables (332 for a grey 1x1 image)

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlong, _repr.maxlevel = 120, 120, 60, 3
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def show(value: Any) -> str:
    """repr() of a value, cut to fit one line (a value may be a list of a million items)."""
    return _repr.repr(value)


def size_text(n: float) -> str:
    """Bytes as '1.5 GB' (decimal units)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} bytes"  # not reached


# ---------------------------------------------------------------------------------------------- YAML
class YamlLimitError(yaml.YAMLError):
    """A YAML document clipcl refuses although it parses: a duplicate key, an alias bomb, a recursive alias."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (the last would silently win) and documents whose aliases
    expand to more than MAX_YAML_VALUES values or refer to themselves (a 'billion laughs' file would take
    minutes and all memory to expand when a value is printed or copied)."""

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue  # '<<: *base' merges are meant to be overridden by the keys next to them
            line = key.start_mark.line + 1
            ident = (key.tag, key.value)
            if ident in seen:
                raise YamlLimitError(f"key '{show(key.value)[1:-1]}' appears twice (lines {seen[ident]} and {line}); "
                                     "YAML would silently keep the last value. Remove one of them")
            seen[ident] = line
        return node

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _count_values(node)
        return node


def _count_values(root: yaml.Node) -> int:
    """Values of the document once its aliases are expanded (each node counted once per reference)."""
    memo: dict[int, int | None] = {}

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in memo:
            if memo[key] is None:
                raise YamlLimitError("an alias refers to a value that holds it (a recursive structure); write the "
                                     "values out without anchors (&) and aliases (*)")
            return memo[key]  # type: ignore[return-value]
        memo[key] = None
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(count(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(count(k) + count(v) for k, v in node.value)
        if n > MAX_YAML_VALUES:
            raise YamlLimitError(f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values (an alias "
                                 "bomb); write the values out without anchors (&) and aliases (*)")
        memo[key] = n
        return n

    return count(root)


def parse_yaml(text: str) -> Any:
    """One YAML document with Loader; raises YamlLimitError (refused) or another yaml.YAMLError (invalid)."""
    loader = Loader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise YamlLimitError("lists or mappings nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str = "config") -> Any:
    """The YAML document of a config or grid file; any problem is a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} file '{path}': {e.strerror or e}.") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} file '{path}' is larger than {MAX_YAML_BYTES // 2 ** 20} MiB; a {what} file "
                          "holds a few keys: is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        hint = (" Give a YAML file of config keys, or a shipped benchmark name ('clipcl list benchmarks')."
                if what == "config" else " Give a YAML grid file, or a shipped grid name ('clipcl list grids').")
        raise ConfigError(f"{what} file '{path}' is not a text file (not UTF-8).{hint}") from None
    try:
        return parse_yaml(text)
    except YamlLimitError as e:
        raise ConfigError(f"{what} file '{path}' is refused: {e}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file '{path}' is not valid YAML: {' '.join(str(e).split())}") from None


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
    # how images smaller or larger than the model's input reach its size: torch (bicubic on float tensors, on the
    # device: fast) | openclip (open_clip's own eval transform: PIL bicubic on the shorter side, centre crop, on
    # uint8, on the CPU: the inputs pretrained CLIP weights were measured with)
    resize: str = "torch"
    lora_rank: int = 0  # > 0: LoRA of that rank on the attention and MLP projections of every tower that is not
    #                     locked; everything else is frozen (clipcl.lora). 0: the whole model trains
    lora_alpha: float = 0.0  # LoRA's scale is lora_alpha / lora_rank; 0 = lora_rank (a scale of 1)


@dataclass(frozen=True)
class ScenarioCfg:
    """The stream of tasks: dataset, protocol, class order and subsampling."""

    dataset: str = "fashion_mnist"
    root: str = ""  # data folder; "" = $CLIPCL_DATA, then the dataset's usual places
    kind: str = "cil"  # cil (class-incremental) | dil (domain-incremental)
    classes_per_task: int = 2
    initial_classes: int = 0  # a larger first task (B50-Inc10 style); 0 = same as classes_per_task
    n_tasks: int = 0  # 0 = as many as the classes (CIL) or domains (DIL) allow
    # seeded | natural | shipped (the dataset's published order, if any) | pycil (numpy seed 1993) |
    # continual-clip (CIFAR-100: iCaRL's list) | a file of label ids (a value with '/' or a suffix, e.g. order.txt)
    class_order: str = "seeded"
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
    #                           when the class was last trained) | auto: t2i in the prompts form, loss in pairs |
    #                           probe (old classes: the image -> text loss of memory images held out of training,
    #                           method.probe_per_class each) | oracle (every seen class: that loss on the validation
    #                           split; a DIAGNOSTIC, NOT A METHOD: it reads held-out labelled data of old tasks)
    lam_start: float = 0.0  # > lam: the KL-DRO temperature falls from lam_start to lam over each task (cosine)
    telemetry_every: int = 1  # record the DRO class weights every N steps
    t2i_eps: float = 0.0  # prompts form: the text -> image term is log(eps + mean_j exp(a_jc - a_ic)) + log n;
    #                       0 = 1/n, n the batch size (this project's choice, saturating: a well-fit sample has
    #                       little gradient); FastCLIP's 1e-14 is a numerical guard (the gradient stays whole)
    class_presence: str = "batch"  # gdro's per-sample weights: batch (w_i = p_y / (n_B(y) sum_{c in B} p_c)) |
    #                                corrected (w_i = p_y / (pi_y n_B(y)), pi_c the chance that class c is in a
    #                                batch under method.sampling: unbiased for sum_c p_c L_c)
    probe_per_class: int = 1  # dro_signal=probe: memory images of each old class held out of training as probes
    signal_every: int = 10  # dro_signal=probe | oracle: steps between the no-grad forwards on the held-out images
    replay_share: str = "batch"  # er: batch (the plain mini-batch CLIP loss) | classes (memory samples carry
    #                              n_old / n_seen of the loss, new samples n_new / n_seen: class balancing's ratio)
    rapf_threshold: float = 0.55  # rapf: an old and a new class are a hard pair when their normalised text
    #                               embeddings lie closer than this (Euclidean; RAPF's CIFAR-100 value)
    rapf_mix_bias: float = 0.6  # rapf: the floor of the fusion mask (CIFAR-100's; ImageNet-100's 0.5)
    rapf_beta: float = 2.0  # rapf: 10 beta Gaussian samples per drawn old class, 20 beta per hard pair, each step
    rapf_classes: int = 2  # rapf: old classes drawn per step for the cross-entropy replay (K)
    rapf_margin: float = 0.1  # rapf: the hinge margin between an old sample's own and its new neighbour's text
    proto_weight: float = 1.0  # prototypes: scores (1 - w) z.t_c + w z.p_c (0: zero-shot CLIP, 1: nearest class mean;
    #                            chosen on fmnist100-cil's validation split); classes without a prototype: z.t_c


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


NAMED_ORDERS = ("seeded", "natural", "shipped", "pycil", "continual-clip")  # scenario.class_order's names


def is_order_file(value: str) -> bool:
    """scenario.class_order names a file of class indices when it is not a bare name: it has a '/' or a suffix."""
    return value not in NAMED_ORDERS and ("/" in value or "." in value or "\\" in value)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.precision": ("auto", "fp32", "bf16"),
    "model.resize": ("torch", "openclip"),
    "scenario.kind": ("cil", "dil"),
    "memory.selection": ("random", "herding"),
    "memory.codec": ("raw", "png", "jpeg"),
    "scenario.augment": ("none", "shift", "crop_flip"),
    "method.sampling": ("concat", "uniform"),
    "method.dro": ("kl", "groupdro", "cvar", "none"),
    "method.gamma_schedule": ("constant", "cosine"),
    "method.gcl_form": ("pairs", "prompts"),
    "method.dro_signal": ("auto", "loss", "excess", "t2i", "probe", "oracle"),
    "method.class_presence": ("batch", "corrected"),
    "method.replay_share": ("batch", "classes"),
    "eval.templates": ("default", "ensemble"),
    "eval.split": ("test", "val"),
    "device": ("auto", "cpu", "cuda"),
}


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {show(value)}: {what}")


def _check_numbers(cfg: Any, prefix: str = "") -> None:
    """Every float of the config is a real number (inf and nan pass every range check and fail much later) and
    every integer fits an int64 (a larger one overflows in numpy or torch, far from the key that caused it)."""
    for name, value in vars(cfg).items():  # by type, not isinstance: a sweep validates thousands of configs
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                _check(False, prefix + name, value, "must be a finite number")
        elif kind is int:
            if not -MAX_INT <= value <= MAX_INT:
                _check(False, prefix + name, value, f"is too large (at most {MAX_INT:,})")
        elif kind is tuple:
            big = [v for v in value if isinstance(v, int) and abs(v) > MAX_INT]
            if big:
                _check(False, prefix + name, list(value), f"holds {show(big[0])}, too large (at most {MAX_INT:,})")
        elif is_dataclass(value):
            _check_numbers(value, prefix + name + ".")


# What validation knows of the registered datasets without loading them (the loaders live in data/, which
# imports torch): the shape of an image as loaded (None: decoded at scenario.image_size) and the number of
# classes (None: found in the files). tests/test_faults_limits.py checks it against the loaders.
DATASET_FACTS: dict[str, tuple[tuple[int, int, int] | None, int | None]] = {
    "fashion_mnist": ((1, 28, 28), 10), "fmnist_dil": ((1, 28, 28), 10), "fmnist_pretrain": ((1, 28, 28), 10),
    "fmnist_stream": ((1, 28, 28), 10), "fmnist_dil_stream": ((1, 28, 28), 10), "cifar100": ((3, 32, 32), 100),
    "imagenet": (None, None), "imagenet100": (None, 100), "domainnet": (None, None), "imagefolder": (None, None),
    "fmnist100": ((3, 28, 28), 100), "fmnist100_dil": ((3, 28, 28), 100), "fmnist100_pretrain": ((3, 28, 28), 60),
}


def image_shape(s: "ScenarioCfg") -> tuple[int, int, int] | None:
    """(C, H, W) of the dataset's images as a batch holds them; None for a dataset validation does not know."""
    if s.dataset not in DATASET_FACTS:
        return None
    shape = DATASET_FACTS[s.dataset][0]
    return shape or (3, s.image_size, s.image_size)


def _stream_classes(s: "ScenarioCfg") -> tuple[int, int | None]:
    """(classes the first task brings, classes seen after the last task or None if only the data can say)."""
    n = DATASET_FACTS.get(s.dataset, (None, None))[1]
    if s.kind == "dil":
        return (n or 1), n
    avail = len(s.classes) if s.classes else n
    first = s.initial_classes or s.classes_per_task
    if avail:
        first = min(first, avail)
    if s.n_tasks:
        last = first + (s.n_tasks - 1) * s.classes_per_task
        return first, (min(last, avail) if avail else last)
    return first, avail


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(cfg: "RunCfg") -> None:
    """A replay budget that holds no image, and a training batch larger than the memory available, refused."""
    s, m, o = cfg.scenario, cfg.memory, cfg.optim
    shape = image_shape(s)
    if shape is None:
        return
    pixels = shape[0] * shape[1] * shape[2]
    dims = "x".join(map(str, shape))
    first, last = _stream_classes(s)
    if m.bytes:
        image = pixels if m.codec == "raw" else MIN_ENCODED_BYTES[m.codec]
        takes = (f"one {dims} image takes {image:,} bytes raw" if m.codec == "raw" else
                 f"no {m.codec} file of an image is smaller than {image} bytes")
        for n, when in ((first, "the first task"), (last, "the last task")):
            if n and m.bytes // n < image:
                need = image * (last or first)
                raise ConfigError(
                    f"config key 'memory.bytes' = {m.bytes:,} holds no image: split over the {n} classes of {when}, "
                    f"each class gets {m.bytes // n:,} bytes, and {takes}. Set memory.bytes to at least {need:,} "
                    f"(one image of each of the {last or first} classes{'' if last else ' of the first task'}), "
                    "or to 0 to count images with memory.per_class")
    elif m.total:
        for n, when in ((first, "the first task"), (last, "the last task")):
            if n and m.total < n:
                raise ConfigError(
                    f"config key 'memory.total' = {m.total:,} holds no image: split over the {n} classes of {when}, "
                    f"each class gets {m.total // n} images. Set memory.total to at least {last or first} (one image "
                    "per class), or use memory.per_class")
    need = o.batch_size * pixels * 5  # uint8 as decoded, float32 as the model takes them; the first task's step
    if need > 2 ** 30:  # (later steps add as many memory images) only a large batch is worth reading meminfo
        avail = available_memory()
        if avail and need > avail:
            size = f" (scenario.image_size = {s.image_size})" if DATASET_FACTS[s.dataset][0] is None else ""
            raise ConfigError(
                f"config key 'optim.batch_size' = {o.batch_size:,}: a training step holds {o.batch_size:,} images of "
                f"{dims}{size} as uint8 and float32, at least {size_text(need)}, more than the "
                f"{size_text(avail)} of memory available. Lower optim.batch_size"
                + (" or scenario.image_size (the model resizes its input anyway)" if size else ""))


def _is_dir(path: str) -> tuple[bool, str]:
    """(is a folder, why not) without the OSError a too-long name raises."""
    try:
        return Path(path).expanduser().is_dir(), "no such folder"
    except OSError as e:
        return False, e.strerror or str(e)


# method name -> the method.* options it reads (each method class's `reads`; methods.register adds a new
# method's). Here too, without torch, for the processes that validate configs without building a method (a
# sweep's parent); a test checks that it equals the classes'. Any other method option must keep its default
# when the method runs: the method would ignore it in silence.
_GCL_READS = ("sampling", "gamma", "tau", "gcl_form", "gamma_schedule", "gamma_min", "t2i_eps")
METHOD_READS: dict[str, tuple[str, ...]] = {
    "zeroshot": (), "finetune": (), "joint": (),
    "er": ("sampling", "replay_share"), "er_ace": ("sampling",), "derpp": ("sampling", "distill_weight", "label_weight"),
    "gcl": _GCL_READS,
    "gdro": (*_GCL_READS, "dro", "lam", "beta", "eta", "alpha", "max_weight", "dro_adjust", "sample_mix", "dro_signal",
             "lam_start", "telemetry_every", "class_presence", "probe_per_class", "signal_every"),
    "lwf": ("distill_weight", "distill_temp"), "zscl": ("distill_weight", "distill_temp"),
    "wiseft": ("wise_alpha",), "prototypes": ("proto_weight",),
    "rapf": ("rapf_threshold", "rapf_mix_bias", "rapf_beta", "rapf_classes", "rapf_margin"),
}


def _check_method_reads(me: MethodCfg) -> None:
    reads = METHOD_READS.get(me.name)
    if reads is None:
        return
    default = MethodCfg()
    for f in fields(MethodCfg):
        value = getattr(me, f.name)
        if f.name in ("name", "telemetry_every") or f.name in reads or value == getattr(default, f.name):
            continue
        owners = [n for n, r in METHOD_READS.items() if f.name in r]
        _check(False, f"method.{f.name}", value,
               f"is not an option of method.name={me.name} (it reads {', '.join(reads) or 'none'}), which would "
               f"ignore it; {', '.join(owners) or 'no method'} read{'s' if len(owners) == 1 else ''} it. Leave it "
               f"at {getattr(default, f.name)!r} or choose such a method")


def validate(cfg: RunCfg) -> None:
    """Check values that no type can express; raise ConfigError naming the key.

    Everything that can be checked without data or a model is checked here, so that a bad value fails
    before any work starts (and before --overwrite replaces an old run).
    """
    for key, seed in (("seed", cfg.seed), ("scenario.order_seed", cfg.scenario.order_seed)):
        _check(seed >= 0, key, seed, "must be 0 or more (seeds are non-negative integers)")
        _check(seed <= MAX_SEED, key, seed, f"must be at most {MAX_SEED:,} = 2**32-1 (numpy's seeds are 32-bit)")
    _check_numbers(cfg)
    _check(bool(cfg.model.name.strip()), "model.name", cfg.model.name,
           "must name an open_clip architecture ('clipcl list models')")
    _check(bool(cfg.scenario.dataset.strip()), "scenario.dataset", cfg.scenario.dataset,
           "must name a dataset ('clipcl list datasets')")
    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        _check(value in choices, key, value, f"must be one of {', '.join(choices)}")
    s, m, o, me = cfg.scenario, cfg.memory, cfg.optim, cfg.method
    mo = cfg.model
    _check(0 <= mo.lora_rank <= 4096, "model.lora_rank", mo.lora_rank, "must be 0 (no LoRA) or a rank from 1 to 4096")
    _check(mo.lora_alpha >= 0, "model.lora_alpha", mo.lora_alpha, "must be 0 (= lora_rank) or positive")
    _check(not mo.lora_alpha or mo.lora_rank, "model.lora_alpha", mo.lora_alpha,
           "scales LoRA's adapters, and model.lora_rank is 0 (no LoRA): set a rank, or leave lora_alpha at 0")
    _check(not mo.lora_rank or not (mo.lock_text and mo.lock_image), "model.lora_rank", mo.lora_rank,
           "adapts the towers that are not locked, and model.lock_text and model.lock_image lock both: unlock one")
    _check(not mo.lora_rank or me.name not in ("zeroshot", "prototypes"), "model.lora_rank", mo.lora_rank,
           f"adapts a model that trains; method.name={me.name} trains nothing. Set model.lora_rank=0")
    _check(not mo.lora_rank or me.name not in ("wiseft", "zscl"), "model.lora_rank", mo.lora_rank,
           f"method.name={me.name} averages weights, and an average of LoRA's A and B is not the average of the "
           "adapted weights W + BA. Set model.lora_rank=0, or use another method")
    _check(s.class_order in NAMED_ORDERS or is_order_file(s.class_order), "scenario.class_order", s.class_order,
           f"must be one of {', '.join(NAMED_ORDERS)}, or the path of a file of class indices (e.g. orders/c100.txt)")
    _check(s.classes_per_task >= 1, "scenario.classes_per_task", s.classes_per_task, "must be at least 1")
    for key in ("initial_classes", "n_tasks", "train_per_class", "test_per_class", "val_per_class"):
        _check(getattr(s, key) >= 0, f"scenario.{key}", getattr(s, key), "must be 0 or more")
    _check(s.image_size >= 1, "scenario.image_size", s.image_size, "must be a positive number of pixels")
    _check(s.image_size <= MAX_IMAGE_SIZE, "scenario.image_size", s.image_size,
           f"must be at most {MAX_IMAGE_SIZE} pixels (one decoded image of that size takes "
           f"{size_text(3 * MAX_IMAGE_SIZE ** 2)}); CLIP models take 224 to 448")
    _check(s.decode_workers >= 0, "scenario.decode_workers", s.decode_workers, "must be 0 or more")
    _check(s.decode_workers <= MAX_DECODE_WORKERS, "scenario.decode_workers", s.decode_workers,
           f"must be at most {MAX_DECODE_WORKERS} processes (about the CPU count, at most)")
    _check(len(set(s.classes)) == len(s.classes), "scenario.classes", list(s.classes), "has repeated classes")
    # An explicit data folder that is not there is a typo, not a cue to look elsewhere (or to download).
    if s.root and not s.download:
        ok, why = _is_dir(s.root)
        _check(ok, "scenario.root", s.root, f"{why} (and scenario.download is false). Give the folder that holds "
               "the dataset, or leave scenario.root empty to use $CLIPCL_DATA and the usual places")
    _check(m.per_class >= 0, "memory.per_class", m.per_class, "must be 0 or more (images per class)")
    _check(m.total >= 0, "memory.total", m.total, "must be 0 or more (0 = use memory.per_class)")
    _check(m.bytes >= 0, "memory.bytes", m.bytes, "must be 0 or more (0 = count images, not bytes)")
    _check(1 <= m.quality <= 100, "memory.quality", m.quality, "must be a JPEG quality in 1..100")
    _check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be 0 or more")
    _check(o.epochs > 0, "optim.epochs", o.epochs, "must be positive")
    _check(o.batch_size >= 2, "optim.batch_size", o.batch_size, "must be at least 2 (a contrastive loss needs pairs)")
    for key, batch in (("optim.batch_size", o.batch_size), ("eval.batch_size", cfg.eval.batch_size)):
        _check(batch <= MAX_BATCH, key, batch, f"must be at most {MAX_BATCH:,} images (the largest published CLIP "
               "batches are 32,768 to 160,000, over hundreds of GPUs)")
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
    _check(me.t2i_eps >= 0, "method.t2i_eps", me.t2i_eps,
           "must be 0 (eps = 1/n, n the batch size) or a positive number (FastCLIP: 1e-14)")
    _check(not (me.t2i_eps and me.gcl_form != "prompts"), "method.t2i_eps", me.t2i_eps,
           "sets the text -> image term of method.gcl_form=prompts; it has no effect in the pairs form. Set it to 0")
    _check(me.probe_per_class >= 1, "method.probe_per_class", me.probe_per_class,
           "must be 1 or more (memory images held out per old class)")
    _check(me.signal_every >= 1, "method.signal_every", me.signal_every, "must be at least 1 (steps)")
    held_out = me.dro_signal in ("probe", "oracle")
    # options of one method only: set on another they would be ignored in silence
    _check(not me.t2i_eps or me.name in ("gcl", "gdro"), "method.t2i_eps", me.t2i_eps,
           f"sets gcl's and gdro's text -> image term; method.name={me.name} has none. Set it to 0")
    _check(me.class_presence == "batch" or me.name == "gdro", "method.class_presence", me.class_presence,
           f"corrects gdro's class weights; method.name={me.name} has none. Use class_presence=batch")
    _check(not held_out or me.name == "gdro", "method.dro_signal", me.dro_signal,
           f"is a signal of gdro's class weights; method.name={me.name} has none. Use dro_signal=auto")
    _check(me.replay_share == "batch" or me.name == "er", "method.replay_share", me.replay_share,
           f"weighs er's memory loss; method.name={me.name} weighs its own. Use replay_share=batch")
    _check(0 <= me.proto_weight <= 1, "method.proto_weight", me.proto_weight,
           "must be in [0, 1] (0: the text classifier alone, 1: the prototypes alone)")
    _check(me.proto_weight == 1.0 or me.name == "prototypes", "method.proto_weight", me.proto_weight,
           f"fuses the prototypes method's classifier; method.name={me.name} has none. Leave it at 1")
    _check(me.class_presence == "batch" or s.kind == "cil" or me.sampling == "uniform", "method.class_presence",
           me.class_presence, "corrected is exact when every class is all new data or all memory (class-incremental) "
           "or with method.sampling=uniform; in a domain-incremental stream drawn with sampling=concat a class is in "
           "both parts. Use sampling=uniform or class_presence=batch")
    _check(not held_out or me.gcl_form == "prompts", "method.dro_signal", me.dro_signal,
           f"{me.dro_signal} reads the image -> text loss over every seen class prompt, which needs "
           "method.gcl_form=prompts (the pairs form has none)")
    if me.dro_signal == "probe":
        _check(not (m.total or m.bytes), "memory.total" if m.total else "memory.bytes", m.total or m.bytes,
               "method.dro_signal=probe holds out method.probe_per_class images of each old class's memory, which "
               "needs a per-class budget: set memory.total and memory.bytes to 0 and memory.per_class above "
               f"{me.probe_per_class}")
        _check(m.per_class > me.probe_per_class, "memory.per_class", m.per_class,
               f"method.dro_signal=probe holds out method.probe_per_class={me.probe_per_class} image(s) of each old "
               f"class's memory and trains on the rest, so memory.per_class must be at least "
               f"{me.probe_per_class + 1}" + (" (at memory.per_class=1 there is no image to spare for a probe: use "
                                               "dro_signal=auto, or oracle as a diagnostic)" if m.per_class == 1 else ""))
    _check(me.dro_signal != "oracle" or s.val_per_class > 0, "method.dro_signal", me.dro_signal,
           "oracle reads the validation split of every seen task: set scenario.val_per_class to 1 or more")
    _check(me.replay_share != "classes" or s.kind == "cil", "method.replay_share", me.replay_share,
           "classes splits the loss between old classes (memory) and the new task's classes; in a domain-incremental "
           "stream every class is both. Use replay_share=batch")
    _check(me.rapf_threshold > 0, "method.rapf_threshold", me.rapf_threshold,
           "must be positive (a distance between unit vectors, 0 to 2)")
    _check(0 <= me.rapf_mix_bias <= 1, "method.rapf_mix_bias", me.rapf_mix_bias, "must be in [0, 1]")
    _check(me.rapf_beta >= 0, "method.rapf_beta", me.rapf_beta, "must be 0 or more")
    _check(me.rapf_classes >= 1, "method.rapf_classes", me.rapf_classes, "must be at least 1")
    _check(me.rapf_margin >= 0, "method.rapf_margin", me.rapf_margin, "must be 0 or more")
    _check(not mo.lora_rank or me.name != "rapf", "model.lora_rank", mo.lora_rank,
           "adapts the towers, and rapf keeps them frozen (it trains its own adapter). Set model.lora_rank=0")
    _check(cfg.log.every >= 1, "log.every", cfg.log.every, "must be at least 1 (a row every N steps)")
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be 0 (per task) or more")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be at least 1")
    # Without held-out images a val evaluation would have nothing to measure: every row of R would be empty.
    _check(cfg.eval.split != "val" or s.val_per_class > 0, "eval.split", cfg.eval.split,
           "needs a validation split: set scenario.val_per_class to 1 or more")
    _check_memory(cfg)


def get_value(cfg: Any, dotted: str) -> Any:
    """Value of a dotted key such as 'method.lam'."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@functools.lru_cache(maxsize=None)
def _layout(cls: type) -> tuple[tuple[str, type | None, Any], ...]:
    """(name, section class or None, type) of each field of a config class, in order.

    Cached: typing.get_type_hints evaluates the annotations, which dominated building a config (a sweep builds
    thousands).
    """
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name] if is_dataclass(hints[f.name]) else None, hints[f.name]) for f in fields(cls))


@functools.lru_cache(maxsize=None)
def _types(cls: type) -> dict[str, tuple[type | None, Any]]:
    return {name: (section, typ) for name, section, typ in _layout(cls)}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-ready dict of a config (tuples become lists)."""
    out: dict[str, Any] = {}
    for name, section, _ in _layout(type(cfg)):
        value = getattr(cfg, name)
        if section is not None:
            out[name] = to_dict(value)
        elif isinstance(value, (tuple, list)):
            out[name] = list(value)
        else:
            out[name] = value
    return out


def valid_keys(cls: type = RunCfg, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts."""
    keys = []
    for name, section, _ in _layout(cls):
        if section is not None:
            keys += valid_keys(section, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


_origin = functools.lru_cache(maxsize=None)(typing.get_origin)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML value to the field's type, or raise ConfigError naming the key."""
    origin = _origin(typ)
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a list")
        (inner, _) = typing.get_args(typ)
        return tuple(_coerce(key, v, inner) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' = {show(value)}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # exact, however large (validate() says when it is too large)
        if isinstance(value, bool) or not isinstance(value, (float, str)):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a whole number")
        try:
            f = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a whole number") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a whole number")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a number") from None
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' = {show(value)}: expected a string")
        return str(value)
    return value


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{show(key)[1:-1]}'.{hint} Run 'clipcl list keys' to see every key.")


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config (results.json, a checkpoint) with the keys added to clipcl since it was written filled
    in at their defaults, which reproduce what the older version did: so that a run resumes, a sweep cell is
    recognised and runs group as they did. Unknown keys and odd values are kept as they are."""
    def merge(defaults: dict[str, Any], given: Any) -> Any:
        if not isinstance(given, dict):
            return given
        out = dict(given)
        for k, v in defaults.items():
            if k not in out:
                out[k] = v
            elif isinstance(v, dict):
                out[k] = merge(v, out[k])
        return out

    return merge(json.loads(_default_config_json()), config)  # a fresh copy each time: callers may change it


@functools.lru_cache(maxsize=1)
def _default_config_json() -> str:
    return json.dumps(to_dict(RunCfg()))


def from_dict(data: dict[str, Any], cls: type = RunCfg, prefix: str = "") -> Any:
    """Build a (nested) config from a dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {show(data)}")
    types = _types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(prefix + str(key))
        section, typ = types[key]
        if section is not None:
            kwargs[key] = from_dict(value or {}, section, prefix + key + ".")
        else:
            kwargs[key] = _coerce(prefix + key, value, typ)
    return cls(**kwargs)


@functools.lru_cache(maxsize=4096)
def _parse_scalar(raw: str) -> tuple[bool, Any]:
    """(parsed, value) of an override's text when it is a single YAML scalar; (False, None) otherwise.

    Cached: a sweep's cells repeat the same few texts thousands of times, and PyYAML is pure Python here.
    """
    value = parse_yaml(raw)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return True, value
    return False, None


def _override_value(key: str, raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        parsed, value = _parse_scalar(raw)
        return value if parsed else parse_yaml(raw)  # lists and mappings are parsed afresh: they are mutable
    except YamlLimitError as e:
        raise ConfigError(f"override '{key}=...' is refused: {e}.") from None
    except yaml.YAMLError:
        return raw


def overridden(data: dict[str, Any], overrides: list[str] | tuple[str, ...], whole: bool = True) -> RunCfg:
    """The config of a to_dict() dict with 'a.b=value' strings applied (data itself is left as it was).

    whole: this is the config a run will run with, so the method options its method does not read must be at
    their defaults (a config file alone may set gdro's options under er, for a user who then picks gdro; a
    stored config of an older run is not checked again)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}  # the sections are replaced
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{show(item)[1:-1]}' is not of the form key=value (for example "
                              "method.name=er)")
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
        node[parts[-1]] = _override_value(key, raw)
    cfg = from_dict(data)
    if whole:
        _check_method_reads(cfg.method)
    return cfg


def apply_overrides(cfg: RunCfg, overrides: list[str], whole: bool = True) -> RunCfg:
    """Apply 'a.b=value' strings (values parsed as YAML) to a config (whole: see overridden)."""
    return overridden(to_dict(cfg), overrides, whole)


def load_config(path_or_name: str | Path, overrides: list[str] | None = None) -> RunCfg:
    """Load a YAML file or a shipped benchmark config by name, then apply overrides."""
    from .benchmarks import config_path

    try:
        path = config_path(str(path_or_name))
    except OSError as e:  # a name too long for the file system, a folder that cannot be read
        raise ConfigError(f"config '{show(str(path_or_name))[1:-1]}': {e.strerror or e}. Give a YAML file of config "
                          "keys, or a shipped benchmark name ('clipcl list benchmarks').") from None
    data = read_yaml(path, "config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    try:
        cfg = from_dict(data)
    except ConfigError as e:  # name the file: the key alone does not say where to fix it
        raise ConfigError(f"in config file '{path}': {e}") from None
    return apply_overrides(cfg, overrides or [])
