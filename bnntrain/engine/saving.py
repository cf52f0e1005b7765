"""The hooks that write: `last.pt` (and `best.pt`) after each epoch, checkpoints inside epochs
where `trainer.checkpoint_every` asks, and the checkpoint and clean stop on a stop signal;
and `stage_hooks`, a stage's hooks in the order the loop calls them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from . import distributed, layout
from .checkpoint import load_checkpoint, save_checkpoint
from ..nn.quantizers import WEIGHT_QUANTIZERS
from .hooks import (BatchNormReestimation, EpochLog, FlipRatio, Hook, PrecisionSwitch, QuantizerSchedule, StageRun,
                    TeacherSchedule, WeightProjection)
from .stopping import StepWatch, Stopped


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
        The precision switch and the quantizer schedule, the assistant teachers' schedule
            (`distill.assistants`), the sign-flip ratio (binary weights),
            BN re-estimation (`trainer.bn_recalibrate`), the epoch log, the checkpointer and the
            stop watch.
    """
    hooks: list[Hook] = [PrecisionSwitch(), QuantizerSchedule()]
    distill = cfg.get("distill")
    if distill and cfg.stage.name in distill.stages and distill.get("assistants"):
        hooks.append(TeacherSchedule())
    quantizer = cfg.model.get("weight_quantizer") or {}
    if quantizer.get("name") and WEIGHT_QUANTIZERS.get(quantizer["name"]).projects_weights:
        hooks.append(WeightProjection())
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
