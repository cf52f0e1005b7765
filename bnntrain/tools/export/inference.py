"""A trained model in its inference form: binary layers as signs and scales, BN folded where exact.

BN is folded where that is exact: into a real-valued conv that it directly follows
(the stem's conv and BN, each shortcut's 1x1 conv and BN). A BN in front of a sign, after
a pooling layer or after a binary conv stays a BN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UserError
from ...nn.layers import BinaryMixin, binary_layers
from ...nn.quantizers import PRECISION_MODES, sign


def compare_sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 as a comparison and a select (ONNX's GreaterOrEqual and Where;
    ONNX has no copysign). It differs from training's sign only on IEEE negative zero.

    Args:
        x: any floating-point tensor.

    Returns:
        +1 where x >= 0, else -1, in x's dtype.
    """
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# What a binary layer does to its input, per activation mode, in plain ops rather than the
# training quantizers' autograd Functions, so that ONNX sees standard operators.
INPUT_FUNCTIONS = {"binary": compare_sign, **PRECISION_MODES}


class InferenceBinaryLayer(nn.Module):
    """A binary conv or linear layer for inference. Binary weights are held as their signs
    (+-1), with the per-channel scale (the training forward's mean |w|) beside them.

    Args:
        layer: a trained BinaryConv2d or BinaryLinear, at the precision it is exported at.
    """

    def __init__(self, layer: BinaryMixin) -> None:
        super().__init__()
        self.activations = layer.activations
        self.binary_weights = layer.weights == "binary"
        self.conv = ({"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                      "groups": layer.groups} if isinstance(layer, nn.Conv2d) else None)
        # What the quantized input is padded with (larq's `pad_values`; QuickNet's +1): the
        # layer pads it here and convolves with no padding, as the trained layer does.
        self.pad_value = getattr(layer, "pad_value", 0.0)
        weight = layer.quantized_weight().detach().clone()
        scale = None
        if self.binary_weights and layer.weight_quantizer.channel_scaled:
            # |sign(w) x s| is s itself: the scale is read back bit for bit.
            scale = weight.abs().flatten(1)[:, :1].reshape(-1, *[1] * (weight.dim() - 1)).clone()
        self.register_buffer("weight", sign(weight) if self.binary_weights else weight)
        self.register_buffer("scale", scale)
        self.register_buffer("threshold", None if layer.threshold is None else layer.threshold.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def extra_repr(self) -> str:
        kind = "conv" if self.conv is not None else "linear"
        bits = "1-bit" if self.binary_weights else "32-bit"
        pad = f", padded with {self.pad_value}" if self.pad_value else ""
        return f"{kind} {tuple(self.weight.shape)}, {bits} weights, {self.activations} input{pad}"

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x + self.threshold
        x = INPUT_FUNCTIONS[self.activations](x)
        conv = self.conv
        if conv is not None and self.pad_value:
            (ph, pw), conv = conv["padding"], {**conv, "padding": 0}
            x = F.pad(x, (pw, pw, ph, ph), value=self.pad_value)
        if not (self.binary_weights and self.activations == "binary"):
            weight = self.weight if self.scale is None else self.weight * self.scale
            return F.linear(x, weight, self.bias) if conv is None else F.conv2d(x, weight, self.bias, **conv)
        # +-1 inputs and weights: the conv's sums are whole numbers, exact in float32 in any
        # order; the scale and bias then apply once each, as a binary engine does it
        # (bnntrain.infer's outputs are these, bit for bit).
        out = F.linear(x, self.weight) if conv is None else F.conv2d(x, self.weight, None, **conv)
        shape = (1, -1) + (1,) * (out.dim() - 2)
        if self.scale is not None:
            out = out * self.scale.reshape(shape)
        return out if self.bias is None else out + self.bias.reshape(shape)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by BN in eval mode, as one conv: w k and (b - mean) k + beta, k = gamma / std."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    k = gamma.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(k)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * k.view(-1, 1, 1, 1))
        folded.bias.copy_((bias - bn.running_mean.double()) * k + beta.double())
    return folded.to(conv.weight.device)


def fold_batchnorms(model: nn.Module) -> dict[str, str]:
    """Fold every BN that directly follows a real-valued conv in a sequential container
    (the only place where the data flow from one to the other is certain); returns {conv: bn}.

    Args:
        model: a model in eval mode; changed in place (each BN that is folded becomes an identity).

    Returns:
        {name of the conv: name of the BN folded into it}.
    """
    folded = {}
    for name, seq in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]:
        prefix = f"{name}." if name else ""
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
                seq[i], seq[i + 1] = _fold(conv, bn), nn.Identity()
                folded[f"{prefix}{i}"] = f"{prefix}{i + 1}"
    return folded


def check_packable(name: str, layer: BinaryMixin) -> None:
    """A binary layer whose quantizer the inference layer cannot reproduce (not +-1, nor +-a
    scale per output channel) stops the export: exporting it would give another network.

    Args:
        name: the layer's name in the model.
        layer: a BinaryConv2d or BinaryLinear.

    Raises:
        UserError: the layer binarizes its input or weights with a quantizer that is not
            `packable`.
    """
    for role, quantizer, binary in (("input", layer.input_quantizer, layer.activations == "binary"),
                                    ("weight", layer.weight_quantizer, layer.weights == "binary")):
        if binary and not quantizer.packable:
            raise UserError(f"{name} binarizes its {role} with {quantizer.name}, whose values are not +-1 "
                            f"(or +-a scale per output channel): the packed export and bnntrain.infer "
                            f"cannot run it as trained")


def to_inference(model: nn.Module, check: bool = True) -> dict[str, str]:
    """Turn a trained model, in place, into its inference form: binary layers of plain ops,
    BN folded where exact, eval mode. Returns the folded {conv: bn}.

    Args:
        model: a trained model, at the precision it is exported at.
        check: refuse a layer whose quantizer is not `packable`. Reading a packed file skips
            it: the file was checked when written, and the fresh model its config builds has
            the quantizers' initial state (BNext's soft weights at temperature 1), not the
            trained one.

    Returns:
        {name of the conv: name of the BN folded into it}.

    Raises:
        UserError: with `check`, a binary layer whose quantizer is not packable.
    """
    model.eval()
    for name, layer in list(binary_layers(model)):
        if check:
            check_packable(name, layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, InferenceBinaryLayer(layer))
    folded = fold_batchnorms(model)
    model.requires_grad_(False)
    return folded
