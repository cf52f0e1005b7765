"""Transform presets: an `augment` config lists torchvision v2 transforms by name, in order.

    train:
      random_crop: {size: 32, padding: 4}   # a mapping is passed as keyword arguments
      horizontal_flip: true                 # true: the transform with its defaults
      rotation: 15                          # a scalar is its first argument
      color_jitter: null                    # null or false: left out
    mixup: 0.2                              # batch mixing (alpha), applied to whole training batches
    cutmix: null

A stage without colour jitter (stage 2 of the collection's recipe) has it set to null in
its config (see `bnntrain.run.config`).

The listed transforms run per image in the loader's workers and end in a uint8 tensor.
What is the same for every image runs once per batch on the training device instead
(`BatchNormalize` with the data preset's statistics, then MixUp/CutMix): workers hand over
a quarter of float32's bytes, and one vectorised op replaces a normalisation per image.

torchvision is imported where a transform needs it: importing it takes longer (1.6 s, its
ops load torch's compiler) than a small run on in-memory data, which needs none of it.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ..errors import ConfigError
from .randaugment import RandAugment
from ..registry import Registry, choose

# ImageNet's RGB principal components (trick 9), for Lighting.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


class Lighting(torch.nn.Module):
    """AlexNet-style PCA colour noise: add eigvec @ (alpha * eigval), alpha ~ N(0, alphastd).

    Works on [0, 1] float images and on uint8 images (scaled to [0, 1] and back), so it may
    sit anywhere in the list. torchvision has no equivalent.

    Args:
        alphastd: the standard deviation of alpha; 0 leaves images as they are.
        eigval: the eigenvalues of the RGB covariance (ImageNet's by default).
        eigvec: its eigenvectors, one per row (ImageNet's by default).
    """

    def __init__(self, alphastd: float = 0.1, eigval: Sequence[float] = IMAGENET_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(eigval))
        self.register_buffer("eigvec", torch.tensor(eigvec))

    def forward(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = _v2().functional.pil_to_tensor(image)
        if self.alphastd == 0:
            return image
        alpha = torch.randn(3) * self.alphastd
        shift = (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)
        if image.dtype == torch.uint8:
            return (image.float() + 255 * shift).round_().clamp_(0, 255).to(torch.uint8)
        return image + shift


def _v2() -> Any:
    from torchvision.transforms import v2

    return v2


TRANSFORMS: Registry[Callable[..., Callable]] = Registry("augment transform")
"""The per-image transforms an `augment` config lists, by name. Each is a factory called with
the listed value: with no argument for `true`, with keyword arguments for a mapping, else with
the value itself."""
TRANSFORMS.register("resize")(
    lambda size, interpolation="bilinear": _v2().Resize(size, _interpolation(interpolation), antialias=True))
TRANSFORMS.register("center_crop")(lambda *args, **kwargs: _v2().CenterCrop(*args, **kwargs))
TRANSFORMS.register("random_crop")(lambda *args, **kwargs: _v2().RandomCrop(*args, **kwargs))
TRANSFORMS.register("random_resized_crop")(
    lambda size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear": _v2().RandomResizedCrop(
        size, scale=tuple(scale), ratio=tuple(ratio), interpolation=_interpolation(interpolation), antialias=True))
TRANSFORMS.register("horizontal_flip")(lambda *args, **kwargs: _v2().RandomHorizontalFlip(*args, **kwargs))
TRANSFORMS.register("rotation")(lambda *args, **kwargs: _v2().RandomRotation(*args, **kwargs))
TRANSFORMS.register("color_jitter")(lambda *args, **kwargs: _v2().ColorJitter(*args, **kwargs))
TRANSFORMS.register("autoaugment")(lambda policy="imagenet": _v2().AutoAugment(_v2().AutoAugmentPolicy(policy)))
TRANSFORMS.register("lighting")(Lighting)


def _interpolation(name: str) -> Any:
    """torchvision's interpolation mode of that name (`bilinear`, `bicubic`, `nearest`)."""
    return _v2().InterpolationMode(name)


TRANSFORMS.register("rand_augment")(RandAugment)


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


ON_BATCHES = ("color_jitter", "lighting")  # per-pixel colour: they may run on whole batches instead
# Crops, resizes and flips run at least as fast on uint8 tensors as on PIL images; Pillow's
# colour operations about twice as fast as torchvision's tensor ones (see `decoder_for`).
GEOMETRIC = ("resize", "center_crop", "random_crop", "random_resized_crop", "horizontal_flip")


DECODERS = ("auto", "pillow", "torchcodec")  # data.decoder


def decoder_for(setting: str, spec: DictConfig | None, leave_out: Sequence[str] = ()) -> str:
    """`data.decoder` for one split: `auto` decodes with torchcodec where it is installed and
    the split's per-image transforms are all geometric (decode plus crop on its tensor cost
    about 25% less per full-size JPEG than Pillow's path), and with Pillow where a colour
    transform still runs per image in the workers (stage 1's colour jitter, unless
    `data.batch_augment` moves it: Pillow's colour operations cost about half torch's)."""
    choose("data.decoder", setting, DECODERS)
    installed = importlib.util.find_spec("torchcodec") is not None
    if setting == "torchcodec" and not installed:
        raise ConfigError("data.decoder=torchcodec needs torchcodec: pip install 'bnntrain[decode]' "
                          "(or data.decoder=pillow)")
    if setting != "auto":
        return setting
    names = [name for name in _listed(spec) if name not in leave_out]
    return "torchcodec" if installed and all(name in GEOMETRIC for name in names) else "pillow"


class Decode:
    """The first per-image step of an image-file dataset (whose loader hands over the path):
    the file as a PIL image or as a uint8 tensor. Other datasets' images pass as they are."""

    def __init__(self, decoder: str) -> None:
        from .images import load_rgb, load_rgb_tensor

        self.decoder = decoder
        self.load = load_rgb_tensor if decoder == "torchcodec" else load_rgb

    def __call__(self, image: Any) -> Any:
        return self.load(image) if isinstance(image, str) else image

    def __repr__(self) -> str:
        return f"Decode({self.decoder})"


class ToImage:
    """The last step, torchvision's v2.ToImage for what reaches it: a PIL image becomes a uint8
    [C, H, W] tensor, a tensor passes as it is."""

    def __call__(self, image: Any) -> torch.Tensor:
        return image if isinstance(image, torch.Tensor) else _v2().functional.pil_to_tensor(image)

    def __repr__(self) -> str:
        return "ToImage()"


class Steps:
    """Per-image steps applied in order (v2.Compose, without importing torchvision)."""

    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = transforms

    def __call__(self, image: Any) -> Any:
        for step in self.transforms:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"Steps({', '.join(map(repr, self.transforms))})"


def build_transform(spec: DictConfig | None, leave_out: Sequence[str] = (), decoder: str = "pillow") -> Steps:
    """Per-image transform: a file's path (decoded by `decoder`), a PIL image or a tensor in,
    the listed transforms (but `leave_out`), tensor out.

    The listed transforms see the image as it comes: a PIL image (Pillow's colour ops are
    faster than the tensor ones) or, decoded by torchcodec, a uint8 tensor. Images end as
    uint8 tensors (or stay float where the dataset holds floats in [0, 1]); `BatchNormalize`
    turns the batch into normalised floats.

    Args:
        spec: the `augment.train` or `augment.test` mapping: transform names with their values,
            in order; null or false leaves one out.
        leave_out: names not to run per image (they run on whole batches).
        decoder: `pillow` or `torchcodec`: how an image file's path is decoded.

    Returns:
        The per-image steps: decode, the listed transforms in order, then a tensor.

    Raises:
        ConfigError: a transform's value that it refuses.
        ValueError: an unknown transform name (`UnknownChoice`).
    """
    steps: list[Callable] = [Decode(decoder)]
    for name, args in _listed(spec).items():
        if name not in leave_out:
            steps.append(_make(name, args))
    steps.append(ToImage())
    return Steps(steps)


def build_batch_augment(spec: DictConfig | None) -> torch.nn.Module | None:
    """The colour transforms of `spec` as batch operations (batch_augment.py), in its order."""
    from .batch_augment import BATCH_TRANSFORMS

    steps = []
    for name, args in _listed(spec).items():
        if name in ON_BATCHES:
            factory = BATCH_TRANSFORMS[name]
            steps.append(factory(**args) if isinstance(args, dict) else factory())
    return torch.nn.Sequential(*steps) if steps else None


def _listed(spec: DictConfig | None) -> dict[str, Any]:
    """The transforms a spec lists, less those set to null or false."""
    listed = OmegaConf.to_container(spec, resolve=True) if spec else {}
    return {name: args for name, args in listed.items() if args is not None and args is not False}


class BatchNormalize(torch.nn.Module):
    """A batch of uint8 (0..255) or float (0..1) images -> float32, normalised per channel.

    Args:
        mean: the per-channel means, of images in [0, 1].
        std: the per-channel standard deviations, of images in [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor, augment: torch.nn.Module | None = None) -> torch.Tensor:
        """`augment` (colour operations on [0, 1] floats) runs between the conversion and the
        normalisation.

        Args:
            images: an (N, C, H, W) batch, uint8 or float.
            augment: colour operations on [0, 1] float batches, or None.

        Returns:
            The normalised float32 batch.
        """
        if augment is not None:
            images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
            return (augment(images) - self.mean) / self.std
        if images.dtype == torch.uint8:  # fold the /255 into the statistics: two in-place ops
            return images.float().sub_(255 * self.mean).div_(255 * self.std)
        return (images.float() - self.mean) / self.std


def build_batch_mixing(augment: DictConfig, num_classes: int) -> Callable | None:
    """MixUp or CutMix over whole (images, labels) batches; with both set, one is picked at
    random per batch. The labels become class probabilities, which `CrossEntropyLoss` takes
    as they are, so the training loop needs no special case."""
    alphas = (("MixUp", augment.get("mixup")), ("CutMix", augment.get("cutmix")))
    mixers = [getattr(_v2(), mixer)(alpha=alpha, num_classes=num_classes) for mixer, alpha in alphas if alpha]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else _v2().RandomChoice(mixers)
