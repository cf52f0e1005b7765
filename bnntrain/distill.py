"""Teachers for distillation (trick 12), always frozen and in eval mode.

A teacher is a bnntrain checkpoint (rebuilt from the config saved in it: for instance a
`model.binarize=false` run, or for label refinery the checkpoint this stage starts from), a
torchvision architecture with a weights file, or a timm model (the `timm` extra) by its name
and tag, with a weights file or timm's pretrained download. `distill.assistants` lists more
teachers that take turns beside the main one (BNext's assistant teachers, `losses.Objective`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .data.randaugment import timm_module
from .distill_losses import FEATURE_LOSSES, WEIGHTINGS
from .engine import load_checkpoint
from .errors import CheckpointError, ConfigError
from .models import model_from_checkpoint
from .registry import UnknownChoice, choose

SOURCES = ("checkpoint", "torchvision", "timm")  # where a teacher comes from; the first one given counts


def teacher_specs(cfg: DictConfig) -> list[tuple[str, Any]]:
    """The teachers of a `distill` group, each with the key it is configured under.

    Args:
        cfg: the `distill` group.

    Returns:
        (`distill.teacher`, its mapping), then (`distill.assistants.N`, its mapping) for each
            assistant.
    """
    assistants = cfg.get("assistants") or []
    return [("distill.teacher", cfg.teacher), *((f"distill.assistants.{i}", a) for i, a in enumerate(assistants))]


def check_teachers(cfg: DictConfig) -> None:
    """What can be checked before a stage builds its teachers: each names a source (where it
    names several, the first of `SOURCES` is used), the files it names exist, timm is installed
    and knows the model; and the distillation's choices.

    Args:
        cfg: the `distill` group of a stage that distils.

    Raises:
        ConfigError: no teacher, an unknown choice or timm model, or timm missing.
        CheckpointError: a checkpoint or weights file that does not exist.
    """
    try:
        choose("distill.weighting", cfg.get("weighting", "cross_entropy"), WEIGHTINGS)
        choose("distill.feature_loss", cfg.get("feature_loss", "l2_normalized"), FEATURE_LOSSES)
    except UnknownChoice as err:
        raise ConfigError(str(err)) from None
    for key, spec in teacher_specs(cfg):
        if not any(spec.get(source) for source in SOURCES):
            raise ConfigError(f"distillation needs a teacher: {key}.checkpoint=PATH (a bnntrain checkpoint), "
                              f"{key}.torchvision=NAME with {key}.weights=PATH, or {key}.timm=NAME")
        weights = spec.get("weights")
        if spec.get("torchvision") and not weights:
            raise ConfigError(f"{key}.torchvision={spec.torchvision} needs {key}.weights=PATH (a state dict)")
        if spec.get("timm"):
            _check_timm(key, spec.timm, weights)
        for field in ("checkpoint", "weights"):
            path = spec.get(field)
            if not path or path == "init" or (field == "weights" and _published(spec.get("torchvision"), path)):
                continue
            if not Path(path).expanduser().is_file():
                raise CheckpointError(f"{key}.{field}={path} does not exist" + _how_to_supply(key, spec))


def _check_timm(key: str, name: str, weights: str | None) -> None:
    timm = timm_module(f"{key}.timm={name}")
    if not timm.is_model(name):
        raise ConfigError(f"{key}.timm={name}: timm has no such model (a name and tag such as efficientnet_b0.ra_in1k)")
    pretrained = _timm_pretrained(timm, key, name)  # also where a file stands in for them: the tag is checked
    if not weights and pretrained is None:
        raise ConfigError(f"{key}.timm={name}: timm has no pretrained weights for it; give {key}.weights=PATH "
                          f"(a state dict)")


def _timm_pretrained(timm: Any, key: str, name: str) -> Any:
    """timm's description of the pretrained weights `name` names (None: it has none)."""
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # a tag timm does not know
        raise ConfigError(f"{key}.timm={name}: {err}") from None


def _how_to_supply(key: str, spec: Any) -> str:
    if spec.get("timm"):
        return (f": the teacher {spec.timm} takes {key}.weights=PATH (a state dict of timm's {spec.timm}), "
                f"or {key}.weights=null for timm's pretrained download")
    if spec.get("torchvision"):
        return (f": the teacher {spec.torchvision} takes {key}.weights=PATH (a state dict of torchvision's "
                f"{spec.torchvision}), or the name of torchvision's weights (IMAGENET1K_V1) for its download")
    return ""


def _published(architecture: str | None, weights: str) -> bool:
    return bool(architecture) and torchvision_weights(architecture, weights) is not None


def build_assistants(cfg: DictConfig, teacher: nn.Module, init: str | None, num_classes: int) -> list[nn.Module]:
    """The frozen assistants of a stage's teacher (`distill.assistants`), in their order. One
    configured as the main teacher is that module (BNext-L's last assistant), and one listed
    twice is one module.

    Args:
        cfg: the `distill` group.
        teacher: the main teacher, built by `build_teacher`.
        init: the checkpoint the stage starts from, which `checkpoint=init` names.
        num_classes: the data's classes, which every teacher must predict.

    Returns:
        The assistants; empty without `assistants`.
    """
    def same(spec: Any) -> str:
        return repr(sorted((key, spec.get(key)) for key in (*SOURCES, "weights")))

    built = {same(cfg.teacher): teacher}
    assistants = []
    for key, spec in teacher_specs(cfg)[1:]:
        if same(spec) not in built:
            built[same(spec)] = _build(spec, key, init, num_classes)
        assistants.append(built[same(spec)])
    return assistants


