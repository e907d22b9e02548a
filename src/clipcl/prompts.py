"""Prompt templates and class-name text features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# A small prompt ensemble for evaluation (a subset of CLIP's ImageNet templates).
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
    "art of the {}.",
)
TEMPLATE_SETS = {"default": DEFAULT_TEMPLATES, "ensemble": ENSEMBLE_TEMPLATES}


def class_tokens(tokenizer, classnames: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """Token ids [len(templates), n_classes, context] of every template filled with every class name."""
    return torch.stack([tokenizer([t.format(c) for c in classnames]) for t in templates])


TEXT_CHUNK = 256  # prompts per text-tower call: a 1000-class x 80-template ensemble is 80,000 prompts


def text_features(model, tokens: torch.Tensor, chunk: int = TEXT_CHUNK) -> torch.Tensor:
    """Normalised class embeddings [n_classes, D] from tokens [n_templates, n_classes, L], the text tower
    called on `chunk` prompts at a time.

    With several templates the normalised embeddings are averaged then normalised again (CLIP's ensemble).
    """
    n_t, n_c, length = tokens.shape
    flat = tokens.reshape(n_t * n_c, length)
    z = torch.cat([F.normalize(model.encode_text(flat[i:i + chunk]).float(), dim=-1)
                   for i in range(0, len(flat), chunk)])
    z = z.view(n_t, n_c, -1).mean(0)
    return F.normalize(z, dim=-1)
