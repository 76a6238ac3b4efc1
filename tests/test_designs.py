"""Uncertainty designs: the contract, each design's objective against an independent
computation, the first optimiser steps (beta stays in range, the semantic gradient lives),
and checkpoints / indexes made before designs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idml.core.config import RunConfig, as_dict, config_from_dict
from idml.data.splits import LabeledTensors, RetrievalSplits
from idml.method.designs import DESIGNS, LEGACY_DESIGN, DULLoss, LinearHead, MLPHead, get_design
from idml.method.losses import LOSSES
from idml.method.metric import uncertainty_score
from idml.method.model import create_model, model_for_design
from idml.training.factories import build_loss_for, make_optimizer
from idml.training.trainer import Trainer

C, PER_CLASS, E = 4, 6, 16
INTROSPECTIVE_LOSSES = [n for n, e in LOSSES.items() if e.semantic_only is None]


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = F.normalize(torch.randn(C * PER_CLASS, E, generator=g), dim=1).requires_grad_()
    u = (0.2 * torch.randn(C * PER_CLASS, E, generator=g)).abs().requires_grad_()
    return s, u, torch.arange(C).repeat_interleave(PER_CLASS)


@pytest.mark.parametrize("design", [d for d in DESIGNS if not DESIGNS[d].reference_numerics])
@pytest.mark.parametrize("loss", INTROSPECTIVE_LOSSES)
def test_every_design_trains_every_loss(design, loss):
    cfg = RunConfig(loss=loss, design=design, embedding_dim=E)
    torch.manual_seed(0)
    loss_fn = build_loss_for(cfg, C)
    s, u, y = _batch()
    value = loss_fn(s, u, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all() and torch.isfinite(u.grad).all()
    assert isinstance(loss_fn.proxy_parameters(), list)


def test_the_release_design_is_proxy_anchor_only():
    with pytest.raises(ValueError, match="release"):
        build_loss_for(RunConfig(loss="triplet", design="release"), C)


def test_unknown_design_names_the_choices():
    with pytest.raises(ValueError, match="unknown design 'magic'.*decoupled"):
        get_design("magic")


def test_decoupled_semantics_see_only_the_plain_loss():
    """The semantic gradient of the decoupled objective is that of the semantic loss alone,
    and u's gradient is that of the introspective loss on detached semantics."""
    torch.manual_seed(0)
    loss_fn = build_loss_for(RunConfig(design="decoupled", embedding_dim=E), C)
    s, u, y = _batch()
    loss_fn(s, u, y).backward()
    s2, u2, _ = _batch()
    loss_fn.semantic(s2, u2, y).backward()
    torch.testing.assert_close(s.grad, s2.grad)
    assert u2.grad is None or not u2.grad.any()
    s3, u3, _ = _batch()
    loss_fn.introspective(s3.detach(), u3, y).backward()
    torch.testing.assert_close(u.grad, u3.grad)


def test_dul_prior_is_the_gaussian_kl():
    """The cost of doubt against torch.distributions: KL(N(s, sigma^2) || N(0, 1/D)) minus
    its mean part (a constant for unit s)."""
    g = torch.Generator().manual_seed(1)
    sigma = 0.1 * torch.rand(5, E, generator=g) + 0.01
    s = F.normalize(torch.randn(5, E, generator=g), dim=1)
    tau = (1.0 / E) ** 0.5
    full = torch.distributions.kl_divergence(torch.distributions.Normal(s, sigma),
                                             torch.distributions.Normal(0.0, tau)).sum(1)
    mean_part = (s.pow(2) / (2 * tau**2)).sum(1)
    loss = DULLoss(lambda metric: nn.Identity())
    torch.testing.assert_close(loss.kl(sigma), (full - mean_part).mean())