def build_teacher(cfg: DictConfig, init: str | None, num_classes: int) -> nn.Module:
    """The frozen main teacher of a stage that distils (`distill.teacher`).

    Args:
        cfg: the `distill` group: `teacher.checkpoint` (a bnntrain checkpoint, or `init`),
            `teacher.torchvision` with `teacher.weights`, or `teacher.timm` (with or without
            `teacher.weights`).
        init: the checkpoint the stage starts from, which `teacher.checkpoint=init` names.
        num_classes: the data's classes, which the teacher must predict.

    Returns:
        The teacher in eval mode, without gradients.

    Raises:
        ConfigError: no teacher given, `init` asked for where the stage has none, or another
            number of classes.
        CheckpointError: a checkpoint or weights file that is missing or does not fit, or timm's
            pretrained weights that cannot be downloaded.
    """
    return _build(cfg.teacher, "distill.teacher", init, num_classes)


def _build(spec: Any, key: str, init: str | None, num_classes: int) -> nn.Module:
    if spec.get("checkpoint"):
        path = spec.checkpoint
        if path == "init":  # label refinery: the model this stage starts from
            if init is None:
                raise ConfigError(f"{key}.checkpoint=init needs a stage that starts from a checkpoint "
                                  "(stage 2, or init=PATH)")
            path = init
        teacher = model_from_checkpoint(load_checkpoint(path), source=path)
        if teacher.classifier.out_features != num_classes:
            raise ConfigError(f"the teacher {path} predicts {teacher.classifier.out_features} classes, "
                              f"this data has {num_classes}")
    elif spec.get("torchvision"):
        teacher = _torchvision_teacher(spec.torchvision, spec.get("weights"), num_classes, key)
    elif spec.get("timm"):
        teacher = _timm_teacher(spec.timm, spec.get("weights"), num_classes, key)
    else:
        raise ConfigError(f"distillation needs a teacher: {key}.checkpoint=PATH (a bnntrain checkpoint), "
                          f"{key}.torchvision=NAME with {key}.weights=PATH, or {key}.timm=NAME")
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


def _torchvision_teacher(name: str, weights: str | None, num_classes: int, key: str = "distill.teacher") -> nn.Module:
    import torchvision

    if not weights:
        raise ConfigError(f"{key}.torchvision={name} needs {key}.weights=PATH (a state dict) "
                          f"or the name of torchvision's weights (IMAGENET1K_V1)")
    published = torchvision_weights(name, weights)
    if published is not None:  # downloaded into torch's cache the first time
        if len(published.meta["categories"]) != num_classes:
            raise ConfigError(f"torchvision's {name} {weights} predicts {len(published.meta['categories'])} classes, "
                              f"this data has {num_classes}")
        try:
            return torchvision.models.get_model(name, weights=published)
        except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), a broken download
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"the teacher {name}: torchvision's {weights} weights could not be loaded "
                                  f"({reason}); download them once where there is a network (torch caches them "
                                  f"under TORCH_HOME), or give {key}.weights=PATH (a state dict of torchvision's "
                                  f"{name})") from None
    try:
        model = torchvision.models.get_model(name, num_classes=num_classes)
    except ValueError as err:
        raise ConfigError(f"{key}.torchvision={name}: {err}") from None
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


def _timm_teacher(name: str, weights: str | None, num_classes: int, key: str) -> nn.Module:
    """timm's `name` with the weights of the file `weights`, read as timm reads its own
    pretrained files (a state dict, or a checkpoint holding one; timm's key filter for the
    model, e.g. for ConvNeXt's original files), or with timm's pretrained weights (downloaded
    once into the Hugging Face cache) where `weights` is null."""
    timm = timm_module(f"{key}.timm={name}")
    if not weights:
        pretrained = _timm_pretrained(timm, key, name)
        if pretrained is not None and pretrained.num_classes != num_classes:
            raise ConfigError(f"timm's pretrained {name} predicts {pretrained.num_classes} classes, this data has "
                              f"{num_classes}; give {key}.weights=PATH (a state dict for {num_classes} classes)")
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as err:  # no network, no cache, a broken download: whatever the hub raises
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"the teacher {name}: timm's pretrained weights could not be loaded ({reason}); "
                                  f"download them once where there is a network (timm caches them), or give "
                                  f"{key}.weights=PATH (a state dict of timm's {name})") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{key}.weights={weights} does not exist: the teacher {name} takes {key}.weights=PATH "
                              f"(a state dict of timm's {name}), or {key}.weights=null for timm's pretrained download")
    # The file stands in for the pretrained weights; stating its classes makes timm load the
    # classifier too (strictly) rather than drop it as it does for another number of classes.
    overlay = {"file": str(path), "num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError) as err:
        raise CheckpointError(f"{path} does not hold timm {name} weights for {num_classes} classes "
                              f"({(str(err).splitlines() or [''])[0]})") from None
