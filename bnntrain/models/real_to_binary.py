"""Real-to-Binary Net (Martinez et al., "Training binary neural networks with real-to-binary
convolutions", ICLR 2020) as larq-zoo builds it: `RealToBinNetBNNFactory`, larq/zoo
`larq_zoo/literature/real_to_bin_nets.py` (the authors released no code).

Stem: a 7x7 stride-2 conv to 64 channels, BN, PReLU, a 3x3 stride-2 max-pool. Then blocks 2 to 9
(larq-zoo's numbers) of 64, 64, 128, 128, 256, 256, 512, 512 channels, the map halving where they
double; each block is two halves, each half: BN of the input -> sign -> binary 3x3 conv, its
output scaled per channel by a gate read from the BN'd real input (nn/gated_scaling.py), PReLU,
plus the shortcut (the input; where the channels double, a 2x2 average pool, a 1x1 conv and BN).
Global average pooling and a linear classifier. Every conv is padded as TensorFlow pads "same";
every BN is Keras's (momentum 0.99, epsilon 1e-3); the layers start as Keras draws them. Its
binary layers' quantizer is larq's `ste_sign` (clip 1.0) on inputs and kernels; its
`weight_clip` (1.0) is the optimizer's `weight_clip`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.gated_scaling import GatedScaling
from ..nn.layers import BinaryConv2d
from ..nn.quantizers import QuantizerSpec
from ..nn.quicknet_blocks import SamePad2d, keras_batchnorm, keras_init_, same_padding
from ..nn.shortcuts import halve
from ..registry import choose
from .quicknet import refuse_options
from .registry import MODELS
from .resnet import STEMS

STEM_CHANNELS = 64
# Blocks 2 to 9 halve the map (and double the channels) where larq-zoo's `block % 2 == 0 and block > 3`.
DOWNSAMPLES = (False, False, True, False, True, False, True, False)
R2B_KEYS = ("in_channels", "stem", "width", "bn_momentum", "input_quantizer", "weight_quantizer",
            "learnable_threshold", "binarize", "scaling_reduction")  # what `RealToBinaryNet` reads


class KerasPReLU(nn.PReLU):
    """Keras's PReLU (one slope per channel, `shared_axes=[1, 2]`, from 0): relu(x) - a relu(-x).
    Its gradient at x = 0 is 0, where PyTorch's is a; a binary conv's sums are whole numbers,
    so its scaled outputs are often exactly 0.

    Args:
        channels: the input's channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x) - self.weight[:, None, None] * F.relu(-x)


class SameBinaryConv2d(BinaryConv2d):
    """A BinaryConv2d padded as larq's QuantConv2D pads `padding="same"` (pad_values 0): zeros
    after the sign, the smaller half before. At stride 1, or on an odd map, that is PyTorch's
    symmetric `padding = kernel // 2`, which `padding` holds (for the export); at stride 2 on
    an even map it is one row and one column after the map only.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: the odd side of the kernel.
        stride: the stride.
        **binary: the BinaryConv2d keywords (quantizers, threshold, `binarize`).

    Raises:
        ValueError: a strided conv with a quantizer that scales the output (XNOR-Net's K,
            computed with symmetric zero padding).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, **binary: Any) -> None:
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2, **binary)
        if stride > 1 and any(q.scales_output for q in (self.input_quantizer, self.weight_quantizer)):
            raise ValueError("a quantizer that scales the output (XNOR-Net's K) is computed with symmetric "
                             "padding, not TensorFlow's \"same\" padding of a strided conv")

    def same_pads(self, x: Tensor) -> tuple[int, int, int, int]:
        """(left, right, top, bottom): TensorFlow's "same" padding of x for this conv."""
        (k, _), (s, _) = self.kernel_size, self.stride
        return (*same_padding(x.shape[-1], k, s), *same_padding(x.shape[-2], k, s))

    def forward(self, x: Tensor) -> Tensor:
        pads = self.same_pads(x)
        ph, pw = self.padding
        if pads == (pw, pw, ph, ph):  # symmetric: the layer's own (fused) forward
            return super().forward(x)
        signs = F.pad(self.quantize_input(x), pads)  # the zeros come after the sign
        return F.conv2d(signs, self.quantized_weight(), self.bias, self.stride, 0, self.dilation, self.groups)


