"""Every registered loss on both metrics, through build_loss."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.reducers import MeanReducer
from torch import nn

from idml.method.losses import LOSSES, PMLLoss, build_loss, mixup_loss
from idml.method.metric import ISMParams

C, PER_CLASS, E, U, IN = 4, 8, 16, 16, 10
N = C * PER_CLASS
METRICS = ["semantic", "introspective"]
CASES = [
    (name, metric)
    for name, entry in LOSSES.items()
    for metric in METRICS
    if metric == "semantic" or entry.semantic_only is None
]
PROXY_LOSSES = {"proxy_anchor", "proxy_nca", "soft_triple", "normsoftmax", "arcface"}


def _build(name, metric, **kwargs):
    torch.manual_seed(0)  # the same proxy initialisation for every build of a loss
    return build_loss(
        name, num_classes=C, embedding_dim=E, uncertainty_dim=U, metric=metric, **kwargs
    )


def _problem(seed=0, duplicates=False):
    """A linear 'model' whose first E outputs are the semantic head, the rest the uncertainty."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=g)
    if duplicates:  # rows i and i + N/2 are the same image (and share a label)
        x[N // 2 :] = x[: N // 2]
    model = nn.Linear(IN, E + U)
    with torch.no_grad():  # ||u||^2 ~ 1: the ISM's warp is neither off nor saturated
        model.weight.copy_(torch.randn(E + U, IN, generator=g))
        model.weight[E:] *= 0.1
        model.bias.zero_()
    return model, x, torch.arange(N) % C


def _heads(model, x):
    out = model(x)
    return F.normalize(out[:, :E], dim=1), out[:, E:]


def _seeded(loss_fn, s, u, y):
    torch.manual_seed(1)  # the distance-weighted miner samples at random
    return loss_fn(s, u, y)


def _loss(loss_fn, model, x, y):
    return _seeded(loss_fn, *_heads(model, x), y)


class _FirstSelection(nn.Module):
    """A miner that keeps the tuples it mined on its first call."""

    def __init__(self, miner):
        super().__init__()
        self.miner, self.tuples = miner, None

    def forward(self, embeddings, labels):
        if self.tuples is None:
            self.tuples = self.miner(embeddings, labels)
        return self.tuples


def _fixed_terms(loss_fn):
    """The same loss over a fixed set of terms, so that 'before' and 'after' are comparable.

    Mined losses report an average over the terms active *now*, which need not fall while
    training works (a semi-hard triplet's loss lies in (0, margin] by definition, and an
    average over the non-zero terms rises as small terms reach zero). So keep the first
    mining and average over all its terms; the gradient direction of each term is unchanged.
    """
    if isinstance(loss_fn, PMLLoss):
        if loss_fn.miner is not None:
            loss_fn.miner = _FirstSelection(loss_fn.miner)
        loss_fn.loss.set_reducer(MeanReducer())
    return loss_fn


@pytest.mark.parametrize(("name", "metric"), CASES)
def test_a_few_adam_steps_lower_the_loss(name, metric):
    model, x, y = _problem()
    loss_fn = _fixed_terms(_build(name, metric))
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=0.02)
    with torch.no_grad():
        before = _loss(loss_fn, model, x, y).item()
    for _ in range(10):
        opt.zero_grad()
        _loss(loss_fn, model, x, y).backward()
        opt.step()
    with torch.no_grad():
        after = _loss(loss_fn, model, x, y).item()
    assert after < 0.99 * before


@pytest.mark.parametrize(("name", "metric"), CASES)
def test_duplicates_give_finite_loss_and_gradients(name, metric):
    model, x, y = _problem(1, duplicates=True)
    loss_fn = _build(name, metric)
    loss = _loss(loss_fn, model, x, y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [model.weight.grad, *(p.grad for p in loss_fn.parameters() if p.grad is not None)]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("name", "metric"), CASES)