def test_dul_samples_in_training_and_uses_the_mean_in_eval():
    torch.manual_seed(0)
    loss_fn = build_loss_for(RunConfig(design="dul", embedding_dim=E), C)
    s, u, y = _batch()
    a, b = loss_fn(s, u, y), loss_fn(s, u, y)
    assert a != b  # a new sample each call
    loss_fn.eval()
    assert loss_fn(s, u, y) == loss_fn.inner(s, u, y)


def _clusters(n: int, gen: torch.Generator, centres: torch.Tensor):
    """Pairs of points from two different clusters (of 4), as pooled features of classes."""
    y = torch.randint(0, 4, (n,), generator=gen)
    y2 = (y + torch.randint(1, 4, (n,), generator=gen)) % 4
    return (centres[y] + 0.1 * torch.rand(n, 32, generator=gen),
            centres[y2] + 0.1 * torch.rand(n, 32, generator=gen))


def _blend_auroc(head: nn.Module) -> float:
    """Train ``head`` to score 50/50 blends above clean points; the AUROC it reaches."""
    from idml.evaluation.uncertainty import mixup_ambiguity_auroc

    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(4, 32, generator=gen) * 2
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        a, b = _clusters(64, gen, centres)
        clean, mixed = uncertainty_score(head(a)), uncertainty_score(head(0.5 * a + 0.5 * b))
        opt.zero_grad()
        F.softplus(clean - mixed).mean().backward()
        opt.step()
    a, b = _clusters(256, gen, centres)
    with torch.no_grad():
        return mixup_ambiguity_auroc(uncertainty_score(head(a)),
                                     uncertainty_score(head(0.5 * a + 0.5 * b)))


def test_a_linear_head_cannot_score_a_blend_above_its_parts_and_an_mlp_can():
    """||u(lam f1 + (1-lam) f2)||^2 = lam ||u1||^2 + (1-lam) ||u2||^2 - lam(1-lam)||W(f1-f2)||^2
    for u = W f: never above both parts. Trained for it, the linear head stays at chance and
    the MLP head of the expressive designs separates blends from clean points."""
    torch.manual_seed(0)
    f1, f2 = torch.rand(64, 32), torch.rand(64, 32)
    lin = nn.Linear(32, 8, bias=False)
    lam = 0.3
    blend = uncertainty_score(lin(lam * f1 + (1 - lam) * f2))
    expected = (lam * uncertainty_score(lin(f1)) + (1 - lam) * uncertainty_score(lin(f2))
                - lam * (1 - lam) * uncertainty_score(lin(f1 - f2)))
    torch.testing.assert_close(blend, expected, rtol=1e-4, atol=1e-5)
    assert (blend <= torch.maximum(uncertainty_score(lin(f1)), uncertainty_score(lin(f2)))).all()
    torch.manual_seed(0)
    assert _blend_auroc(LinearHead(32, 8)) < 0.6
    head = MLPHead(32, 8)
    head.init_weights()
    assert _blend_auroc(head) > 0.85


def test_every_head_starts_small_and_nonzero():
    torch.manual_seed(0)
    f = torch.rand(256, 1280) * 2.0  # pooled GAP + GMP features: non-negative, sum ~1,300
    for name in DESIGNS:
        head = get_design(name).make_head(1280, 512)
        head.init_weights()
        beta = uncertainty_score(head(f))
        assert 0.005 < beta.mean().item() < 0.5, name


# --- the first optimiser steps -------------------------------------------------------------

FEATURES, CLASSES = 1280, 20


