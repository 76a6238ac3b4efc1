"""Proxy-Anchor (baseline and introspective) and the mixup objective."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from idml.method.losses import ProxyAnchorLoss, mixup_batch, mixup_loss


def _batch(seed=0, n=24, d=16, c=6):
    g = torch.Generator().manual_seed(seed)
    s = F.normalize(torch.randn(n, d, generator=g), dim=1)
    u = 0.3 * torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return s, u, y


def test_semantic_mode_equals_pytorch_metric_learning():
    s, u, y = _batch()
    ours = ProxyAnchorLoss(6, 16, metric="semantic", margin=0.1, scale=32)
    theirs = pml_losses.ProxyAnchorLoss(6, 16, margin=0.1, alpha=32)
    with torch.no_grad():
        theirs.proxies.copy_(ours.proxies)
    torch.testing.assert_close(ours(s, u, y), theirs(s, y), rtol=1e-5, atol=1e-5)


def test_introspective_with_zero_uncertainty_and_no_warp_is_baseline():
    # a huge `a` makes exp(-(beta + b) / (a d)) = 1 wherever d is not tiny: D_IN == alpha.
    s, _, y = _batch(1)
    base = ProxyAnchorLoss(6, 16, metric="semantic")
    ism = ProxyAnchorLoss(6, 16, metric="introspective", a=1e9, b=0.0)
    ism.load_state_dict(base.state_dict())
    torch.testing.assert_close(ism(s, torch.zeros_like(s), y), base(s, s, y), rtol=1e-5, atol=1e-5)


def _head_grads(reference):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(10, 10)
    sem, unc = torch.nn.Linear(10, 16), torch.nn.Linear(10, 16)
    x = torch.randn(24, 10)
    y = torch.arange(24) % 6
    f = trunk(x)
    s, u = F.normalize(sem(f), dim=1), unc(f)
    if reference:  # the release's model normalises the uncertainty too
        u = F.normalize(u, dim=1)
    loss = ProxyAnchorLoss(6, 16, metric="introspective", reference=reference)(s, u, y)
    loss.backward()
    return sem.weight.grad.norm().item(), unc.weight.grad.norm().item()


def test_uncertainty_head_learns_in_default_mode():
    sem_grad, unc_grad = _head_grads(reference=False)
    assert unc_grad > 1e-3 * sem_grad > 0


def test_uncertainty_head_gets_no_gradient_in_reference_mode():
    # Defect 5a of the release: ||u||^2 == 1, so the uncertainty head receives nothing.
    sem_grad, unc_grad = _head_grads(reference=True)
    assert sem_grad > 0
    assert unc_grad < 1e-6 * sem_grad


@pytest.mark.parametrize("metric", ["semantic", "introspective"])
@pytest.mark.parametrize("reference", [False, True])
def test_duplicates_give_finite_loss_and_gradients(metric, reference):
    s, u, y = _batch(2)
    loss_fn = ProxyAnchorLoss(6, 16, metric=metric, reference=reference)
    with torch.no_grad():  # samples that coincide with their proxy: semantic distance 0
        s[:6] = F.normalize(loss_fn.proxies, dim=1)
        s[6:12] = s[:6]
        y[:12] = torch.arange(12) % 6
    s.requires_grad_(True)
    u.requires_grad_(True)
    loss = mixup_loss(loss_fn, (s, u), (s, u), y, torch.arange(24).flip(0), 0.3)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all() and torch.isfinite(loss_fn.proxies.grad).all()
    assert (u.grad is None) == (metric == "semantic")
    assert u.grad is None or torch.isfinite(u.grad).all()


def test_mixup_loss_is_the_papers_combination():
    s, u, y = _batch(3)
    s2, u2, _ = _batch(4)
    loss_fn = ProxyAnchorLoss(6, 16)
    perm = torch.randperm(24)
    lam = 0.25
    expected = loss_fn(s, u, y) + lam * loss_fn(s2, u2, y) + (1 - lam) * loss_fn(s2, u2, y[perm])
    torch.testing.assert_close(mixup_loss(loss_fn, (s, u), (s2, u2), y, perm, lam), expected)


def test_mixup_batch_blends_with_a_permutation():
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).clone()
    mixed, perm, lam = mixup_batch(x, torch.Generator().manual_seed(0))
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])


def test_optimisation_lowers_the_loss():
    s0, u0, y = _batch(5)
    s = s0.clone().requires_grad_(True)
    u = u0.clone().requires_grad_(True)
    loss_fn = ProxyAnchorLoss(6, 16)
    opt = torch.optim.SGD([s, u, *loss_fn.parameters()], lr=0.05)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(F.normalize(s, dim=1), u, y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_semantic_similarity_is_float32_under_autocast():
    s, u, y = _batch(6)
    loss_fn = ProxyAnchorLoss(6, 16, metric="semantic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = loss_fn.similarity(s.bfloat16(), u.bfloat16())
    assert sim.dtype == torch.float32
