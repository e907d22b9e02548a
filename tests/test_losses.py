"""Losses against the exact quantities they compute or estimate."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipcl.losses import (ClassDRO, GlobalContrastiveLoss, PromptContrastiveLoss, clip_loss,
                           project_capped_simplex)


def _batch(B=12, C=4, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(B) % C
    z = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    text_all = F.normalize(torch.randn(C, D, generator=g, dtype=dtype), dim=-1)
    classes, inv = torch.unique(labels, return_inverse=True)
    return z, text_all[classes], inv, labels


def test_clip_loss_matches_direct_computation():
    z, text, inv, labels = _batch(B=10, C=3)
    z[7] = z[2]  # duplicates must not change the definition
    scale = 7.0
    loss = clip_loss(z, text, inv, scale)
    # image -> text: loop over images
    i2t = 0.0
    for i in range(len(z)):
        logits = [scale * float(z[i] @ text[u]) for u in range(len(text))]
        i2t += -(logits[inv[i]] - math.log(sum(math.exp(x) for x in logits)))
    i2t /= len(z)
    # text -> image: loop over classes, mean log-probability of the class's images among all batch images
    t2i = 0.0
    for u in range(len(text)):
        logits = [scale * float(text[u] @ z[j]) for j in range(len(z))]
        lse = math.log(sum(math.exp(x) for x in logits))
        own = [logits[j] - lse for j in range(len(z)) if inv[j] == u]
        t2i += -sum(own) / len(own)
    t2i /= len(text)
    assert float(loss) == pytest.approx((i2t + t2i) / 2, rel=1e-10)


def exact_global_loss(z, text, inv, tau):
    """mean_i [tau log mean_{j: y_j != y_i} exp(d_ij / tau) + tau log mean_j exp(e_ij / tau)], written directly."""
    total = 0.0
    B = len(z)
    for i in range(B):
        pos = z[i] @ text[inv[i]]
        d = torch.stack([z[i] @ text[inv[j]] - pos for j in range(B) if inv[j] != inv[i]])
        e = torch.stack([z[j] @ text[inv[i]] - pos for j in range(B) if inv[j] != inv[i]])
        total = total + tau * torch.log(torch.exp(d / tau).mean()) + tau * torch.log(torch.exp(e / tau).mean())
    return total / B


@pytest.mark.parametrize("tau", [0.5, 0.07])
def test_gcl_whole_batch_gamma_one_equals_exact_loss_and_gradient(tau):
    z0, text0, inv, labels = _batch(B=10, C=3, D=6, seed=1)
    index = torch.arange(len(z0))
    # exact loss and its autograd gradient
    z1, t1 = z0.clone().requires_grad_(), text0.clone().requires_grad_()
    exact = exact_global_loss(z1, t1, inv, tau)
    gz_exact, gt_exact = torch.autograd.grad(exact, (z1, t1))
    # the estimator, after a first visit (gamma = 1 means the estimate is the batch value)
    gcl = GlobalContrastiveLoss(len(z0), gamma=1.0)
    for _ in range(2):  # a second visit exercises the moving-average branch with gamma = 1
        z2, t2 = z0.clone().requires_grad_(), text0.clone().requires_grad_()
        out = gcl(z2, t2, inv, index, tau)
        surrogate = out["surrogate"].mean()
        gz, gt = torch.autograd.grad(surrogate, (z2, t2))
        assert float(out["loss"].mean()) == pytest.approx(float(exact.detach()), abs=1e-9)
        torch.testing.assert_close(gz, gz_exact, atol=1e-6, rtol=0)
        torch.testing.assert_close(gt, gt_exact, atol=1e-6, rtol=0)


def test_gcl_moving_average_follows_recursion_and_keeps_lonely_samples():
    gamma, tau = 0.3, 0.2
    gcl = GlobalContrastiveLoss(6, gamma=gamma)
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=-1)
    expected_u1 = {}
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([0, 1, 4, 5]), torch.tensor([0, 2])]
    labels_of = torch.tensor([0, 1, 2, 0, 1, 2])
    for step, idx in enumerate(batches):
        labels = labels_of[idx]
        if step == 3:
            labels = torch.tensor([0, 0])  # no negatives: estimates must stay put
        z = F.normalize(torch.randn(len(idx), 5, generator=g, dtype=torch.float64), dim=-1)
        classes, inv = torch.unique(labels, return_inverse=True)
        before = gcl.log_u1.clone()
        gcl(z, text[classes], inv, idx, tau)
        if step == 3:
            torch.testing.assert_close(gcl.log_u1, before)
            continue
        for k, i in enumerate(idx.tolist()):
            s = z[k] @ text[classes].t()
            pos = s[inv[k]]
            negs = [s[inv[j]] - pos for j in range(len(idx)) if labels[j] != labels[k]]
            gb = torch.exp(torch.stack(negs) / tau).mean()
            expected_u1[i] = gb if i not in expected_u1 else (1 - gamma) * expected_u1[i] + gamma * gb
            assert float(gcl.log_u1[i].exp()) == pytest.approx(float(expected_u1[i]), rel=1e-10)


def test_gcl_duplicate_index_updates_once_with_mean_estimate():
    tau = 0.5
    gcl = GlobalContrastiveLoss(4, gamma=0.9)
    text = F.normalize(torch.randn(2, 4, dtype=torch.float64), dim=-1)
    z = F.normalize(torch.randn(4, 4, dtype=torch.float64), dim=-1)
    inv = torch.tensor([0, 0, 1, 1])
    index = torch.tensor([0, 0, 1, 2])  # sample 0 drawn twice
    gcl(z, text, inv, index, tau)
    s = z @ text.t()
    g0 = [torch.exp(torch.stack([s[k, 1] - s[k, 0]] * 2) / tau).mean() for k in (0, 1)]
    assert float(gcl.log_u1[0].exp()) == pytest.approx(float((g0[0] + g0[1]) / 2), rel=1e-10)


def test_gcl_is_finite_at_small_tau_in_float32():
    gcl = GlobalContrastiveLoss(64, gamma=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        z = F.normalize(torch.randn(64, 16, generator=g), dim=-1).requires_grad_()
        text = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
        inv = torch.arange(64) % 8
        # push similarities to the extremes [-1, 1]: exp(2 / 0.01) overflows float32 outside log space
        text = torch.cat([text[:1], -text[:1].expand(7, -1)])
        out = gcl(z, text, inv, torch.arange(64), tau=0.01)
        out["surrogate"].mean().backward()
        assert torch.isfinite(out["surrogate"]).all() and torch.isfinite(out["loss"]).all()
        assert torch.isfinite(z.grad).all()


def test_dro_kl_weights_are_softmax_of_moving_averages():
    dro = ClassDRO(3, "kl", lam=0.5, beta=0.25)
    dro.update(torch.tensor([0, 0, 1, 2]), torch.tensor([1.0, 3.0, 2.0, 0.5]))
    dro.update(torch.tensor([0, 1]), torch.tensor([4.0, 0.0]))
    v = torch.tensor([0.75 * 2.0 + 0.25 * 4.0, 0.75 * 2.0 + 0.25 * 0.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(dro.v, v)
    torch.testing.assert_close(dro.class_weights(), torch.softmax(v / 0.5, 0))


def test_dro_huge_lambda_is_uniform_and_weights_sum_to_one():
    dro = ClassDRO(4, "kl", lam=1e9)
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    w = dro(labels, torch.tensor([5.0, 0.1, 0.2, 9.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(dro.class_weights(), torch.full((4,), 0.25, dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(1.0)


def test_dro_uniform_p_gives_each_class_equal_total_weight():
    dro = ClassDRO(2, "none")
    labels = torch.tensor([0] + [1] * 100)
    w = dro(labels, torch.rand(101))
    assert float(w[labels == 0].sum()) == pytest.approx(0.5)
    assert float(w[labels == 1].sum()) == pytest.approx(0.5)
    assert float(w.sum()) == pytest.approx(1.0)


def test_dro_kl_weights_follow_p_within_the_batch():
    dro = ClassDRO(3, "kl", lam=1.0, beta=1.0)
    labels = torch.tensor([0, 1, 1, 1])
    w = dro(labels, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)  # class 2 absent from the batch
    assert float(w[0]) == pytest.approx(float(p[0]))
    assert float(w[1:].sum()) == pytest.approx(float(p[1]))


def test_groupdro_exponentiated_gradient_by_hand():
    dro = ClassDRO(3, "groupdro", eta=0.5)
    dro.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    dro.update(torch.tensor([0, 0]), torch.tensor([2.0, 4.0]))  # class 0 mean 3
    q = torch.tensor([math.exp(0.5 * 1 + 0.5 * 3), math.exp(0.5 * 2), math.exp(0.5 * 3)], dtype=torch.float64)
    torch.testing.assert_close(dro.class_weights(), q / q.sum())


def test_cvar_uniform_on_top_fraction():
    dro = ClassDRO(5, "cvar", alpha=0.4, beta=1.0)
    dro.update(torch.arange(5), torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2]))
    torch.testing.assert_close(dro.class_weights(), torch.tensor([0, 0.5, 0, 0.5, 0], dtype=torch.float64))
    # a batch holding none of the top classes gets no weight at all
    assert float(dro.sample_weights(torch.tensor([0, 2])).sum()) == 0.0
    w = dro.sample_weights(torch.tensor([1, 1, 2, 3]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.0, 0.5], dtype=torch.float64))


def test_capped_simplex_projection():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = project_capped_simplex(p, 0.5)
    assert float(q.max()) == pytest.approx(0.5)
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(q[1] / q[2]) == pytest.approx(2.0)  # the excess goes in proportion
    torch.testing.assert_close(project_capped_simplex(p, 0.2), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_capped_simplex_with_zero_weights_spreads_the_excess_equally():
    """cvar gives 0 to the classes below the top fraction: capping must not divide by their zero mass."""
    q = project_capped_simplex(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 0.5)
    torch.testing.assert_close(q, torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64))
    dro = ClassDRO(4, "cvar", alpha=0.25, max_weight=0.5)
    dro.update(torch.tensor([0, 1, 2, 3]), torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=torch.float64))
    p = dro.class_weights()
    assert torch.isfinite(p).all() and float(p.sum()) == pytest.approx(1.0) and float(p.max()) == pytest.approx(0.5)


def test_dil_forgetting_counts_only_rows_after_the_task_was_trained():
    """In DIL, R[0, 1] is the accuracy on domain 1 before training on it: not a peak that can be forgotten."""
    from clipcl.evaluate import forgetting

    R = [[0.9, 0.95, 0.1], [0.8, 0.7, 0.2], [0.6, 0.5, 0.9]]
    assert forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.5)) / 2)


def _prompt_setup(seed=0, B=12, K=4, D=8):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    prompts = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    labels = torch.arange(B) % K
    return z, prompts, labels


def _prompt_exact(z, prompts, labels, scale, weights, n_ref):
    """The loss of PromptContrastiveLoss computed directly, sample by sample (weighted means over negatives)."""
    total = []
    for i in range(len(labels)):
        c = int(labels[i])
        a = scale * z @ prompts.t()
        i2t = torch.logsumexp(a[i], 0) - a[i, c]
        neg = [j for j in range(len(labels)) if int(labels[j]) != c]
        w = weights[neg] / weights[neg].sum()
        m = (w * torch.exp(a[neg, c])).sum()
        t2i = torch.log(1 + n_ref * torch.exp(-a[i, c]) * m)
        total.append((i2t + t2i) / 2)
    return torch.stack(total)


@pytest.mark.parametrize("weighted", [False, True])
def test_prompt_gcl_whole_data_gamma_one_equals_exact_loss_and_gradient(weighted):
    z, prompts, labels = _prompt_setup()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(0.5, 3.0, len(labels), dtype=torch.float64) if weighted else torch.ones(len(labels))
    loss = PromptContrastiveLoss(4, gamma=1.0)
    out = loss(z, prompts, labels, scale, weights, n_ref=11.0)
    exact = _prompt_exact(z, prompts, labels, scale, weights.to(torch.float64), 11.0)
    assert torch.allclose(out["loss"], exact.detach(), atol=1e-10)
    g_sur = torch.autograd.grad(out["surrogate"].mean(), (z, prompts, scale))
    g_exact = torch.autograd.grad(exact.mean(), (z, prompts, scale))
    for a, b in zip(g_sur, g_exact):
        assert torch.allclose(a, b, atol=1e-10)
    assert float(g_exact[2]).__abs__() > 1e-6  # the logit scale gets a gradient


def test_prompt_gcl_estimator_is_a_moving_average_of_weighted_batch_means():
    z, prompts, labels = _prompt_setup(seed=1)
    weights = torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    loss = PromptContrastiveLoss(4, gamma=0.3)
    scale = 5.0
    halves = (slice(0, 6), slice(6, 12))
    expected = torch.zeros(4, dtype=torch.float64)
    for step, part in enumerate(halves):
        zb, lb, wb = z[part].detach(), labels[part], weights[part].to(torch.float64)
        loss(zb, prompts.detach(), lb, scale, wb, n_ref=5.0)
        for c in range(4):
            neg = lb != c
            g = (wb[neg] * torch.exp(scale * zb[neg] @ prompts.detach()[c])).sum() / wb[neg].sum()
            expected[c] = g if step == 0 else 0.7 * expected[c] + 0.3 * g
    assert torch.allclose(loss.log_u.exp(), expected, rtol=1e-10)


def test_prompt_gcl_saturates_where_the_pairs_form_does_not():
    # two well-separated samples: text -> image has almost no gradient (clip_loss-like), i2t is exact
    prompts = torch.eye(2, dtype=torch.float64)
    z = torch.eye(2, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1])
    out = PromptContrastiveLoss(2, gamma=1.0)(z, prompts, labels, 50.0, torch.ones(2), n_ref=1.0)
    (g,) = torch.autograd.grad(out["surrogate"].sum(), z)
    assert g.norm() < 1e-18  # no gradient left at a large margin
    assert torch.allclose(out["loss"], torch.full((2,), math.log1p(math.exp(-50)), dtype=torch.float64))


def test_prompt_gcl_class_without_negatives_keeps_its_estimate_and_no_nan():
    prompts = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    z = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    loss = PromptContrastiveLoss(3, gamma=0.5)
    loss(z, prompts, torch.tensor([0, 2, 2]), 10.0, torch.ones(3), n_ref=2.0)  # class 1's negatives: all three
    kept = loss.log_u[1].clone()
    out = loss(z, prompts, torch.tensor([1, 1, 1]), 10.0, torch.ones(3), n_ref=2.0)  # class 1 has no negative now
    assert loss.log_u[1] == kept and loss.visited.all()
    assert torch.isfinite(out["surrogate"]).all() and (out["t2i"] == 0).all() and not out["has_negative"].any()


def test_dro_excess_reads_losses_against_their_value_when_last_trained():
    dro = ClassDRO(2, "kl", lam=1.0, beta=1.0, excess=True)
    dro.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    dro.mark_trained(torch.tensor([0, 1]))
    dro.reset(3)  # a new stage with a new class: the marks stay
    assert torch.equal(dro.base[:2], torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert dro.marked.tolist() == [True, True, False]
    dro.update(torch.tensor([0, 1, 2]), torch.tensor([2.0, 3.5, 9.0]))
    excess = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)  # class 2 never trained before: 0
    assert torch.allclose(dro.class_weights(), torch.softmax(excess, 0))


def test_dro_excess_is_taken_before_the_size_adjustment():
    dro = ClassDRO(3, "kl", lam=1.0, beta=1.0, adjust=1.0, excess=True)
    dro.set_sizes(torch.tensor([4, 4, 4]))
    dro.update(torch.tensor([0, 1]), torch.tensor([2.0, 2.0]))
    dro.mark_trained(torch.tensor([0, 1]))
    dro.update(torch.tensor([0, 1, 2]), torch.tensor([2.0, 2.0, 5.0]))  # no class rose; class 2 never trained
    assert torch.allclose(dro.class_weights(), torch.full((3,), 1 / 3, dtype=torch.float64))
