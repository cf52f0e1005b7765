"""The concerns of a stage's epoch loop besides training and evaluating, one hook each.

The loop (`bnntrain.engine.stage`) calls every hook, in the order of `stage_hooks`
(engine/saving.py, beside the hooks that write checkpoints), at each of
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

from omegaconf import DictConfig

from ..complexity import count_costs, format_totals, precision
from ..nn import binary_layers, set_precision
from . import layout
from .build import StageParts
from .flips import FlipTracker
from .logger import StageLogger, flat_hparams
from .recalibrate import recalibrate_batchnorm
from .stopping import StopSignals

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
    learn at each epoch's start how far the stage has come: epoch / epochs, 0 at its start
    (one with `set_progress_span(start, end)` gets where the epoch ends too, (epoch + 1) /
    epochs).
    Modules with a `set_epoch(epoch)` method (a schedule by epoch, not by fraction: BNext's
    temperature) learn the epoch itself, counted from 0."""
    name = "quantizer_schedule"

    def before_stage(self, run: StageRun) -> None:
        modules = list(run.parts.model.modules())
        self.scheduled = [m for m in modules if callable(getattr(m, "set_progress", None))]
        if callable(getattr(run.parts.optimizer, "set_progress", None)):  # Bop's gamma
            self.scheduled.append(run.parts.optimizer)
        self.by_epoch = [m for m in modules if callable(getattr(m, "set_epoch", None))]

    def before_epoch(self, run: StageRun, epoch: int) -> None:
        for module in self.scheduled:
            span = getattr(module, "set_progress_span", None)
            if callable(span):  # a schedule that also reads where the epoch ends (FDA's noise weight)
                span(epoch / run.epochs, (epoch + 1) / run.epochs)
            else:
                module.set_progress(epoch / run.epochs)
        for module in self.by_epoch:
            module.set_epoch(epoch)


class TeacherSchedule(Hook):
    """The objective's assistant teacher of each epoch (`distill.assistants`), picked at the
    epoch's start from the epoch alone (so a resumed stage picks it too)."""
    name = "teacher_schedule"

    def before_epoch(self, run: StageRun, epoch: int) -> None:
        run.parts.objective.set_epoch(epoch, run.epochs)


class WeightProjection(Hook):
    """Weight quantizers that keep the latent weights in a set (`projects_weights`: XNOR-Net
    mean-centres and clamps them) project them before every training forward, as their
    authors' code does: once as a fresh stage starts, then after each optimizer step. A
    resumed stage's weights were projected after its last step already (projecting is not
    idempotent, so it is not done again)."""
    name = "weight_projection"

    def __init__(self) -> None:
        self.resumed = False

    def state_dict(self) -> dict[str, Any]:
        return {"projected": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed = bool(state)

    def before_stage(self, run: StageRun) -> None:
        self.layers = [layer for _, layer in binary_layers(run.parts.model)
                       if layer.weight_quantizer.projects_weights]
        if not self.resumed:
            self.project()

    def after_step(self, run: StageRun, epoch: int, step: int) -> None:
        self.project()

    def project(self) -> None:
        for layer in self.layers:
            if layer.weights == "binary":
                layer.weight_quantizer.project_(layer.weight)


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
            log.info(f"{run.name}: " + format_totals(report)[-2])  # BOPs, FLOPs, OPs

    def after_epoch(self, run: StageRun, epoch: int) -> None:
        run.logger.epoch(epoch, run.lr, run.train, run.metrics, time.time() - run.epoch_started)

    def after_stage(self, run: StageRun) -> None:
        run.logger.close(flat_hparams(run.cfg), {k: run.result[k] for k in ("top1", "top5", "best_top1")})
