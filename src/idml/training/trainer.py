"""The Trainer: the paper's recipe as four calls (``train_step``, ``run_epoch``, ``end_epoch``,
``finish``) over one set of parts (model, loss, optimizer, scheduler, scaler, loader, random
generators).

Proxy-Anchor (or any loss of :data:`idml.method.losses.LOSSES`) on the semantic or the
introspective metric, mixup, AdamW with proxies at ``proxy_lr_mult`` times the learning rate,
warm-up epochs that train only the new parameters (heads and proxies), StepLR, gradient
clipping by value, mixed precision. One code path for one process and for ``torchrun``
(:class:`~idml.training.distributed.Distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from idml.core.checkpoint import save_checkpoint
from idml.core.config import RunConfig, as_dict
from idml.core.io import write_json
from idml.core.rundir import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    LOG_FILE,
    METRICS_FILE,
    RESUME_FILE,
    quiet,
)
from idml.core.runtime import autocast
from idml.data.loader import make_train_loader
from idml.data.splits import RetrievalSplits, labels_of
from idml.data.transforms import random_affine
from idml.evaluation.evaluator import evaluate_model, format_metrics_table
from idml.evaluation.uncertainty import format_uncertainty_table
from idml.method.losses import mixup_batch, mixup_loss
from idml.method.model import IntrospectiveNet
from idml.training.distributed import Distributed
from idml.training.factories import make_optimizer
from idml.training.state import ResumeState, process_seeds, restore_rng, rng_state
from idml.training.tracking import Trackers, flat_scalars

#: The optimiser's parameter groups (``make_optimizer``), named for the trackers.
LR_GROUPS = ("backbone", "semantic_head", "uncertainty_head", "proxies", "loss")


def steps_done(history: list[dict[str, Any]]) -> int:
    """Optimiser steps taken in the epochs of ``history`` (the trackers' step numbers)."""
    return sum(len(h.get("step_loss", ())) for h in history)


class Trainer:
    """Trains ``model`` with ``loss_fn`` on ``splits.train`` by the recipe of ``cfg``.

    ``run_dir`` (process 0) receives ``last.pt`` after every epoch and the finished run's
    files from :meth:`finish`; without it nothing is written (e.g. for benchmarks that only
    call :meth:`train_step`).
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: IntrospectiveNet,
        loss_fn: torch.nn.Module,
        splits: RetrievalSplits,
        device: torch.device,
        *,
        ctx: Distributed | None = None,
        run_dir: Path | None = None,
        log: Callable[[str], None] = quiet,
        trackers: Trackers | None = None,
    ) -> None:
        self.cfg, self.model, self.loss_fn, self.splits = cfg, model, loss_fn, splits
        self.device, self.ctx = device, ctx or Distributed()
        self.run_dir, self.log = run_dir, log
        self.trackers = trackers if trackers is not None else Trackers([])
        self.backbone_params = model.backbone_parameters()
        self.optimizer = make_optimizer(cfg, model, loss_fn, device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step,
                                                         gamma=cfg.lr_gamma)
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        # The same mixup draws on every process (one lam per step); own augmentations.
        self.mixup_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.aug_gen = torch.Generator().manual_seed(process_seeds(cfg, self.ctx.rank)[1])
        self.loader = make_train_loader(
            splits.train, labels_of(splits.train).tolist(),
            min(cfg.batch_size, len(splits.train)), cfg.m_per_class, cfg.seed,
            cfg.num_workers, rank=self.ctx.rank, world_size=self.ctx.world_size,
        )
        self.epoch = 0  # completed epochs
        self.initial: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, dict[str, torch.Tensor]] | None = None

    @property
    def generators(self) -> list[torch.Generator]:
        """The run's own generators, in the order :class:`ResumeState` saves them."""
        return [self.mixup_gen, self.aug_gen]

    # --- one step ----------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One optimiser step on a batch (this process's shard of it).

        Returns the loss (detached, still on the device: no host sync) and the number of
        samples of the global batch it averaged over.
        """
        cfg, ctx = self.cfg, self.ctx
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if cfg.augment and self.splits.in_memory:  # image data sets augment per image
            images = random_affine(images, self.aug_gen)
        # Each process embeds its shard; the loss sees the gathered global batch.
        all_labels = ctx.gather_labels(labels)
        with autocast(self.device, cfg.precision):
            loss = self._loss(images, all_labels) if cfg.mixup else self.loss_fn(
                *(ctx.gather(t) for t in self.model(images)), all_labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        ctx.average_gradients(self.params)
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), len(all_labels)

    def _loss(self, images: torch.Tensor, all_labels: torch.Tensor) -> torch.Tensor:
        """The mixup objective of a batch. Partners are drawn within each process's shard
        (the same lam and permutation on every process)."""
        ctx = self.ctx
        mixed, perm, lam = mixup_batch(images, self.mixup_gen)
        # One forward for clean + mixed images: half the kernel launches. With frozen BN this
        # equals two forwards; with trainable BN (the digits CNN) the batch statistics cover
        # both halves.
        s, u = self.model(torch.cat([images, mixed]))
        n = len(images)
        return mixup_loss(
            self.loss_fn,
            (ctx.gather(s[:n]), ctx.gather(u[:n])),
            (ctx.gather(s[n:]), ctx.gather(u[n:])),
            all_labels,
            ctx.gather_indices(perm),
            lam,
        )

    # --- one epoch ---------------------------------------------------------------------------

    def run_epoch(self) -> dict[str, Any]:
        """Train epoch ``self.epoch + 1`` (warm-up epochs: heads and proxies only); returns
        its record (loss, images/s, warm-up flag, and per step: the loss, the learning rates,
        the step numbers, for the trackers)."""
        cfg, ctx = self.cfg, self.ctx
        warm = self.epoch < cfg.warmup_epochs
        for p in self.backbone_params:
            p.requires_grad_(not warm)
        self.model.train()
        lrs = {name: g["lr"] for name, g in zip(LR_GROUPS, self.optimizer.param_groups,
                                                strict=False)}
        first_step = 1 + steps_done(self.history)
        total, seen, start, losses, rates = 0.0, 0, time.perf_counter(), [], []
        last = start
        show = cfg.progress and ctx.is_main
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not show,
                   leave=False)
        for images, labels in bar:
            loss, count = self.train_step(images, labels)
            total += loss * count
            seen += count
            losses.append(loss)
            now = time.perf_counter()
            rates.append(count / max(now - last, 1e-9))
            last = now
            if show:
                bar.set_postfix(loss=f"{float(total) / seen:.4f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        self.scheduler.step()
        ctx.broadcast_buffers(self.model, self.loss_fn)  # trainable BN on CPU: process 0's
        self.epoch += 1
        return {"epoch": self.epoch, "loss": float(total) / max(seen, 1),
                "images_per_s": seen / (time.perf_counter() - start), "warmup": warm,
                "first_step": first_step, "lr": lrs, "time_ms": int(time.time() * 1000),
                "step_loss": torch.stack(losses).float().tolist() if losses else [],
                "step_images_per_s": rates}

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Validate (if there is a validation split), log, and write ``last.pt``.

        Called on every process (it gathers their random states); process 0 does the work.
        """
        rng = self.ctx.all_objects(rng_state(self.loader, self.generators))
        self.ctx.on_main(lambda: self._end_epoch_main(record, rng))

    def _end_epoch_main(self, record: dict[str, Any], rng: list[dict[str, Any]]) -> None:
        if self.splits.val is not None:
            val_metrics, _ = evaluate_model(self.model, self.splits, self.cfg, self.device,
                                            part="val")
            record["val"] = val_metrics
            if self.best is None or val_metrics["recall@1"] > self.best[0]:
                snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.best = (val_metrics["recall@1"], snapshot)
        self.history.append(record)
        extra = f" | val recall@1 {100 * record['val']['recall@1']:.2f}" if "val" in record \
            else ""
        self.log(f"epoch {record['epoch']}/{self.cfg.epochs} loss {record['loss']:.4f} "
                 f"{record['images_per_s']:.0f} img/s{' (warm-up)' if record['warmup'] else ''}"
                 f"{extra}")
        rng[0] = rng_state(self.loader, self.generators)  # after the evaluation, which draws
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / RESUME_FILE, self.state(rng).to_payload())
        self.trackers.log_epochs(self.history)  # after last.pt: see idml.training.tracking

    # --- resume --------------------------------------------------------------------------------

    def state(self, rng: list[dict[str, Any]]) -> ResumeState:
        """The resume state after the completed epochs (``rng``: every process's states)."""
        best = None if self.best is None else {"score": self.best[0], "state": self.best[1]}
        return ResumeState(
            config=as_dict(self.cfg), epoch=self.epoch, model=self.model.state_dict(),
            loss=self.loss_fn.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            rng=rng[0], initial=self.initial, history=self.history, best=best,
            world_size=self.ctx.world_size,
            rank_rng=rng if self.ctx.enabled else None,
        )

    def restore(self, state: ResumeState) -> None:
        """Continue from ``state``: weights, optimiser, scheduler, scaler, every random state."""
        self.model.load_state_dict(state.model)
        self.loss_fn.load_state_dict(state.loss)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        note = restore_rng(state, self.ctx.rank, self.ctx.world_size, self.cfg, self.loader,
                           self.generators)
        if note is not None:
            self.log(note)
        self.epoch, self.initial, self.history = state.epoch, state.initial, state.history
        if state.best is not None:
            self.best = (state.best["score"], state.best["state"])

    # --- the end -------------------------------------------------------------------------------

    def finish(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Final evaluation and the finished run folder; every process returns the metrics.

        The model of the best validation epoch is used where there is a validation split
        (chosen on held-out training classes, never on the test classes), else the last.
        """
        ctx = self.ctx
        if ctx.enabled:
            params = [*self.model.parameters(), *self.loss_fn.parameters()]
            diff = ctx.max_parameter_difference(params)
            self.log(f"parameters and proxies on the {ctx.world_size} processes: "
                     + ("identical" if diff == 0 else f"differ by up to {diff:.3g}"))
        return ctx.on_main(self._finish_main)

    def _finish_main(self) -> tuple[dict[str, float], dict[str, Any]]:
        if self.best is not None:
            self.model.load_state_dict(self.best[1])
        final, unc = evaluate_model(self.model, self.splits, self.cfg, self.device,
                                    ambiguity=True)
        if self.run_dir is not None:
            self._write_results(final, unc)
        self.log(format_metrics_table({"initial": self.initial, "final": final}))
        self.log(f"uncertainty ||u||^2 (design {unc['design']}) on test: mean {unc['mean']:.4g}; "
                 f"queries whose nearest neighbour is right {unc['correct_mean']:.4g}, "
                 f"wrong {unc['wrong_mean']:.4g}")
        self.log("queries ranked by confidence (risk = 1 - recall@1; lower AURC is better):\n"
                 + format_uncertainty_table(unc["risk_coverage"]))
        self.log(f"ambiguity check: AUROC of telling altered test images from clean ones by "
                 f"||u||^2 (0.5 = chance): 50/50 mixup {unc['mixup_auroc']:.3f}, CutMix (half "
                 f"the area from another image) {unc['cutmix_auroc']:.3f}")
        self._finish_trackers(final, unc)
        return final, unc

    def _finish_trackers(self, final: dict[str, float], unc: dict[str, Any]) -> None:
        """The test metrics and uncertainty numbers at the last step, the run's files."""
        files = [] if self.run_dir is None else [
            self.run_dir / name for name in (CONFIG_FILE, METRICS_FILE, HISTORY_FILE, LOG_FILE)]
        steps = steps_done(self.history)
        self.trackers.finish(
            {**flat_scalars(final, "test"), **flat_scalars(unc, "test/uncertainty")}, steps,
            files)

    def _write_results(self, final: dict[str, float], unc: dict[str, Any]) -> None:
        run_dir = self.run_dir
        assert run_dir is not None
        save_checkpoint(run_dir / CHECKPOINT_FILE, {
            "config": as_dict(self.cfg), "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(), "metrics": {"final": final},
        })
        write_json(run_dir / METRICS_FILE, {"initial": self.initial, "final": final,
                                             "uncertainty": unc})
        write_json(run_dir / HISTORY_FILE, self.history)
        (run_dir / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
