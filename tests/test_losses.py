"""Each loss against its formula written out directly (float64 NumPy, loops, full sorts)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pretrain.losses import (
    dcl_loss,
    hcl_loss,
    in_batch_logits,
    in_batch_ring_loss,
    nce_loss,
    nt_xent_loss,
    ring_bounds,
    ring_logits,
    ring_loss,
)
from ringbench.errors import UserError
from ringbench.ring_schedules import ring_threshold


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random(seed: int, b: int, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), torch.randn(k, d, generator=g)


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def _direct_ring(q, k, neg, t, w_outer, w_inner) -> float:
    q, k, neg = (_unit(x.double().numpy()) for x in (q, k, neg))
    outer = math.floor(w_outer * len(neg))
    inner = math.floor(w_inner * outer)
    losses = []
    for qi, ki in zip(q, k):
        pos = qi @ ki / t
        ranked = np.sort(neg @ qi / t)[::-1]  # rank 0 = most similar to the anchor
        ring = ranked[inner:outer]
        losses.append(-(pos - _logsumexp(np.concatenate([[pos], ring]))))
    return float(np.mean(losses))


def test_nce_matches_formula():
    q, k, neg = _random(0, 5, 40, 16)
    qn, kn, nn_ = (_unit(x.double().numpy()) for x in (q, k, neg))
    t = 0.2
    want = np.mean(
        [-(qi @ ki / t - _logsumexp(np.concatenate([[qi @ ki / t], nn_ @ qi / t]))) for qi, ki in zip(qn, kn)]
    )
    assert nce_loss(q, k, neg, t).item() == pytest.approx(want, rel=1e-5)


def test_nce_per_anchor_negatives_match_shared():
    q, k, neg = _random(1, 4, 10, 8)
    shared = nce_loss(q, k, neg, 0.1)
    per_anchor = nce_loss(q, k, neg.expand(4, 10, 8), 0.1)
    assert shared.item() == pytest.approx(per_anchor.item(), rel=1e-6)


@pytest.mark.parametrize("w_outer,w_inner", [(0.1, 0.1), (0.5, 0.0), (1.0, 0.5), (0.3, 0.9)])
def test_ring_matches_sorted_formula(w_outer, w_inner):
    q, k, neg = _random(2, 6, 200, 12)
    got = ring_loss(q, k, neg, t=0.07, w_outer=w_outer, w_inner=w_inner).item()
    assert got == pytest.approx(_direct_ring(q, k, neg, 0.07, w_outer, w_inner), rel=1e-5)


def test_ring_whole_set_equals_nce():
    q, k, neg = _random(3, 4, 30, 8)
    assert ring_loss(q, k, neg, 0.1, w_outer=1.0, w_inner=0.0).item() == pytest.approx(
        nce_loss(q, k, neg, 0.1).item(), rel=1e-6
    )


def test_ring_ranks_by_anchor_not_by_positive():
    # One negative equals the positive key but is far from the anchor: ranking by q keeps it out
    # of a tight ring, ranking by k would put it first.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [1.0, 0.2, 0.0], [1.0, 0.3, 0.0], [0.5, 0.0, 1.0]])
    ring = ring_logits(pair_neg(q, neg, 1.0), w_outer=0.6, w_inner=0.0)
    members = ring[torch.isfinite(ring)]
    assert members.shape == (3,)
    assert torch.allclose(torch.sort(members).values, torch.sort(pair_neg(q, neg, 1.0)[0, 1:4]).values)


def test_ring_logits_mark_exactly_the_ring():
    neg = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    inner, outer = ring_bounds(300, 0.3, 0.2)
    ring = ring_logits(neg, 0.3, 0.2)
    for row, got in zip(neg, ring):
        want = torch.sort(row, descending=True).values[inner:outer]
        assert torch.equal(torch.sort(got[torch.isfinite(got)], descending=True).values, want)


def pair_neg(q, neg, t):
    return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(neg, dim=1).t() / t


def test_ir_sampling_draws_only_from_ring():
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(8, 500, generator=g)  # distinct logits
    inner, outer = ring_bounds(500, 0.2, 0.25)
    samples = ring_logits(neg, 0.2, 0.25, num_samples=4000, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (8, 4000)
    for row, drawn in zip(neg, samples):
        ring = set(torch.sort(row, descending=True).values[inner:outer].tolist())
        drawn = drawn.tolist()
        assert set(drawn) <= ring
        assert len(set(drawn)) > 0.95 * len(ring)  # with replacement, uniform: nearly all members appear
        counts = np.unique(drawn, return_counts=True)[1]
        assert counts.max() < 4000 / len(ring) * 3  # no member dominates


def test_ir_ring_loss_formula_and_generator_reproducible():
    q, k, neg = _random(4, 3, 100, 8)
    t, n = 0.07, 7
    inner, outer = ring_bounds(100, 0.3, 0.1)
    got = ring_loss(q, k, neg, t, 0.3, 0.1, num_samples=n, generator=torch.Generator().manual_seed(5))
    again = ring_loss(q, k, neg, t, 0.3, 0.1, num_samples=n, generator=torch.Generator().manual_seed(5))
    assert got.item() == again.item()
    picks = torch.randint(0, outer - inner, (3, n), generator=torch.Generator().manual_seed(5)).numpy()
    qn, kn, nn_ = (_unit(x.double().numpy()) for x in (q, k, neg))
    losses = []
    for i in range(3):
        pos = qn[i] @ kn[i] / t
        logits = nn_ @ qn[i] / t
        rank = np.argsort(np.argsort(-logits))
        ring = logits[(rank >= inner) & (rank < outer)]  # ring members in queue order
        losses.append(-(pos - _logsumexp(np.concatenate([[pos], ring[picks[i]]]))))
    assert got.item() == pytest.approx(np.mean(losses), rel=1e-5)


def test_ring_large_queue_candidate_path_is_exact():
    # K >= 16,384 takes the subsampled-threshold path: same value and gradient as a full sort.
    q, k, neg = _random(12, 16, 20000, 8)
    q1 = q.clone().requires_grad_()
    ring_loss(q1, k, neg, 0.07, 0.1, 0.1).backward()
    q2 = q.clone().requires_grad_()
    pos = (torch.nn.functional.normalize(q2, dim=1) * torch.nn.functional.normalize(k, dim=1)).sum(1) / 0.07
    ring = torch.sort(pair_neg(q2, neg, 0.07), dim=1, descending=True).values[:, 200:2000]
    want = -(pos - torch.logsumexp(torch.cat([pos[:, None], ring], 1), 1)).mean()
    want.backward()
    assert q1.grad is not None and torch.allclose(q1.grad, q2.grad, atol=1e-6)
    assert ring_loss(q, k, neg, 0.07, 0.1, 0.1).item() == pytest.approx(want.item(), rel=1e-6)


def test_ring_gradient_matches_sort_based():
    q, k, neg = _random(5, 4, 300, 16)
    q1 = q.clone().requires_grad_()
    ring_loss(q1, k, neg, 0.07, 0.1, 0.1).backward()
    q2 = q.clone().requires_grad_()
    pos, negl = (
        (torch.nn.functional.normalize(q2, dim=1) * torch.nn.functional.normalize(k, dim=1)).sum(1) / 0.07,
        pair_neg(q2, neg, 0.07),
    )
    ring = torch.sort(negl, dim=1, descending=True).values[:, 3:30]
    (-(pos - torch.logsumexp(torch.cat([pos[:, None], ring], 1), 1)).mean()).backward()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_outer=0.1, w_inner=1.0), "w_inner"),
        (dict(w_outer=0.0, w_inner=0.1), "w_outer"),
        (dict(w_outer=1.5, w_inner=0.1), "w_outer"),
        (dict(w_outer=0.01, w_inner=0.1), "ring is empty"),
        (dict(w_outer=0.1, w_inner=0.1, num_samples=0), "num_samples"),
    ],
)
def test_ring_bad_parameters(kwargs, match):
    q, k, neg = _random(6, 2, 50, 4)
    with pytest.raises(UserError, match=match):
        ring_loss(q, k, neg, 0.07, **kwargs)


def _direct_in_batch(z1, z2):
    z = _unit(torch.cat([z1, z2]).double().numpy())
    n = len(z)
    b = n // 2
    for i in range(n):
        j = (i + b) % n
        yield z[i] @ z[j], np.array([z[i] @ z[m] for m in range(n) if m not in (i, j)])


def _direct_hcl(z1, z2, t, tau_plus, beta, estimator="hard") -> float:
    losses = []
    for s_pos, s_neg in _direct_in_batch(z1, z2):
        n = len(s_neg)
        pos = np.exp(s_pos / t)
        if estimator == "easy":
            ng = np.exp(s_neg / t).sum()
        else:
            imp = np.exp(beta * s_neg / t)
            reweight = (imp * np.exp(s_neg / t)).sum() / imp.mean()
            ng = max((-tau_plus * n * pos + reweight) / (1 - tau_plus), n * np.exp(-1 / t))
        losses.append(-np.log(pos / (pos + ng)))
    return float(np.mean(losses))


def test_in_batch_logits_layout():
    z1, z2, _ = _random(7, 3, 1, 5)
    pos, neg = in_batch_logits(z1, z2, 1.0)
    assert pos.shape == (6,) and neg.shape == (6, 4)
    for i, (s_pos, s_neg) in enumerate(_direct_in_batch(z1, z2)):
        assert pos[i].item() == pytest.approx(s_pos, rel=1e-5)
        assert np.allclose(neg[i].numpy(), s_neg, atol=1e-6)


@pytest.mark.parametrize("t,tau_plus,beta", [(0.5, 0.1, 1.0), (0.5, 0.0, 0.5), (0.2, 0.3, 2.0), (0.07, 0.1, 1.0)])
def test_hcl_matches_formula(t, tau_plus, beta):
    z1, z2, _ = _random(8, 8, 1, 16)
    got = hcl_loss(z1, z2, t=t, tau_plus=tau_plus, beta=beta).item()
    assert got == pytest.approx(_direct_hcl(z1, z2, t, tau_plus, beta), rel=1e-4)


def test_hcl_clamp_branch_matches_formula():
    # Each view close to its own axis, far from the others': s_pos ~ 1, s_neg ~ 0, so with a large
    # tau_plus the debiased estimate (-tau_plus*N*e^{s_pos/t} + reweight) / (1 - tau_plus) is negative
    # and the floor N*exp(-1/t) takes over for every anchor.
    gen = torch.Generator().manual_seed(0)
    base = torch.eye(6, 8)
    z1 = base + 0.01 * torch.randn(6, 8, generator=gen)
    z2 = base + 0.01 * torch.randn(6, 8, generator=gen)
    t, tau_plus = 0.5, 0.5
    for s_pos, s_neg in _direct_in_batch(z1, z2):
        n = len(s_neg)
        imp = np.exp(s_neg / t)
        reweight = (imp * np.exp(s_neg / t)).sum() / imp.mean()
        assert (-tau_plus * n * np.exp(s_pos / t) + reweight) / (1 - tau_plus) < n * np.exp(-1 / t)
    got = hcl_loss(z1, z2, t=t, tau_plus=tau_plus, beta=1.0).item()
    assert got == pytest.approx(_direct_hcl(z1, z2, t, tau_plus, 1.0), rel=1e-5)


def test_hcl_easy_dcl_and_ntxent():
    z1, z2, _ = _random(9, 6, 1, 8)
    assert hcl_loss(z1, z2, 0.5, estimator="easy").item() == pytest.approx(
        _direct_hcl(z1, z2, 0.5, 0, 0, "easy"), rel=1e-5
    )
    assert dcl_loss(z1, z2, 0.5, 0.1).item() == pytest.approx(_direct_hcl(z1, z2, 0.5, 0.1, 0.0), rel=1e-5)
    assert hcl_loss(z1, z2, 0.5, tau_plus=0.0, beta=0.0).item() == pytest.approx(
        nt_xent_loss(z1, z2, 0.5).item(), rel=1e-6
    )


def test_hcl_stable_at_low_temperature():
    z1, z2, _ = _random(10, 64, 1, 128)
    z1 = z1.requires_grad_()
    loss = hcl_loss(z1, z2 + 0.0 * z1, t=0.07, tau_plus=0.1, beta=5.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
    assert loss.item() == pytest.approx(_direct_hcl(z1.detach(), z2, 0.07, 0.1, 5.0), rel=1e-4)


def test_in_batch_ring_draws_from_own_negatives():
    z1, z2, _ = _random(11, 10, 1, 8)
    pos, neg = in_batch_logits(z1, z2, 0.5)
    inner, outer = ring_bounds(neg.shape[1], 0.5, 0.2)
    ring = torch.sort(neg, 1, descending=True).values[:, inner:outer]
    want = -(pos - torch.logsumexp(torch.cat([pos[:, None], ring], 1), 1)).mean()
    assert in_batch_ring_loss(z1, z2, 0.5, 0.5, 0.2).item() == pytest.approx(want.item(), rel=1e-6)


def test_ring_schedules():
    assert ring_threshold(50, "constant", 0.1) == 0.1
    assert ring_threshold(0, "linear", 0.1, 1.0, 100) == pytest.approx(1.0)
    assert ring_threshold(50, "linear", 0.1, 1.0, 100) == pytest.approx(0.55)
    assert ring_threshold(150, "linear", 0.1, 1.0, 100) == pytest.approx(0.1)
    assert ring_threshold(24, "step", 0.2, 1.0, 100, steps=4) == pytest.approx(1.0)
    assert ring_threshold(25, "step", 0.2, 1.0, 100, steps=4) == pytest.approx(0.8)
    assert ring_threshold(100, "step", 0.2, 1.0, 100, steps=4) == pytest.approx(0.2)
    assert ring_threshold(50, "exponential", 0.01, 1.0, 100) == pytest.approx(0.1)
    assert ring_threshold(200, "exponential", 0.01, 1.0, 100) == pytest.approx(0.01)
    values = [ring_threshold(e, "exponential", 0.05, 1.0, 10) for e in range(12)]
    assert all(a > b for a, b in itertools.pairwise(values[:11]))  # decreasing until the anneal ends
    with pytest.raises(UserError, match="schedule"):
        ring_threshold(0, "cosine")


@pytest.mark.parametrize(
    "loss",
    [
        lambda q, k, n: nce_loss(q, k, n, 0.07),
        lambda q, k, n: ring_loss(q, k, n, 0.07, 0.3, 0.1),
        lambda q, k, n: ring_loss(q, k, n, 0.07, 0.3, 0.1, num_samples=64, generator=torch.Generator().manual_seed(0)),
        lambda q, k, n: nt_xent_loss(q, k, 0.5),
        lambda q, k, n: in_batch_ring_loss(q, k, 0.5, 0.5, 0.1),
        lambda q, k, n: hcl_loss(q, k, 0.5, 0.1, 1.0),
        lambda q, k, n: dcl_loss(q, k, 0.5, 0.1),
    ],
)
def test_losses_stay_float32_under_autocast(loss):
    """Under mixed precision (here CPU bfloat16 autocast, which would run the matmuls in bfloat16) the
    logits, the ring selection and the loss are float32: value and gradient equal the fp32 ones."""
    q, k, neg = _random(7, 16, 512, 32)

    def run(autocast: bool):
        x = q.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss(x, k, neg)
        value.backward()
        return value, x.grad

    (v32, g32), (vmix, gmix) = run(False), run(True)
    assert vmix.dtype == torch.float32
    assert vmix.item() == v32.item()
    assert torch.equal(gmix, g32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast would have done to the loss
        assert (q @ neg.t()).dtype == torch.bfloat16


@pytest.mark.parametrize("k,w_outer,w_inner", [(300, 0.3, 0.2), (20000, 0.1, 0.1), (20000, 0.6, 0.0)])
def test_ring_member_selection_paths_agree_and_are_exact(k, w_outer, w_inner):
    """The NumPy (CPU, large K) and torch (any device) selections give the same ring, in column order,
    equal to ranks [inner, outer) of a full sort, also for rows with float ties at a bound."""
    from pretrain.losses import _ring_members_numpy, _ring_members_torch

    g = torch.Generator().manual_seed(11)
    neg = torch.randn(6, k, generator=g)
    inner, outer = ring_bounds(k, w_outer, w_inner)
    ranked = torch.sort(neg, dim=1, descending=True, stable=True).indices
    neg[0, ranked[0, outer]] = neg[0, ranked[0, outer - 1]]  # ties at the outer bound
    neg[1, ranked[1, inner]] = neg[1, ranked[1, max(inner - 1, 0)]]  # and at the inner one
    ranked = torch.sort(neg, dim=1, descending=True, stable=True).indices
    for select in (_ring_members_numpy, _ring_members_torch):
        values, cols = select(neg, inner, outer)
        assert values.shape == cols.shape == (6, outer - inner)
        assert torch.equal(values, neg.gather(1, cols))
        assert bool((cols[:, 1:] > cols[:, :-1]).all())  # column order
        for row in range(6):  # the ring's values are the sorted row's ranks [inner, outer)
            want = torch.sort(neg[row, ranked[row, inner:outer]]).values
            assert torch.equal(torch.sort(values[row]).values, want)


@pytest.mark.parametrize("num_samples", [None, 3000])
def test_ring_loss_gradients_reach_anchor_positive_and_negatives(num_samples):
    """The ring's custom backward against autograd through the gathered ring logits (per-anchor copies of
    the shared negatives take the reference path), for q, k and the negatives; IR draws repeat members."""
    q, k, neg = _random(13, 5, 20000, 8)
    tensors = [x.clone().requires_grad_() for x in (q, k, neg)]
    ring_loss(*tensors, 0.07, 0.1, 0.1, num_samples, torch.Generator().manual_seed(3)).backward()
    reference = [x.clone().requires_grad_() for x in (q, k, neg)]
    per_anchor = reference[2].expand(5, *neg.shape)
    ring_loss(*reference[:2], per_anchor, 0.07, 0.1, 0.1, num_samples, torch.Generator().manual_seed(3)).backward()
    for got, want in zip(tensors, reference):
        assert torch.allclose(got.grad, want.grad, atol=1e-6, rtol=1e-4)
