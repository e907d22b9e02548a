"""Losses of METHOD.md: the mini-batch CLIP loss, the global contrastive loss (GCL) with moving-average
estimators, and class-level distributionally robust (DRO) weights.

Notation: z_i normalised image embedding, t_c normalised text embedding of class c, s(i, c) = z_i . t_c.
A batch gives `text` [U, D] for its U distinct classes and `inv` [B], the row of `text` of each sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def clip_loss(z: torch.Tensor, text: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Mini-batch CLIP loss over the distinct classes of the batch.

    image -> text: CE of each image over the U class texts, target its own class;
    text -> image: for each class u, -mean over its images j of log softmax_k(scale * t_u . z_k)[j],
    the softmax taken over all batch images. Same-class texts never appear twice (classes are distinct),
    so same-class images are never each other's negatives on the image side. Returns (i2t + t2i) / 2.
    """
    logits = scale * z @ text.t()  # [B, U]
    i2t = F.cross_entropy(logits, inv)
    logp = torch.log_softmax(logits.t(), dim=1)  # [U, B], over batch images
    n_u = torch.bincount(inv, minlength=text.shape[0]).clamp_min(1)
    own = logp.gather(0, inv.view(1, -1)).squeeze(0)  # log p(j | class of j)
    per_class = torch.zeros(text.shape[0], dtype=own.dtype, device=own.device).index_add_(0, inv, own) / n_u
    t2i = -per_class.mean()
    return (i2t + t2i) / 2


def weighted_clip_loss(z: torch.Tensor, text: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor | float,
                       w_i2t: torch.Tensor, w_t2i: torch.Tensor) -> torch.Tensor:
    """The mini-batch CLIP loss with per-sample weights on its two terms (each set of weights sums to 1):

        i2t = sum_i w_i2t[i] CE_i,   CE_i = -log softmax_u(scale z_i . t_u)[u_i] over the U batch class texts
        t2i = sum_j w_t2i[j] l_j,    l_j = -log softmax_k(scale t_{u_j} . z_k)[j] over the B batch images
    and returns (i2t + t2i) / 2. clip_loss is w_i2t = 1 / B and w_t2i[j] = 1 / (U n_B(u_j)), up to rounding.
    """
    logits = scale * z @ text.t()  # [B, U]
    ce = -torch.log_softmax(logits, dim=1).gather(1, inv.view(-1, 1)).squeeze(1)
    own = torch.log_softmax(logits.t(), dim=1).gather(0, inv.view(1, -1)).squeeze(0)  # log p(j | class of j)
    i2t = (w_i2t.to(ce.dtype) * ce).sum()
    t2i = -(w_t2i.to(own.dtype) * own).sum()
    return (i2t + t2i) / 2


