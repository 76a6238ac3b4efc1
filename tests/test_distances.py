"""IntrospectiveDistance: the ISM of idml.method.metric behind PML's distance contract."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from idml.method.distances import IntrospectiveDistance
from idml.method.metric import pairwise_introspective, proxy_introspective_similarity

E, U = 6, 4


def _halves(seed=0, n=7, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = F.normalize(torch.randn(n, E, generator=g), dim=1)
    u = 0.5 * torch.randn(n, U, generator=g)
    return scale * s, u


FORMS = ["cosine", "euclidean"]
BETAS = ["difference", "sum"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("ab", [(5.0, 4.0), (1.0, 0.0)])
def test_compute_mat_is_pairwise_introspective(form, beta, ab):
    (s, u), (t, v) = _halves(0), _halves(1, n=5)
    a, b = ab
    dist = IntrospectiveDistance(E, form=form, a=a, b=b, beta=beta)
    got = dist.compute_mat(torch.cat([s, u], 1), torch.cat([t, v], 1))
    expected = pairwise_introspective(s, u, t, v, form=form, a=a, b=b, beta=beta)
    assert torch.equal(got, expected)
    assert dist.is_inverted == (form == "cosine")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", BETAS)
def test_forward_normalises_only_the_semantic_half(form, beta):
    s, u = _halves(2, scale=3.0)  # semantic rows of norm 3
    x = torch.cat([s, u], 1)
    dist = IntrospectiveDistance(E, form=form, beta=beta)
    normalised = dist.normalize(x)
    assert torch.equal(normalised[:, E:], u)
    torch.testing.assert_close(normalised[:, :E].norm(dim=1), torch.ones(len(x)))
    torch.testing.assert_close(dist.get_norm(x), torch.full((len(x),), 3.0))
    expected = pairwise_introspective(F.normalize(s, dim=1), u, form=form, beta=beta)
    torch.testing.assert_close(dist(x), expected)


def test_normalize_along_dim_0_for_weights_stored_as_columns():
    # NormalizedSoftmaxLoss normalises its [embedding, classes] weight along dim 0
    w = torch.randn(E + U, 3)
    out = IntrospectiveDistance(E).normalize(w, dim=0)
    torch.testing.assert_close(out[:E], F.normalize(w[:E], dim=0))
    assert torch.equal(out[E:], w[E:])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("beta", BETAS)
def test_semantic_only_proxies_have_zero_uncertainty(form, beta):
    s, u = _halves(3)
    proxies = F.normalize(torch.randn(5, E, generator=torch.Generator().manual_seed(4)), dim=1)
    dist = IntrospectiveDistance(E, form=form, beta=beta)
    got = dist.compute_mat(torch.cat([s, u], 1), proxies)
    expected = pairwise_introspective(s, u, proxies, torch.zeros(5, U), form=form, beta=beta)
    assert torch.equal(got, expected)
    if form == "cosine":  # the same numbers as the hand-written Proxy-Anchor path
        torch.testing.assert_close(got, proxy_introspective_similarity(s, u, proxies, beta=beta))


def test_proxies_with_a_learned_uncertainty_half():
    (s, u), (p, w) = _halves(5), _halves(6, n=3)
    dist = IntrospectiveDistance(E, beta="difference")
    got = dist.compute_mat(torch.cat([s, u], 1), torch.cat([p, w], 1))
    assert torch.equal(got, pairwise_introspective(s, u, p, w))


def test_squared_false_is_the_root_on_lp_distance_scale():
    s, u = _halves(7)
    x = torch.cat([s, u], 1)
    d_in = IntrospectiveDistance(E, form="euclidean").compute_mat(x, x)
    root = IntrospectiveDistance(E, form="euclidean", squared=False)
    torch.testing.assert_close(root.compute_mat(x, x), d_in.sqrt())
    squared_back = IntrospectiveDistance(E, form="euclidean", squared=False, power=2)
    torch.testing.assert_close(squared_back(x), d_in)


def test_root_matches_numpy_restatement():
    # sqrt(||s-t||^2 * exp(-(beta + b) / (a ||s-t||^2))), from the method page, float64 loops
    s, u = _halves(8, n=4)
    a, b = 2.0, 0.5
    got = IntrospectiveDistance(E, form="euclidean", a=a, b=b, squared=False)(torch.cat([s, u], 1))
    sn, un = s.double().numpy(), u.double().numpy()
    expected = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            d = np.sum((sn[i] - sn[j]) ** 2)
            if i != j:
                expected[i, j] = np.sqrt(d * np.exp(-(np.sum((un[i] - un[j]) ** 2) + b) / (a * d)))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "baseline"),
    [
        ({"form": "cosine"}, CosineSimilarity()),
        ({"form": "euclidean", "squared": False}, LpDistance()),
        ({"form": "euclidean", "squared": False, "power": 2}, LpDistance(power=2)),
    ],
)
def test_zero_uncertainty_without_offset_is_the_pml_baseline(kwargs, baseline):
    s, _ = _halves(9, scale=2.0)
    dist = IntrospectiveDistance(E, b=0.0, **kwargs)
    x = torch.cat([s, torch.zeros(len(s), U)], 1)
    # atol: torch.cdist (LpDistance) puts sqrt(rounding) ~ 3e-4 on its zero diagonal
    torch.testing.assert_close(dist(x), baseline(s), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("squared", [True, False])
def test_pairwise_distance_is_the_diagonal(form, squared):
    (s, u), (t, v) = _halves(10), _halves(11)
    q, r = torch.cat([s, u], 1), torch.cat([t, v], 1)
    dist = IntrospectiveDistance(E, form=form, squared=squared)
    torch.testing.assert_close(dist.pairwise_distance(q, r), dist.compute_mat(q, r).diagonal())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("power", [1, 2])
def test_duplicates_give_finite_values_and_gradients(form, squared, power):
    s, u = _halves(12, n=4)
    x = torch.cat([s, u], 1).repeat(2, 1).requires_grad_(True)  # every row twice
    dist = IntrospectiveDistance(E, form=form, squared=squared, power=power)
    mat = dist(x)
    (mat.sum() + dist.pairwise_distance(x, x.roll(4, 0)).sum()).backward()
    assert torch.isfinite(mat).all() and torch.isfinite(x.grad).all()
    same = 1.0 if form == "cosine" else 0.0
    torch.testing.assert_close(mat.diagonal(), torch.full((8,), same))
    torch.testing.assert_close(mat.diagonal(4), torch.full((4,), same))
    assert x.grad[:, E:].abs().sum() > 0  # the uncertainty half is differentiated


def test_bad_arguments():
    with pytest.raises(ValueError, match="form"):
        IntrospectiveDistance(E, form="manhattan")
    with pytest.raises(ValueError, match="uncertainty distance"):
        IntrospectiveDistance(E, beta="max")
    dist = IntrospectiveDistance(E)
    with pytest.raises(ValueError, match="semantic_dim"):
        dist(torch.randn(3, E - 1))
    with pytest.raises(ValueError, match="widths differ"):
        dist.compute_mat(torch.randn(3, E + U), torch.randn(2, E + 1))
