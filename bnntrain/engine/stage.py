"""One stage of the recipe: built from its config (engine/build.py), then trained epoch by
epoch, with its other concerns as hooks around each epoch (engine/hooks.py).

A stage is resumable on its own: `last.pt` holds everything the next step needs, written at
the end of each epoch and, with `trainer.checkpoint_every` or on a stop signal, in the
middle of one (its `position`: the batches of the epoch under way already trained).
"""
from __future__ import annotations

import functools
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ..data.samples import BadImageLog
from . import StageLogger, distributed, layout, load_checkpoint
from .build import build_stage
from .hooks import StageRun, steps_hooked
from .saving import resume_command, stage_hooks
from .seeding import epoch_seed, seed_everything
from .stopping import Stopped, StopSignals
from .trainer import check_finite
from ..errors import CheckpointError
from ..files import write_text

log = logging.getLogger("bnntrain")


def train_stage(cfg: DictConfig, stage_dir: Path, init: str | None = None, resume: Path | None = None,
                bad_images: BadImageLog | None = None, signals: StopSignals | None = None) -> dict:
    """Train one stage as `cfg` (a stage config from `config.plan`) says; return its entry for
    results.json. `signals`: the run's stop signals (pipeline.py); a stage alone hears its own
    while it trains.

    Args:
        cfg: a stage config, as `plan` makes it.
        stage_dir: the stage's folder: its config, checkpoints, cost report and logs.
        init: the checkpoint whose weights the stage starts from, or None.
        resume: this stage's `last.pt` to resume from, or None.
        bad_images: where unreadable images are recorded, or None.
        signals: the run's stop signals, or None.

    Returns:
        The stage's entry in results.json: `top1`, `top5`, `loss`, `best_top1`, `epochs`, the
            checkpoints' paths, `init_from` and `seconds`.

    Raises:
        Stopped: a stop signal came; the checkpoint to resume from was written.
        CheckpointError: `resume` is another stage's checkpoint or lacks what resuming needs.
        TrainingDiverged: the loss became NaN or infinite.
    """
    saved = _resumable(resume, cfg.stage.name) if resume is not None else None
    if saved is not None:
        init = saved["init_from"]
    try:
        parts = build_stage(cfg, init, saved, resume, bad_images)
    except Stopped as stop:  # while a data folder was listed or verified
        raise Stopped(f"{stop}; {resume_command(stage_dir.parent)}", stop.signum, stop.then) from None
    main = distributed.is_main()
    if main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_text(stage_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    logger = StageLogger(stage_dir, cfg.stage.name, cfg.schedule.epochs, enabled=main, progress=cfg.trainer.progress)
    started = time.time()
    with nullcontext(signals) if signals is not None else StopSignals() as signals:
        run = StageRun(cfg, parts, stage_dir, logger, signals, None if init is None else str(init), stage_hooks(cfg))
        start = _restore(run, saved, resume) if saved is not None else 0
        _call(run, "before_stage")
        for epoch in range(start, cfg.schedule.epochs):
            _train_epoch(run, epoch)
    _check_ranks(run)
    run.result = _result(run, time.time() - started)
    _call(run, "after_stage")
    return run.result


def _train_epoch(run: StageRun, epoch: int) -> None:
    """One epoch, or the rest of one that a resumed stage had begun: train, evaluate, and the
    hooks around them."""
    parts, cfg = run.parts, run.cfg
    run.epoch_started = time.time()
    _call(run, "before_epoch", epoch)
    seed_everything(epoch_seed(cfg.seed, cfg.stage.name, epoch))
    done, run.position = run.position, dict(layout.START)
    parts.loaders.set_epoch(epoch, done["batches"])
    # The lr the log shows: the first group's, but for Bop's own, whose "lr" is its gamma.
    run.lr = next((g["lr"] for g in parts.optimizer.param_groups if not g.get("bop")),
                  parts.optimizer.param_groups[0]["lr"])
    run.train = parts.trainer.train_epoch(run.logger.batches(parts.loaders.train, epoch), on_log=run.logger.train_loss,
                                          on_step=_on_step(run, epoch), done=done["batches"],
                                          loss_sum=done["loss_sum"])
    run.metrics = parts.trainer.evaluate(parts.loaders.test)
    _call(run, "after_evaluation", epoch)
    check_finite(run.metrics["loss"], f"{cfg.stage.name} epoch {epoch + 1}: the test loss")  # never save broken weights
    if not getattr(parts.scheduler, "per_step", False):  # a schedule by steps moved with each step
        parts.scheduler.step()
    _call(run, "after_epoch", epoch)


def _call(run: StageRun, point: str, *args: Any) -> None:
    for hook in run.hooks:
        getattr(hook, point)(run, *args)


def _on_step(run: StageRun, epoch: int) -> Callable[[int], None] | None:
    """What the trainer calls after each optimizer step: the one hook that steps, called
    directly (the per-step path stays one call), or each of several."""
    stepping = [functools.partial(hook.after_step, run, epoch) for hook in run.hooks if steps_hooked(hook)]
    if len(stepping) <= 1:
        return stepping[0] if stepping else None

    def each(step: int) -> None:
        for call in stepping:
            call(step)
    return each


def _restore(run: StageRun, saved: dict[str, Any], resume: Path) -> int:
    """The loop's and the hooks' state from `saved`; the epoch to go on from."""
    run.metrics, run.best_top1 = saved["metrics"], saved["best_top1"]
    run.position = layout.position(saved)
    for hook in run.hooks:
        hook.load_state_dict(layout.hook_state(saved, hook.name))
    start, batches = saved["epoch"], run.position["batches"]
    where = f" and {batches} batches of epoch {start + 1}" if batches else ""
    log.info(f"{run.name}: resuming from {resume} after epoch {start}{where}")
    return start


def _check_ranks(run: StageRun) -> None:
    for part in (run.parts.model, run.parts.objective):
        if not distributed.weights_agree(part):
            raise RuntimeError(f"{run.name}: the ranks ended with different weights")
    if distributed.world_size() > 1:
        log.info(f"{run.name}: weights identical on all {distributed.world_size()} ranks")


def _result(run: StageRun, seconds: float) -> dict[str, Any]:
    """The stage's entry in results.json."""
    metrics, name = run.metrics, run.name
    return {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "loss": metrics.get("loss"),
            "best_top1": run.best_top1, "epochs": run.epochs, "checkpoint": f"{name}/last.pt",
            "best_checkpoint": f"{name}/best.pt", "init_from": run.init_from, "seconds": round(seconds, 1)}


def _resumable(resume: Path, name: str) -> dict[str, Any]:
    saved = load_checkpoint(resume)
    if saved["stage"] != name:
        raise CheckpointError(f"{resume} is a {saved['stage']} checkpoint, not {name}")
    missing = [k for k in layout.RESUME_KEYS if k not in saved]
    if missing:
        raise CheckpointError(f"{resume} cannot be resumed: it lacks {', '.join(missing)}")
    return saved
