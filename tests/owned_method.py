"""A method that trains only a module of its own (the Method.modules hook), for the tests: a linear head on the
frozen model's image embeddings, cross-entropy over the seen classes' frozen text embeddings, and the head in
the evaluation's classifier. `import owned_method` registers it as 'headonly'."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcl import distributed
from clipcl.methods import METHODS, Method, clip_forward, register


class HeadOnly(Method):
    name = "headonly"

    def setup(self, bundle) -> None:
        generator = torch.Generator().manual_seed(0)
        self.head = nn.Linear(bundle.dim, bundle.dim)
        with torch.no_grad():  # near the identity: the frozen model's classifier at the start
            self.head.weight.copy_(torch.eye(bundle.dim) + 0.01 * torch.randn(bundle.dim, bundle.dim,
                                                                                generator=generator))
            self.head.bias.zero_()

    def trains_parameter(self, name, param) -> bool:
        return False

    def modules(self):
        return {"head": self.head}

    def training_forward(self, model, images, labels, index, step):
        with torch.no_grad():
            z, _, scale = clip_forward(model, images, None, self.ctx.autocast)
        text = self.frozen_text(model, images.device)[: self.ctx.n_seen]
        out = F.normalize(self.call_module("head", z), dim=-1)
        if self.ctx.shard_sizes is not None:  # the own rows differentiable, the loss that of the global batch
            out = distributed.gather(out, self.ctx.shard_sizes)
        return {"ce_loss": F.cross_entropy(scale * out @ text.t(), labels)}

    def classifier(self):
        head = self.head

        def scores(z, text):
            with torch.no_grad():
                return F.normalize(head(z), dim=-1) @ text.t()

        return scores


if "headonly" not in METHODS:
    register(HeadOnly, "a linear head on frozen features (tests)")