def _frozen_trainer(design: str, lr: float) -> Trainer:
    """Issue 10's frozen-feature recipe on synthetic pooled features with the statistics of
    EfficientNet-Lite0's (1,280 non-negative components, sum ~1,700): the two heads and the
    proxies train, mixup on, AdamW at ``lr``."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(CLASSES, FEATURES, generator=g) * 2.6
    y = torch.arange(CLASSES).repeat_interleave(12)
    f = (centres[y] + 0.8 * torch.rand(len(y), FEATURES, generator=g)).clamp_min(0)
    cfg = RunConfig(design=design, lr=lr, embedding_dim=64, batch_size=60, m_per_class=4,
                    warmup_epochs=0, channels_last=False, progress=False)
    torch.manual_seed(0)
    model = model_for_design(nn.Identity(), FEATURES, 64, design=design, freeze_bn=False)
    splits = RetrievalSplits(train=LabeledTensors((f / 2)[:, :, None, None], y), test=None,
                             num_train_classes=CLASSES, in_memory=False)
    return Trainer(dataclasses.replace(cfg, augment=False), model, build_loss_for(cfg, CLASSES),
                   splits, torch.device("cpu"))


def _trace(trainer: Trainer, steps: int) -> tuple[list[float], list[float]]:
    """Batch-mean ||u||^2 at each step's forward, and the semantic head's gradient norm."""
    betas, grads = [], []
    hook = trainer.model.uncertainty_head.register_forward_hook(
        lambda _m, _i, out: betas.append(uncertainty_score(out.detach()).mean().item()))
    loader = iter(trainer.loader)
    for _ in range(steps):
        try:
            images, labels = next(loader)
        except StopIteration:
            loader = iter(trainer.loader)
            images, labels = next(loader)
        trainer.train_step(images, labels)
        grads.append(trainer.model.semantic_head.weight.grad.norm().item())
    hook.remove()
    return betas, grads


#: Stated range of the batch-mean beta = ||u||^2 over the first steps (it starts ~0.05; the
#: semantic distance alpha lives in [0, 2], so beta far above ~10 saturates the metric).
BETA_RANGE = (1e-3, 5.0)
#: ``predictive`` never puts ||u||^2 in a metric: it is the odds of a failure, which the
#: binary cross entropy keeps near the batch's failure rate (odds 1/50 .. 50).
RANGES = {"predictive": (1e-3, 50.0), "guarded": (1e-3, 50.0)}
STABLE = ["stable", "expressive", "decoupled", "dul", "predictive", "guarded"]


@pytest.mark.parametrize("design", STABLE)
def test_beta_stays_in_range_and_the_semantic_gradient_lives(design):
    low, high = RANGES.get(design, BETA_RANGE)
    betas, grads = _trace(_frozen_trainer(design, lr=1e-3), steps=24)
    assert low < min(betas) and max(betas) < high, (design, betas)
    assert min(grads[-8:]) > 1e-2 * grads[0], (design, grads)


def test_the_paper_design_blows_up_at_the_frozen_recipes_learning_rate():
    """The mechanism the range test guards against (BENCHMARKS.md, first optimiser steps):
    Adam moves every weight of the linear head by ~lr, so u moves by ~lr * sum(f)."""
    betas, grads = _trace(_frozen_trainer("paper", lr=1e-3), steps=6)
    assert max(betas) > 100 * BETA_RANGE[1]
    assert grads[-1] < 1e-6 * grads[0]  # the metric saturated: no semantic gradient left


@pytest.mark.parametrize("design", STABLE)
def test_beta_stays_in_range_when_the_backbone_trains(design):
    """The digits recipe end to end (the backbone trains from the first step)."""
    from idml.training.factories import build

    cfg = RunConfig(design=design, warmup_epochs=0, progress=False, epochs=1)
    torch.manual_seed(0)
    model, splits = build(cfg, torch.device("cpu"), log=lambda _m: None)
    trainer = Trainer(cfg, model, build_loss_for(cfg, splits.num_train_classes), splits,
                      torch.device("cpu"))
    betas, grads = _trace(trainer, steps=20)
    low, high = RANGES.get(design, BETA_RANGE)
    assert low < min(betas) and max(betas) < high, (design, betas)
    assert min(grads[-5:]) > 1e-2 * grads[0], (design, grads)


def test_the_head_learning_rate_is_the_designs_unless_set():
    model = create_model("digits_cnn", embedding_dim=8, in_chans=1, design="stable")
    for mult, expected in ((None, 0.01), (0.5, 0.5)):
        cfg = RunConfig(design="stable", lr=1e-3, uncertainty_lr_mult=mult, embedding_dim=8)
        opt = make_optimizer(cfg, model, build_loss_for(cfg, 3), torch.device("cpu"))
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert {lr_of[id(p)] for p in model.uncertainty_head.parameters()} == {1e-3 * expected}


def test_decoupled_head_does_not_train_the_backbone():
    torch.manual_seed(0)
    model = create_model("digits_cnn", embedding_dim=8, in_chans=1, design="decoupled")
    _, u = model(torch.rand(4, 1, 8, 8))
    uncertainty_score(u).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.uncertainty_head.parameters())


# --- checkpoints and indexes from before designs -------------------------------------------

def test_configs_saved_before_designs_load_as_their_design():
    old = as_dict(RunConfig())
    del old["design"]
    assert config_from_dict(dict(old), "old").design == LEGACY_DESIGN == "paper"
    assert config_from_dict({**old, "mode": "reference"}, "old").design == "release"
    assert config_from_dict({**old, "mode": "default"}, "old").design == "paper"


def test_a_checkpoint_from_before_designs_loads_and_keeps_its_fingerprint(tmp_path):
    """Written as the previous release wrote it (a ``mode`` field, no ``design``): it loads
    as the paper design, bit for bit, with the fingerprint indexes made then recorded; the
    same weights under another design get another fingerprint (an old index is refused)."""
    import idml
    from idml.core.checkpoint import save_checkpoint, weights_fingerprint

    torch.manual_seed(0)
    model = create_model("digits_cnn", embedding_dim=8, in_chans=1, design=LEGACY_DESIGN)
    old = {k: v for k, v in as_dict(RunConfig(embedding_dim=8)).items() if k != "design"}
    save_checkpoint(tmp_path / "old.pt", {"config": {**old, "mode": "default"},
                                          "model": model.state_dict(), "loss": {}})
    loaded = idml.load(tmp_path / "old.pt", device="cpu")
    assert loaded.config.design == "paper"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    # the fingerprint before designs: the weights and the preprocessing key, nothing else
    spec = model.input_spec
    before = weights_fingerprint(model.state_dict(), "digits", tuple(spec["input_size"]),
                                 tuple(spec["mean"]), tuple(spec["std"]),
                                 spec.get("interpolation"), spec.get("crop_pct"))
    assert loaded.fingerprint == before
    save_checkpoint(tmp_path / "stable.pt", {"config": {**old, "design": "stable"},
                                             "model": model.state_dict(), "loss": {}})
    assert idml.load(tmp_path / "stable.pt", device="cpu").fingerprint != before


def test_predictive_target_is_the_batch_nearest_neighbour_failure():
    """Against a loop over the batch: image i fails when its most similar other image has
    another label; the doubt term is the binary cross entropy of odds ||u||^2."""
    from idml.method.designs import FailureOddsLoss

    s, u, y = _batch(3)
    expected = []
    for i in range(len(y)):
        sims = [(float(s[i].detach() @ s[j].detach()), j) for j in range(len(y)) if j != i]
        expected.append(float(y[max(sims)[1]] != y[i]))
    target = FailureOddsLoss.batch_failure(s, y)
    assert target.tolist() == expected
    loss = FailureOddsLoss(lambda metric: (lambda *_: torch.tensor(0.0)))
    odds = u.detach().pow(2).sum(1)
    p = odds / (1 + odds)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(loss(s, u, y), bce)


def test_guarded_blends_train_the_doubt_alone():
    """Under mixup the guarded objective gives the semantics exactly the plain loss's
    gradient on the clean images (blends reach only the failure odds), while ``predictive``
    also pulls the blends' semantics; computed against the plain loss by hand."""
    from idml.method.losses import mixup_loss

    s, u, y = _batch(4)
    s_mix = F.normalize(torch.randn_like(s), dim=1).requires_grad_()
    u_mix = (0.1 * torch.randn_like(u)).requires_grad_()
    perm = torch.randperm(len(y))
    cfg = RunConfig(design="guarded", metric="introspective", embedding_dim=s.shape[1])
    guarded = build_loss_for(cfg, int(y.max()) + 1)
    plain = guarded.semantic
    mixup_loss(guarded, (s, u), (s_mix, u_mix), y, perm, 0.3).backward()
    expected = torch.autograd.grad(plain(s, u, y), s)[0]
    torch.testing.assert_close(s.grad, expected)
    assert s_mix.grad is None or s_mix.grad.abs().max() == 0  # no semantic pull on blends
    assert u_mix.grad.abs().sum() > 0  # the blends train the doubt
    predictive = build_loss_for(dataclasses.replace(cfg, design="predictive"), int(y.max()) + 1)
    s_mix.grad = None
    mixup_loss(predictive, (s.detach(), u.detach()), (s_mix, u_mix), y, perm, 0.3).backward()
    assert s_mix.grad.abs().sum() > 0


