"""Binary ResNets (18, 34, 50) built from the configurable blocks of `bnntrain.nn`.

The first conv and the classifier stay real-valued by default, as in every published BNN;
`binary_stem` / `binary_classifier` make them binary layers that follow the stage.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..nn.blocks import ACTIVATIONS, BinaryBlock, BlockOptions, TricksBottleneck
from ..registry import choose
from ..nn.layers import BinaryLinear
from .registry import MODELS

BASE_CHANNELS = (64, 128, 256, 512)


def double_skip(cin: int, planes: int, stride: int, opts: BlockOptions) -> tuple[list[nn.Module], int]:
    """A ResNet basic block as two of the collection's blocks, each with its own shortcut (trick 3, Bi-Real)."""
    return [BinaryBlock(cin, planes, stride, opts), BinaryBlock(planes, planes, 1, opts)], planes


def single_skip(cin: int, planes: int, stride: int, opts: BlockOptions) -> tuple[list[nn.Module], int]:
    """A ResNet basic block: two binary convs under one shortcut."""
    return [BinaryBlock(cin, planes, stride, opts, convs=2)], planes


def bottleneck(cin: int, planes: int, stride: int, opts: BlockOptions) -> tuple[list[nn.Module], int]:
    """The collection's bottleneck; `skip` does not apply (its inner shortcut is part of the block)."""
    return [TricksBottleneck(cin, planes, stride, opts)], planes * TricksBottleneck.expansion


BasicBlockBuilder = Callable[[int, int, int, BlockOptions], tuple[list[nn.Module], int]]
SKIPS: dict[str, BasicBlockBuilder] = {"double": double_skip, "single": single_skip}


STEMS = {"cifar": (3, 1), "imagenet": (7, 2)}  # kernel and stride of the first conv
STEM_ORDERS = {"conv_bn_act_pool": ("conv", "bn", "act", "pool"), "conv_pool_bn_act": ("conv", "pool", "bn", "act")}


