"""Training, the run folder, `idml train` / `idml eval` end to end on the embedded digits."""

import json

import pytest
import torch
import yaml

from idml.cli import main
from idml.core.checkpoint import load_checkpoint
from idml.core.config import RunConfig, resolve_config
from idml.core.runtime import seed_everything
from idml.training.factories import build
from idml.training.run import train

METRIC_KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "r_precision", "map@r"}


def _cfg(tmp_path, name, **kw):
    base = {"epochs": 2, "progress": False, "out": str(tmp_path / name), "device": "cpu"}
    return RunConfig(**{**base, **kw})


def test_same_seed_gives_identical_metrics(tmp_path):
    a = train(_cfg(tmp_path, "a", seed=3))
    b = train(_cfg(tmp_path, "b", seed=3))
    assert a.final == b.final and a.initial == b.initial


def test_cli_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(out)]) == 0  # the full default run
    for name in ("config.yaml", "train.log", "checkpoint.pt", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["initial"]) == METRIC_KEYS and set(metrics["final"]) == METRIC_KEYS
    assert metrics["final"]["recall@1"] > metrics["initial"]["recall@1"]
    assert 0.0 <= metrics["uncertainty"]["mixup_auroc"] <= 1.0
    assert set(metrics["uncertainty"]["risk_coverage"]) == {"uncertainty", "semantic_gap",
                                                           "feature_norm", "random"}
    assert 0.0 <= metrics["uncertainty"]["cutmix_auroc"] <= 1.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 8 and saved["metric"] == "introspective"

    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["final"]


def test_warmup_trains_only_new_parameters(tmp_path):
    cfg = _cfg(tmp_path, "w", epochs=1, warmup_epochs=1)
    result = train(cfg)
    trained = load_checkpoint(result.run_dir / "checkpoint.pt")["model"]
    seed_everything(cfg.seed)
    initial, _ = build(cfg, torch.device("cpu"))
    for name, p in initial.named_parameters():
        same = torch.equal(p.detach(), trained[name])
        # backbone frozen during warm-up; both heads (uncertainty included, defect 5c) learn
        assert same == name.startswith("backbone."), name


def test_validation_split_is_carved_from_training_classes(tmp_path):
    result = train(_cfg(tmp_path, "v", val_fraction=0.4))
    history = json.loads((result.run_dir / "history.json").read_text())
    assert all("val" in h for h in history)


def test_non_empty_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_bad_config_errors_name_the_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "learning_rate" in err
    bad.write_text("epochs: many\n")
    with pytest.raises(ValueError, match="epochs must be int"):
        resolve_config(config_file=bad)
    with pytest.raises(ValueError, match="metric"):
        resolve_config(overrides={"metric": "cosine"})


def test_eval_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["eval", str(junk)]) == 2
    assert str(junk) in capsys.readouterr().err


def test_bf16_training_is_finite_and_learns(tmp_path):
    result = train(_cfg(tmp_path, "bf16", precision="bf16", epochs=2))
    history = json.loads((result.run_dir / "history.json").read_text())
    assert all(h["loss"] == h["loss"] for h in history)  # no NaN
    assert history[-1]["loss"] < history[0]["loss"]
    assert result.final["recall@1"] > 0.9


def test_digits_rotation_classes_extend_training_only():
    from idml.data.digits import load_digits_splits

    plain = load_digits_splits((0.0,), (1.0,), rotation_classes=False)
    rotated = load_digits_splits((0.0,), (1.0,))
    assert plain.num_train_classes == 5 and rotated.num_train_classes == 20
    assert len(rotated.train) == 4 * len(plain.train)
    torch.testing.assert_close(rotated.test.images, plain.test.images)
    # class c + 5k holds the images of class c rotated k quarter turns
    first = plain.train.images[plain.train.labels == 3][0]
    turned = rotated.train.images[rotated.train.labels == 3 + 5 * 2][0]
    torch.testing.assert_close(turned, torch.rot90(first, 2, dims=(1, 2)))


