"""The one training loop every stage runs: forward, loss, backward, step; and evaluation.

Logging, checkpoints and the epoch loop live beside it (`bnntrain.engine.stage`, engine/hooks.py), not inside it.
The loop never calls `.item()` except every `log_every` steps, so on a GPU it does not
wait for the device between steps.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import TrainingDiverged
from . import distributed
from .metrics import topk_correct

LogFn = Callable[[int, float], None]
StepFn = Callable[[int], bool]
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """The loop every stage runs: forward, loss, backward and optimizer step over an epoch's
    batches (with gradient accumulation, mixed precision and clipping), and the evaluation of
    the test set. `step` counts the optimizer steps taken in the stage."""

    def __init__(self, model: nn.Module, objective: Objective, optimizer: Optimizer, device: torch.device,
                 log_every: int | None = None, amp: str | None = None, channels_last: bool = False,
                 grad_clip: float | None = None, accumulate: int = 1, step_schedule: Any = None) -> None:
        """`objective(model, images, targets)` returns the batch loss (see bnntrain.losses).

        The options are `trainer.*` as `engine.setup.trainer_options` resolves them; left out,
        each is off. `log_every`: optimizer steps between logged (and checked) training losses.
        `amp` (bf16 | fp16 | None) runs forward passes under autocast; fp16 adds a gradient
        scaler. `accumulate` sums gradients over that many batches per optimizer step.

        Args:
            model: the module to train, possibly wrapped (DDP, compiled).
            objective: the batch loss, an `Objective`; None for a trainer that only evaluates.
            optimizer: the optimizer over the model's parameters; None for one that only evaluates.
            device: where the batches are moved.
            log_every: optimizer steps between logged training losses; None logs none.
            amp: `bf16`, `fp16` or None.
            channels_last: feed the batches in the channels-last memory format.
            grad_clip: the largest gradient norm, clipped before each step; None clips none.
            accumulate: batches per optimizer step.
            step_schedule: a learning-rate schedule stepped after each optimizer step (one whose
                `per_step` says so), or None.
        """
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.device, self.log_every = device, log_every
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.grad_clip, self.accumulate, self.step_schedule = grad_clip, accumulate, step_schedule
        self.step = 0  # optimizer steps taken in this stage, across epochs
        self.progress: dict[str, Any] = {"batches": 0, "loss_sum": 0.0}  # of the epoch under way

    def state_dict(self) -> dict:
        """What the loop itself carries between epochs: the step count and the gradient scaler.

        Returns:
            `{step, scaler}`, which `load_state_dict` takes back.
        """
        return {"step": self.step, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Go on from a saved state.

        Args:
            state: what `state_dict` returned.
        """
        self.step = state["step"]
        if state["scaler"]:  # empty when the scaler is off
            self.scaler.load_state_dict(state["scaler"])

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed precision of the forward passes.

        Returns:
            torch's autocast at the `amp` dtype, or a context that does nothing without `amp`.
        """
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """`model` (this trainer's, or the module inside it) on a batch as the loop feeds it:
        moved to the device, in the memory format, under autocast.

        Args:
            model: the module to run.
            images: a batch of images.

        Returns:
            The model's output.
        """
        with self.autocast():
            return model(images.to(self.device, non_blocking=True, memory_format=self.memory_format))

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, update: bool = True,
                   window: int = 1) -> torch.Tensor:
        """Forward and backward one batch of an accumulation window of `window` batches; step
        the optimizer when `update` (its last batch). DDP all-reduces gradients only then.

        Args:
            images: the batch's images, on the device.
            targets: its targets, on the device.
            update: step the optimizer after this batch.
            window: the batches of the accumulation window; the loss is divided by it.

        Returns:
            The batch's loss, detached (not divided by `window`).
        """
        sync = contextlib.nullcontext() if update or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            with self.autocast():
                loss = self.objective(self.model, images, targets)
            self.scaler.scale(loss / window).backward()
        if update:
            if isinstance(self.objective, nn.Module):  # e.g. centre-loss centres, outside DDP
                distributed.average_gradients(self.objective.parameters())
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train_epoch(self, batches: Iterable, on_log: LogFn | None = None, on_step: StepFn | None = None,
                    done: int = 0, loss_sum: float = 0.0) -> dict[str, Any]:
        """Train on `batches`, the rest of an epoch of which `done` batches (with losses summing
        to `loss_sum`) were trained before: a resumed epoch. After each optimizer step
        `on_step(step)` may stop the epoch there by returning True. `self.progress` holds
        how far the epoch has come, for a checkpoint written in the middle of it.

        Args:
            batches: the (images, targets) batches still to train.
            on_log: called with (step, mean loss) every `log_every` optimizer steps.
            on_step: called with the step count after each optimizer step; True stops the epoch.
            done: batches of this epoch trained before.
            loss_sum: the sum of their losses.

        Returns:
            `loss`, the mean loss of the epoch's batches trained so far; `steps`, the batches
                this call trained; `stopped`, whether `on_step` stopped the epoch.

        Raises:
            TrainingDiverged: the training loss became NaN or infinite.
        """
        self.model.train()
        total = torch.full((), loss_sum, device=self.device)
        logged, logged_steps, seen = torch.zeros((), device=self.device), 0, done  # losses since the last log
        last = done + len(batches) if hasattr(batches, "__len__") else -1
        stopped = False
        self.progress = {"batches": done, "loss_sum": total}
        for i, (images, targets) in enumerate(batches, start=done + 1):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            update = i % self.accumulate == 0 or i == last  # no gradients left over at the epoch's end
            # The epoch's last window may be shorter: its batches are averaged over its own size.
            start = (i - 1) // self.accumulate * self.accumulate
            window = min(self.accumulate, last - start) if last > 0 else self.accumulate
            loss = self.train_step(images, targets, update, window)
            total += loss
            logged += loss
            seen, logged_steps = i, logged_steps + 1
            if not update:
                continue
            self.step += 1
            if self.step_schedule is not None:  # the lr of the next step, before a checkpoint holds it
                self.step_schedule.step()
            self.progress = {"batches": i, "loss_sum": total}
            if self.log_every and self.step % self.log_every == 0:
                self._report(logged.item() / logged_steps, on_log)
                logged.zero_()
                logged_steps = 0
            if on_step is not None and on_step(self.step):
                stopped = True
                break
        mean = total.item() / max(seen, 1)
        check_finite(mean, f"by step {self.step}, the training loss")
        return {"loss": mean, "steps": seen - done, "stopped": stopped}

    def _report(self, loss: float, on_log: LogFn | None) -> None:
        check_finite(loss, f"by step {self.step}, the training loss")
        if on_log is not None:
            on_log(self.step, loss)

    @torch.inference_mode()
    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Top-1 and top-5 accuracy in percent and mean loss over the whole test set (all ranks).

        Args:
            batches: the (images, targets) test batches; under torchrun, this rank's share.

        Returns:
            `{top1, top5, loss}`: the loss is the mean cross-entropy per image.
        """
        self.model.eval()
        sums = torch.zeros(4, device=self.device)  # loss sum, top-1 hits, top-5 hits, samples
        for images, targets in batches:
            logits = self.forward(self.model, images)
            targets = targets.to(self.device, non_blocking=True)
            loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            top1, top5 = topk_correct(logits, targets)
            sums += torch.stack([loss, top1.float(), top5.float(), torch.tensor(float(len(targets)), device=self.device)])
        loss, top1, top5, n = distributed.all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


def check_finite(loss: float, what: str) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{what} became {loss}; try a lower optimizer.lr")
