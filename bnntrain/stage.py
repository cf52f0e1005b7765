"""One stage of the recipe: build its objects from the config, train, evaluate, checkpoint.

A stage is resumable on its own: `last.pt` holds everything the next step needs, written at
the end of each epoch and, with `trainer.checkpoint_every` or on a stop signal, in the
middle of one (its `position`: the batches of the epoch under way already trained).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .complexity import count_costs, format_totals, precision
from .data import build_loaders
from .data.samples import BadImageLog
from .distill import build_teacher
from .engine import StageLogger, Trainer, distributed, load_checkpoint, load_model_weights, save_checkpoint
from .engine.flips import FlipTracker
from .engine.logger import flat_hparams
from .engine.recalibrate import recalibrate_batchnorm
from .engine.seeding import epoch_seed, seed_everything
from .engine.setup import configure_malloc, prepare_model, resolve_device, trainer_options
from .engine.stopping import StepWatch, Stopped, StopSignals
from .engine.trainer import check_finite
from .errors import CheckpointError, UserError
from .files import write_text
from .losses import build_objective
from .models import build_model
from .nn import set_precision
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("bnntrain")
# What `resume` reads from a stage's last.pt, beyond the keys every checkpoint has.
RESUME_KEYS = ("optimizer", "scheduler", "objective", "trainer", "metrics", "best_top1", "init_from")
START = {"batches": 0, "loss_sum": 0.0}  # the position of an epoch not yet begun


def train_stage(cfg: DictConfig, stage_dir: Path, init: str | None = None, resume: Path | None = None,
                bad_images: BadImageLog | None = None, signals: StopSignals | None = None) -> dict:
    """Train one stage as `cfg` (a stage config from `config.plan`) says; return its entry for
    results.json. `signals`: the run's stop signals (pipeline.py); a stage alone hears its own
    while it trains."""
    stage = cfg.stage
    name, epochs = stage.name, cfg.schedule.epochs
    device = resolve_device(cfg.trainer.device)
    options = trainer_options(cfg.trainer, device)
    if configure_malloc(cfg.trainer.malloc, device):
        log.debug(f"{name}: glibc keeps freed memory for the next step (trainer.malloc)")
    seed_everything(cfg.seed)
    saved = _resumable(resume, name) if resume is not None else None
    if saved is not None:
        init = saved["init_from"]

    try:
        loaders = build_loaders(cfg.data, cfg.augment, seed=cfg.seed, device=device, bad_images=bad_images)
    except Stopped as stop:  # while a data folder was listed or verified
        raise Stopped(f"{stop}; {_resume_command(stage_dir.parent)}", stop.signum, stop.then) from None
    model = build_model(cfg.model, num_classes=loaders.num_classes, in_channels=loaders.channels)
    distill = cfg.get("distill")
    teacher = build_teacher(distill, init, loaders.num_classes) if distill and name in distill.stages else None
    objective = build_objective(cfg, model, loaders.num_classes, teacher)
    optimizer = build_optimizer(cfg.optimizer, model, extra=objective.parameters())

    start_epoch, position, best_top1, metrics = 0, dict(START), -1.0, {}
    if saved is not None:
        load_model_weights(model, saved["model"], resume)
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, best_top1, metrics = saved["epoch"], saved["best_top1"], saved["metrics"]
        position = saved.get("position") or dict(START)
        where = f" and {position['batches']} batches of epoch {start_epoch + 1}" if position["batches"] else ""
        log.info(f"{name}: resuming from {resume} after epoch {start_epoch}{where}")
    elif init is not None:
        load_model_weights(model, _finite(load_checkpoint(init)["model"], init), init)
        log.info(f"{name}: weights initialised from {init}")
    scheduler = _scheduler(cfg.schedule, optimizer, start_epoch)
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
    fixed = {"num_classes": loaders.num_classes, "in_channels": loaders.channels, "stage": name,
             "config": OmegaConf.to_container(cfg, resolve=True), "init_from": None if init is None else str(init)}

    def checkpoint(epoch: int, mode: dict, at: dict, best: bool = False) -> None:
        """last.pt (and best.pt) after `epoch` whole epochs and `at` of the next; rank 0 writes."""
        if main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "objective": objective.state_dict(),
                     "trainer": trainer.state_dict(), "precision": mode, "epoch": epoch,
                     "position": {"batches": at["batches"], "loss_sum": float(at["loss_sum"])},
                     "metrics": metrics, "best_top1": best_top1, **fixed}
            _save(state, stage_dir, best)
        distributed.barrier()  # no rank runs ahead of the checkpoint it may resume from

    every = cfg.trainer.get("checkpoint_every") or {}
    started = time.time()
    with nullcontext(signals) if signals is not None else StopSignals() as signals:
        watch = StepWatch(signals, every.get("steps"), every.get("minutes"), cfg.trainer.log_every, device)
        if watch.stop_requested():  # it came while the stage was loading
            raise _stopped(watch, stage_dir, f"the start of {name}", written=False)
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            mode = {"activations": _activations(stage, epoch, epochs), "weights": stage.weights}
            set_precision(model, **mode)
            seed_everything(epoch_seed(cfg.seed, name, epoch))
            done = position if epoch == start_epoch else START
            loaders.set_epoch(epoch, done["batches"])
            lr = optimizer.param_groups[0]["lr"]

            def on_step(step: int, epoch: int = epoch, mode: dict = mode) -> bool:
                save, stop = watch(step)
                if save:
                    checkpoint(epoch, mode, trainer.progress)
                return stop

            train = trainer.train_epoch(logger.batches(loaders.train, epoch), on_log=logger.train_loss,
                                        on_step=on_step, done=done["batches"], loss_sum=done["loss_sum"])
            if train["stopped"]:
                raise _stopped(watch, stage_dir, f"{name} epoch {epoch + 1}, batch {trainer.progress['batches']}")
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
            checkpoint(epoch + 1, mode, START, best=improved)
            if signals.received is not None:  # it came during evaluation
                raise _stopped(watch, stage_dir, f"{name} after epoch {epoch + 1}")

    if not distributed.weights_agree(model) or not distributed.weights_agree(objective):
        raise RuntimeError(f"{name}: the ranks ended with different weights")
    if distributed.world_size() > 1:
        log.info(f"{name}: weights identical on all {distributed.world_size()} ranks")
    result = {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "loss": metrics.get("loss"),
              "best_top1": best_top1, "epochs": epochs, "checkpoint": f"{name}/last.pt",
              "best_checkpoint": f"{name}/best.pt", "init_from": fixed["init_from"],
              "seconds": round(time.time() - started, 1)}
    logger.close(flat_hparams(cfg), {k: result[k] for k in ("top1", "top5", "best_top1")})
    return result


def _resumable(resume: Path, name: str) -> dict[str, Any]:
    saved = load_checkpoint(resume)
    if saved["stage"] != name:
        raise CheckpointError(f"{resume} is a {saved['stage']} checkpoint, not {name}")
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise CheckpointError(f"{resume} cannot be resumed: it lacks {', '.join(missing)}")
    return saved


def _finite(weights: dict[str, Any], init: str) -> dict[str, Any]:
    """A start from NaN or infinite weights would only be found as a NaN loss, blamed on the lr."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"init={init} holds NaN or infinite weights ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): training cannot start from it")
    return weights


