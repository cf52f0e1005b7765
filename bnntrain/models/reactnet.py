"""ReActNet-A (Liu et al., ECCV 2020): MobileNetV1's layout, binarized.

A real 3x3 stride-2 conv and BN (no activation), then 13 blocks. Each block is two
`BinaryBlock`s: a binary 3x3 conv (full, not depthwise) from C to C channels, with the
block's stride, and a binary 1x1 conv from C to the block's output channels; each behind a
learnable threshold (RSign), followed by BN, added to its own shortcut and passed through
RPReLU. The shortcuts have no parameters: a 2x2 average pool where the map halves, and,
where the channels double, the input twice over (the official code's two 1x1 convs C -> C,
each with its BN, added to the same input and concatenated, are here one 1x1 conv C -> 2C
and one BN of 2C channels: per output channel the same computation, and the same weights,
scales and statistics, in the same order). Then global average pooling and a linear
classifier.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..nn.blocks import BinaryBlock, BlockOptions
from .registry import MODELS
from ..registry import choose
from .resnet import STEMS, binary_or_real_classifier

# The stem's channels, then each block's output channels (the official `stage_out_channel`).
CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class ReActNetA(nn.Module):
    """ReActNet-A: a real stem, 13 blocks of a binary 3x3 and a binary 1x1 conv (each a
    `BinaryBlock`), global average pooling and the classifier.

    Args:
        num_classes: the classifier's outputs.
        in_channels: the input images' channels.
        stem: `imagenet` (the stem conv halves the input) or `cifar` (it keeps the size).
        width: scales the first block's 32 channels; the others keep their multiples of it.
        binary_classifier: make the classifier a binary layer that follows the stage's precision.
        **block_options: the `BlockOptions` fields, the `model` config's other keys.

    Raises:
        ValueError: an unknown value of an option (`UnknownChoice`).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "imagenet", width: float = 1.0,
                 binary_classifier: bool = False, **block_options: Any) -> None:
        super().__init__()
        opts = BlockOptions(**block_options)
        # `width` scales the first block's 32 channels; the rest keep their multiples of it,
        # so that every doubling stays a doubling.
        unit = max(1, round(CHANNELS[0] * width))
        channels = [unit * c // CHANNELS[0] for c in CHANNELS]
        # ImageNet: the stem halves 224 to 112. On small images (stem: cifar) it keeps the size.
        stride = 2 if choose("model.stem", stem, STEMS) == "imagenet" else 1
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, stride, 1, bias=False), opts.norm(channels[0]))
        blocks = []
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            stride = 2 if cout != cin and i > 0 else 1  # the first block widens without halving
            blocks.append(nn.Sequential(BinaryBlock(cin, cin, stride, opts, kernel=3),
                                        BinaryBlock(cin, cout, 1, opts, kernel=1)))
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels[-1]
        self.classifier = binary_or_real_classifier(channels[-1], num_classes, opts, binary_classifier)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (what the classifier sees), for centre loss and distillation.

        Args:
            x: an (N, in_channels, H, W) batch.

        Returns:
            The (N, num_features) pooled features.
        """
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("reactnet_a")
def reactnet_a(**kwargs: Any) -> ReActNetA:
    """ReActNet-A.

    Args:
        **kwargs: the `ReActNetA` options.

    Returns:
        The network.
    """
    return ReActNetA(**kwargs)
