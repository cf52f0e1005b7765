"""Transform presets: an `augment` config lists torchvision v2 transforms by name, in order.

    train:
      random_crop: {size: 32, padding: 4}   # a mapping is passed as keyword arguments
      horizontal_flip: true                 # true: the transform with its defaults
      rotation: 15                          # a scalar is its first argument
      color_jitter: null                    # null or false: left out

Normalisation comes from the data preset and is always last. Colour jitter is left out of
a stage whose config says `color_jitter: false` (stage 2 of the seed's recipe).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms import v2

from ..errors import ConfigError
from ..registry import Registry

TRANSFORMS: Registry[Callable[..., Callable]] = Registry("transform")
TRANSFORMS.register("resize")(lambda size: v2.Resize(size, antialias=True))
TRANSFORMS.register("center_crop")(v2.CenterCrop)
TRANSFORMS.register("random_crop")(v2.RandomCrop)
TRANSFORMS.register("random_resized_crop")(
    lambda size, scale=(0.08, 1.0): v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True))
TRANSFORMS.register("horizontal_flip")(v2.RandomHorizontalFlip)
TRANSFORMS.register("rotation")(v2.RandomRotation)
TRANSFORMS.register("color_jitter")(v2.ColorJitter)


def _make(name: str, args: Any) -> Callable:
    factory = TRANSFORMS.get(name)
    try:
        if args is True:
            return factory()
        if isinstance(args, dict):
            return factory(**args)
        return factory(args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"augment option {name}={args!r} is invalid: {err}") from None


def build_transform(spec: DictConfig | None, mean: list[float], std: list[float],
                    color_jitter: bool = True) -> v2.Compose:
    """PIL image or tensor -> normalised float tensor, with the listed transforms in between."""
    steps: list[Callable] = [v2.ToImage()]
    for name, args in (OmegaConf.to_container(spec, resolve=True) if spec else {}).items():
        if args is None or args is False or (name == "color_jitter" and not color_jitter):
            continue
        steps.append(_make(name, args))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
