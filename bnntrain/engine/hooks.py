"""The concerns of a stage's epoch loop besides training and evaluating, one hook each.

The loop (`bnntrain.engine.stage`) calls every hook, in the order of `stage_hooks`, at each of
these points: `before_stage` (built, restored, not trained yet), `before_epoch`,
`after_step` (after each optimizer step: only hooks that define it are called there, and
the loop stays one call a step), `after_evaluation` (the epoch trained and evaluated;
a hook may replace `run.metrics`), `after_epoch` (after the lr schedule's step) and
`after_stage`. A hook that keeps state across a resume returns it from `state_dict`; the
checkpoint holds it under the hook's `name` (engine/layout.py) and `load_state_dict`
gets it back.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..complexity import count_costs, format_totals, precision
from ..errors import UserError
from ..nn import set_precision
from . import distributed, layout
from .build import StageParts
from .checkpoint import load_checkpoint, save_checkpoint
from .flips import FlipTracker
from .logger import StageLogger, flat_hparams
from .recalibrate import recalibrate_batchnorm
from .stopping import StepWatch, Stopped, StopSignals

log = logging.getLogger("bnntrain")


@dataclass
class StageRun:
    """What the hooks of one stage share: its config and objects, and how far it has come.

    Attributes:
        cfg: the stage config.
        parts: the stage's objects (`StageParts`).
        stage_dir: the stage's folder.
        logger: its `StageLogger`.
        signals: the run's stop signals.
        init_from: the checkpoint the stage started from, or None.
        hooks: the stage's hooks, in the order they are called.
        position: how far into the first epoch to train a resumed stage is (batches, loss sum).
        precision: the layers' mode in the epoch under way (`activations`, `weights`).
        metrics: the last evaluation's metrics (`top1`, `top5`, `loss`).
        best_top1: the best test top-1 so far (-1 before the first evaluation).
        lr: the learning rate of the epoch under way.
        train: what `Trainer.train_epoch` returned for the last epoch.
        epoch_started: when the epoch under way began (`time.time()`).
        result: the stage's entry for results.json, once it has trained.
    """
    cfg: DictConfig
    parts: StageParts
    stage_dir: Path
    logger: StageLogger
    signals: StopSignals
    init_from: str | None
    hooks: list["Hook"] = field(default_factory=list)  # in the order they are called
    position: dict[str, Any] = field(default_factory=lambda: dict(layout.START))  # into the first epoch to train
    precision: dict[str, str] = field(default_factory=dict)  # the layers' mode in the epoch under way
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation
    best_top1: float = -1.0
    lr: float = 0.0  # the epoch's learning rate (the schedule steps after each epoch)
    train: dict[str, Any] = field(default_factory=dict)  # train_epoch's result
    epoch_started: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)  # the stage's entry for results.json

    @property
    def name(self) -> str:
        """The stage's name (`stage.name`)."""
        return self.cfg.stage.name

    @property
    def epochs(self) -> int:
        """The stage's epochs (`schedule.epochs`)."""
        return self.cfg.schedule.epochs


class Hook:
    """One concern of the loop: a subclass overrides the points it acts at (see the top)."""
    name = ""  # where its state sits under the checkpoint's `hooks`

    def before_stage(self, run: StageRun) -> None:
        """Called once the stage is built (and, resumed, restored), before it trains.

        Args:
            run: the stage's shared state.
        """
        pass

    def before_epoch(self, run: StageRun, epoch: int) -> None:
        """Called at each epoch's start.

        Args:
            run: the stage's shared state.
            epoch: the epoch, counted from 0.
        """
        pass

    def after_step(self, run: StageRun, epoch: int, step: int) -> None:
        """Not defined here: the loop calls it only on hooks that define it.

        Args:
            run: the stage's shared state.
            epoch: the epoch, counted from 0.
            step: the optimizer steps taken in the stage so far.

        Raises:
            NotImplementedError: always, on the base class.
        """
        raise NotImplementedError

    def after_evaluation(self, run: StageRun, epoch: int) -> None:
        """Called once the epoch is trained and the test set evaluated; may replace `run.metrics`.

        Args:
            run: the stage's shared state.
            epoch: the epoch, counted from 0.
        """
        pass

    def after_epoch(self, run: StageRun, epoch: int) -> None:
        """Called at the epoch's end, after the learning-rate schedule's step.

        Args:
            run: the stage's shared state.
            epoch: the epoch, counted from 0.
        """
        pass

    def after_stage(self, run: StageRun) -> None:
        """Called after the last epoch, once `run.result` holds the stage's entry.

        Args:
            run: the stage's shared state.
        """
        pass

    def state_dict(self) -> dict[str, Any]:
        """What this hook keeps across a resume.

        Returns:
            Its state, saved under its `name`; {} (the default) saves nothing.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back, on a resume, what `state_dict` returned.

        Args:
            state: the saved state; {} where the hook saved none.
        """
        pass


