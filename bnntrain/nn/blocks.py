"""Binary residual blocks, one configurable class per block shape.

`BinaryBlock` is one binary conv (or two) under one shortcut. Where its BN sits is an
option: before the sign, as in the collection's BasicBlock (trick 1: BN -> sign -> binary
conv -> + shortcut -> activation), or after the binary conv, as in Bi-Real Net and ReActNet
(sign -> binary conv -> BN -> + shortcut -> activation). With `convs=1` two of them make one
ResNet basic block (double skip, trick 3, Bi-Real style); with `convs=2` one block holds both
convs under one shortcut; `kernel=1` gives ReActNet-A's pointwise half.
`TricksBottleneck` is the collection's second listing, for ResNet-50-style models.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..registry import Registry, choose
from .layers import BinaryConv2d
from .maxout import Maxout
from .quantizers import QuantizerSpec
from .shortcuts import halve, shortcut

BN_POSITIONS = ("before_sign", "after_conv")


@dataclass
class BlockOptions:
    """Everything a block needs to know about the tricks. The values, and what each means,
    are the `model` config group's (configs/model/base.yaml): no defaults here to drift.

    Attributes:
        input_quantizer: every binary layer's sign estimator (trick 1), as `BinaryConv2d` takes it.
        weight_quantizer: every binary layer's weight binarizer.
        binary_init: `default` or `small_positive`, as for `BinaryConv2d`.
        learnable_threshold: ReActNet's RSign: a learnable per-channel shift before each sign.
        bn_position: `before_sign` (the collection's block) or `after_conv` (Bi-Real Net, ReActNet).
        activation: what follows each addition (trick 2): `prelu`, `relu`, `identity` or `rprelu`.
        downsample: the real-valued shortcut where the shape changes (trick 4): `v1`, `v2`, `v3`,
            `conv` or `pool`.
        bn_momentum: every BN's momentum (trick 10, PyTorch's convention).
        attention: None, or `se`: Squeeze-Excitation on the binary convs (trick 13).
        se_reduction: the Squeeze-Excitation's channel reduction.
        groups: the groups of the binary 3x3 convs (trick 15).
        binarize: False builds the real-valued twin.
    """

    input_quantizer: QuantizerSpec   # trick 1: the sign estimator
    weight_quantizer: QuantizerSpec
    binary_init: str
    learnable_threshold: bool        # ReActNet's RSign
    bn_position: str
    activation: str                  # trick 2
    downsample: str                  # trick 4
    bn_momentum: float               # trick 10 (PyTorch convention)
    attention: str | None            # trick 13
    se_reduction: int
    groups: int                      # trick 15: grouped binary 3x3 convs
    binarize: bool                   # False: the real-valued twin

    @classmethod
    def from_config(cls, model: Mapping[str, Any], **overrides: Any) -> BlockOptions:
        """The block options among a `model` config's keys, with `overrides`.

        Args:
            model: the `model` config group, or any mapping with a key per field (others are
                left out).
            **overrides: values that replace the config's.

        Returns:
            The options.

        Raises:
            KeyError: a field that neither `model` nor `overrides` gives.
        """
        return cls(**{f.name: overrides[f.name] if f.name in overrides else model[f.name] for f in fields(cls)})

    def norm(self, channels: int) -> nn.BatchNorm2d:
        """A BN with the configured momentum.

        Args:
            channels: its channels.

        Returns:
            The `nn.BatchNorm2d`.
        """
        return nn.BatchNorm2d(channels, momentum=self.bn_momentum)

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> BinaryConv2d:
        """A binary conv with the options of every binary layer, padded by `kernel // 2`.

        Args:
            cin: input channels.
            cout: output channels.
            kernel: the side of the square kernel.
            stride: the convolution's stride.
            groups: the convolution's groups.

        Returns:
            The `BinaryConv2d`, without a bias.
        """
        return BinaryConv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, **self.binary_layer())

    def binary_layer(self) -> dict[str, Any]:
        """What every binary layer of the model takes: quantizers, threshold, init.

        Returns:
            The keyword arguments of `BinaryConv2d` and `BinaryLinear`: `input_quantizer`,
                `weight_quantizer`, `learnable_threshold`, `binarize` and `init`.
        """
        return {"input_quantizer": self.input_quantizer, "weight_quantizer": self.weight_quantizer,
                "learnable_threshold": self.learnable_threshold, "binarize": self.binarize, "init": self.binary_init}

    def shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        """The real-valued shortcut of a block: the identity where the shape stays, else as
        `downsample` says.

        Args:
            cin: the block's input channels.
            cout: its output channels.
            stride: its stride.

        Returns:
            The shortcut module.

        Raises:
            ValueError: an unknown `downsample` where the map halves, or `pool` where `cout` is
                not a multiple of `cin`.
        """
        return shortcut(cin, cout, stride, self.downsample, self.norm)


ATTENTION = (None, "se")  # trick 13's choices


class RPReLU(nn.Module):
    """ReActNet's RPReLU: a learnable per-channel shift added before and after a PReLU
    (their move1 -> prelu -> move2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.prelu = nn.PReLU(channels)
        self.shift_out = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.prelu(x + self.shift_in) + self.shift_out


ACTIVATIONS: Registry[Callable[[int], nn.Module]] = Registry("model.activation")
ACTIVATIONS.register("prelu")(nn.PReLU)
ACTIVATIONS.register("relu")(lambda channels: nn.ReLU(inplace=True))
ACTIVATIONS.register("identity")(lambda channels: nn.Identity())
ACTIVATIONS.register("rprelu")(RPReLU)
ACTIVATIONS.register("maxout")(Maxout)  # AdaBin's (nn/maxout.py)
ACTIVATIONS.register("hardtanh")(lambda channels: nn.Hardtanh())  # IR-Net's and ReCU's ResNets


class ChannelAttention(nn.Module):
    """Squeeze-Excitation scale computed from the block's real-valued input (trick 13).

    torchvision's SqueezeExcitation multiplies its own input; here the scale multiplies
    the binary conv's output, which may have more channels than the input, so the
    excitation maps `cin` to `cout` channels.
    """

    def __init__(self, cin: int, cout: int, reduction: int) -> None:
        super().__init__()
        hidden = max(cin // reduction, 8)
        self.fc1, self.fc2 = nn.Conv2d(cin, hidden, 1), nn.Conv2d(hidden, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return torch.sigmoid(self.fc2(s))


class BinaryBlock(nn.Module):
    """`convs` x (sign -> binary conv, with a BN before the sign or after the conv [x SE])
    -> + shortcut -> activation.

    Args:
        cin: input channels.
        cout: output channels, of every conv.
        stride: the first conv's stride (the others' is 1).
        opts: the tricks.
        convs: the binary convs under the one shortcut: 1 (two such blocks make a ResNet basic
            block with a double skip, trick 3) or 2.
        kernel: the convs' kernel size: 3, or 1 for ReActNet-A's pointwise half.

    Raises:
        ValueError: an unknown `attention`, `bn_position`, `activation` or `downsample`.
    """

    def __init__(self, cin: int, cout: int, stride: int, opts: BlockOptions, convs: int = 1,
                 kernel: int = 3) -> None:
        super().__init__()
        choose("model.attention", opts.attention, ATTENTION)
        self.norm_first = choose("model.bn_position", opts.bn_position, BN_POSITIONS) == "before_sign"
        ins = [cin if i == 0 else cout for i in range(convs)]
        self.norms = nn.ModuleList(opts.norm(c if self.norm_first else cout) for c in ins)
        # A grouped conv needs both channel counts divisible by the groups; the stem-facing
        # conv of a widened model may not be, so it falls back to a dense conv.
        groups = lambda c_in: opts.groups if c_in % opts.groups == 0 and cout % opts.groups == 0 else 1  # noqa: E731
        self.convs = nn.ModuleList(opts.conv(c, cout, kernel, stride if i == 0 else 1, groups(c))
                                   for i, c in enumerate(ins))
        self.attention = (nn.ModuleList(ChannelAttention(c, cout, opts.se_reduction) for c in ins)
                          if opts.attention == "se" else None)
        self.shortcut = opts.shortcut(cin, cout, stride)
        self.act = ACTIVATIONS.get(opts.activation)(cout)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, (norm, conv) in enumerate(zip(self.norms, self.convs)):
            real = norm(out) if self.norm_first else out
            out = conv(real)  # the conv binarizes its own input
            if not self.norm_first:
                out = norm(out)
            if self.attention is not None:
                out = out * self.attention[i](real)
        return self.act(out + self.shortcut(x))


class TricksBottleneck(nn.Module):
    """The collection's Bottleneck (trick 1, second listing), as written there.

    1x1 (stride) -> 3x3 with an inner shortcut around it -> 1x1 to 4x planes, each
    behind BN and sign; the outer shortcut is a real-valued branch where the shape
    changes (AvgPool 3x3 stride 1 at stride 1, AvgPool 2x2 at stride 2) and identity
    otherwise, and the activation follows the addition only where a branch exists.

    Args:
        cin: input channels.
        planes: the channels of the 1x1 and 3x3 convs; the block outputs `4 * planes`.
        stride: the first 1x1 conv's stride.
        opts: the tricks.

    Raises:
        ValueError: `opts.attention` is set (not available on this block), or an unknown
            `activation` where the shape changes (only there does one follow the addition).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, opts: BlockOptions) -> None:
        super().__init__()
        if opts.attention is not None:
            raise ValueError("model.attention is not available on the collection's bottleneck (resnet50)")
        cout = planes * self.expansion
        self.bn1, self.bn2, self.bn3, self.bn4 = (opts.norm(c) for c in (cin, planes, planes, cout))
        self.conv1 = opts.conv(cin, planes, 1, stride)
        self.conv2 = opts.conv(planes, planes, 3, 1, opts.groups if planes % opts.groups == 0 else 1)
        self.conv3 = opts.conv(planes, cout, 1)
        self.has_branch = stride != 1 or cin != cout
        if self.has_branch:
            pool = halve() if stride == 2 else nn.AvgPool2d(3, 1, 1)
            self.branch = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), opts.norm(cout), pool)
            self.act = ACTIVATIONS.get(opts.activation)(cout)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.branch(x) if self.has_branch else x
        add = self.conv1(self.bn1(x))
        out = self.conv2(self.bn2(add)) + add
        out = self.bn4(self.conv3(self.bn3(out))) + residual
        return self.act(out) if self.has_branch else out
