"""The introspective metric against an independent NumPy restatement of the method page."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idml.method import metric


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_ism(s, u, t, v, form, a, b, beta):
    """Loops over pairs, straight from the formulas (float64)."""
    out = np.empty((len(s), len(t)))
    for i in range(len(s)):
        for j in range(len(t)):
            cos = s[i] @ t[j]
            d = np.sum((s[i] - t[j]) ** 2)
            if beta == "difference":
                bt = np.sum((u[i] - v[j]) ** 2)
            else:
                bt = np.sum(u[i] ** 2) + np.sum(v[j] ** 2)
            alpha = 1 - cos if form == "cosine" else d
            dist = alpha * np.exp(-(bt + b) / (a * d))
            out[i, j] = 1 - dist if form == "cosine" else dist
    return out


@pytest.mark.parametrize("form", ["cosine", "euclidean"])
@pytest.mark.parametrize("beta", ["difference", "sum"])
@pytest.mark.parametrize("ab", [(5.0, 4.0), (1.0, 0.0), (2.5, 0.3)])
def test_pairwise_matches_numpy(form, beta, ab):
    rng = np.random.default_rng(0)
    s, t = _unit(rng, 7, 6), _unit(rng, 5, 6)
    u, v = rng.normal(size=(7, 4)) * 0.5, rng.normal(size=(5, 4)) * 0.5
    a, b = ab
    got = metric.pairwise_introspective(
        *(torch.tensor(x, dtype=torch.float32) for x in (s, u, t, v)),
        form=form, a=a, b=b, beta=beta,
    )
    np.testing.assert_allclose(got.numpy(), _np_ism(s, u, t, v, form, a, b, beta), atol=2e-5)


def test_paper_form_when_a1_b0():
    # a=1, b=0, Euclidean form: D = alpha * exp(-beta / alpha) (paper, Fig. 1).
    alpha = torch.tensor([0.5, 1.0, 2.0])
    beta = torch.tensor([0.1, 0.0, 3.0])
    got = metric.introspective_distance(alpha, beta, a=1.0, b=0.0)
    expected = np.array([0.5 * np.exp(-0.2), 1.0, 2.0 * np.exp(-1.5)])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_gradients_match_closed_form():
    # dD/dalpha = exp(-t)(1 + t), dD/dbeta = -exp(-t), t = beta / alpha (method page, section 3).
    alpha = torch.tensor([0.3, 1.2], requires_grad=True)
    beta = torch.tensor([0.6, 0.4], requires_grad=True)
    metric.introspective_distance(alpha, beta, a=1.0, b=0.0).sum().backward()
    t = (beta / alpha).detach().numpy()
    np.testing.assert_allclose(alpha.grad.numpy(), np.exp(-t) * (1 + t), rtol=1e-5)
    np.testing.assert_allclose(beta.grad.numpy(), -np.exp(-t), rtol=1e-5)


def test_distance_bounded_by_alpha_and_decreasing_in_beta():
    alpha = torch.full((50,), 0.7)
    beta = torch.linspace(0, 10, 50)
    d = metric.introspective_distance(alpha, beta, a=1.0, b=0.0)
    assert torch.all(d <= alpha) and torch.all(d[1:] < d[:-1])
    assert d[0] == pytest.approx(0.7)


def _np_proxy(s, u, p, a, b, reference):
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    if reference:
        u = u / np.linalg.norm(u, axis=1, keepdims=True)
    out = np.empty((len(s), len(p)))
    for i in range(len(s)):
        for c in range(len(p)):
            S = s[i] @ pn[c]
            d = np.sum((s[i] - (p[c] if reference else pn[c])) ** 2)
            out[i, c] = 1 - (1 - S) * np.exp(-(np.sum(u[i] ** 2) + b) / (a * d))
    return out


@pytest.mark.parametrize("reference", [False, True])
def test_proxy_similarity_matches_release_formula(reference):
    rng = np.random.default_rng(1)
    s = _unit(rng, 6, 8)
    u = rng.normal(size=(6, 8))
    p = rng.normal(size=(4, 8)) * 3.0  # far from unit norm: defect 5b matters
    got = metric.proxy_introspective_similarity(
        *(torch.tensor(x, dtype=torch.float32) for x in (s, u, p)), a=5.0, b=4.0,
        reference=reference,
    )
    np.testing.assert_allclose(got.numpy(), _np_proxy(s, u, p, 5.0, 4.0, reference), atol=2e-5)


def test_reference_and_default_differ():
    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    u, p = torch.randn(5, 8, generator=g), 3 * torch.randn(3, 8, generator=g)
    ref = metric.proxy_introspective_similarity(s, u, p, reference=True)
    new = metric.proxy_introspective_similarity(s, u, p, reference=False)
    assert (ref - new).abs().max() > 1e-3


def test_default_proxy_form_is_d_in_with_rescaled_beta():
    # With unit proxies, S_IN = 1 - D_IN(alpha = 1 - S, beta' = (beta + b) / (2a)), a=1, b=0.
    g = torch.Generator().manual_seed(2)
    s = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    u, p = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)
    got = metric.proxy_introspective_similarity(s, u, p, a=5.0, b=4.0)
    alpha = 1 - s @ F.normalize(p, dim=1).T
    beta = ((u**2).sum(1, keepdim=True) + 4.0) / 10.0
    expected = 1 - metric.introspective_distance(alpha, beta.expand_as(alpha), a=1.0, b=0.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["cosine", "euclidean"])
def test_duplicates_are_finite_with_finite_gradients(form):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 8, generator=g)
    s = torch.cat([base, base]).requires_grad_(True)  # every image twice: alpha == 0
    u = torch.randn(6, 8, generator=g).requires_grad_(True)
    out = metric.pairwise_introspective(F.normalize(s, dim=1), u, form=form)
    assert torch.isfinite(out).all()
    diag = out.diagonal()
    expected_diag = 1.0 if form == "cosine" else 0.0  # D_IN = 0 at alpha = 0
    torch.testing.assert_close(diag, torch.full_like(diag, expected_diag), atol=1e-5, rtol=0)
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(u.grad).all()


def test_float32_under_autocast():
    s = F.normalize(torch.randn(4, 8), dim=1).bfloat16()
    u = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = metric.pairwise_introspective(s, u)
        prox = metric.proxy_introspective_similarity(s, u, torch.randn(3, 8))
    assert out.dtype == torch.float32 and prox.dtype == torch.float32


def test_bad_arguments():
    s = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="form"):
        metric.pairwise_introspective(s, s, form="manhattan")
    with pytest.raises(ValueError, match="difference"):
        metric.uncertainty_distance(s, s, variant="max")