def steps_hooked(hook: Hook) -> bool:
    """Whether `hook` acts after optimizer steps (defines `after_step`)."""
    return type(hook).after_step is not Hook.after_step


def activations_at(stage: DictConfig, epoch: int, epochs: int) -> str:
    """A stage may switch activation mode part-way: stage 0 trains with leaky-clip, then
    clamp (trick 16); `switch.at` is the fraction of the stage's epochs before the switch."""
    switch = stage.get("switch")
    if switch and epoch >= math.floor(switch.at * epochs):
        return switch.activations
    return stage.activations


class PrecisionSwitch(Hook):
    """The stage's precision, set at each epoch's start (stage 0's switch included)."""
    name = "precision"

    def before_epoch(self, run: StageRun, epoch: int) -> None:
        stage = run.cfg.stage
        run.precision = {"activations": activations_at(stage, epoch, run.epochs), "weights": stage.weights}
        set_precision(run.parts.model, **run.precision)


class QuantizerSchedule(Hook):
    """Quantizers whose behaviour changes over the stage (a `set_progress(fraction)` method)
    learn at each epoch's start how far the stage has come: epoch / epochs, 0 at its start."""
    name = "quantizer_schedule"

    def before_stage(self, run: StageRun) -> None:
        self.scheduled = [m for m in run.parts.model.modules() if callable(getattr(m, "set_progress", None))]

    def before_epoch(self, run: StageRun, epoch: int) -> None:
        for module in self.scheduled:
            module.set_progress(epoch / run.epochs)


class FlipRatio(Hook):
    """The fraction of binary weights whose sign flipped in each epoch (engine/flips.py)."""
    name = "flips"

    def before_stage(self, run: StageRun) -> None:
        self.tracker = FlipTracker(run.parts.model)  # the signs the stage starts (or resumes) from

    def after_evaluation(self, run: StageRun, epoch: int) -> None:
        run.logger.scalars(self.tracker.update(), epoch + 1)


class BatchNormReestimation(Hook):
    """`trainer.bn_recalibrate`: BN statistics for the weights as they are at the epoch's end,
    then the test set evaluated again (engine/recalibrate.py).

    Args:
        batches: the training batches the statistics are estimated from.
    """
    name = "bn_recalibrate"

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def after_evaluation(self, run: StageRun, epoch: int) -> None:
        parts, before = run.parts, run.metrics
        seconds = recalibrate_batchnorm(parts.model, parts.loaders.train.unmixed(), self.batches, parts.trainer.forward)
        run.metrics = parts.trainer.evaluate(parts.loaders.test)
        run.logger.recalibration(epoch, self.batches, before, run.metrics, seconds)