def same_conv(conv: nn.Module, x: Tensor, kernel: int, stride: int) -> Tensor:
    """conv(x) padded as TensorFlow pads "same", whatever form the conv has now.

    A SameBinaryConv2d pads itself. Its exported forms (the inference and packed layers) pad
    symmetrically by kernel // 2; where TensorFlow pads one less before than after (stride 2
    on an even map), the map gets one more row or column in front and the outputs it reaches
    are dropped: the remaining windows are TensorFlow's, their zeros after the sign.

    Args:
        conv: a SameBinaryConv2d, or what the export made of it.
        x: its input.
        kernel: its kernel's side.
        stride: its stride.

    Returns:
        Its output.
    """
    if isinstance(conv, SameBinaryConv2d):
        return conv(x)
    # The network's 3x3 convs: TensorFlow pads (1, 1) (no shift) or, stride 2 on an even map, (0, 1).
    shift = [int(same_padding(n, kernel, stride)[0] < kernel // 2) for n in x.shape[-2:]]
    out = conv(F.pad(x, (shift[1], 0, shift[0], 0)))
    return out[..., shift[0]:, shift[1]:]


def shortcut(cin: int, cout: int, momentum: float) -> nn.Module:
    """The identity, or where the channels change: 2x2 average pool ("same"), 1x1 conv, BN."""
    if cin == cout:
        return nn.Identity()
    conv = nn.Conv2d(cin, cout, 1, bias=False)
    keras_init_(conv, "glorot_normal")
    # The conv right before its BN in a Sequential: the export folds them into one conv.
    return nn.Sequential(halve(), conv, keras_batchnorm(cout, momentum))


class HalfBlock(nn.Module):
    """Half a Real-to-Binary block (larq-zoo's `half_binary_block`): BN -> sign -> binary 3x3
    conv -> gated scaling (from the BN'd input) -> PReLU, plus the shortcut.

    Args:
        cin: input channels.
        cout: output channels (2 x cin where the block halves the map).
        stride: the binary conv's stride.
        momentum: Keras's BN momentum (0.99).
        reduction: the gate's reduction (8).
        **binary: the binary conv's quantizers and options.
    """

    def __init__(self, cin: int, cout: int, stride: int, momentum: float, reduction: int, **binary: Any) -> None:
        super().__init__()
        self.shortcut = shortcut(cin, cout, momentum)
        self.norm = keras_batchnorm(cin, momentum)
        self.conv = SameBinaryConv2d(cin, cout, 3, stride, **binary)
        keras_init_(self.conv, "glorot_normal")
        self.scale = GatedScaling(cin, cout, reduction)
        self.act = KerasPReLU(cout)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        real = self.norm(x)
        out = self.scale(real, same_conv(self.conv, real, 3, self.stride))
        return self.act(out) + self.shortcut(x)


def r2b_stem(in_channels: int, channels: int, kind: str, momentum: float) -> nn.Sequential:
    """`imagenet`: larq-zoo's 7x7 stride-2 conv, BN, PReLU, 3x3 stride-2 max-pool ("same"
    padding); `cifar`: a 3x3 conv at stride 1, BN, PReLU, no pooling (small images keep their size)."""
    kernel, stride = STEMS[choose("model.stem", kind, STEMS)]
    conv = nn.Conv2d(in_channels, channels, kernel, stride, bias=False)
    keras_init_(conv, "glorot_normal")
    layers = [("pad", SamePad2d(kernel, stride)), ("conv", conv), ("bn", keras_batchnorm(channels, momentum)),
              ("act", KerasPReLU(channels))]
    if kind == "imagenet":
        # TensorFlow's "same" max pool: the smaller half of the padding before, -inf (never the max).
        layers.append(("pool", nn.Sequential(SamePad2d(3, 2, value=-math.inf), nn.MaxPool2d(3, 2))))
    return nn.Sequential(OrderedDict(layers))


class RealToBinaryNet(nn.Module):
    """stem -> blocks 2 to 9, each two halves `a` and `b` -> global average pool -> linear.

    Args:
        num_classes: the classifier's outputs.
        in_channels: the input images' channels.
        stem: `imagenet` (larq-zoo's: 224 -> 56) or `cifar` (3x3 conv at stride 1, no pooling).
        width: multiplies the stem's 64 channels; each block that halves the map doubles them.
        bn_momentum: every BN's momentum, PyTorch's convention (Keras's 0.99 is 0.01).
        input_quantizer: every binary conv's sign estimator.
        weight_quantizer: every binary conv's weight binarizer.
        learnable_threshold: a learnable per-channel shift before each sign (not Real-to-Binary's).
        binarize: False builds the real-valued twin.
        scaling_reduction: the gates' reduction (larq-zoo's `scaling_r`, 8).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "imagenet", width: float = 1.0,
                 bn_momentum: float = 0.01, input_quantizer: QuantizerSpec = "ste_sign",
                 weight_quantizer: QuantizerSpec = "sign", learnable_threshold: bool = False,
                 binarize: bool = True, scaling_reduction: int = 8) -> None:
        super().__init__()
        momentum = 1 - bn_momentum
        binary = {"input_quantizer": input_quantizer, "weight_quantizer": weight_quantizer,
                  "learnable_threshold": learnable_threshold, "binarize": binarize}
        channels = max(1, round(STEM_CHANNELS * width))
        self.stem = r2b_stem(in_channels, channels, stem, momentum)
        blocks = []
        for downsample in DOWNSAMPLES:
            cout = 2 * channels if downsample else channels
            halves = (("a", HalfBlock(channels, cout, 2 if downsample else 1, momentum, scaling_reduction, **binary)),
                      ("b", HalfBlock(cout, cout, 1, momentum, scaling_reduction, **binary)))
            blocks.append(nn.Sequential(OrderedDict(halves)))  # a block's output: the attention loss's
            channels = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        keras_init_(self.classifier, "glorot_uniform")  # Keras Dense's default

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (what the classifier sees), for centre loss and distillation.

        Args:
            x: an (N, in_channels, H, W) batch.

        Returns:
            The (N, num_features) pooled features.
        """
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("real_to_binary")
def real_to_binary(num_classes: int, groups: int = 1, binary_classifier: bool = False, se_reduction: int = 16,
                   **options: Any) -> RealToBinaryNet:
    """Real-to-Binary Net, larq-zoo's BNN variant; the `model` config's keys checked: those it
    does not read must be null (or their defaults: groups 1, no binary classifier).

    Args:
        num_classes: the classifier's outputs.
        groups: must be 1.
        binary_classifier: must be false.
        se_reduction: not read (the collection's attention, which is refused).
        **options: the `RealToBinaryNet` options, and the collection's block options (each null).

    Returns:
        The network.
    """
    del se_reduction  # read only with the collection's attention, which is refused
    block_options = {key: options.pop(key) for key in list(options) if key not in R2B_KEYS}
    refuse_options("real_to_binary", groups, binary_classifier, block_options)
    return RealToBinaryNet(num_classes, **options)