def test_bad_flags_give_clear_errors(tmp_path, capsys):
    for argv, needle in [
        (["--device", "gpu"], "--device 'gpu' is not a device"),
        (["--ism-b", "-1"], "ism_b must be >= 0"),
        (["--backbone", "no_such_net"], "no_such_net"),
        (["--dataset", "folder", "--data-root", str(tmp_path / "absent")], "does not exist"),
    ]:
        out = tmp_path / "run"
        assert main(["train", "--no-progress", "--out", str(out), *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
        assert not out.exists() or not any(out.iterdir()), argv  # no half-made run folder


def test_yaml_reads_exponent_floats(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 1e-3\nweight_decay: 5e-5\n")  # YAML 1.1 parses these as strings
    cfg = resolve_config(config_file=cfg_file)
    assert cfg.lr == 1e-3 and cfg.weight_decay == 5e-5


def test_evaluating_a_missing_validation_split_is_an_error():
    from idml.evaluation.evaluator import evaluate_model

    cfg = RunConfig(device="cpu")
    model, splits = build(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="no validation split"):
        evaluate_model(model, splits, cfg, torch.device("cpu"), part="val")


def test_ambiguity_probe_scores_blends_and_cutmix_within_each_batch():
    from idml.evaluation.evaluator import ambiguity_probe

    cfg = RunConfig(device="cpu", eval_batch_size=64)
    model, splits = build(cfg, torch.device("cpu"))
    got = ambiguity_probe(model, splits.test, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(cfg.seed)
    x = splits.test.images[:64]
    partner = torch.randperm(64, generator=gen)
    # the CutMix box: half the area (6 x 6 of 8 x 8 rounds 8 / sqrt 2), position from gen
    top, left = (int(torch.randint(0, 3, (), generator=gen)) for _ in range(2))
    pasted = x.clone()
    pasted[..., top:top + 6, left:left + 6] = x[partner][..., top:top + 6, left:left + 6]
    model.eval()
    with torch.no_grad():
        _, u_mix = model(0.5 * x + 0.5 * x[partner])
        _, u_cut = model(pasted)
        _, u = model(x)
        f = model.forward_features(x)
    assert got["mixup"].shape == (len(splits.test),)
    torch.testing.assert_close(got["mixup"][:64], u_mix.pow(2).sum(1))
    torch.testing.assert_close(got["cutmix"][:64], u_cut.pow(2).sum(1))
    torch.testing.assert_close(got["clean"][:64], u.pow(2).sum(1))
    torch.testing.assert_close(got["feature_norm"][:64], f.norm(dim=1))


def test_proxy_anchor_flags_are_refused_for_other_losses(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--loss", "triplet", "--margin", "0.3", "--out", str(out)]) == 2
    assert "margin/scale are Proxy-Anchor's" in capsys.readouterr().err
    assert not out.exists()


def test_uncertainty_head_gets_its_own_learning_rate():
    from idml.method.losses import build_loss
    from idml.method.model import create_model
    from idml.training.factories import make_optimizer

    cfg = RunConfig(lr=1e-3, uncertainty_lr_mult=0.01, proxy_lr_mult=100.0)
    model = create_model("digits_cnn", embedding_dim=8, in_chans=1)
    loss_fn = build_loss("proxy_anchor", num_classes=3, embedding_dim=8, uncertainty_dim=8)
    optimizer = make_optimizer(cfg, model, loss_fn, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in model.uncertainty_head.parameters()} == {1e-3 * 0.01}
    assert {lr_of[id(p)] for p in model.semantic_head.parameters()} == {1e-3}
    assert {lr_of[id(p)] for p in loss_fn.proxy_parameters()} == {1e-3 * 100.0}
    assert len(lr_of) == len([*model.parameters(), *loss_fn.parameters()])
