"""QuickNet, QuickNetSmall and QuickNetLarge (Bannink et al., Larq Compute Engine, MLSys 2021) as
larq-zoo builds them (larq/zoo `larq_zoo/sota/quicknet.py`, the v1.0 networks).

A real stem: a 3x3 stride-2 conv to a quarter of the first section's channels, BN, ReLU, a
3x3 stride-2 depthwise conv, a BN of running statistics only, a 1x1 conv to the first
section's channels, BN (Keras's BN defaults: momentum 0.99, epsilon 1e-3; the convs padded as
TensorFlow pads "same"). Then sections of residual blocks (sign -> binary 3x3 conv, signs
padded with +1 -> ReLU -> BN -> + x), a transition before the first block of each section
whose channels differ (ReLU, 2x2 max-pool at stride 1, blur pool at stride 2, 1x1 conv, BN;
momentum 0.9, epsilon 1e-5), and a head of ReLU, global average pooling and a linear
classifier. Every binary layer's input and kernel quantizer is larq's SteSign(clip_value=1.25)
(`model.input_quantizer`, `model.weight_quantizer` in the presets); its WeightClip(1.25) is the
optimizer's `weight_clip`. Initialised as Keras draws it (nn/quicknet_blocks.py).

Three registered names, larq-zoo's own (`quicknet_small`, `quicknet`, `quicknet_large`): a
checkpoint's `model.name` alone says which network it holds.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..nn.quantizers import QuantizerSpec
from ..nn.quicknet_blocks import QuickNetResidual, QuickNetTransition, SamePad2d, keras_batchnorm, keras_init_
from ..registry import choose
from .registry import MODELS
from .resnet import STEMS

# (blocks per section, channels per section), larq-zoo's `section_blocks` and `section_filters`.
SIZES = {"quicknet_small": ((4, 4, 4, 4), (32, 64, 256, 512)),
         "quicknet": ((4, 4, 4, 4), (64, 128, 256, 512)),
         "quicknet_large": ((6, 8, 12, 6), (64, 128, 256, 512))}
# The collection's block options: QuickNet's blocks are its own, so each must be null.
BLOCK_KEYS = ("activation", "downsample", "bn_position", "attention", "binary_init")
QUICKNET_KEYS = ("in_channels", "stem", "width", "bn_momentum", "input_quantizer", "weight_quantizer",
                 "learnable_threshold", "binarize")  # what `QuickNet` reads


def quicknet_stem(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    """The stem: conv 3x3 (stride) -> BN -> ReLU -> depthwise 3x3 (stride) -> BN without scale
    or shift -> conv 1x1 -> BN; each 3x3 conv padded as TensorFlow pads "same"."""
    quarter = max(1, channels // 4)
    first = nn.Conv2d(in_channels, quarter, 3, stride, bias=False)
    depthwise = nn.Conv2d(quarter, quarter, 3, stride, groups=quarter, bias=False)
    last = nn.Conv2d(quarter, channels, 1, bias=False)
    for conv, initializer in ((first, "he_normal"), (depthwise, "glorot_uniform"), (last, "he_normal")):
        keras_init_(conv, initializer)
    return nn.Sequential(SamePad2d(3, stride), first, keras_batchnorm(quarter), nn.ReLU(inplace=True),
                         SamePad2d(3, stride), depthwise, keras_batchnorm(quarter, affine=False),
                         last, keras_batchnorm(channels))


def refuse_options(name: str, groups: int, binary_classifier: bool, block_options: dict[str, Any]) -> None:
    """The options QuickNet's own blocks do not read, set, stop the build rather than be ignored."""
    unknown = sorted(set(block_options) - set(BLOCK_KEYS))
    if unknown:
        raise ValueError(f"model={name} does not take {', '.join(unknown)}")
    given = [f"model.{key}={value}" for key, value in block_options.items() if value is not None]
    if groups != 1:
        given.append(f"model.groups={groups}")
    if binary_classifier:  # behind the head's ReLU every sign would be +1
        given.append("model.binary_classifier=true")
    if given:
        raise ValueError(f"model={name} is larq-zoo's network, its blocks its own: {given[0]} does not apply to it")