# --- training labels with errors -----------------------------------------------------------

def test_symmetric_label_noise_moves_the_stated_fraction_to_other_classes():
    from idml.data.splits import symmetric_label_noise

    labels = torch.tensor([3, 5, 9] * 40)
    noisy = symmetric_label_noise(labels, 0.2, seed=1)
    moved = noisy != labels
    assert moved.sum().item() == 24  # round(0.2 * 120)
    assert set(noisy.tolist()) <= {3, 5, 9}  # only classes of the training split
    assert torch.equal(noisy, symmetric_label_noise(labels, 0.2, seed=1))
    assert not torch.equal(noisy, symmetric_label_noise(labels, 0.2, seed=2))
    with pytest.raises(ValueError, match="label_noise"):
        symmetric_label_noise(labels, 1.0, seed=0)


def test_mislabel_scores_against_a_direct_computation():
    from idml.evaluation.uncertainty import mislabel_auroc, mislabel_scores

    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    u = torch.randn(30, 4, generator=g)
    y = torch.arange(3).repeat(10)
    got = mislabel_scores(s, u, y, k=4)
    sims = s @ s.T
    for i in (0, 7, 29):
        others = sorted((j for j in range(30) if j != i), key=lambda j: -float(sims[i, j]))[:4]
        assert got["knn_disagreement"][i] == pytest.approx(
            sum(int(y[j] != y[i]) for j in others) / 4)
        centre = F.normalize(s[y == y[i]].mean(0), dim=0)
        assert got["centroid_distance"][i] == pytest.approx(1 - float(s[i] @ centre), abs=1e-6)
    assert got["uncertainty"] == pytest.approx(u.pow(2).sum(1).double().numpy(), rel=1e-6)
    flipped = torch.zeros(30, dtype=torch.bool)
    flipped[:5] = True
    perfect = {"x": flipped.double().numpy()}
    assert mislabel_auroc(perfect, flipped.numpy()) == {"x": 1.0}


def test_suspicious_lists_a_runs_training_images(tmp_path, capsys):
    """End to end on the digits with 20 % label noise: the command names the run's training
    items, most suspect first, with their (noisy) labels."""
    import json

    from idml.cli import main

    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--no-progress", "--label-noise", "0.2",
                 "--design", "predictive", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["suspicious", str(out / "checkpoint.pt"), "--top", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and rows[0]["path"] is None
    keys = [(r["knn_disagreement"], r["centroid_distance"]) for r in rows]  # the default order
    assert keys == sorted(keys, reverse=True)
    assert all(r["score"] == r["knn_disagreement"] for r in rows)
    assert main(["suspicious", str(out / "checkpoint.pt"), "--top", "3", "--json",
                 "--by", "uncertainty"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["score"] for r in rows] == sorted((r["uncertainty"] for r in rows), reverse=True)
    with pytest.raises(SystemExit) as exit_:  # argparse: --top must be at least 1
        main(["suspicious", str(out / "checkpoint.pt"), "--top", "0"])
    assert exit_.value.code == 2
