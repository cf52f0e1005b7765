"""AdaBin's Maxout (Tu et al., "AdaBin: Improving Binary Neural Networks with Adaptive Binary
Sets", ECCV 2022): the non-linearity its networks put after each block's BN and residual sum,
as the authors' code computes it (huawei-noah/Efficient-Computing,
`BinaryNetworks/AdaBin/cifar10/utils/binarylib.py` and the same `imagenet/utils/binarylib.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Maxout(nn.Module):
    """A learnable two-piece linear function per channel: pos_scale x for x > 0 and
    neg_scale x for x < 0 (both slopes learnt; their code's `pos_scale * relu(x) - neg_scale *
    relu(-x)`, written the same way so that the gradient at 0 is theirs: 0).

    Initialised as their code does, pos_scale = 1 and neg_scale = 0.25: a PReLU at first.
    Where their block would apply it (`BasicBlock_1w1a`), the output is
    `maxout(bn(binary_conv(x)) + shortcut(x))`; their stem is `maxout(bn(conv(x)))`.

    Args:
        channels: the channels of its input (dimension 1).
        neg_init: neg_scale's initial value.
        pos_init: pos_scale's initial value.
    """

    def __init__(self, channels: int, neg_init: float = 0.25, pos_init: float = 1.0) -> None:
        super().__init__()
        self.neg_scale = nn.Parameter(torch.full((channels,), float(neg_init)))
        self.pos_scale = nn.Parameter(torch.full((channels,), float(pos_init)))

    def forward(self, x: Tensor) -> Tensor:
        """pos_scale relu(x) - neg_scale relu(-x), per channel.

        Args:
            x: (N, channels, ...): a feature map or a batch of feature vectors.

        Returns:
            A tensor of x's shape.
        """
        # Their code reshapes to (1, C, 1, 1), for feature maps only; any rank is the same here.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.pos_scale.view(shape) * F.relu(x) - self.neg_scale.view(shape) * F.relu(-x)

    def extra_repr(self) -> str:
        return f"{self.pos_scale.numel()}"
