"""Continual-learning scenarios: an indexable sequence of tasks, each carrying its classes.

Scenario labels are positions in the class order: the k-th class of the order has label k, so the classes
seen after task t are simply range(n_seen(t)).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..config import NAMED_ORDERS, ConfigError, ScenarioCfg, is_order_file
from .datasets import Dataset, load_dataset, pycil_order
from .images import FileStore, ImageSet, TensorStore


@dataclass(frozen=True)
class Task:
    """One step of the stream: its training, test and validation images and the classes it brings.

    val is held out of the training images (scenario.val_per_class), so hyper-parameters can be chosen
    without looking at test; it is empty when no validation split was asked for.
    """

    index: int
    name: str
    classes: tuple[int, ...]  # scenario labels of the classes present in this task
    train: ImageSet
    test: ImageSet
    val: ImageSet


@dataclass(frozen=True)
class Scenario:
    """A stream of tasks; kind 'cil' (disjoint classes) or 'dil' (same classes, new domain per task)."""

    kind: str
    classnames: tuple[str, ...]  # by scenario label
    class_order: tuple[int, ...]  # dataset label id of each scenario label
    tasks: tuple[Task, ...]
    notes: dict = field(default_factory=dict, compare=False)  # the dataset's notes (skipped files, warnings)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, t: int) -> Task:
        return self.tasks[t]

    def n_seen(self, t: int) -> int:
        """Number of classes seen after task t (the candidates of step t)."""
        if self.kind == "dil":
            return len(self.classnames)
        return max(max(task.classes) for task in self.tasks[: t + 1]) + 1

    @property
    def order_hash(self) -> str:
        """A short hash of the class order and class names: equal hashes, comparable runs."""
        blob = json.dumps({"order": list(self.class_order), "names": list(self.classnames),
                           "tasks": [t.name for t in self.tasks]})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprint(self) -> dict:
        """What the stream is made of, as plain JSON types: a resumed run must see the same data.

        Names, order and sizes say what changed in words (fingerprint_diff); a 16-hex-digit sha256 per task
        split catches the rest: for files, their paths relative to the dataset root (so a moved dataset
        still matches) with their labels; for in-memory images, the pixels with their labels.
        """
        root = self.notes.get("root", "")
        return {"kind": self.kind, "classnames": list(self.classnames), "class_order": list(self.class_order),
                "tasks": [t.name for t in self.tasks],
                "train_sizes": [len(t.train) for t in self.tasks], "test_sizes": [len(t.test) for t in self.tasks],
                "train_hashes": [_content_hash(t.train, root) for t in self.tasks],
                "test_hashes": [_content_hash(t.test, root) for t in self.tasks],
                "val_sizes": [len(t.val) for t in self.tasks],
                "val_hashes": [_content_hash(t.val, root) for t in self.tasks]}


EMPTY_HASH = hashlib.sha256(b"\0labels").hexdigest()[:16]  # _content_hash of a split with no images


def _split_field(fp: dict, key: str) -> list:
    """fp[key]; a fingerprint without val keys was saved before validation splits, so it had none."""
    if key in fp or not key.startswith("val_"):
        return list(fp.get(key, []))
    return [0 if key == "val_sizes" else EMPTY_HASH] * len(fp.get("tasks", []))


def _content_hash(images: ImageSet, root: str) -> str:
    """sha256 (16 hex digits) of one split: its files' paths below root, or its pixels; then its labels."""
    h = hashlib.sha256()
    store = getattr(images, "store", None)
    if isinstance(store, FileStore):
        prefix = os.path.join(root, "") if root else ""
        paths = (store.paths[i] for i in images.index)
        # surrogateescape: file names that are not valid UTF-8 still hash (as their original bytes)
        h.update("\0".join(p[len(prefix):] if p.startswith(prefix) else p for p in paths)
                 .encode("utf-8", "surrogateescape"))
    elif len(images):
        pixels = images.load(np.arange(len(images))).contiguous().numpy()
        h.update(repr(pixels.shape).encode())
        h.update(pixels)
    h.update(b"\0labels")
    h.update(images.targets.astype("<i8").tobytes())
    return h.hexdigest()[:16]


