"""One stage of the recipe: build its objects from the config, train, evaluate, checkpoint.

A stage is resumable on its own: `last.pt` holds everything the next epoch needs.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .data import build_loaders
from .engine import StageLogger, Trainer, distributed, load_checkpoint, load_model_weights, save_checkpoint
from .engine.setup import prepare_model, resolve_device, trainer_options
from .engine.flips import FlipTracker
from .engine.recalibrate import recalibrate_batchnorm
from .engine.seeding import epoch_seed, seed_everything
from .engine.trainer import check_finite
from .distill import build_teacher
from .errors import CheckpointError
from .files import write_text
from .losses import build_objective
from .models import build_model
from .nn import set_precision
from .optim import build_optimizer, build_scheduler
from .complexity import count_costs, format_totals, precision

log = logging.getLogger("bnntrain")
# What `resume` reads from a stage's last.pt, beyond the keys every checkpoint has.
RESUME_KEYS = ("optimizer", "scheduler", "objective", "trainer", "metrics", "best_top1", "init_from")


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Dotted scalar entries of the config, for TensorBoard's hparams view."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif node is not None:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def train_stage(cfg: DictConfig, stage_dir: Path, init: str | None = None, resume: Path | None = None) -> dict:
    """Train one stage as `cfg` (a stage config from `config.plan`) says; return its entry for
    results.json."""
    stage = cfg.stage
    name, epochs = stage.name, cfg.schedule.epochs
    device = resolve_device(cfg.trainer.device)
    options = trainer_options(cfg.trainer, device)
    seed_everything(cfg.seed)

    saved = load_checkpoint(resume) if resume is not None else None
    if saved is not None:
        if saved["stage"] != name:
            raise CheckpointError(f"{resume} is a {saved['stage']} checkpoint, not {name}")
        missing = [k for k in RESUME_KEYS if k not in saved]
        if missing:
            raise CheckpointError(f"{resume} cannot be resumed: it lacks {', '.join(missing)}")
        init = saved["init_from"]

    loaders = build_loaders(cfg.data, cfg.augment, seed=cfg.seed, device=device)
    model = build_model(cfg.model, num_classes=loaders.num_classes, in_channels=loaders.channels)
    distill = cfg.get("distill")
    teacher = build_teacher(distill, init, loaders.num_classes) if distill and name in distill.stages else None
    objective = build_objective(cfg, model, loaders.num_classes, teacher)
    optimizer = build_optimizer(cfg.optimizer, model, extra=objective.parameters())
    scheduler = build_scheduler(cfg.schedule, optimizer)

    start_epoch, best_top1, metrics = 0, -1.0, {}
    if saved is not None:
        load_model_weights(model, saved["model"], resume)
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, best_top1, metrics = saved["epoch"], saved["best_top1"], saved["metrics"]
        log.info(f"{name}: resuming from {resume} after epoch {start_epoch}")
    elif init is not None:
        load_model_weights(model, load_checkpoint(init)["model"], init)
        log.info(f"{name}: weights initialised from {init}")
    net = prepare_model(model, device, cfg.trainer, options["channels_last"])  # DDP/compile around `model`
    objective.to(device)
    if teacher is not None:
        teacher.to(device)
    # The optimizer state loaded on the CPU follows the parameters to the device.
    optimizer.load_state_dict(optimizer.state_dict())

    main = distributed.is_main()
    if main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_text(stage_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    trainer = Trainer(net, objective, optimizer, device, **options)
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
    logger = StageLogger(stage_dir, name, epochs, enabled=main, progress=cfg.trainer.progress)
    if logger.enabled:
        _cost_report(model, cfg, stage_dir, logger)
    flips = FlipTracker(model) if stage.weights == "binary" else None  # sign changes per epoch
    config = OmegaConf.to_container(cfg, resolve=True)
    started = time.time()

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        mode = {"activations": _activations(stage, epoch, epochs), "weights": stage.weights}
        set_precision(model, **mode)
        seed_everything(epoch_seed(cfg.seed, name, epoch))
        loaders.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train = trainer.train_epoch(logger.batches(loaders.train, epoch), on_log=logger.train_loss)
        if flips is not None:
            logger.scalars(flips.update(), epoch + 1)
        metrics = trainer.evaluate(loaders.test)
        if cfg.trainer.bn_recalibrate:  # BN statistics for the weights as they are now
            before = metrics
            seconds = recalibrate_batchnorm(model, loaders.train.unmixed(), cfg.trainer.bn_recalibrate, device,
                                            trainer.memory_format, trainer.autocast)
            metrics = trainer.evaluate(loaders.test)
            logger.recalibration(epoch, cfg.trainer.bn_recalibrate, before, metrics, seconds)
        check_finite(metrics["loss"], f"{name} epoch {epoch + 1}: the test loss")  # never save broken weights
        scheduler.step()
        logger.epoch(epoch, lr, train, metrics, time.time() - t0)
        improved = metrics["top1"] > best_top1
        best_top1 = max(best_top1, metrics["top1"])
        state = {"model": model.state_dict(), "num_classes": loaders.num_classes, "in_channels": loaders.channels,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "objective": objective.state_dict(), "trainer": trainer.state_dict(), "precision": mode,
                 "epoch": epoch + 1, "stage": name,
                 "metrics": metrics, "best_top1": best_top1, "config": config,
                 "init_from": None if init is None else str(init)}
        if main:
            if improved:
                save_checkpoint(state, stage_dir / "best.pt")
            save_checkpoint(state, stage_dir / "last.pt")
        distributed.barrier()  # no rank runs ahead of the checkpoint it may resume from

    if not distributed.weights_agree(model) or not distributed.weights_agree(objective):
        raise RuntimeError(f"{name}: the ranks ended with different weights")
    if distributed.world_size() > 1:
        log.info(f"{name}: weights identical on all {distributed.world_size()} ranks")
    result = {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "loss": metrics.get("loss"),
              "best_top1": best_top1, "epochs": epochs, "checkpoint": f"{name}/last.pt",
              "best_checkpoint": f"{name}/best.pt", "init_from": None if init is None else str(init),
              "seconds": round(time.time() - started, 1)}
    logger.close(flat_hparams(cfg), {k: result[k] for k in ("top1", "top5", "best_top1")})
    return result


def _cost_report(model: nn.Module, cfg: DictConfig, stage_dir: Path, logger: StageLogger) -> None:
    """The stage's cost report at its precision: cost.txt, cost.json and TensorBoard text."""
    with precision(model, cfg.stage.activations, cfg.stage.weights):
        report = count_costs(model, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    report.save(stage_dir)
    logger.text("cost", report.table())
    log.info(f"{cfg.stage.name}: " + format_totals(report)[-1])


def _activations(stage: DictConfig, epoch: int, epochs: int) -> str:
    """A stage may switch activation mode part-way: stage 0 trains with leaky-clip, then
    clamp (trick 16); `switch.at` is the fraction of the stage's epochs before the switch."""
    switch = stage.get("switch")
    if switch and epoch >= math.floor(switch.at * epochs):
        return switch.activations
    return stage.activations
