"""Teachers for distillation (trick 12), always frozen and in eval mode.

A teacher is either a bnntrain checkpoint (rebuilt from the config saved in it: for
instance a `model.binarize=false` run, or for label refinery the checkpoint this stage
starts from), or a torchvision architecture with a weights file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .engine import load_checkpoint
from .errors import CheckpointError, ConfigError
from .models import model_from_checkpoint


def build_teacher(cfg: DictConfig, init: str | None, num_classes: int) -> nn.Module:
    """The frozen teacher of a stage that distils.

    Args:
        cfg: the `distill` group: `teacher.checkpoint` (a bnntrain checkpoint, or `init`), or
            `teacher.torchvision` with `teacher.weights`.
        init: the checkpoint the stage starts from, which `teacher.checkpoint=init` names.
        num_classes: the data's classes, which the teacher must predict.

    Returns:
        The teacher in eval mode, without gradients.

    Raises:
        ConfigError: no teacher given, `init` asked for where the stage has none, or another
            number of classes.
        CheckpointError: a checkpoint or weights file that is missing or does not fit.
    """
    teacher_cfg = cfg.teacher
    if teacher_cfg.checkpoint:
        path = teacher_cfg.checkpoint
        if path == "init":  # label refinery: the model this stage starts from
            if init is None:
                raise ConfigError("distill.teacher.checkpoint=init needs a stage that starts from a checkpoint "
                                  "(stage 2, or init=PATH)")
            path = init
        teacher = model_from_checkpoint(load_checkpoint(path), source=path)
        if teacher.classifier.out_features != num_classes:
            raise ConfigError(f"the teacher {path} predicts {teacher.classifier.out_features} classes, "
                              f"this data has {num_classes}")
    elif teacher_cfg.torchvision:
        teacher = _torchvision_teacher(teacher_cfg.torchvision, teacher_cfg.weights, num_classes)
    else:
        raise ConfigError("distillation needs a teacher: distill.teacher.checkpoint=PATH (a bnntrain checkpoint) "
                          "or distill.teacher.torchvision=NAME with distill.teacher.weights=PATH")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def torchvision_weights(name: str, weights: str) -> Any:
    """torchvision's published weights of architecture `name` called `weights` (e.g.
    IMAGENET1K_V1), or None where `weights` names no such thing (then it is a file).

    Args:
        name: a torchvision architecture (`resnet18`).
        weights: the name of its published weights, or a file.

    Returns:
        torchvision's weights enum member, or None.
    """
    import torchvision  # here: a run without a torchvision teacher need not import it

    try:
        return torchvision.models.get_model_weights(name).__members__.get(weights)
    except ValueError:
        return None


def _torchvision_teacher(name: str, weights: str | None, num_classes: int) -> nn.Module:
    import torchvision

    if not weights:
        raise ConfigError(f"distill.teacher.torchvision={name} needs distill.teacher.weights=PATH (a state dict) "
                          f"or the name of torchvision's weights (IMAGENET1K_V1)")
    published = torchvision_weights(name, weights)
    if published is not None:  # downloaded into torch's cache the first time
        if len(published.meta["categories"]) != num_classes:
            raise ConfigError(f"torchvision's {name} {weights} predicts {len(published.meta['categories'])} classes, "
                              f"this data has {num_classes}")
        return torchvision.models.get_model(name, weights=published)
    try:
        model = torchvision.models.get_model(name, num_classes=num_classes)
    except ValueError as err:
        raise ConfigError(f"distill.teacher.torchvision={name}: {err}") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointError(f"teacher weights {path} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    except (RuntimeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path} does not hold {name} weights for {num_classes} classes "
                              f"({str(err).splitlines()[0]})") from None
    return model
