"""What a stage is made of, built from its config in one place: the stage loop, `evaluate`
and the benchmark scripts all take their model, data, objective, optimizer, schedule and
trainer from here.

`build_stage` builds a stage to train: from scratch, from `init` (the previous stage's
weights) or from its own `last.pt` (a resume: model, objective, optimizer, schedule and
trainer as they were saved). `build_evaluation` builds a checkpoint's model with the data
and trainer to evaluate it, and nothing to train it with.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..data import Loaders, build_loaders
from ..data.samples import BadImageLog
from ..distill import build_assistants, build_teacher
from ..errors import CheckpointError
from ..losses import build_objective
from ..models import build_model, model_from_checkpoint
from ..nn import binary_layers
from ..optim import build_optimizer, build_scheduler
from .checkpoint import load_checkpoint, load_model_weights
from .distributed import idle_quantizer_parameters
from .seeding import seed_everything
from .setup import configure_malloc, prepare_model, resolve_device, trainer_options
from .trainer import Trainer

log = logging.getLogger("bnntrain")


@dataclass
class StageParts:
    """A stage's objects. `model` is the module itself (checkpoints, precision, BN statistics);
    `trainer.model` runs it, wrapped for DDP or compilation where the config asks.

    Attributes:
        device: where the stage runs.
        loaders: its train and test batches.
        model: the network itself.
        trainer: the loop that trains and evaluates it.
        objective: the batch loss; None where the parts only evaluate.
        optimizer: None where the parts only evaluate.
        scheduler: the learning-rate schedule, stepped once per epoch (or, where its `per_step`
            says so, by the trainer after each optimizer step); None where the parts only evaluate.
        teacher: the frozen distillation teacher, or None (its assistants are the objective's).
    """
    device: torch.device
    loaders: Loaders
    model: nn.Module
    trainer: Trainer
    objective: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    teacher: nn.Module | None = None


def keep_own_binary_weights(model: nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    """`weights` with every binary layer's latent weight replaced by the fresh model's own:
    ReActNet-A's released step-2 code loads step 1 with strict=False into binary convs whose
    weight has another name (`weights`, flattened), so they keep their U[0, 0.001) init."""
    own = {f"{name}.weight": layer.weight.detach().clone() for name, layer in binary_layers(model) if layer.binarize}
    return {**weights, **own}


def build_stage(cfg: DictConfig, init: str | None = None, saved: dict[str, Any] | None = None,
                resume: Path | None = None, bad_images: BadImageLog | None = None) -> StageParts:
    """The stage `cfg` (a stage config from `config.plan`) starting from `init`, or resumed
    from `saved` (the checkpoint read from `resume`).

    Args:
        cfg: a stage config, as `plan` makes it.
        init: the checkpoint whose weights the stage starts from, or None.
        saved: this stage's checkpoint to resume from, as `load_checkpoint` read it, or None.
        resume: the file `saved` was read from.
        bad_images: where unreadable images are recorded, or None.

    Returns:
        The stage's parts, on its device, ready to train.

    Raises:
        CheckpointError: `init` holds NaN or infinite weights, or weights of another model.
        DataError: the data set is missing or cannot be read.
    """
    name = cfg.stage.name
    device, options = _runtime(cfg.trainer, name)
    seed_everything(cfg.seed)  # the model's initial weights
    loaders = build_loaders(cfg.data, cfg.augment, seed=cfg.seed, device=device, bad_images=bad_images)
    model = build_model(cfg.model, num_classes=loaders.num_classes, in_channels=loaders.channels)
    distill = cfg.get("distill")
    teacher = build_teacher(distill, init, loaders.num_classes) if distill and name in distill.stages else None
    assistants = build_assistants(distill, teacher, init, loaders.num_classes) if teacher is not None else []
    objective = build_objective(cfg, model, loaders.num_classes, teacher, assistants)
    optimizer = build_optimizer(cfg.optimizer, model, extra=objective.parameters())
    if saved is not None:
        load_model_weights(model, saved["model"], resume)
        objective.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
    elif init is not None and cfg.stage.hand_over == "none":  # a fresh network, which `init` may still teach
        log.info(f"{name}: starts from its own initial weights (stage.hand_over: none), not from {init}")
    elif init is not None:
        weights = _finite(load_checkpoint(init)["model"], init)
        if cfg.stage.hand_over == "all_but_binary_weights":
            weights = keep_own_binary_weights(model, weights)
        load_model_weights(model, weights, init)
        log.info(f"{name}: weights initialised from {init}"
                 + (" (its binary convs' weights left at their init)" if cfg.stage.hand_over != "all" else ""))
    steps_per_epoch = math.ceil(len(loaders.train) / options["accumulate"])  # the trainer's, last window included
    scheduler = _scheduler(cfg.schedule, optimizer, saved, steps_per_epoch)
    idle = idle_quantizer_parameters(model, cfg.stage.activations, cfg.stage.weights)
    # DDP/compile around `model`
    net = prepare_model(model, device, cfg.trainer, options["channels_last"], idle_parameters=bool(idle))
    objective.to(device)
    for frozen in {id(t): t for t in (teacher, *assistants) if t is not None}.values():
        frozen.to(device)
    # The optimizer state loaded on the CPU follows the parameters to the device.
    optimizer.load_state_dict(optimizer.state_dict())
    per_step = scheduler if getattr(scheduler, "per_step", False) else None
    trainer = Trainer(net, objective, optimizer, device, **options, step_schedule=per_step)
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
    return StageParts(device, loaders, model, trainer, objective, optimizer, scheduler, teacher)


def build_evaluation(cfg: DictConfig, state: dict[str, Any], source: str) -> StageParts:
    """Checkpoint `state`'s model (read from `source`) on its device, with the loaders of
    `cfg.data` and a trainer set up as `cfg.trainer` says (mixed precision, memory format).

    Args:
        cfg: a config with `data`, `augment` and `trainer` groups.
        state: the checkpoint, as `load_checkpoint` read it.
        source: where it was read from, for the errors.

    Returns:
        The parts with the model, loaders and trainer, and nothing to train with.
    """
    device, options = _runtime(cfg.trainer)
    loaders = build_loaders(cfg.data, cfg.augment, device=device)
    model = model_from_checkpoint(state, source).to(device)
    return StageParts(device, loaders, model, Trainer(model, None, None, device, **options))


def _runtime(cfg: DictConfig, name: str | None = None) -> tuple[torch.device, dict[str, Any]]:
    """The device and the trainer's options of `cfg` (the `trainer` group); glibc's malloc
    set up for them."""
    device = resolve_device(cfg.device)
    options = trainer_options(cfg, device)
    # Checkpoints saved before trainer.malloc existed have none: they get its auto.
    if configure_malloc(cfg.get("malloc", "auto"), device) and name is not None:
        log.debug(f"{name}: glibc keeps freed memory for the next step (trainer.malloc)")
    return device, options


def _finite(weights: dict[str, Any], init: str) -> dict[str, Any]:
    """A start from NaN or infinite weights would only be found as a NaN loss, blamed on the lr."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"init={init} holds NaN or infinite weights ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): training cannot start from it")
    return weights


def _scheduler(cfg: DictConfig, optimizer: Any, saved: dict[str, Any] | None, steps_per_epoch: int) -> Any:
    """The schedule of this config, moved on by the epochs (or, for a schedule by steps, the
    optimizer steps) already trained in `saved`: the lr is the one an uninterrupted run has
    there (also where a resumed run now has more epochs)."""
    for group in optimizer.param_groups:  # as a new run starts: at the base lr
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    if saved is None:
        return scheduler
    if getattr(scheduler, "per_step", False):  # a checkpoint mid-epoch too: the trainer's step count
        scheduler.advance_to(saved["trainer"]["step"])
        return scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": this is a replay
        for _ in range(saved["epoch"]):
            scheduler.step()
    return scheduler