def _scheduler(cfg: DictConfig, optimizer: Any, epochs_done: int) -> Any:
    """The schedule of this config, moved on by the epochs already trained: the lr is the one
    an uninterrupted run has there (also where a resumed run now has more epochs)."""
    for group in optimizer.param_groups:  # as a new run starts: at the base lr
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = build_scheduler(cfg, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": this is a replay
        for _ in range(epochs_done):
            scheduler.step()
    return scheduler


def _save(state: dict, stage_dir: Path, best: bool) -> None:
    """last.pt (and best.pt); a failed write names the checkpoint that is still good."""
    last = stage_dir / "last.pt"
    try:
        if best:
            save_checkpoint(state, stage_dir / "best.pt")
        save_checkpoint(state, last)
    except UserError as err:
        raise UserError(f"{err}; the last good checkpoint: {_last_good(last)}") from None


def _last_good(last: Path) -> str:
    if not last.exists():
        return "none yet"
    try:
        return f"{last} (epoch {load_checkpoint(last)['epoch']})"
    except UserError:
        return f"none ({last} cannot be read)"


def _stopped(watch: StepWatch, stage_dir: Path, where: str, written: bool = True) -> Stopped:
    saved = f"checkpoint written to {stage_dir / 'last.pt'}" if written else "nothing new to save"
    return Stopped(f"stopped by {watch.signal_name()} at {where}, {saved}; {_resume_command(stage_dir.parent)}",
                   watch.signals.received or 15, then=watch.signals.requeue())


def _resume_command(run: Path) -> str:
    launcher = (f"torchrun --nproc-per-node={distributed.world_size()}" if distributed.world_size() > 1
                else "python")
    return f"resume with: {launcher} -m bnntrain resume={run}"


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
