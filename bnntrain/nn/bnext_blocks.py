"""BNext's blocks (Guo et al., 2022), as the authors' code builds them (hpi-xnor/BNext,
`src/bnext.py`: `Attention`, `FFN_3x3`, `FFN_1x1`, `BasicBlock`).

Each of the code's three units is a `BNextUnit`: a binary conv behind a learnable shift, BN
and PReLU, gated by the mix-to-binary attention (an SE whose sigmoid scales the binary branch,
computed on a learned mix of the unit's real input and that branch) and added to a residual.
They differ in the kernel, in the residual (the element attention of `Attention` multiplies
the gated branch by PReLU(input) and adds that; the others add the input) and in when the mix
weight is clamped to [0, 1]. Parameter names follow the code's, so that a checkpoint maps key
for key: `move.bias` is the binary conv's `threshold`, `binary_conv.temperature` its weight
quantizer's, `se.se.N` is `se.N`; the code's `HardSign` temperature has no effect and no twin.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..registry import choose
from .layers import BinaryConv2d
from .shortcuts import halve

# kind: (kernel, element attention, the mix weight clamped in evaluation too)
UNITS = {"attention": (3, True, False), "ffn_3x3": (3, False, False), "ffn_1x1": (1, False, True)}
SE_RATIO = 8  # the code's SqueezeAndExpand ratio


def mix_to_binary_se(channels: int) -> nn.Sequential:
    """The code's `SqueezeAndExpand` with its sigmoid: pool, 1x1 conv to C/8, ReLU, 1x1 conv
    back to C, sigmoid. (C/8 is at least 1, for the narrow networks of tests and small data;
    the code's networks never have fewer than 8 channels.)

    Args:
        channels: C.

    Returns:
        The gate's modules, at indices 1 and 3 its convs (the code's `se.se.1`, `se.se.3`).
    """
    hidden = max(1, channels // SE_RATIO)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, channels, 1), nn.Sigmoid())


class BNextUnit(nn.Module):
    """One of the code's units, C channels in and out:

        x = PReLU2(BN1(binary_conv(sign(input + shift))))
        mix = s P(input) + (1 - s) x           (s: `scale`, per channel; P: 2x2 average pool at stride 2)
        x = sigmoid(SE(mix)) x                 (the mix-to-binary attention)
        attention:  r = P(PReLU1(input)); out = BN2(x r) + r   (the element attention)
        ffn_3x3, ffn_1x1:  r = P(input);  out = BN2(x) + r

    The code clamps s to [0, 1] in place before every training forward (every unit) and before
    every evaluation forward of `ffn_1x1` (the others evaluate with s as it is); here the same,
    except that evaluation clamps a copy rather than the parameter. `activation1` is used by
    `attention` only; the others keep it as the code does (its parameter count and state dict
    hold it), without a gradient (the code's DDP runs with find_unused_parameters).

    Args:
        kind: `attention` (the code's `Attention`), `ffn_3x3` (`FFN_3x3`) or `ffn_1x1` (`FFN_1x1`).
        channels: C.
        stride: the binary conv's stride, 1 or 2 (`ffn_1x1`: 1).
        layer: the `BinaryConv2d` keywords: `input_quantizer`, `weight_quantizer`, `binarize`.
        norm: makes a BN of so many channels.

    Raises:
        ValueError: an unknown kind, or a strided `ffn_1x1`.
    """

    def __init__(self, kind: str, channels: int, stride: int, layer: Mapping[str, Any],
                 norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        kernel, self.element_attention, self.clamp_in_eval = UNITS[choose("BNext unit", kind, UNITS)]
        if kernel == 1 and stride != 1:
            raise ValueError(f"a BNext {kind} unit has stride 1, not {stride}")
        self.kind = kind
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))
        self.binary_conv = BinaryConv2d(channels, channels, kernel, stride, kernel // 2, learnable_threshold=True,
                                        **layer)
        self.norm1, self.norm2 = norm(channels), norm(channels)
        self.activation1, self.activation2 = nn.PReLU(channels), nn.PReLU(channels)
        if not self.element_attention:
            self.activation1.requires_grad_(False)  # never used: no gradient, never stepped
        # The code's AvgPool2d(2, 2) on even maps; ceil mode also halves an odd one (8 px digits
        # reach 1x1) as the strided conv does, where the code's shapes would not match.
        self.pool = halve() if stride == 2 else nn.Identity()
        self.se = mix_to_binary_se(channels)

    def mix_weight(self) -> Tensor:
        """s as the code uses it: clamped to [0, 1] in place in training, as it is in evaluation
        (`ffn_1x1`: clamped; a converted checkpoint may hold values just outside)."""
        if self.training:
            # `.data`, as the code: no version bump, so a graph built before stays valid.
            self.scale.data.clamp_(0, 1)
            return self.scale
        return self.scale.clamp(0, 1) if self.clamp_in_eval else self.scale

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x)
        residual = self.pool(self.activation1(x)) if self.element_attention else pooled
        out = self.activation2(self.norm1(self.binary_conv(x)))
        s = self.mix_weight()
        out = self.se(s * pooled + (1 - s) * out) * out
        if self.element_attention:
            out = out * residual
        return self.norm2(out) + residual


class BNextBlock(nn.Module):
    """The code's `BasicBlock`: a 3x3 unit (`attention` or `ffn_3x3`, at the block's stride),
    then a binary feed-forward: one `ffn_1x1` where the channels stay, or, where they double,
    two side by side on the same input, their outputs concatenated.

    Args:
        cin: input channels.
        cout: output channels: `cin` or `2 * cin`.
        stride: the 3x3 unit's stride.
        mode: `scale` (the element attention) or `bias` (`ffn_3x3`), the code's names.
        layer: the `BinaryConv2d` keywords, as `BNextUnit` takes them.
        norm: makes a BN of so many channels.

    Raises:
        ValueError: `cout` neither `cin` nor `2 * cin`, or an unknown mode.
    """

    def __init__(self, cin: int, cout: int, stride: int, mode: str, layer: Mapping[str, Any],
                 norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if cout not in (cin, 2 * cin):
            raise ValueError(f"a BNext block keeps or doubles its channels; got {cin} -> {cout}")
        kind = {"scale": "attention", "bias": "ffn_3x3"}[choose("BNext block mode", mode, ("scale", "bias"))]
        self.attention = BNextUnit(kind, cin, stride, layer, norm)
        self.ffn = nn.ModuleList(BNextUnit("ffn_1x1", cin, 1, layer, norm) for _ in range(cout // cin))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention(x)
        return torch.cat([ffn(x) for ffn in self.ffn], dim=1) if len(self.ffn) > 1 else self.ffn[0](x)
