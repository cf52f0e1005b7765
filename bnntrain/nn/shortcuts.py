"""The real-valued shortcuts of binary blocks (trick 4), chosen by `model.downsample`.

Where a block keeps its shape the shortcut is the identity. Where it halves the map or
changes the channels:
- `v1`: 1x1 conv -> BN -> 2x2 average pool (the collection's recommended variant);
- `v2`: 2x2 average pool -> 1x1 conv -> BN (Bi-Real Net, ReActNet's ResNet);
- `v3`: 1x1 conv -> BN -> 3x3 stride-2 average pool;
- `conv`: a strided 1x1 conv -> BN (plain ResNet);
- `pool`: no parameters: a 2x2 average pool where the map halves, the input repeated where
  the channels double (ReActNet-A);
- `pad`: no parameters: every second pixel of every second row where the map halves, zero
  channels on both sides where the channels grow (He et al.'s option A; IR-Net's CIFAR ResNets);
- `pool_pad`: no parameters: a 2x2 average pool, then zero channels (ReCU's CIFAR ResNets).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import choose

Norm = Callable[[int], nn.Module]


def halve() -> nn.AvgPool2d:
    # ceil_mode so that odd feature maps (7x7) shrink exactly as the strided 3x3 conv does;
    # on even maps this is PyTorch's default AvgPool2d(2, 2), as in the official code.
    return nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)


class Repeat(nn.Module):
    """The input `times` times along the channels: ReActNet-A's shortcut where the channels
    double (each of its two 1x1 convs adds to the same input)."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] * self.times, dim=1)


class Subsample(nn.Module):
    """Every second pixel of every second row (`x[:, :, ::2, ::2]`): option A's stride 2."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, ::2, ::2]


class PadChannels(nn.Module):
    """`extra` zero channels on each side of the input's (option A's channel growth)."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, 0, self.extra, self.extra))

    def extra_repr(self) -> str:
        return f"extra={self.extra}"


def _zero_padded(cin: int, cout: int, stride: int, pool: bool) -> nn.Module:
    if cout < cin or (cout - cin) % 2:
        raise ValueError(f"model.downsample=pad adds zero channels evenly on both sides; "
                         f"it cannot map {cin} to {cout} channels")
    # ReCU's CIFAR code pools with PyTorch's default AvgPool2d(2), the same as halve() on even maps.
    layers = ([nn.AvgPool2d(2) if pool else Subsample()] if stride == 2 else []) + \
        ([PadChannels((cout - cin) // 2)] if cout != cin else [])
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _parameter_free(cin: int, cout: int, stride: int) -> nn.Module:
    if cout % cin:
        raise ValueError(f"model.downsample=pool repeats channels; it cannot map {cin} to {cout} channels")
    layers = ([halve()] if stride == 2 else []) + ([Repeat(cout // cin)] if cout != cin else [])
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def shortcut(cin: int, cout: int, stride: int, downsample: str, norm: Norm) -> nn.Module:
    """The shortcut of a block from `cin` to `cout` channels at `stride`."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if downsample == "pool":
        return _parameter_free(cin, cout, stride)
    if downsample in ("pad", "pool_pad"):
        return _zero_padded(cin, cout, stride, pool=downsample == "pool_pad")
    proj = lambda s=1: nn.Conv2d(cin, cout, 1, stride=s, bias=False)  # noqa: E731
    if stride == 1:
        return nn.Sequential(proj(), norm(cout))
    variants = {
        "v1": lambda: nn.Sequential(proj(), norm(cout), halve()),
        "v2": lambda: nn.Sequential(halve(), proj(), norm(cout)),
        "v3": lambda: nn.Sequential(proj(), norm(cout), nn.AvgPool2d(3, 2, 1)),
        "conv": lambda: nn.Sequential(proj(stride), norm(cout)),
    }
    return variants[choose("model.downsample", downsample, [*variants, "pool", "pad", "pool_pad"])]()
