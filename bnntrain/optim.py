"""Optimizers and learning-rate schedules from the `optimizer` and `schedule` config groups.

All schedules step once per epoch and are built from `torch.optim.lr_scheduler`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer, lr_scheduler

from .errors import ConfigError
from .registry import Registry

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("adam")(torch.optim.Adam)      # seed trick 7: Adam with default betas
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("sgd")(torch.optim.SGD)


def build_optimizer(cfg: DictConfig, params: Iterable[nn.Parameter] | list[dict]) -> Optimizer:
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    name = options.pop("name")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    try:
        return OPTIMIZERS.get(name)(params, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer={name}: {err}") from None


SCHEDULES: Registry[Callable[..., lr_scheduler.LRScheduler]] = Registry("schedule")


@SCHEDULES.register("multistep")
def multistep(optimizer: Optimizer, epochs: int, milestones: list[int], gamma: float,
              warmup_epochs: int = 0, warmup_lr: float | None = None) -> lr_scheduler.LRScheduler:
    """Step decay (seed trick 8), optionally after a constant warm-up at `warmup_lr`.

    The warm-up is ConstantLR chained with the step decay: for the first `warmup_epochs`
    epochs the lr is warmup_lr, then optimizer.lr, then decayed by gamma at each milestone.
    """
    decay = lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if not warmup_epochs:
        return decay
    base_lr = optimizer.param_groups[0]["lr"]
    warmup = lr_scheduler.ConstantLR(optimizer, factor=warmup_lr / base_lr, total_iters=warmup_epochs)
    return lr_scheduler.ChainedScheduler([warmup, decay], optimizer=optimizer)


@SCHEDULES.register("cosine")
def cosine(optimizer: Optimizer, epochs: int, min_lr: float = 0.0) -> lr_scheduler.LRScheduler:
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr)


def build_scheduler(cfg: DictConfig, optimizer: Optimizer) -> lr_scheduler.LRScheduler:
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    return SCHEDULES.get(options.pop("name"))(optimizer, **options)


def validate_schedule(cfg: DictConfig) -> None:
    """Reject schedules that cannot do what they say, before any work starts."""
    if cfg.epochs < 1:
        raise ConfigError(f"schedule.epochs must be at least 1; got {cfg.epochs}")
    late = [m for m in cfg.get("milestones", []) if m >= cfg.epochs]
    if late:
        raise ConfigError(f"schedule.milestones {late} lie past the last epoch (schedule.epochs={cfg.epochs}); "
                          f"each milestone must be below the number of epochs")
    if cfg.get("warmup_epochs", 0) and not cfg.get("warmup_lr"):
        raise ConfigError("schedule.warmup_epochs is set but schedule.warmup_lr is not")
