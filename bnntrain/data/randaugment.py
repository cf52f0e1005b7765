"""timm's RandAugment as a per-image transform (`augment.train.rand_augment`), and the one
place that imports timm (the `timm` extra) for bnntrain: also for timm teachers (distill.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ConfigError


def timm_module(what: str) -> Any:
    """timm, imported, or the one-line error that `what` needs it (it is the `timm` extra).

    Args:
        what: the option that needs timm, as the config spells it.

    Returns:
        The timm module.

    Raises:
        ConfigError: timm is not installed.
    """
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{what} needs timm: pip install -e '.[timm]' (or pip install 'bnntrain[timm]')") from None
    return timm


class RandAugment:
    """timm's RandAugment (`rand_augment_transform`), on PIL images as timm runs it; a uint8
    tensor (data.decoder=torchcodec) is made a PIL image first.

    Args:
        config: timm's policy string, e.g. `rand-m7-mstd0.5-inc1` (magnitude 7, its noise's
            std 0.5, the operations whose strength increases with the magnitude).
        translate_const: the largest translation in pixels; timm's loader sets int(0.45 x the
            crop size): 100 at 224.
        img_mean: the fill colour of rotations, shears and translations; timm's loader sets the
            data mean in 0-255: (124, 116, 104) for ImageNet's.
        interpolation: the resampling of the geometric operations; timm's loader sets the
            training interpolation (`bicubic` here).
    """

    def __init__(self, config: str, translate_const: int = 100, img_mean: Sequence[int] = (124, 116, 104),
                 interpolation: str = "bicubic") -> None:
        timm_module(f"augment rand_augment={config}")
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        hparams = {"translate_const": translate_const, "img_mean": tuple(img_mean),
                   "interpolation": str_to_pil_interp(interpolation)}
        self.config = config
        self.transform = rand_augment_transform(config, hparams)

    def __call__(self, image: Any) -> Any:
        if isinstance(image, torch.Tensor):
            from torchvision.transforms.v2.functional import to_pil_image

            image = to_pil_image(image)
        return self.transform(image)

    def __repr__(self) -> str:
        return f"RandAugment({self.config})"
