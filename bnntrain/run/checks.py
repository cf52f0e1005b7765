"""Every value a user can set, checked on a stage's resolved config before anything is
trained or written (`config.plan` calls `check_stage`).

First the types and ranges in `RULES`, the paths and the values that depend on each
other; then the choices: the model, optimizer, schedule and transforms are built once,
the model on the meta device (no memory, no compute), so that an unknown name fails here
with its registry's error listing the valid ones, and a bad combination fails as it would
in training. The builders raise plain ValueErrors; `check_builds` is the one place that
turns them into the one-line ConfigError. A choice list here is the one its code owns.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, DataError

Check = tuple[Callable[[Any], bool], str]  # (is it valid?, what a valid value is)


def whole(minimum: int | None = None, maximum: int | None = None) -> Check:
    what = "a whole number" if minimum is None else f"a whole number >= {minimum}"
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)
            and (maximum is None or v <= maximum)), what + ("" if maximum is None else f" and <= {maximum}")


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
           what: str | None = None) -> Check:
    def ok(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):  # NaN, inf
            return False
        return (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))

    above = f"> {low}" if low_open else f">= {low}"
    return ok, what or f"a number {above}" + ("" if high is None else f" and {'<' if high_open else '<='} {high}")


def flag() -> Check:
    return (lambda v: isinstance(v, bool)), "true or false"


def one_of(*choices: Any) -> Check:
    names = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    return (lambda v: any(v is c or (type(v) is type(c) and v == c) for c in choices)), f"one of {names}"


def optional(check: Check) -> Check:
    ok, what = check
    return (lambda v: v is None or ok(v)), f"null or {what}"


class Owned:
    """`one_of` the choices that the code owns (`"optim.DECAYED"`: a tuple, or a mapping's
    keys, in a module of bnntrain), between `before` and `after`; looked up when the check is
    unpacked, as a value is checked: composing a config, and its one-line errors, import no torch."""

    def __init__(self, where: str, before: tuple = (), after: tuple = ()) -> None:
        self.where, self.before, self.after = where, before, after

    def __iter__(self) -> Iterator:
        module, name = self.where.rsplit(".", 1)
        owned = getattr(importlib.import_module(f"bnntrain.{module}"), name)
        return iter(one_of(*self.before, *owned, *self.after))


POSITIVE = number(0, low_open=True, what="a positive number")
NON_NEGATIVE = number(0, what="zero or a positive number")
FRACTION = number(0, 1)

RULES: dict[str, Check | Owned] = {
    "seed": whole(0, 2**64 - 1),  # what torch's generators take
    "stage.activations": Owned("nn.ACTIVATION_MODES"),
    "stage.weights": Owned("nn.WEIGHT_MODES"),
    "stage.color_jitter": flag(),
    "stage.needs_init": flag(),
    "stage.start_from": one_of("last", "best"),
    "stage.hand_over": one_of("all", "all_but_binary_weights", "none"),
    "stage.switch.at": FRACTION,
    "stage.switch.activations": Owned("nn.ACTIVATION_MODES"),
    "data.batch_size": whole(1),
    "data.num_workers": whole(0),
    "data.image_size": whole(1),
    "data.channels": whole(1),
    "data.num_classes": optional(whole(2)),
    "data.train_limit": optional(whole(1)),
    "data.test_limit": optional(whole(1)),
    "data.download": flag(),
    "model.width": POSITIVE,
    "model.widen": whole(1),
    "model.groups": whole(1),
    "model.bn_momentum": FRACTION,
    "model.se_reduction": whole(1),
    "model.weight_scale": optional(flag()),  # the old name (null: not set); the quantizers check at build
    "model.learnable_threshold": flag(),
    "model.binary_stem": flag(),
    "model.binary_classifier": flag(),
    "model.binarize": flag(),
    "model.binary_depthwise": optional(flag()),  # model=torchvision only
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.momentum": number(0, 1, high_open=True),
    "optimizer.weight_decay_on": Owned("optim.DECAYED"),
    "optimizer.gradient_centralization": flag(),
    "optimizer.weight_clip": optional(POSITIVE),
    "schedule.epochs": whole(1),
    "schedule.gamma": POSITIVE,
    "schedule.warmup_epochs": whole(0),
    "schedule.warmup_lr": optional(POSITIVE),
    "schedule.min_lr": NON_NEGATIVE,
    "augment.mixup": optional(POSITIVE),
    "augment.cutmix": optional(POSITIVE),
    "loss.label_smoothing": number(0, 1, high_open=True),
    "loss.center.weight": NON_NEGATIVE,
    "distill.kd_weight": FRACTION,
    "distill.temperature": POSITIVE,
    "distill.feature_weight": NON_NEGATIVE,
    "trainer.amp": Owned("engine.trainer.AMP_DTYPES", before=("auto",), after=(None,)),
    "trainer.channels_last": one_of("auto", True, False),
    "trainer.compile": flag(),
    "trainer.malloc": one_of("auto", "keep", "release"),
    "trainer.grad_clip": optional(POSITIVE),
    "trainer.accumulate": whole(1),
    "trainer.sync_bn": flag(),
    "trainer.scale_lr": flag(),
    "trainer.log_every": whole(1),
    "trainer.bn_recalibrate": whole(0),
    "trainer.checkpoint_every.steps": optional(whole(1)),
    "trainer.checkpoint_every.minutes": optional(POSITIVE),
    "data.bad_images": Owned("data.samples.BAD_IMAGES"),
    "data.max_bad_images": whole(0),
    "data.verify": flag(),
    "data.batch_augment": Owned("data.BATCH_AUGMENT"),
    "data.decoder": Owned("data.transforms.DECODERS"),
    "trainer.progress": one_of("auto", "bar", "plain"),
}
PATHS = ("data.root", "init", "resume", "distill.teacher.checkpoint", "distill.teacher.weights")
ABSENT = object()


def check_stage(cfg: DictConfig) -> None:
    check_values(cfg)
    for key in PATHS:
        check_path(key, OmegaConf.select(cfg, key, default=None))
    check_relations(cfg)
    check_builds(cfg)


def check_values(cfg: DictConfig) -> None:
    for key, (ok, what) in RULES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and not ok(value):  # a key this config lacks (momentum for Adam) is no error
            raise ConfigError(f"{key} must be {what}; got {value!r}")


def check_path(key: str, value: Any) -> None:
    """A path that the file system cannot hold fails here, not as an OSError deep inside a run."""
    if value is None:
        return
    path = Path(str(value)).expanduser()
    existing = next((p for p in path.absolute().parents if os.path.isdir(p)), Path("/"))  # isdir never raises
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)), default="")
    if len(os.fsencode(longest)) > name_max:
        raise ConfigError(f"{key}: a name in the path is {len(os.fsencode(longest))} bytes long ('{longest[:24]}...'); "
                          f"the file system allows {name_max}")
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise ConfigError(f"{key}: the path is {len(os.fsencode(str(path.absolute())))} bytes long; "
                          f"the file system allows {path_max - 1}")


def takes_warmup_lr(schedule: str) -> bool:
    from ..optim import SCHEDULES

    return "warmup_lr" in inspect.signature(SCHEDULES.get(schedule)).parameters


def check_relations(cfg: DictConfig) -> None:
    """Values that are fine alone but not together."""
    schedule = cfg.schedule
    late = [m for m in schedule.get("milestones", []) if not isinstance(m, int) or m >= schedule.epochs]
    if late:
        raise ConfigError(f"schedule.milestones {late} lie past the last epoch (schedule.epochs={schedule.epochs}); "
                          f"each milestone must be a whole number below the number of epochs")
    # The step decay's warm-up holds warmup_lr; the cosine's ramps up to the lr and takes none.
    if schedule.get("warmup_epochs") and takes_warmup_lr(schedule.name) and not schedule.get("warmup_lr"):
        raise ConfigError("schedule.warmup_epochs is set but schedule.warmup_lr is not")
    if (schedule.get("warmup_epochs") or 0) >= schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs ({schedule.warmup_epochs}) must be fewer than schedule.epochs "
                          f"({schedule.epochs})")
    if (schedule.get("warmup_lr") or 0) > cfg.optimizer.lr:
        raise ConfigError(f"schedule.warmup_lr ({schedule.warmup_lr}) must not exceed optimizer.lr "
                          f"({cfg.optimizer.lr}): the warm-up leads up to the lr")
    if cfg.optimizer.name == "bop" and cfg.stage.weights != "binary":
        raise ConfigError(f"optimizer=bop trains binary weights, and {cfg.stage.name} has real ones "
                          f"(stage.weights={cfg.stage.weights}): use it in a fully binary stage")
    distill = cfg.get("distill")  # absent without distill=
    if distill and cfg.stage.name in distill.stages:
        from ..distill import check_teachers  # here: composing a config imports no torch

        check_teachers(distill)


def check_builds(cfg: DictConfig) -> None:
    """Build what the stage will build, once, where it costs nothing. What a builder raises
    about a value (a ValueError: an unknown name, options that do not go together) is the
    ConfigError of its message."""
    try:
        build_once(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_once(cfg: DictConfig) -> None:
    import torch

    from ..data.datasets import DATASETS, RGB_DATASETS
    from ..data.transforms import build_batch_mixing, build_transform
    from ..engine.setup import resolve_device, trainer_options
    from ..models import build_model
    from ..nn import set_precision
    from ..optim import build_optimizer, build_scheduler

    DATASETS.get(cfg.data.name)
    if cfg.data.name in RGB_DATASETS and cfg.data.channels != 3:
        raise DataError(f"data={cfg.data.name} loads colour images (3 channels); got data.channels={cfg.data.channels}")
    for key in ("mean", "std"):
        if len(cfg.data[key]) != cfg.data.channels:
            raise ConfigError(f"data.{key} has {len(cfg.data[key])} values for data.channels={cfg.data.channels}")
    build_transform(cfg.augment.train)
    build_transform(cfg.augment.test)
    num_classes = cfg.data.num_classes or 10  # a folder dataset counts its classes when it loads
    build_batch_mixing(cfg.augment, num_classes)
    trainer_options(cfg.trainer, resolve_device(cfg.trainer.device))
    with torch.device("meta"):
        model = build_model(cfg.model, num_classes=num_classes, in_channels=cfg.data.channels)
    check_model_size(model, cfg)
    set_precision(model, cfg.stage.activations, cfg.stage.weights)
    build_scheduler(cfg.schedule, build_optimizer(cfg.optimizer, model))
    distill = cfg.get("distill")  # absent without distill=
    if distill and cfg.stage.name in distill.stages:
        layers = dict(model.named_modules())
        missing = [student for student, _ in distill.feature_pairs or [] if student not in layers]
        if distill.feature_weight and missing:
            raise ConfigError(f"distill.feature_pairs: the model has no layer '{missing[0]}'")


def check_model_size(model: Any, cfg: DictConfig) -> None:
    """A model whose weights alone would take half this machine's memory is refused before it
    is built; one whose binary layers are under 4 channels wide trains to chance: a note."""
    from .. import notes
    from ..nn import binary_layers

    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if weight_bytes > memory / 2:
        raise ConfigError(f"model={cfg.model.name} model.width={cfg.model.get('width')} makes "
                          f"{weight_bytes / 4e9:.1f} G parameters ({weight_bytes / 2**30:.0f} GiB of weights, several "
                          f"times that to train); this machine has {memory / 2**30:.0f} GiB")
    narrowest = min((layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
                     for _, layer in binary_layers(model)), default=None)
    if narrowest is not None and narrowest < 4:
        notes.add(f"warning: model.width={cfg.model.get('width')} leaves binary layers {narrowest} channel(s) wide; "
                  f"such a network trains to about chance")
