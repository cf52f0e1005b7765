"""The pieces QuickNet (larq-zoo, `larq_zoo/sota/quicknet.py`) is built from that are new here:
TensorFlow's "same" padding, the fixed blur pool of its transitions, its residual block with
signs padded with +1, its transition, and Keras's initialisers and BN conventions.

TensorFlow pads "same" by total = max((ceil(n / s) - 1) s + k - n, 0), the smaller half before
and the larger after: a 3x3 stride-2 conv on 224 pads 0 above and left, 1 below and right,
which PyTorch's symmetric `padding=1` does not reproduce.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..complexity import MAC_COUNTERS
from .layers import BinaryConv2d

# The standard deviation of a unit normal truncated at +-2: Keras divides by it, so that the
# truncated draw keeps the variance it asks for.
KERAS_TRUNCATION = 0.87962566103423978
# Keras initialiser: (scale, fan mode, distribution), as its VarianceScaling takes them.
KERAS_INITS = {"he_normal": (2.0, "fan_in", "truncated_normal"),
               "glorot_normal": (1.0, "fan_avg", "truncated_normal"),
               "glorot_uniform": (1.0, "fan_avg", "uniform")}


def keras_fans(conv: nn.Conv2d | nn.Linear) -> tuple[int, int]:
    """(fan_in, fan_out) as Keras computes them for the layer's kernel.

    A depthwise conv's Keras kernel is (kh, kw, C, multiplier): its fan_in counts the C
    channels and its fan_out the multiplier, the reverse of what PyTorch's (C, 1, kh, kw)
    weight suggests.

    Args:
        conv: a conv (dense or depthwise) or linear layer.

    Returns:
        The fans.
    """
    w = conv.weight
    receptive = math.prod(w.shape[2:])
    if isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels:
        return conv.in_channels * receptive, conv.out_channels // conv.in_channels * receptive
    return w.shape[1] * receptive, w.shape[0] * receptive


@torch.no_grad()
def keras_init_(conv: nn.Conv2d | nn.Linear, initializer: str) -> None:
    """The layer's weight drawn as Keras's `initializer` draws it, its bias (if any) zero.

    Args:
        conv: a conv or linear layer; changed in place.
        initializer: `he_normal`, `glorot_normal` (normals truncated at two standard
            deviations, of variance scale / n) or `glorot_uniform`.
    """
    scale, mode, distribution = KERAS_INITS[initializer]
    fan_in, fan_out = keras_fans(conv)
    n = fan_in if mode == "fan_in" else (fan_in + fan_out) / 2
    if distribution == "uniform":
        limit = math.sqrt(3 * scale / n)
        conv.weight.uniform_(-limit, limit)
    else:
        std = math.sqrt(scale / n) / KERAS_TRUNCATION
        nn.init.trunc_normal_(conv.weight, 0.0, std, -2 * std, 2 * std)
    if conv.bias is not None:
        conv.bias.zero_()


def keras_batchnorm(channels: int, momentum: float = 0.99, eps: float = 1e-3, affine: bool = True) -> nn.BatchNorm2d:
    """Keras's BatchNormalization (defaults momentum 0.99, epsilon 1e-3) as a BatchNorm2d.

    Args:
        channels: its channels.
        momentum: Keras's momentum, the weight of the running statistic (PyTorch's is 1 - it).
        eps: added to the variance.
        affine: False for Keras's `scale=False, center=False`: running statistics only.

    Returns:
        The BN.
    """
    return nn.BatchNorm2d(channels, eps=eps, momentum=round(1 - momentum, 12), affine=affine)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one side: (before, after).

    Args:
        size: the input's size along that side.
        kernel: the kernel's size.
        stride: the stride.

    Returns:
        The zeros before and after.
    """
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """TensorFlow's `padding="same"` of a square kernel, from the input's size at each call.

    Args:
        kernel: the next conv's (or pool's) kernel size.
        stride: its stride.
        value: the padding's value: 0 before a conv, -inf before a max pool (the padding never wins).
    """

    def __init__(self, kernel: int, stride: int, value: float = 0.0) -> None:
        super().__init__()
        self.kernel, self.stride, self.value = kernel, stride, value

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}" + (f", value={self.value}" if self.value else "")

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel, self.stride)
        return F.pad(x, (left, right, top, bottom), value=self.value)


class BlurPool2d(nn.Module):
    """Anti-aliased downsampling (Zhang 2019; larq-zoo's `blurpool_initializer`): a depthwise
    3x3 conv with the fixed kernel [1, 2, 1] x [1, 2, 1] / 16, "same" padding, stride 2. The
    kernel is a buffer (Keras's `trainable=False` weight), not a parameter, and is not saved:
    it is the architecture's.

    Args:
        channels: the input's channels.
        stride: the stride.
    """

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        row = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(row, row) / 16
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)
        self.pad = SamePad2d(3, stride)
        self.channels, self.stride = channels, stride

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}"

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.pad(x), self.kernel, None, self.stride, 0, 1, self.channels)


# The cost report counts the blur's multiply-accumulates as it counts a depthwise conv's: FLOPs.
MAC_COUNTERS[BlurPool2d] = lambda m, out: out.numel() * math.prod(m.kernel.shape[1:])


class QuickNetResidual(nn.Module):
    """QuickNet's residual block: x + BN(ReLU(binary 3x3 conv of sign(x))), the signs padded
    with +1 (larq's `pad_values=1.0`); no BN after the addition, nothing on the shortcut.

    Args:
        channels: its input and output channels.
        bn_momentum: the BN's PyTorch momentum (Keras's 0.9 is 0.1); its epsilon is 1e-5.
        **binary_layer: the binary conv's quantizers and options (`BinaryConv2d`'s keywords).
    """

    def __init__(self, channels: int, bn_momentum: float = 0.1, **binary_layer: Any) -> None:
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, 3, 1, padding=1, pad_value=1.0, **binary_layer)
        self.act = nn.ReLU(inplace=True)  # the conv's own `activation="relu"`, before the BN
        self.norm = nn.BatchNorm2d(channels, eps=1e-5, momentum=bn_momentum)
        keras_init_(self.conv, "glorot_normal")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.act(self.conv(x)))


class QuickNetTransition(nn.Sequential):
    """QuickNet's transition, with no shortcut around it: ReLU, a 2x2 max-pool at stride 1
    (valid), the blur pool at stride 2, a real 1x1 conv to the new channels, BN.

    Args:
        cin: the input's channels.
        cout: the output's channels.
        bn_momentum: the BN's PyTorch momentum; its epsilon is 1e-5.
    """

    def __init__(self, cin: int, cout: int, bn_momentum: float = 0.1) -> None:
        conv = nn.Conv2d(cin, cout, 1, bias=False)
        keras_init_(conv, "glorot_normal")
        # A Sequential with the conv right before its BN: the export folds them into one conv.
        super().__init__(nn.ReLU(), nn.MaxPool2d(2, 1), BlurPool2d(cin, 2), conv,
                         nn.BatchNorm2d(cout, eps=1e-5, momentum=bn_momentum))
