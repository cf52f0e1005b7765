"""Learning-rate schedules that move after every optimizer step, as Keras's do, rather than
after every epoch.

A `PerStepLR` is stepped by the trainer after each optimizer step (`Trainer.step_schedule`),
not by the stage loop after each epoch (its `per_step` says so); a resumed stage moves it to
the trainer's step count (engine/build.py). The lr of step k (counted from 0 in the stage) is
each group's own lr x factor(k), so that every group of a two-optimizer setup
(`optimizer=case`) follows the same shape to its own peak.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch.optim import Optimizer, lr_scheduler


class PerStepLR(lr_scheduler.LRScheduler):
    """Each group's lr x `factor(step)`, `step` the optimizer steps taken in the stage.

    Args:
        optimizer: the optimizer whose lr it sets.
        factor: the fraction of each group's lr at each step.
    """

    per_step = True  # the stage loop leaves it alone after epochs; the trainer steps it

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        self.factor = factor
        super().__init__(optimizer)

    def lrs_at(self, step: int) -> list[float]:
        """The groups' lrs at optimizer step `step`.

        Args:
            step: the optimizer steps taken before it in the stage (0 for the first).

        Returns:
            One lr per parameter group.
        """
        return [base * self.factor(step) for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self.lrs_at(self.last_epoch)

    def advance_to(self, steps: int) -> None:
        """Where an uninterrupted run is after `steps` optimizer steps (a resumed stage).

        Args:
            steps: the optimizer steps already taken in the stage.
        """
        self.last_epoch = steps
        self._last_lr = self.lrs_at(steps)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """The step count and base lrs, without the factor (a function: checkpoints hold data).

        Returns:
            The scheduler's state.
        """
        return {key: value for key, value in super().state_dict().items() if key != "factor"}


def cosine_decay_with_warmup(warmup_steps: int, decay_steps: int) -> Callable[[int], float]:
    """larq-zoo's `CosineDecayWithWarmup` (larq/zoo `larq_zoo/training/learning_schedules.py`)
    as a fraction of the peak: Keras's `PolynomialDecay(0, warmup_steps - 1, peak, power=1)`
    for step < W = warmup_steps, then `CosineDecay(peak, decay_steps - W - 1)` of step - W:

        step < W:   step / (W - 1)
        step >= W:  (1 + cos(pi min(step - W, P) / P)) / 2,   P = decay_steps - W - 1

    so step 0 trains at 0, steps W - 1 and W at the peak, and step decay_steps - 1 (and every
    one after it) at 0.

    Args:
        warmup_steps: W; 0 for none (then the cosine starts at step 0).
        decay_steps: the schedule's length in steps, warm-up included.

    Returns:
        factor(step), the fraction of the peak lr at optimizer step `step` (from 0).
    """
    period = decay_steps - warmup_steps - 1

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(warmup_steps - 1, 1)  # one step of warm-up: that step at 0
        if period <= 0:  # no step left to decay over
            return 0.0
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, period) / period))
    return factor


def cosine_per_step(optimizer: Optimizer, epochs: int, warmup_epochs: int = 5,
                    steps_per_epoch: int = 1) -> PerStepLR:
    """Linear warm-up from 0 over `warmup_epochs`, then cosine to 0 at the stage's last step,
    moved per optimizer step: larq-zoo's `CosineDecayWithWarmup(peak, warmup_steps=
    steps_per_epoch x 5, decay_steps=steps_per_epoch x epochs)` (`cosine_decay_with_warmup`).

    Args:
        optimizer: the optimizer whose lr it sets; each group's lr is its peak.
        epochs: the stage's epochs.
        warmup_epochs: epochs of warm-up.
        steps_per_epoch: the optimizer steps of an epoch (the stage passes its own; a config
            check, without data, passes 1).

    Returns:
        The scheduler, stepped after each optimizer step.
    """
    factor = cosine_decay_with_warmup(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    return PerStepLR(optimizer, factor)