def test_only_the_introspective_metric_trains_the_uncertainty_head(name, metric):
    model, x, y = _problem(2)
    loss_fn = _build(name, metric)
    _loss(loss_fn, model, x, y).backward()
    semantic_grad = model.weight.grad[:E].norm().item()
    uncertainty_grad = model.weight.grad[E:].norm().item()
    assert semantic_grad > 0
    if metric == "introspective":
        assert uncertainty_grad > 1e-4 * semantic_grad
    else:
        assert uncertainty_grad == 0


@pytest.mark.parametrize("name", [n for n, e in LOSSES.items() if e.semantic_only is None])
def test_zero_uncertainty_without_offset_reduces_to_the_baseline(name):
    # b = 0 and u = 0: exp(-(beta + b) / (a d)) == 1, so D_IN == alpha on every pair.
    model, x, y = _problem(3)
    s, _ = _heads(model, x)
    u = torch.zeros(N, U)
    base = _seeded(_build(name, "semantic"), s, u, y)
    ism = _seeded(_build(name, "introspective", ism=ISMParams(b=0.0)), s, u, y)
    assert base.item() > 0
    torch.testing.assert_close(ism, base, atol=1e-4, rtol=1e-4)


def _plain_triplet(s, y):
    miner = pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")
    return pml_losses.TripletMarginLoss(margin=0.1)(s, y, miner(s, y))


def _plain_contrastive(s, y):
    return pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(s, y)


def _plain_multi_similarity(s, y):
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    return pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(s, y, miner(s, y))


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("triplet", _plain_triplet),
        ("contrastive", _plain_contrastive),
        ("multi_similarity", _plain_multi_similarity),
    ],
)
def test_semantic_metric_is_the_plain_pml_loss(name, plain):
    model, x, y = _problem(4)
    s, u = _heads(model, x)
    got = _build(name, "semantic")(s, u, y)
    assert got.item() > 0
    torch.testing.assert_close(got, plain(s, y))


@pytest.mark.parametrize("name", LOSSES)
def test_proxy_parameters(name):
    loss_fn = _build(name, "semantic")
    proxies = loss_fn.proxy_parameters()
    assert len(proxies) == (1 if name in PROXY_LOSSES else 0)
    owned = {id(p) for p in loss_fn.parameters()}
    assert all(id(p) in owned for p in proxies)


@pytest.mark.parametrize("name", ["proxy_nca", "soft_triple", "normsoftmax", "arcface"])
def test_proxies_with_a_learned_uncertainty(name):
    loss_fn = _build(name, "introspective", learn_proxy_uncertainty=True)
    (weight,) = loss_fn.proxy_parameters()
    dim = 1 if name == "proxy_nca" else 0  # PML stores some weights as [embedding, classes]
    assert weight.size(dim) == E + U
    assert torch.all(weight.narrow(dim, E, U) == 0)  # start with no uncertainty
    model, x, y = _problem(5)
    _loss(loss_fn, model, x, y).backward()
    assert weight.grad.narrow(dim, E, U).abs().sum() > 0
    semantic_only = _build(name, "semantic", learn_proxy_uncertainty=True)
    assert semantic_only.proxy_parameters()[0].size(dim) == E


def test_built_loss_works_in_the_mixup_objective_and_under_autocast():
    model, x, y = _problem(6)
    loss_fn = _build("proxy_nca", "introspective")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, u = _heads(model, x)
        loss = mixup_loss(loss_fn, (s, u), (s.flip(0), u.flip(0)), y, perm, 0.3)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss_fn.proxy_parameters()[0].dtype == torch.float32  # PML cast nothing in place


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        _build("no_such_loss", "semantic")
    with pytest.raises(ValueError, match="unknown metric"):
        _build("triplet", "cosine")
    for name, entry in LOSSES.items():
        if entry.semantic_only is not None:
            with pytest.raises(ValueError, match=f"{name} cannot use the introspective metric"):
                _build(name, "introspective")
    with pytest.raises(TypeError):
        _build("triplet", "semantic", no_such_hyperparameter=1.0)