def make_stem(in_channels: int, channels: int, kind: str, pool_order: str, opts: BlockOptions,
              binary: bool, activation: str = "relu") -> nn.Sequential:
    """CIFAR stem (3x3 conv, no pooling) or ImageNet stem (7x7 stride 2 + 3x3 max-pool).

    `pool_order` (trick 11): `conv_bn_act_pool` as in ResNet, or `conv_pool_bn_act`,
    which pools before BN and the activation. `activation`, one of the blocks' (`ACTIVATIONS`):
    ReLU as in ResNet, none (`identity`) as in Bi-Real Net and ReActNet, whose stem ends in BN,
    `hardtanh` as in IR-Net's and ReCU's ResNets, `maxout` as in AdaBin's.
    """
    kernel, stride = STEMS[choose("model.stem", kind, STEMS)]
    order = STEM_ORDERS[choose("model.stem_pool_order", pool_order, STEM_ORDERS)]
    conv = (opts.conv(in_channels, channels, kernel, stride) if binary
            else nn.Conv2d(in_channels, channels, kernel, stride, kernel // 2, bias=False))
    layers = {"conv": conv, "bn": opts.norm(channels),
              "act": ACTIVATIONS.get_as("model.stem_activation", activation)(channels)}
    if kind == "imagenet":
        layers["pool"] = nn.MaxPool2d(3, 2, 1)
    return nn.Sequential(*(layers[k] for k in order if k in layers))


class BinaryResNet(nn.Module):
    """stem -> stages of binary blocks -> global average pool [-> BN] -> classifier.

    Args:
        depths: the basic blocks (or bottlenecks) of each stage.
        use_bottleneck: build the collection's bottleneck (ResNet-50) instead of basic blocks.
        num_classes: the classifier's outputs.
        in_channels: the input images' channels.
        stem: `cifar` (a 3x3 conv, no pooling) or `imagenet` (a 7x7 stride-2 conv and a 3x3
            max-pool).
        stem_pool_order: `conv_bn_act_pool` (ResNet's) or `conv_pool_bn_act` (trick 11).
        stem_activation: `relu` (ResNet's), `identity` (Bi-Real Net, ReActNet: the stem ends in
            BN) or `hardtanh` (IR-Net, ReCU).
        channels: the channels of each stage before `width`; the stem has the first stage's.
        width: multiplies the channels of every layer.
        widen: multiplies the channels of the binary stages (trick 15).
        skip: `double` (a shortcut per binary conv, trick 3) or `single` (one per two convs);
            not read with bottlenecks.
        binary_stem: make the first conv a binary layer that follows the stage's precision.
        binary_classifier: make the classifier a binary layer that follows the stage's precision.
        head_norm: a BatchNorm1d on the pooled features, before the classifier (IR-Net, ReCU).
        **block_options: the `BlockOptions` fields, the `model` config's other keys.

    Raises:
        ValueError: an unknown value of an option (`UnknownChoice`), or options that do not go
            together.
    """

    def __init__(self, depths: tuple[int, ...], use_bottleneck: bool, num_classes: int, in_channels: int = 3,
                 stem: str = "cifar", stem_pool_order: str = "conv_bn_act_pool", stem_activation: str = "relu",
                 channels: tuple[int, ...] = BASE_CHANNELS, width: float = 1.0, widen: int = 1,
                 skip: str = "double", binary_stem: bool = False, binary_classifier: bool = False,
                 head_norm: bool = False, **block_options: Any) -> None:
        super().__init__()
        if len(channels) != len(depths):
            raise ValueError(f"model.channels has {len(channels)} stages, the network {len(depths)}")
        opts = BlockOptions(**block_options)
        make_block = bottleneck if use_bottleneck else SKIPS[choose("model.skip", skip, SKIPS)]
        # `width` scales every layer; `widen` (trick 15) multiplies the channels of the binary stages.
        stem_channels = max(1, round(channels[0] * width))
        self.stem = make_stem(in_channels, stem_channels, stem, stem_pool_order, opts, binary_stem, stem_activation)
        stages, cin = [], stem_channels
        for i, depth in enumerate(depths):
            planes = max(1, round(channels[i] * width * widen))
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(depth):
                new_blocks, cin = make_block(cin, planes, stride if j == 0 else 1, opts)
                blocks += new_blocks
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        # Identity where off: no state-dict keys, so the other presets' checkpoints are unchanged.
        self.head_norm = nn.BatchNorm1d(cin, momentum=opts.bn_momentum) if head_norm else nn.Identity()
        self.classifier = binary_or_real_classifier(cin, num_classes, opts, binary_classifier)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (what the classifier sees), for centre loss and distillation.

        Args:
            x: an (N, in_channels, H, W) batch.

        Returns:
            The (N, num_features) pooled features.
        """
        return self.head_norm(self.pool(self.stages(self.stem(x))).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def binary_or_real_classifier(features: int, num_classes: int, opts: BlockOptions, binary: bool) -> nn.Module:
    if not binary:
        return nn.Linear(features, num_classes)
    return BinaryLinear(features, num_classes, **opts.binary_layer())


@MODELS.register("resnet18")
def resnet18(**kwargs: Any) -> BinaryResNet:
    """Binary ResNet-18: two basic blocks in each stage.

    Args:
        **kwargs: the `BinaryResNet` options but `depths` and `use_bottleneck`.

    Returns:
        The network.
    """
    return BinaryResNet((2, 2, 2, 2), use_bottleneck=False, **kwargs)


@MODELS.register("resnet20")
def resnet20(channels: tuple[int, ...] = (16, 32, 64), **kwargs: Any) -> BinaryResNet:
    """Binary ResNet-20 for CIFAR (He et al.'s): three stages of three basic blocks, 16, 32 and
    64 channels.

    Args:
        channels: the channels of the three stages.
        **kwargs: the `BinaryResNet` options but `depths` and `use_bottleneck`.

    Returns:
        The network.
    """
    return BinaryResNet((3, 3, 3), use_bottleneck=False, channels=tuple(channels), **kwargs)


@MODELS.register("resnet34")
def resnet34(**kwargs: Any) -> BinaryResNet:
    """Binary ResNet-34: 3, 4, 6 and 3 basic blocks in its stages.

    Args:
        **kwargs: the `BinaryResNet` options but `depths` and `use_bottleneck`.

    Returns:
        The network.
    """
    return BinaryResNet((3, 4, 6, 3), use_bottleneck=False, **kwargs)


@MODELS.register("resnet50")
def resnet50(**kwargs: Any) -> BinaryResNet:
    """Binary ResNet-50: 3, 4, 6 and 3 of the collection's bottlenecks in its stages.

    Args:
        **kwargs: the `BinaryResNet` options but `depths` and `use_bottleneck`.

    Returns:
        The network.
    """
    return BinaryResNet((3, 4, 6, 3), use_bottleneck=True, **kwargs)