def _masked_log_mean_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log mean_{j: mask_ij} exp(x_ij) per row; -inf for rows with no entry."""
    n = mask.sum(1)
    lse = torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)
    return lse - torch.log(n.clamp_min(1).to(x.dtype))


def _group_log_mean_exp(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """log of the mean of exp(values) within each group (log space, stable)."""
    peak = torch.full((n_groups,), -math.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, groups, values, reduce="amax")
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, groups, torch.exp(values - peak[groups]))
    counts = torch.bincount(groups, minlength=n_groups).to(values.dtype)
    return torch.log(sums) + peak - torch.log(counts)


class GlobalContrastiveLoss(nn.Module):
    """Global contrastive loss with per-sample moving-average estimators (SogCLR-style), in log space.

    For sample i of class y_i and negatives N_i = {j : y_j != y_i} over the whole stage data D_t U M:
        d_ij = s(i, y_j) - s(i, y_i),   e_ij = s(j, y_i) - s(i, y_i)
        L_i  = tau log mean_j exp(d_ij / tau) + tau log mean_j exp(e_ij / tau)
    u1[i], u2[i] track mean_j exp(d_ij / tau), mean_j exp(e_ij / tau) across batches:
        log u <- logaddexp(log(1 - gamma) + log u, log(gamma) + log g)   (first visit: log u = log g)
    and the surrogate mean_j sg(exp(d_ij / tau - log u1[i])) d_ij + (same for e) has the gradient
    estimate of grad L_i. Nothing is exponentiated outside log space, so tau = 0.01 is safe in float32.
    """

    def __init__(self, n_samples: int = 0, gamma: float = 0.9):
        super().__init__()
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.gamma = gamma
        self.register_buffer("log_u1", torch.zeros(n_samples, dtype=torch.float64))
        self.register_buffer("log_u2", torch.zeros(n_samples, dtype=torch.float64))
        self.register_buffer("visited", torch.zeros(n_samples, dtype=torch.bool))

    def reset(self, n_samples: int) -> None:
        """Forget every estimate: a new stage with n_samples indexed samples starts."""
        device = self.log_u1.device
        self.log_u1 = torch.zeros(n_samples, dtype=torch.float64, device=device)
        self.log_u2 = torch.zeros(n_samples, dtype=torch.float64, device=device)
        self.visited = torch.zeros(n_samples, dtype=torch.bool, device=device)

    @torch.no_grad()
    def _update(self, log_u: torch.Tensor, index: torch.Tensor, log_g: torch.Tensor, ok: torch.Tensor) -> None:
        """Moving-average update of log_u at the samples of the batch; duplicates update once, with the mean."""
        if not ok.any():
            return
        idx, lg = index[ok], log_g[ok].to(torch.float64)
        uniq, inverse = torch.unique(idx, return_inverse=True)
        lg = _group_log_mean_exp(lg, inverse, len(uniq))
        old = log_u[uniq]
        fresh = ~self.visited[uniq]
        keep = math.log1p(-self.gamma) if self.gamma < 1 else -math.inf
        blended = torch.logaddexp(old + keep, lg + math.log(self.gamma))
        log_u[uniq] = torch.where(fresh, lg, blended)

    def forward(self, z: torch.Tensor, text: torch.Tensor, inv: torch.Tensor, index: torch.Tensor,
                tau: float) -> dict[str, torch.Tensor]:
        """Per-sample surrogate [B] (differentiable), loss value [B] (detached) and has-negative mask [B].

        Updates the estimators of the batch's samples (in the order: update, then use the new estimate).
        """
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        sim = (z.to(dtype) @ text.to(dtype).t())[:, inv]  # sim[i, j] = s(i, y_j)
        pos = sim.diagonal()
        d = sim - pos[:, None]
        e = sim.t() - pos[:, None]
        neg = inv[:, None] != inv[None, :]
        ok = neg.any(1)
        log_g1 = _masked_log_mean_exp(d.detach() / tau, neg)
        log_g2 = _masked_log_mean_exp(e.detach() / tau, neg)
        self._update(self.log_u1, index, log_g1, ok)
        self._update(self.log_u2, index, log_g2, ok)
        self.visited[index[ok]] = True
        n_neg = neg.sum(1).clamp_min(1).to(dtype)
        w1 = torch.exp((d.detach() / tau - self.log_u1[index].to(dtype)[:, None]).masked_fill(~neg, -math.inf))
        w2 = torch.exp((e.detach() / tau - self.log_u2[index].to(dtype)[:, None]).masked_fill(~neg, -math.inf))
        surrogate = (w1 * d).sum(1) / n_neg + (w2 * e).sum(1) / n_neg
        value = torch.where(ok, tau * (log_g1 + log_g2), torch.zeros_like(log_g1))
        return {"surrogate": surrogate, "loss": value.detach(), "has_negative": ok}


def project_capped_simplex(p: torch.Tensor, cap: float) -> torch.Tensor:
    """Cap every weight at `cap` and give the excess to the uncapped weights in proportion (sum stays 1)."""
    if cap <= 0 or len(p) == 0:
        return p
    if cap * len(p) <= 1:
        return torch.full_like(p, 1.0 / len(p))
    p = p.clone()
    for _ in range(len(p)):
        over = p > cap
        if not over.any():
            break
        excess = (p[over] - cap).sum()
        p[over] = cap
        free = ~over & (p < cap)
        mass = p[free].sum()
        # in proportion to the free weights; equally when they are all 0 (cvar gives 0 to most classes)
        p[free] += excess * p[free] / mass if mass > 0 else excess / free.sum()
    return p


class ClassDRO(nn.Module):
    """Class-level DRO weights over the seen classes (METHOD.md, GDRO).

    v_c, the moving average of the batch-mean loss of class c: v_c <- (1 - beta) v_c + beta m_c
    (first visit v_c = m_c). Class weights p over the seen classes already visited in the stage:
      kl       p = softmax(v / lam)          (the gradient of lam log mean_c exp(L_c / lam))
      groupdro p ∝ q, q_c <- q_c exp(eta m_c) (online exponentiated gradient)
      cvar     p uniform on the top ceil(alpha |K|) classes by v
      none     p uniform (class-balanced averaging only)
    then optionally capped at max_weight. A batch sample i gets w_i = p_{y_i} / (n_B(y_i) sum_{c in B} p_c), or,
    given each class's probability pi_c of being in a batch (class_presence=corrected), w_i = p_{y_i} / (pi_{y_i}
    n_B(y_i)): then E[sum_i w_i L_i] = sum_c p_c L_c, classes absent from a batch included (the weights of one
    batch no longer sum to 1; their expectation does).
    With `adjust` = C > 0, every v_c above is read as v_c + C / sqrt(n_c), n_c the class's samples in the stage
    (group DRO's size adjustment: a memory class of 2 images looks worse than its loss says).
    With `excess`, every v_c is read as v_c - b_c, b_c its value when the class was last trained (mark_trained;
    kept across stages); a class never trained before reads 0: a class whose loss has risen since is forgotten.
    """

    VARIANTS = ("kl", "groupdro", "cvar", "none")

    def __init__(self, n_classes: int = 0, variant: str = "kl", lam: float = 1.0, beta: float = 0.1,
                 eta: float = 0.01, alpha: float = 0.5, max_weight: float = 0.0, adjust: float = 0.0,
                 excess: bool = False):
        super().__init__()
        self.excess = excess
        self.register_buffer("base", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("marked", torch.zeros(n_classes, dtype=torch.bool))  # base holds a value
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown DRO variant {variant!r}; choose from {', '.join(self.VARIANTS)}")
        self.variant, self.lam, self.beta, self.eta, self.alpha, self.max_weight, self.adjust = (
            variant, lam, beta, eta, alpha, max_weight, adjust)
        self.register_buffer("v", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("sizes", torch.ones(n_classes, dtype=torch.float64))  # n_c, for `adjust`
        self.register_buffer("log_q", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("visited", torch.zeros(n_classes, dtype=torch.bool))

    def reset(self, n_classes: int) -> None:
        """Forget the class estimates: a new stage over n_classes seen classes starts."""
        device = self.v.device
        self.v = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.log_q = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.visited = torch.zeros(n_classes, dtype=torch.bool, device=device)
        self.sizes = torch.ones(n_classes, dtype=torch.float64, device=device)
        base = torch.zeros(n_classes, dtype=torch.float64, device=device)
        marked = torch.zeros(n_classes, dtype=torch.bool, device=device)
        kept = min(n_classes, len(self.base))
        base[:kept], marked[:kept] = self.base[:kept].to(device), self.marked[:kept].to(device)
        self.base, self.marked = base, marked  # the values at the end of training outlive the stage

    @torch.no_grad()
    def mark_trained(self, classes: torch.Tensor) -> None:
        """Remember v_c of these classes (visited in this stage) as their value when last trained."""
        classes = classes.to(self.v.device)
        classes = classes[classes < len(self.visited)]  # a stage that never started holds no class
        classes = classes[self.visited[classes]]
        self.base[classes] = self.v[classes]
        self.marked[classes] = True

    def set_sizes(self, sizes: torch.Tensor) -> None:
        """n_c, the samples of each class in the stage's data (group DRO's size adjustment)."""
        self.sizes = sizes.to(self.v.device, torch.float64).clamp_min(1)

    @torch.no_grad()
    def update(self, labels: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold the batch's class-mean losses into v (and q for groupdro)."""
        classes, inverse = torch.unique(labels, return_inverse=True)
        sums = torch.zeros(len(classes), dtype=torch.float64, device=losses.device).index_add_(
            0, inverse, losses.detach().to(torch.float64))
        means = sums / torch.bincount(inverse, minlength=len(classes)).to(torch.float64)
        fresh = ~self.visited[classes]
        self.v[classes] = torch.where(fresh, means, (1 - self.beta) * self.v[classes] + self.beta * means)
        self.log_q[classes] += self.eta * means
        self.visited[classes] = True

    @torch.no_grad()
    def class_weights(self) -> torch.Tensor:
        """p over all classes of the stage (0 for classes not visited yet); sums to 1 once any is visited."""
        p = torch.zeros_like(self.v)
        seen = self.visited
        k = int(seen.sum())
        if k == 0:
            return p
        v = self.v[seen]
        if self.excess:  # the rise since the class was last trained; 0 for a class never trained before
            v = torch.where(self.marked[seen], v - self.base[seen], torch.zeros_like(v))
        v = v + self.adjust / self.sizes[seen].sqrt()  # Sagawa et al.'s generalisation adjustment
        if self.variant == "kl":
            ps = torch.softmax(v / self.lam, dim=0)
        elif self.variant == "groupdro":
            ps = torch.softmax(self.log_q[seen], dim=0)
        elif self.variant == "cvar":
            top = max(1, math.ceil(self.alpha * k))
            ps = torch.zeros_like(v)
            ps[torch.argsort(v, descending=True, stable=True)[:top]] = 1.0 / top
        else:
            ps = torch.full_like(v, 1.0 / k)
        p[seen] = project_capped_simplex(ps, self.max_weight)
        return p

    @torch.no_grad()
    def sample_weights(self, labels: torch.Tensor, p: torch.Tensor | None = None,
                       presence: torch.Tensor | None = None) -> torch.Tensor:
        """w_i = p_{y_i} / (n_B(y_i) sum_{c in B} p_c); all zero if no batch class has weight (cvar). With
        `presence` pi [n_classes] (the chance that each class is in a batch): w_i = p_{y_i} / (pi_{y_i} n_B(y_i))."""
        p = self.class_weights() if p is None else p
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        pb = p[classes]
        if presence is not None:
            pi = presence.to(pb.device, pb.dtype)[classes]
            return (pb / (counts.to(pb.dtype) * pi.clamp_min(1e-300)))[inverse]
        total = pb.sum()
        if total <= 0:
            return torch.zeros(len(labels), dtype=torch.float64, device=labels.device)
        return (pb / (counts.to(pb.dtype) * total))[inverse]

    def forward(self, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Update with the batch's losses, then return its per-sample weights."""
        self.update(labels, losses)
        return self.sample_weights(labels)


class PromptContrastiveLoss(nn.Module):
    """The global contrastive loss fitted to class prompts (method.gcl_form=prompts), with the model's logit
    scale s and its gradient. For sample i of class c, a_ik = s z_i . t_k over the K seen class prompts:

        image -> text  L1_i = log sum_k exp(a_ik) - a_ic         exact: every seen prompt, each counted once
        text -> image  L2_i = log(eps + exp(-a_ic) m_c) + log n,  m_c = mean_{j in D_t U M, y_j != c} exp(a_jc)
        L_i = (L1_i + L2_i) / 2

    L2 is FastCLIP's text-to-image term log(eps + mean_j exp(a_jc - a_ic)), shifted by the constant log n (n the
    negatives the term stands for, n_ref) so that it is comparable to the mini-batch CLIP loss. eps = 0 (the
    default) means eps = 1 / n, this project's choice: L2_i = log(1 + n exp(-a_ic) m_c), CLIP's text-to-image
    term with the batch's n negatives replaced by n times their mean over the whole stage data; it saturates
    (a well-separated sample has almost no gradient). FastCLIP's own eps is 1e-14, a numerical guard: the term
    is then log mean_j exp(a_jc - a_ic) + log n, whose gradient stays whole until the ratio below falls under
    1e-14. One estimator per class prompt,
    log u_c ~ log m_c, moving average of the batch's importance-weighted mean over its negatives of c, updated
    every step for every seen class (the batch's samples weighted so that new and memory samples count as in
    D_t U M, whatever the batch mix). With ratio_i = exp(log u_c - a_ic), the surrogate
        sg(sigma_i) (mean_j sg(w_j exp(a_jc - log u_c)) a_jc - a_ic),   sigma_i = ratio_i / (eps + ratio_i)
                                                                                = sigmoid(log ratio_i - log eps)
    has the gradient of L2_i with m_c read from the estimator (exact when the batch is all of D_t U M, gamma=1).
    At eps = 1/n, sigma_i = n ratio_i / (1 + n ratio_i) is the text -> image softmax's mass on the negatives (n of
    them at the stage's mean): a sample whose positive holds more than 0.97 of it has its gradient multiplied by
    less than 0.03.
    """

    def __init__(self, n_classes: int = 0, gamma: float = 0.9, eps: float = 0.0):
        super().__init__()
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if not eps >= 0:
            raise ValueError(f"eps must be 0 (1 / n) or positive, got {eps}")
        self.gamma = gamma
        self.eps = eps  # 0: 1 / n_ref
        self.register_buffer("log_u", torch.zeros(n_classes, dtype=torch.float64))
        self.register_buffer("visited", torch.zeros(n_classes, dtype=torch.bool))

    def reset(self, n_classes: int) -> None:
        """Forget every estimate: a new stage over n_classes seen classes starts."""
        device = self.log_u.device
        self.log_u = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.visited = torch.zeros(n_classes, dtype=torch.bool, device=device)

    def forward(self, z: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float,
                weights: torch.Tensor, n_ref: float) -> dict[str, torch.Tensor]:
        """z [B, D], prompts [K, D] of every seen class (row = label), labels [B] in 0..K-1, weights [B] > 0 the
        importance of each sample as a negative (its share of D_t U M over its share of the batch), n_ref the
        number of negatives the text -> image term stands for. Updates the estimators, then uses them.
        Returns the per-sample surrogate [B] (differentiable), loss [B], i2t [B], t2i [B] (detached) and
        has_negative [B]."""
        K = prompts.shape[0]
        a = scale * z @ prompts.t()  # [B, K]
        a_pos = a.gather(1, labels.view(-1, 1)).squeeze(1)
        i2t = torch.logsumexp(a, dim=1) - a_pos
        neg = labels.view(-1, 1) != torch.arange(K, device=labels.device).view(1, -1)  # [B, K]: j negative of k
        log_w = torch.log(weights.to(torch.float64)).view(-1, 1).expand(-1, K)
        log_w = log_w.masked_fill(~neg, -math.inf)
        ok = neg.any(0)
        norm = torch.logsumexp(log_w, dim=0, keepdim=True).masked_fill(~ok.view(1, -1), 0.0)
        log_w = log_w - norm  # normalised among the negatives of each k
        with torch.no_grad():
            log_g = torch.logsumexp(a.detach().to(torch.float64) + log_w, dim=0)  # [K] weighted log mean
            fresh = ok & ~self.visited
            keep = math.log1p(-self.gamma) if self.gamma < 1 else -math.inf
            blended = torch.logaddexp(self.log_u + keep, log_g + math.log(self.gamma))
            self.log_u = torch.where(fresh, log_g, torch.where(ok, blended, self.log_u))
            self.visited = self.visited | ok
        log_u = self.log_u.to(a.dtype)
        # the gradient of log m_c, estimated: sum_j w_j exp(a_jc - log u_c) grad a_jc
        coef = torch.exp((a.detach().to(torch.float64) + log_w - self.log_u.view(1, -1)).to(a.dtype))
        coef = coef.masked_fill(~neg, 0.0)
        grad_log_m = (coef * a).sum(0)  # [K], differentiable
        if not self.eps:  # eps = 1 / n: log(1/n + ratio) + log n = softplus(log n + log ratio)
            log_ratio = math.log(n_ref) + log_u[labels] - a_pos.detach()
            t2i = F.softplus(log_ratio)
        else:  # log(eps + ratio) + log n, sigma = sigmoid(log ratio - log eps)
            log_r = log_u[labels] - a_pos.detach()
            t2i = torch.logaddexp(log_r, torch.full_like(log_r, math.log(self.eps))) + math.log(n_ref)
            log_ratio = log_r - math.log(self.eps)
        has = ok[labels]
        surrogate = i2t + torch.where(has, torch.sigmoid(log_ratio) * (grad_log_m[labels] - a_pos),
                                      torch.zeros_like(a_pos))
        t2i = torch.where(has, t2i, torch.zeros_like(t2i))
        return {"surrogate": surrogate / 2, "loss": ((i2t + t2i) / 2).detach(), "i2t": i2t.detach(),
                "t2i": t2i.detach(), "has_negative": has}
