"""Continual-learning scenarios: an indexable sequence of tasks, each carrying its classes.

Scenario labels are positions in the class order: the k-th class of the order has label k, so the classes
seen after task t are simply range(n_seen(t)).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..config import ConfigError, ScenarioCfg
from .datasets import Dataset, load_dataset
from .images import ImageSet


@dataclass(frozen=True)
class Task:
    """One step of the stream: its training and test images and the classes it brings."""

    index: int
    name: str
    classes: tuple[int, ...]  # scenario labels of the classes present in this task
    train: ImageSet
    test: ImageSet


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


def class_order(n_classes: int, cfg: ScenarioCfg, shipped: Sequence[int] | None = None) -> list[int]:
    """The class order of cfg: explicit, natural, the dataset's shipped one, or a seeded shuffle."""
    if cfg.classes:
        bad = [c for c in cfg.classes if not 0 <= c < n_classes]
        if bad:
            raise ConfigError(f"config key 'scenario.classes' holds {bad}: label ids must be in [0, {n_classes}).")
        return list(cfg.classes)
    if cfg.class_order == "natural":
        return list(range(n_classes))
    if cfg.class_order == "shipped":
        if shipped is None:
            raise ConfigError(f"config key 'scenario.class_order' = 'shipped': dataset '{cfg.dataset}' ships no "
                              "class order. Use 'seeded' or 'natural'.")
        return list(shipped)
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
        tasks.append(Task(t, f"task{t}:" + ",".join(classnames[used[c]] for c in labels), labels, tr, te))
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
        tasks.append(Task(t, d, tuple(sorted(set(tr.targets.tolist()))), tr, te))
    return Scenario("dil", tuple(classnames), tuple(range(n)), tuple(tasks))


def build_scenario(cfg: ScenarioCfg, seed: int = 0, dataset: Dataset | None = None) -> Scenario:
    """Load cfg's dataset and cut it into the stream of tasks cfg describes."""
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
        return replace(domain_incremental(domains, ds.classnames, order), notes=ds.notes)
    if ds.train is None or ds.test is None:
        raise ConfigError(f"config key 'scenario.kind' = 'cil': dataset '{cfg.dataset}' is domain-incremental "
                          "only. Use kind: dil.")
    if cfg.classes_per_task > len(ds.classnames):
        raise ConfigError(f"config key 'scenario.classes_per_task' = {cfg.classes_per_task}: dataset "
                          f"'{cfg.dataset}' has only {len(ds.classnames)} classes.")
    order = class_order(len(ds.classnames), cfg, ds.shipped_order)
    train = ds.train.per_class_limit(cfg.train_per_class, rng)
    test = ds.test.per_class_limit(cfg.test_per_class, rng)
    scenario = class_incremental(train, test, ds.classnames, order, cfg.classes_per_task,
                                 cfg.initial_classes, cfg.n_tasks)
    return replace(scenario, notes=ds.notes)
