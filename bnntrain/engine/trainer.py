"""The one training loop every stage runs: forward, loss, backward, step; and evaluation.

Logging, checkpoints and the epoch loop live beside it (`engine.fit`), not inside it.
The loop never calls `.item()` except every `log_every` steps, so on a GPU it does not
wait for the device between steps.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import TrainingDiverged
from .metrics import topk_correct

LogFn = Callable[[int, float], None]


class Trainer:
    def __init__(self, model: nn.Module, objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: Optimizer, device: torch.device, log_every: int = 50) -> None:
        """`objective(model, images, targets)` returns the batch loss (see bnntrain.losses)."""
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.device, self.log_every = device, log_every
        self.step = 0  # optimizer steps taken in this stage, across epochs

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.objective(self.model, images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_epoch(self, batches: Iterable, on_log: LogFn | None = None) -> dict[str, float]:
        self.model.train()
        total = torch.zeros((), device=self.device)
        window, window_steps, steps = torch.zeros((), device=self.device), 0, 0
        for images, targets in batches:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss = self.train_step(images, targets)
            total += loss
            window += loss
            steps, window_steps, self.step = steps + 1, window_steps + 1, self.step + 1
            if self.step % self.log_every == 0:
                self._report(window.item() / window_steps, on_log)
                window.zero_()
                window_steps = 0
        mean = total.item() / max(steps, 1)
        _check_finite(mean, self.step)
        return {"loss": mean, "steps": steps}

    def _report(self, loss: float, on_log: LogFn | None) -> None:
        _check_finite(loss, self.step)
        if on_log is not None:
            on_log(self.step, loss)

    @torch.inference_mode()
    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Top-1 and top-5 accuracy in percent and mean loss over the whole test set."""
        self.model.eval()
        sums = torch.zeros(4, device=self.device)  # loss sum, top-1 hits, top-5 hits, samples
        for images, targets in batches:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            logits = self.model(images)
            loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
            top1, top5 = topk_correct(logits, targets)
            sums += torch.stack([loss, top1.float(), top5.float(), torch.tensor(float(len(targets)), device=self.device)])
        sums = self.reduce(sums)
        loss, top1, top5, n = sums.tolist()
        n = max(n, 1.0)
        return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum across processes; a single process returns its own sums."""
        return sums


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the training loss became {loss} by step {step}; try a lower optimizer.lr")