class EpochLog(Hook):
    """The cost report before the stage, a line (and TensorBoard scalars) per epoch, the
    hyperparameters with the final accuracy after it."""
    name = "log"

    def before_stage(self, run: StageRun) -> None:
        if run.logger.enabled:
            cfg = run.cfg
            with precision(run.parts.model, cfg.stage.activations, cfg.stage.weights):
                report = count_costs(run.parts.model, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
            report.save(run.stage_dir)
            run.logger.text("cost", report.table())
            log.info(f"{run.name}: " + format_totals(report)[-1])

    def after_epoch(self, run: StageRun, epoch: int) -> None:
        run.logger.epoch(epoch, run.lr, run.train, run.metrics, time.time() - run.epoch_started)

    def after_stage(self, run: StageRun) -> None:
        run.logger.close(flat_hparams(run.cfg), {k: run.result[k] for k in ("top1", "top5", "best_top1")})


class Checkpointer(Hook):
    """`last.pt` after each epoch (and `best.pt` where top-1 improved); `write` also serves the
    checkpoints written in the middle of an epoch. Rank 0 writes; every rank waits for it."""
    name = "checkpoint"

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}

    def before_stage(self, run: StageRun) -> None:
        self.config = OmegaConf.to_container(run.cfg, resolve=True)

    def after_epoch(self, run: StageRun, epoch: int) -> None:
        improved = run.metrics["top1"] > run.best_top1
        run.best_top1 = max(run.best_top1, run.metrics["top1"])
        self.write(run, epoch + 1, layout.START, best=improved)

    def write(self, run: StageRun, epochs: int, position: dict[str, Any], best: bool = False) -> None:
        """The checkpoint after `epochs` whole epochs and `position` of the next.

        Args:
            run: the stage's shared state.
            epochs: the epochs completed.
            position: how far into the next one: `{batches, loss_sum}`.
            best: also write `best.pt`.
        """
        if distributed.is_main():
            states = {hook.name: hook.state_dict() for hook in run.hooks}
            state = layout.stage_state(run.parts, self.config, run.init_from, epochs, position, run.precision,
                                       run.metrics, run.best_top1, {k: v for k, v in states.items() if v})
            _save(state, run.stage_dir, best)
        distributed.barrier()  # no rank runs ahead of the checkpoint it may resume from


class StopWatch(Hook):
    """Stop signals and `trainer.checkpoint_every` (engine/stopping.py): a checkpoint inside
    the epoch where one is due, and on a signal that checkpoint and a stop.

    Args:
        checkpointer: the stage's `Checkpointer`, which writes the checkpoints.
        every: `trainer.checkpoint_every`: `steps` and/or `minutes` between checkpoints.
    """
    name = "stop"

    def __init__(self, checkpointer: Checkpointer, every: dict[str, Any]) -> None:
        self.checkpointer, self.every = checkpointer, every

    def before_stage(self, run: StageRun) -> None:
        cfg = run.cfg.trainer
        self.watch = StepWatch(run.signals, self.every.get("steps"), self.every.get("minutes"), cfg.log_every,
                               run.parts.device)
        if self.watch.stop_requested():  # it came while the stage was loading
            raise self._stopped(run, f"the start of {run.name}", written=False)

    def after_step(self, run: StageRun, epoch: int, step: int) -> None:
        save, stop = self.watch(step)
        if save:
            self.checkpointer.write(run, epoch, run.parts.trainer.progress)
        if stop:
            raise self._stopped(run, f"{run.name} epoch {epoch + 1}, batch {run.parts.trainer.progress['batches']}")

    def after_epoch(self, run: StageRun, epoch: int) -> None:
        if run.signals.received is not None:  # it came during evaluation
            raise self._stopped(run, f"{run.name} after epoch {epoch + 1}")

    def _stopped(self, run: StageRun, where: str, written: bool = True) -> Stopped:
        saved = f"checkpoint written to {run.stage_dir / 'last.pt'}" if written else "nothing new to save"
        return Stopped(f"stopped by {self.watch.signal_name()} at {where}, {saved}; "
                       f"{resume_command(run.stage_dir.parent)}", run.signals.received or 15,
                       then=run.signals.requeue())


def stage_hooks(cfg: DictConfig) -> list[Hook]:
    """The hooks of stage `cfg`, in the order they are called.

    Args:
        cfg: a stage config.

    Returns:
        The precision switch and the quantizer schedule, the sign-flip ratio (binary weights),
            BN re-estimation (`trainer.bn_recalibrate`), the epoch log, the checkpointer and the
            stop watch.
    """
    hooks: list[Hook] = [PrecisionSwitch(), QuantizerSchedule()]
    if cfg.stage.weights == "binary":  # sign flips of binary weights
        hooks.append(FlipRatio())
    if cfg.trainer.bn_recalibrate:
        hooks.append(BatchNormReestimation(cfg.trainer.bn_recalibrate))
    checkpointer = Checkpointer()
    hooks += [EpochLog(), checkpointer, StopWatch(checkpointer, cfg.trainer.get("checkpoint_every") or {})]
    return hooks


def resume_command(run: Path) -> str:
    launcher = (f"torchrun --nproc-per-node={distributed.world_size()}" if distributed.world_size() > 1
                else "python")
    return f"resume with: {launcher} -m bnntrain resume={run}"


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
