"""BNext (Guo et al., "Join the High Accuracy Club on ImageNet with a Binary Neural Network
Ticket", 2022), as the authors' code builds it (hpi-xnor/BNext, `src/bnext.py`, class `BNext`
with its default ELM attention and information recoupling).

A real 3x3 conv and BN (no activation), then one `BNextBlock` per entry of the size's channel
list after the first: a 3x3 unit and a binary feed-forward (nn/bnext_blocks.py). The first
block keeps the stem's resolution and doubles its channels; later blocks halve the map where
the channels double. Blocks at an even index use the element attention (`scale`), the others
`ffn_3x3` (`bias`). Then PReLU, global average pooling and a linear classifier.

One builder, `bnext`, takes `size` (tiny, small, middle, large) as the code's `BNext(size=...)`
does: the four differ only in their channel lists, and one name keeps them one network.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..nn.bnext_blocks import BNextBlock
from ..nn.layers import WEIGHT_INITS, BinaryConv2d
from ..registry import choose
from .registry import MODELS
from .resnet import STEMS

# The code's `stage_out_channel_*`: the stem's channels, then each block's output channels.
SIZES = {
    "tiny": (32, 64, *[128] * 2, *[256] * 2, *[512] * 6, *[1024] * 2),
    "small": (48, 96, *[192] * 2, *[384] * 2, *[768] * 6, *[1536] * 2),
    "middle": (48, 96, *[192] * 4, *[384] * 4, *[768] * 8, *[1536] * 4),
    "large": (64, 128, *[256] * 4, *[512] * 4, *[1024] * 16, *[2048] * 4),
}
# The other networks' `model` keys that BNext's structure fixes: the presets state these values
# (what BNext is, in those keys' terms) and another is refused rather than ignored.
FIXED = {"groups": 1, "activation": "identity", "downsample": "pool", "bn_position": "after_conv",
         "learnable_threshold": True, "attention": None, "binary_classifier": False}
UNREAD = ("se_reduction",)  # read only with `attention: se`, as elsewhere
HARD_SIGN = {"name": "ste_sign", "clip_value": 1.5}  # the code's HardSign(range=[-1.5, 1.5])
BINARY_STD = 1e-3  # the code's binary weights: torch.randn(shape) * 0.001


def block_plan(channels: list[int]) -> list[tuple[int, int, int, str]]:
    """(cin, cout, stride, mode) of each block, by the code's rule: the first block at stride
    1 in `bias` mode; later ones at stride 2 where the channels change; `scale` mode at an
    even position in the channel list, `bias` at an odd one.

    Args:
        channels: the stem's channels, then each block's output channels.

    Returns:
        One tuple per block.
    """
    plan = []
    for i in range(1, len(channels)):
        cin, cout = channels[i - 1], channels[i]
        stride = 2 if i > 1 and cout != cin else 1
        plan.append((cin, cout, stride, "bias" if i == 1 or i % 2 else "scale"))
    return plan


class BNext(nn.Module):
    """BNext: the stem, the blocks, PReLU, pooling and the classifier.

    Args:
        num_classes: the classifier's outputs.
        in_channels: the input images' channels.
        size: `tiny`, `small`, `middle` or `large`.
        stem: `imagenet` (the stem conv has stride 2) or `cifar` (stride 1, for small images;
            the code keys this on num_classes != 1000, bnntrain on `model.stem` = `data.stem`).
        width: scales the stem's channels; the others keep their multiples of it.
        input_quantizer: every binary conv's sign estimator (the code's HardSign: `ste_sign` with
            `clip_value` 1.5).
        weight_quantizer: every binary conv's weight binarizer (the code's: `bnext_weight`).
        binary_init: `default`: the code's N(0, 0.001^2) binary weights; `small_positive`: U[0, 0.001).
        bn_momentum: every BN's momentum (the code keeps PyTorch's 0.1).
        binarize: False builds the real-valued twin.
        **fixed: the `FIXED` keys, at BNext's values, and the `UNREAD` ones.

    Raises:
        ValueError: an unknown size, stem or init, or a `FIXED` key at another value.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, size: str = "tiny", stem: str = "imagenet",
                 width: float = 1.0, input_quantizer: Any = HARD_SIGN, weight_quantizer: Any = "bnext_weight",
                 binary_init: str = "default", bn_momentum: float = 0.1, binarize: bool = True,
                 **fixed: Any) -> None:
        super().__init__()
        for key, value in fixed.items():
            if key not in FIXED and key not in UNREAD:
                raise TypeError(f"unexpected keyword argument '{key}'")
            if key in FIXED and value != FIXED[key]:
                raise ValueError(f"model.{key}={value} is not available on bnext, whose structure is fixed "
                                 f"({key}: {FIXED[key]})")
        base = SIZES[choose("model.size", size, SIZES)]
        unit = max(1, round(base[0] * width))
        channels = [unit * c // base[0] for c in base]
        stride = 2 if choose("model.stem", stem, STEMS) == "imagenet" else 1
        layer = {"input_quantizer": input_quantizer, "weight_quantizer": weight_quantizer, "binarize": binarize,
                 "init": choose("model.binary_init", binary_init, WEIGHT_INITS)}
        norm = lambda c: nn.BatchNorm2d(c, momentum=bn_momentum)  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, stride, 1, bias=False), norm(channels[0]))
        # The code's `firstconv3x3.prelu = nn.PReLU(oup, oup)` (every weight = C, not 0.25) is
        # never applied; kept for the code's parameter count and state dict, without a gradient.
        self.stem_prelu = nn.PReLU(channels[0], init=float(channels[0])).requires_grad_(False)
        self.blocks = nn.Sequential(*(BNextBlock(cin, cout, s, mode, layer, norm)
                                      for cin, cout, s, mode in block_plan(channels)))
        self.head_prelu = nn.PReLU(channels[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels[-1]
        self.classifier = nn.Linear(channels[-1], num_classes)
        if binary_init == "default":
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, BinaryConv2d):
                        m.weight.normal_(0, BINARY_STD)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (what the classifier sees), for centre loss and distillation.

        Args:
            x: an (N, in_channels, H, W) batch.

        Returns:
            The (N, num_features) pooled features.
        """
        return self.pool(self.head_prelu(self.blocks(self.stem(x)))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("bnext")
def bnext(**kwargs: Any) -> BNext:
    """BNext of a given `size`.

    Args:
        **kwargs: the `BNext` options.

    Returns:
        The network.
    """
    return BNext(**kwargs)
