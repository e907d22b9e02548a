"""Evaluation: the accuracy matrix R and the metrics of METHOD.md (pure functions of R)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .data.images import ImageSet
from .data.scenarios import Scenario, Task
from .prompts import TEMPLATE_SETS, class_tokens, text_features

Matrix = Sequence[Sequence[float | None]]


class evaluating:
    """`with evaluating(model):` the model in eval mode (BatchNorm on its running statistics), then restored."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> torch.nn.Module:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


# A method's own classifier (Method.classifier): (z [N, D] normalised image embeddings, text [C, D] the candidate
# classes' prompt embeddings, scenario labels 0..C-1) -> scores [N, C]; the best score is the prediction.
Scores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def image_features(bundle, data: ImageSet, batch_size: int, device: torch.device,
                   autocast: bool = False, normalize: bool = True) -> torch.Tensor:
    """Normalised image embeddings [N, D] of a whole ImageSet (normalize=False: as the image tower outputs them)."""
    model = bundle.model
    out = []
    for start in range(0, len(data), batch_size):
        pos = np.arange(start, min(start + batch_size, len(data)))
        x = bundle.prepare_images(bundle.input_images(data.load(pos)).to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            z = model.encode_image(x).float()
            out.append(F.normalize(z, dim=-1) if normalize else z)
    return torch.cat(out) if out else torch.zeros(0, 1, device=device)


@torch.no_grad()
def candidate_text(bundle, classnames: Sequence[str], templates: str, device: torch.device,
                   autocast: bool = False) -> torch.Tensor:
    """Normalised text embeddings [C, D] of the candidate classes, averaged over the template set."""
    tokens = class_tokens(bundle.tokenizer, list(classnames), TEMPLATE_SETS[templates])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return text_features(bundle.model, tokens.to(device)).float()


def image_tower_state(model: torch.nn.Module) -> tuple:
    """What identifies the image tower's current weights and buffers: each tensor and its version counter,
    which every in-place change (an optimiser step, BatchNorm statistics, load_state_dict) increments."""
    visual = model.visual
    return tuple((id(t), t._version) for t in (*visual.parameters(), *visual.buffers()))


def eval_image_features(bundle, data: ImageSet, batch_size: int, device: torch.device,
                        autocast: bool = False) -> torch.Tensor:
    """image_features of an evaluation set, kept while the image tower does not change (model.lock_image, a
    method that does not train, the rows of one task): each test image is encoded once per tower state."""
    if not isinstance(getattr(bundle.model, "visual", None), torch.nn.Module):  # not an open_clip model: no cache
        return image_features(bundle, data, batch_size, device, autocast)
    state = image_tower_state(bundle.model)
    cache = bundle.eval_features
    if cache.get("state") != state:
        cache.clear()
        cache["state"] = state
    key = (id(data), len(data), batch_size, autocast, bundle.model.training)
    hit = cache.get(key)
    if hit is None or hit[0] is not data:
        hit = cache[key] = (data, image_features(bundle, data, batch_size, device, autocast))
    return hit[1]


@torch.no_grad()
def task_accuracy(bundle, data: ImageSet, text: torch.Tensor, batch_size: int, device: torch.device,
                  autocast: bool = False, scores: Scores | None = None) -> float | None:
    """Fraction of data whose best-scored candidate is its label (None for no data): the nearest candidate text,
    z @ text^T, or a method's own classifier `scores(z, text)` (Method.classifier)."""
    if not len(data):
        return None
    if distributed.active():  # each rank its contiguous share of the images; the counts summed
        mine = distributed.shard(np.arange(len(data)), distributed.rank(), distributed.world_size())
        data = data.subset(mine)
    correct = 0.0
    if len(data):  # a rank's share is empty when a task has fewer images than there are ranks
        z = (eval_image_features(bundle, data, batch_size, device, autocast) if not distributed.active()
             else image_features(bundle, data, batch_size, device, autocast))
        logits = z @ text.t() if scores is None else scores(z, text)
        correct = float((logits.argmax(1).cpu().numpy() == data.targets).sum())
    correct, total = distributed.all_sum([correct, float(len(data))], device).tolist()
    return correct / total


def split_of(task: Task, split: str) -> ImageSet:
    """The images a task is evaluated on: test, or val (held out of training) while choosing hyper-parameters."""
    if split not in ("test", "val"):
        raise ValueError(f"unknown evaluation split {split!r}: use 'test' or 'val'")
    return task.val if split == "val" else task.test


@torch.no_grad()
def accuracy_row(bundle, scenario: Scenario, t: int, templates: str, batch_size: int, device: torch.device,
                 autocast: bool = False, split: str = "test", scores: Scores | None = None) -> list[float | None]:
    """Row t of R: accuracy on each task's `split` data (test or val) among the candidate classes of step t.

    CIL: candidates are the classes seen so far and future tasks are not evaluated (None);
    DIL: candidates are all classes and every domain is evaluated (future ones included).
    """
    model = bundle.model
    was_training = model.training
    model.eval()
    text = candidate_text(bundle, scenario.classnames[: scenario.n_seen(t)], templates, device, autocast)
    row = [None if scenario.kind == "cil" and j > t else
           task_accuracy(bundle, split_of(task, split), text, batch_size, device, autocast, scores)
           for j, task in enumerate(scenario.tasks)]
    model.train(was_training)
    return row


@torch.no_grad()
def accuracy_before_training(bundle, scenario: Scenario, t: int, templates: str, batch_size: int,
                             device: torch.device, autocast: bool = False, split: str = "test",
                             scores: Scores | None = None) -> float | None:
    """Accuracy on task t's `split` data (test or val) among the candidates of step t, before training on it.

    For a pretrained model this is its zero-shot accuracy on a task it has not been fine-tuned on yet.
    """
    model = bundle.model
    was_training = model.training
    model.eval()
    text = candidate_text(bundle, scenario.classnames[: scenario.n_seen(t)], templates, device, autocast)
    acc = task_accuracy(bundle, split_of(scenario[t], split), text, batch_size, device, autocast, scores)
    model.train(was_training)
    return acc


@torch.no_grad()
def unseen_row(bundle, scenario: Scenario, trained: int, templates: str, batch_size: int, device: torch.device,
               autocast: bool = False, split: str = "test", scores: Scores | None = None) -> list[float | None]:
    """Accuracy on each task j >= trained (not trained yet) among all classes; None for the trained ones.

    Row 0 (nothing trained) is the model's zero-shot accuracy on every task; later rows say how much of it
    fine-tuning on the first tasks keeps on the tasks still to come.
    """
    with evaluating(bundle.model):
        text = candidate_text(bundle, scenario.classnames, templates, device, autocast)
        return [task_accuracy(bundle, split_of(task, split), text, batch_size, device, autocast, scores)
                if j >= trained
                else None for j, task in enumerate(scenario.tasks)]


def unseen_change(U: Matrix) -> float | None:
    """Mean over s >= 1 and j >= s of U[s][j] - U[0][j]: the zero-shot accuracy on tasks not trained yet that
    fine-tuning gained (positive) or lost (negative); None without such entries."""
    diffs = [U[s][j] - U[0][j] for s in range(1, len(U)) for j in range(s, len(U[s]))
             if U[s][j] is not None and U[0][j] is not None]
    return float(np.mean(diffs)) if diffs else None


def seen_accuracy(R: Matrix, sizes: Sequence[int], t: int) -> float:
    """Accuracy after step t on all test data of tasks 0..t (weighted by their test sizes)."""
    acc = np.array([R[t][j] for j in range(t + 1)], dtype=float)
    n = np.asarray(sizes[: t + 1], dtype=float)
    return float((acc * n).sum() / n.sum())


def average_incremental_accuracy(R: Matrix, sizes: Sequence[int]) -> float:
    """Mean over steps t of the accuracy on all test data seen so far."""
    return float(np.mean([seen_accuracy(R, sizes, t) for t in range(len(R))]))


def last_accuracy(R: Matrix, sizes: Sequence[int]) -> float:
    """Accuracy on all test data after the last step."""
    return seen_accuracy(R, sizes, len(R) - 1)


def forgetting(R: Matrix) -> float:
    """Mean over j < T of max_{j <= t < T} R[t, j] - R[T, j] (T = last step); 0 for a single task."""
    T = len(R) - 1
    if T < 1:
        return 0.0
    return float(np.mean([max(R[t][j] for t in range(j, T)) - R[T][j] for j in range(T)]))


def backward_transfer(R: Matrix) -> float:
    """Mean over j < T of R[T, j] - R[j, j]; negative when learning later tasks hurt earlier ones."""
    T = len(R) - 1
    if T < 1:
        return 0.0
    return float(np.mean([R[T][j] - R[j][j] for j in range(T)]))


def future_accuracy(before: Sequence[float | None]) -> float | None:
    """Mean over tasks t >= 1 of the accuracy on task t before training on it (None if there is none)."""
    vals = [v for v in before[1:] if v is not None]
    return float(np.mean(vals)) if vals else None


def metrics(R: Matrix, sizes: Sequence[int], before: Sequence[float | None] = ()) -> dict[str, float | None]:
    """Every metric of METHOD.md for the rows of R computed so far."""
    if not R:
        return {}
    return {
        "avg_incremental_accuracy": average_incremental_accuracy(R, sizes),
        "last_accuracy": last_accuracy(R, sizes),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
        "future_accuracy": future_accuracy(before),
    }