def _short(text: str, limit: int = 40) -> str:
    """A task or class name cut to fit a one-line message (CIL task names list all their classes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(names: list[str], limit: int = 5) -> str:
    """The first few names and how many more: ImageNet-sized changes still fit on a line."""
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def fingerprint_diff(old: dict, new: dict, max_parts: int = 6) -> str:
    """Empty if two Scenario.fingerprint()s match, else one line saying what changed, the most telling first.

    Class changes come first; a task whose name changed is reported by name alone (its sizes and files
    differ as a consequence); then sizes, then same-size content changes. At most max_parts are named.
    """
    parts = []
    if old.get("kind") != new.get("kind"):
        parts.append(f"kind {old.get('kind')} -> {new.get('kind')}")
    old_names, new_names = list(old.get("classnames", [])), list(new.get("classnames", []))
    added = [c for c in new_names if c not in old_names]
    removed = [c for c in old_names if c not in new_names]
    for names, what in ((added, "added"), (removed, "removed")):
        if names:
            parts.append(f"{'class' if len(names) == 1 else 'classes'} {what}: {_listing(names)}")
    if not added and not removed and (old_names != new_names or old.get("class_order") != new.get("class_order")):
        k = next((k for k, (a, b) in enumerate(zip(old_names, new_names)) if a != b), None)
        parts.append("class order changed" + (f" (position {k}: {_short(new_names[k])!r}, was "
                                                f"{_short(old_names[k])!r})" if k is not None else ""))
    old_tasks, new_tasks = list(old.get("tasks", [])), list(new.get("tasks", []))
    if len(old_tasks) != len(new_tasks):
        parts.append(f"number of tasks {len(old_tasks)} -> {len(new_tasks)}")
    for t, (was, now) in enumerate(zip(old_tasks, new_tasks)):
        if was != now:
            parts.append(f"task {t} is {_short(now)!r}, was {_short(was)!r}")
            continue
        for split, what in (("train", "training"), ("test", "test"), ("val", "validation")):
            sizes = [_split_field(fp, f"{split}_sizes")[t:t + 1] for fp in (old, new)]
            hashes = [_split_field(fp, f"{split}_hashes")[t:t + 1] for fp in (old, new)]
            if sizes[0] != sizes[1]:
                counts = [str(s[0]) if s else "?" for s in sizes]
                parts.append(f"task {t} ({_short(now)}): {what} images {counts[0]} -> {counts[1]}")
            elif hashes[0] != hashes[1]:
                parts.append(f"task {t} ({_short(now)}): the {what} images differ (same count)")
    if len(parts) > max_parts:
        parts = parts[:max_parts] + [f"{len(parts) - max_parts} more differences"]
    return "; ".join(parts)


def verify_images(scenario: Scenario, workers: int = 16) -> dict:
    """Header-check every image file the scenario's tasks use, so a bad file stops the run before training.

    Only the positions the tasks keep are checked (train, test and val of every task, after per-class limits);
    in-memory images need no check. Returns {"files": files checked, "bad": unreadable files, "seconds":
    time taken}. Bad files raise a ConfigError naming the first, unless the store skips bad images
    (scenario.skip_bad_images=true): then they go into its `bad` record up front (substituted on every
    read, counted in notes['unreadable_images']) and notes['warnings'] gets a line about them.
    """
    start = time.perf_counter()
    used: dict[int, tuple[FileStore, list[np.ndarray]]] = {}
    for task in scenario.tasks:
        for images in (task.train, task.test, task.val):
            store = getattr(images, "store", None)
            if isinstance(store, FileStore):
                used.setdefault(id(store), (store, []))[1].append(images.index)
    files, bad = 0, {}
    for store, parts in used.values():
        index = np.unique(np.concatenate(parts))
        files += len(index)
        found = store.verify(index, workers)
        named = {store.paths[i]: why for i, why in found.items()}
        if named and not store.skip_bad:
            first, why = next(iter(named.items()))
            raise ConfigError(f"{len(named)} of the {len(index)} image files this scenario uses are unreadable; the "
                              f"first is '{first}' ({why}). Replace or delete them, or set scenario.skip_bad_images="
                              "true to replace each by another image of its class (counted in results.json).")
        if named:
            _check_replaceable(store, np.fromiter(found, dtype=np.int64))
            store.bad.update(named)
            bad.update(named)
    if bad:
        first, why = next(iter(bad.items()))
        line = f"skipped {len(bad)} unreadable images, each replaced by another of its class (first: {first}: {why})"
        warnings = scenario.notes.setdefault("warnings", [])
        if line not in warnings:  # the scenario may be verified again (a resumed run)
            warnings.append(line)
    return {"files": files, "bad": len(bad), "seconds": round(time.perf_counter() - start, 3)}


def _check_replaceable(store: FileStore, bad: np.ndarray) -> None:
    """A ConfigError if every file of some class and split is bad: read() would find no stand-in mid-run."""
    groups, sizes = np.unique(store.groups, return_counts=True)
    bad_groups, bad_sizes = np.unique(store.groups[bad], return_counts=True)
    full = np.flatnonzero(bad_sizes == sizes[np.searchsorted(groups, bad_groups)])
    if len(full):
        first = store.paths[bad[store.groups[bad] == bad_groups[full[0]]][0]]
        raise ConfigError(f"every image file of the class and split of '{first}' ({bad_sizes[full[0]]} files) is "
                          "unreadable, so none is left to replace them (scenario.skip_bad_images=true); replace "
                          "the files, or remove the class.")


MAX_ORDER_FILE_BYTES = 1 << 20


def read_order_file(value: str, n_classes: int) -> list[int]:
    """The label ids of an order file: integers separated by spaces, commas or new lines (a JSON or YAML list
    reads too), each in [0, n_classes) and none twice; a ConfigError naming the file otherwise."""
    import re

    path = Path(value).expanduser()
    key = f"config key 'scenario.class_order' = '{value}'"
    try:
        if not path.is_file():
            raise ConfigError(f"{key}: no such file; give a file of class indices (e.g. '87 0 52 ...'), or one of "
                              f"{', '.join(NAMED_ORDERS)}.")
        if path.stat().st_size > MAX_ORDER_FILE_BYTES:
            raise ConfigError(f"{key}: the file is larger than 1 MiB; a class order is a list of label ids.")
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad's) is no class index
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read the file ({e}).") from None
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # '# comments' dropped
    tokens = [t for t in re.split(r"[\s,\[\]]+", body) if t and t != "-"]
    bad = [t for t in tokens if not re.fullmatch(r"\d+", t)]
    if bad or not tokens:
        raise ConfigError(f"{key}: " + (f"'{bad[0]}' is not a class index" if bad else "the file holds no class "
                          "index") + "; write label ids (integers) separated by spaces, commas or new lines.")
    return [int(t) for t in tokens]


def _checked(order: list[int], n_classes: int, key: str) -> list[int]:
    out = [c for c in order if not 0 <= c < n_classes]
    if out:
        raise ConfigError(f"{key} holds {out[:5]}: label ids must be in [0, {n_classes}).")
    seen, twice = set(), []
    for c in order:
        (twice.append(c) if c in seen else seen.add(c))
    if twice:
        raise ConfigError(f"{key} holds class {twice[0]} twice: each class comes once in an order.")
    return list(order)


def class_order(n_classes: int, cfg: ScenarioCfg, shipped: Sequence[int] | None = None,
                orders: dict[str, Sequence[int]] | None = None) -> list[int]:
    """The class order of cfg: explicit (scenario.classes), natural, the dataset's shipped one, a published one
    by name (pycil, continual-clip), a file of label ids, or a seeded shuffle."""
    if cfg.classes:
        return _checked(list(cfg.classes), n_classes, "config key 'scenario.classes'")
    if cfg.class_order == "natural":
        return list(range(n_classes))
    if cfg.class_order == "shipped":
        if shipped is None:
            raise ConfigError(f"config key 'scenario.class_order' = 'shipped': dataset '{cfg.dataset}' ships no "
                              "class order. Use 'seeded' or 'natural'.")
        return list(shipped)
    if cfg.class_order == "pycil":
        return pycil_order(n_classes)
    if cfg.class_order == "continual-clip":
        if not orders or "continual-clip" not in orders:
            raise ConfigError(f"config key 'scenario.class_order' = 'continual-clip': that is CIFAR-100's order "
                              f"(iCaRL's, used by Continual-CLIP, ZSCL, MoE-Adapters4CL, RAPF); dataset "
                              f"'{cfg.dataset}' has none of that name. Use pycil, seeded, or a file of class indices.")
        return _checked(list(orders["continual-clip"]), n_classes, "the continual-clip order")
    if is_order_file(cfg.class_order):
        return _checked(read_order_file(cfg.class_order, n_classes), n_classes,
                        f"config key 'scenario.class_order' = '{cfg.class_order}' (the file)")
    return np.random.default_rng(cfg.order_seed).permutation(n_classes).tolist()


def class_incremental(train: ImageSet, test: ImageSet, classnames: Sequence[str], order: Sequence[int],
                      classes_per_task: int, initial_classes: int = 0, n_tasks: int = 0) -> Scenario:
    """Split a dataset into tasks of disjoint classes following `order` (dataset label ids)."""
    first = initial_classes or classes_per_task
    if first > len(order):
        raise ConfigError(f"the first task wants {first} classes but the class order has only {len(order)} "
                          "(check scenario.classes_per_task / scenario.initial_classes).")
    bounds = [0, first]
    while bounds[-1] < len(order):
        bounds.append(min(bounds[-1] + classes_per_task, len(order)))
    if n_tasks:
        if n_tasks > len(bounds) - 1:
            raise ConfigError(f"config key 'scenario.n_tasks' = {n_tasks}: this class order makes only "
                              f"{len(bounds) - 1} tasks of {classes_per_task} classes.")
        bounds = bounds[: n_tasks + 1]
    used = list(order[: bounds[-1]])
    mapping = {old: new for new, old in enumerate(used)}
    train, test = train.relabel(mapping), test.relabel(mapping)
    tasks = []
    for t in range(len(bounds) - 1):
        labels = tuple(range(bounds[t], bounds[t + 1]))
        tr = train.subset(np.flatnonzero(np.isin(train.targets, labels)))
        te = test.subset(np.flatnonzero(np.isin(test.targets, labels)))
        tasks.append(Task(t, f"task{t}:" + ",".join(classnames[used[c]] for c in labels), labels, tr, te,
                          tr.subset(np.zeros(0, np.int64))))
    return Scenario("cil", tuple(classnames[c] for c in used), tuple(used), tuple(tasks))


def domain_incremental(domains: dict[str, tuple[ImageSet, ImageSet]], classnames: Sequence[str],
                       order: Sequence[str]) -> Scenario:
    """One task per domain, every task with all classes (labels unchanged)."""
    missing = [d for d in order if d not in domains]
    if missing:
        raise ConfigError(f"config key 'scenario.domains' names unknown domains {missing}; "
                          f"this dataset has: {', '.join(domains)}.")
    n = len(classnames)
    tasks = []
    for t, d in enumerate(order):
        tr, te = domains[d]
        tasks.append(Task(t, d, tuple(sorted(set(tr.targets.tolist()))), tr, te, tr.subset(np.zeros(0, np.int64))))
    return Scenario("dil", tuple(classnames), tuple(range(n)), tuple(tasks))


VAL_SALT = 52711  # mixed into the run's seed: the validation draw is a stream of its own, apart from subsampling


def hold_out(images: ImageSet, per_class: int, seed: int, stream: int,
             ids: Sequence[int]) -> tuple[ImageSet, ImageSet, list[tuple[int, int]]]:
    """(train, val, short): per_class images of each class moved, at random, from images to val.

    Each class draws with its own generator, seeded by the run's seed and the class's identity (stream, the
    domain; ids[label], its dataset label id), so a class holds out the same images whatever the class order,
    the task it falls in or the other classes. Both parts keep the images' order. A class keeps at least one
    training image; short lists (label, training images) of the classes that could not give per_class.
    """
    order = np.argsort(images.targets, kind="stable")
    labels, starts, counts = np.unique(images.targets[order], return_index=True, return_counts=True)
    val, short = [np.zeros(0, np.int64)], []
    for c, start, n in zip(labels.tolist(), starts, counts):
        k = min(per_class, n - 1)
        if k < per_class:
            short.append((c, int(n)))
        if k > 0:
            rng = np.random.default_rng([seed, VAL_SALT, stream, int(ids[c])])
            val.append(rng.choice(order[start:start + n], size=k, replace=False))
    held = np.sort(np.concatenate(val))
    return images.subset(np.setdiff1d(np.arange(len(images)), held)), images.subset(held), short


def with_validation(scenario: Scenario, per_class: int, seed: int, streams: Sequence[int]) -> Scenario:
    """The scenario with per_class training images of each class of each task moved to the task's val.

    A class too small to give them all and keep a training image is named in notes['warnings'] (a copy of
    the notes: the dataset's own stay as they were).
    """
    if per_class <= 0:
        return scenario
    tasks, short = [], []
    for task, stream in zip(scenario.tasks, streams):
        train, val, few = hold_out(task.train, per_class, seed, stream, scenario.class_order)
        tasks.append(replace(task, train=train, val=val))
        short += [f"{_short(scenario.classnames[c])!r} of task {task.index} ({n} images)" for c, n in few]
    notes = scenario.notes
    if short:
        which = "1 class has" if len(short) == 1 else f"{len(short)} classes have"
        line = (f"scenario.val_per_class = {per_class}: {which} too few training images, so each keeps one "
                f"for training and holds out the rest: {_listing(short)}")
        notes = {**notes, "warnings": [*notes.get("warnings", []), line]}
    return replace(scenario, tasks=tuple(tasks), notes=notes)


def _cap_warning(key: str, cap: int, what: str, sets: Sequence[ImageSet], used: Sequence[int],
                 classnames: Sequence[str]) -> str | None:
    """A line when a per-class cap (scenario.train_per_class, test_per_class) leaves classes below it: every
    class of the stream (the cap changes nothing), or some of them (they keep all they have)."""
    if cap <= 0:
        return None
    counts: dict[int, int] = {}
    for images in sets:  # the splits the cap was applied to, before it was (one per domain in DIL)
        labels, n = np.unique(images.targets, return_counts=True)
        for c, k in zip(labels.tolist(), n.tolist()):
            counts[c] = max(counts.get(c, 0), k)
    have = [(c, counts.get(c, 0)) for c in used]
    short = [(c, k) for c, k in have if k < cap]
    if not short:
        return None
    most = max((k for _, k in have), default=0)
    if len(short) == len(have):
        return (f"{key} = {cap:,} is more than any class has: no class of the stream has more than {most:,} {what} "
                "images, so every one is kept (the cap changes nothing)")
    listing = _listing([f"{_short(classnames[c])} ({k:,})" for c, k in sorted(short, key=lambda x: x[1])])
    verb = "has" if len(short) == 1 else "have"
    return (f"{key} = {cap:,}: {len(short)} of the stream's {len(have)} classes {verb} fewer {what} images and "
            f"keep all of theirs: {listing}")


def _said(ds: Dataset, cfg: ScenarioCfg, used: Sequence[int], train: Sequence[ImageSet],
          test: Sequence[ImageSet]) -> dict:
    """The dataset's notes plus a warning for each value the data ignores or caps (a copy: the dataset's own
    notes stay as they were)."""
    lines = [_cap_warning("scenario.train_per_class", cfg.train_per_class, "training", train, used, ds.classnames),
             _cap_warning("scenario.test_per_class", cfg.test_per_class, "test", test, used, ds.classnames)]
    store = getattr(next(iter(train), None), "store", None)
    if isinstance(store, TensorStore):  # images decoded once into memory: the decoding settings do not apply
        dims = "x".join(str(d) for d in store.images.shape[1:])
        if cfg.image_size != ScenarioCfg.image_size:
            lines.append(f"scenario.image_size = {cfg.image_size} is ignored: {cfg.dataset}'s images are {dims} in "
                         "memory (only folder datasets are decoded at scenario.image_size; the model resizes its "
                         "input to its own size)")
        if cfg.decode_workers != ScenarioCfg.decode_workers:
            lines.append(f"scenario.decode_workers = {cfg.decode_workers} is ignored: {cfg.dataset}'s images are "
                         "in memory, no file is decoded")
    lines = [line for line in lines if line]
    if not lines:
        return ds.notes
    return {**ds.notes, "warnings": [*ds.notes.get("warnings", []), *lines]}


def build_scenario(cfg: ScenarioCfg, seed: int = 0, dataset: Dataset | None = None) -> Scenario:
    """Load cfg's dataset and cut it into the stream of tasks cfg describes, holding out validation images.

    The validation draw comes last and from generators of its own, so with val_per_class=0 the tasks are
    exactly those of a run made before validation splits existed.
    """
    ds = dataset or load_dataset(cfg)
    rng = np.random.default_rng(seed + 7919)  # subsampling is part of the run's seed, not the class order
    if cfg.kind == "dil":
        if not ds.domains:
            raise ConfigError(f"config key 'scenario.kind' = 'dil': dataset '{cfg.dataset}' has no domains. "
                              "Use kind: cil, or a domain dataset (fmnist_dil, domainnet, imagefolder with domains).")
        domains = {d: (tr.per_class_limit(cfg.train_per_class, rng), te.per_class_limit(cfg.test_per_class, rng))
                   for d, (tr, te) in ds.domains.items()}
        order = list(cfg.domains) or list(ds.domains)
        if cfg.n_tasks:
            order = order[: cfg.n_tasks]
        scenario = domain_incremental(domains, ds.classnames, order)  # first: it names unknown domains
        streams = [1 + list(ds.domains).index(d) for d in order]  # a domain's draw is its own, wherever it comes
        notes = _said(ds, cfg, scenario.class_order, [ds.domains[d][0] for d in order],
                      [ds.domains[d][1] for d in order])
        return with_validation(replace(scenario, notes=notes), cfg.val_per_class, seed, streams)
    if ds.train is None or ds.test is None:
        raise ConfigError(f"config key 'scenario.kind' = 'cil': dataset '{cfg.dataset}' is domain-incremental "
                          "only. Use kind: dil.")
    if cfg.classes_per_task > len(ds.classnames):
        raise ConfigError(f"config key 'scenario.classes_per_task' = {cfg.classes_per_task}: dataset "
                          f"'{cfg.dataset}' has only {len(ds.classnames)} classes.")
    order = class_order(len(ds.classnames), cfg, ds.shipped_order, ds.orders)
    train = ds.train.per_class_limit(cfg.train_per_class, rng)
    test = ds.test.per_class_limit(cfg.test_per_class, rng)
    scenario = class_incremental(train, test, ds.classnames, order, cfg.classes_per_task,
                                 cfg.initial_classes, cfg.n_tasks)
    notes = _said(ds, cfg, scenario.class_order, [ds.train], [ds.test])
    return with_validation(replace(scenario, notes=notes), cfg.val_per_class, seed, [0] * len(scenario))