class QuickNet(nn.Module):
    """stem -> sections of transitions and residual blocks -> ReLU -> global average pool -> linear.

    Args:
        blocks: residual blocks per section.
        filters: channels per section (before `width`); the stem ends with the first's.
        num_classes: the classifier's outputs.
        in_channels: the input images' channels.
        stem: `imagenet` (both 3x3 stem convs at stride 2: 224 -> 56, as larq-zoo's) or `cifar`
            (both at stride 1: small images keep their size into the first section).
        width: multiplies every section's channels (the stem's are a quarter of the first's).
        bn_momentum: the sections' BN momentum, PyTorch's convention (larq-zoo's Keras 0.9 is
            0.1); the stem's BNs keep Keras's default 0.99 (0.01 here).
        input_quantizer: every binary conv's sign estimator.
        weight_quantizer: every binary conv's weight binarizer.
        learnable_threshold: a learnable per-channel shift before each sign (not QuickNet's).
        binarize: False builds the real-valued twin.
    """

    def __init__(self, blocks: tuple[int, ...], filters: tuple[int, ...], num_classes: int, in_channels: int = 3,
                 stem: str = "imagenet", width: float = 1.0, bn_momentum: float = 0.1,
                 input_quantizer: QuantizerSpec = "ste_sign", weight_quantizer: QuantizerSpec = "sign",
                 learnable_threshold: bool = False, binarize: bool = True) -> None:
        super().__init__()
        stride = 2 if choose("model.stem", stem, STEMS) == "imagenet" else 1
        filters = tuple(max(1, round(f * width)) for f in filters)
        binary = {"input_quantizer": input_quantizer, "weight_quantizer": weight_quantizer,
                  "learnable_threshold": learnable_threshold, "binarize": binarize}
        self.stem = quicknet_stem(in_channels, filters[0], stride)
        sections, channels = [], filters[0]
        for count, planes in zip(blocks, filters):
            layers: list[nn.Module] = []
            for _ in range(count):  # larq-zoo's loop: a transition wherever the channels differ
                if planes != channels:
                    layers.append(QuickNetTransition(channels, planes, bn_momentum))
                    channels = planes
                layers.append(QuickNetResidual(channels, bn_momentum, **binary))
            sections.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*sections)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        keras_init_(self.classifier, "glorot_normal")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (what the classifier sees), for centre loss and distillation.

        Args:
            x: an (N, in_channels, H, W) batch.

        Returns:
            The (N, num_features) pooled features.
        """
        return self.pool(self.act(self.stages(self.stem(x)))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build(name: str, num_classes: int, groups: int = 1, binary_classifier: bool = False, se_reduction: int = 16,
          **options: Any) -> QuickNet:
    """One of the three sizes, the `model` config's keys checked: those QuickNet does not
    read must be null (or their defaults: groups 1, no binary classifier)."""
    del se_reduction  # read only with the collection's attention, which is refused
    block_options = {key: options.pop(key) for key in list(options) if key not in QUICKNET_KEYS}
    refuse_options(name, groups, binary_classifier, block_options)
    blocks, filters = SIZES[name]
    return QuickNet(blocks, filters, num_classes, **options)


@MODELS.register("quicknet_small")
def quicknet_small(**kwargs: Any) -> QuickNet:
    """QuickNetSmall: sections of 4, 4, 4, 4 blocks, 32, 64, 256, 512 channels.

    Args:
        **kwargs: the `QuickNet` options but `blocks` and `filters`, and the `model` config's
            other keys (each null or its default).

    Returns:
        The network.
    """
    return build("quicknet_small", **kwargs)


@MODELS.register("quicknet")
def quicknet(**kwargs: Any) -> QuickNet:
    """QuickNet: sections of 4, 4, 4, 4 blocks, 64, 128, 256, 512 channels.

    Args:
        **kwargs: as for `quicknet_small`.

    Returns:
        The network.
    """
    return build("quicknet", **kwargs)


@MODELS.register("quicknet_large")
def quicknet_large(**kwargs: Any) -> QuickNet:
    """QuickNetLarge: sections of 6, 8, 12, 6 blocks, 64, 128, 256, 512 channels.

    Args:
        **kwargs: as for `quicknet_small`.

    Returns:
        The network.
    """
    return build("quicknet_large", **kwargs)
