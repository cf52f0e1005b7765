"""Binary conv and linear layers whose quantizers are switched at run time.

A binary layer holds an input quantizer (a sign estimator) and a weight quantizer, each a
name with arguments in the config (`{name: approx_sign}`) or a `Quantizer` object (see
quantizers/). Stage 1 (binary activations, real weights, or the reverse) and stage 2 (both
binary) run the same module tree, so a stage-1 checkpoint loads into stage 2 key for key.
`set_precision` switches a layer between its quantizers and the stage's precision modes;
nothing about it is saved in the state dict.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import choose
from .quantizers import INPUT_QUANTIZERS, PRECISION_MODES, WEIGHT_QUANTIZERS, Quantizer, QuantizerSpec, build_quantizer
from .sign_conv import FUSED_SIGN_CONVS

ACTIVATION_MODES = ("binary", *PRECISION_MODES)
"""What a binary layer's input can be in a stage (`stage.activations`): `binary` (its input
quantizer) or one of `PRECISION_MODES` (`real`, `leaky_clip`, `clamp`, `tanh`)."""
WEIGHT_INITS = ("default", "small_positive")  # PyTorch's conv/linear init, or Bi-Real's U[0, 0.001)
WEIGHT_MODES = ("binary", "real")
"""What a binary layer's weight can be in a stage (`stage.weights`): `binary` (its weight
quantizer) or `real` (the latent weight as it is)."""


def build_input_quantizer(spec: QuantizerSpec) -> Quantizer:
    """A sign estimator from its config; a precision mode is the stage's to set, not the model's."""
    name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, Mapping) else None
    if name in PRECISION_MODES:
        raise ValueError(f"model.input_quantizer={name} is a precision mode, which the stage sets "
                         f"(stage.activations={name}); model.input_quantizer is a sign estimator, one of: "
                         f"{', '.join(INPUT_QUANTIZERS.names())}")
    return build_quantizer(INPUT_QUANTIZERS, spec)


class BinaryMixin:
    """Shared by BinaryConv2d and BinaryLinear: their quantizers and which of them apply right now.

    Attributes:
        input_quantizer: the sign estimator applied to the input in `binary` mode.
        weight_quantizer: the binarizer applied to the latent weight in `binary` mode.
        threshold: ReActNet's learnable per-channel shift, added to the input in every mode;
            None where the layer has none.
        binarize: False for the real-valued twin, which stays real whatever it is set to.
        activations: the input's mode now, one of `ACTIVATION_MODES`.
        weights: the weight's mode now, one of `WEIGHT_MODES`.
    """

    def _init_binary(self, input_quantizer: QuantizerSpec, weight_quantizer: QuantizerSpec,
                     learnable_threshold: bool, binarize: bool, init: str, in_features: int, spatial: bool) -> None:
        self.binarize = binarize  # False: the real-valued twin, whatever the stage says
        if choose("model.binary_init", init, WEIGHT_INITS) == "small_positive":
            with torch.no_grad():  # Bi-Real's HardBinaryConv: U[0, 0.001), every sign +1 at first
                self.weight.uniform_(0, 1e-3)
        self.input_quantizer = build_input_quantizer(input_quantizer)
        self.weight_quantizer = build_quantizer(WEIGHT_QUANTIZERS, weight_quantizer)
        for quantizer in (self.input_quantizer, self.weight_quantizer):
            # A quantizer with learnable parameters sized to the layer (a scale per output
            # channel) makes them now, so the optimizer and the checkpoint see them.
            quantizer.attach(self)
        # ReActNet's RSign threshold (the official code's LearnableBias `move0`): a learnable
        # per-channel shift of the input, in every precision mode, so the layer holds it.
        shape = (1, in_features, 1, 1) if spatial else (1, in_features)
        self.threshold = nn.Parameter(torch.zeros(shape)) if learnable_threshold else None
        self.set_precision("binary", "binary")

    def set_precision(self, activations: str, weights: str) -> None:
        """Switch the layer to a stage's precision; a layer built with `binarize=False` stays real.

        Args:
            activations: one of `ACTIVATION_MODES`: `binary` applies the input quantizer, the
                others a precision mode.
            weights: `binary` applies the weight quantizer, `real` uses the latent weight.

        Raises:
            ValueError: a mode that is not among these.
        """
        if activations not in ACTIVATION_MODES or weights not in WEIGHT_MODES:
            raise ValueError(f"precision must be activations in {ACTIVATION_MODES} and weights in {WEIGHT_MODES}; "
                             f"got activations={activations!r}, weights={weights!r}")
        if not self.binarize:
            activations, weights = "real", "real"
        self.activations, self.weights = activations, weights

    @property
    def input_bits(self) -> int:
        """Bits per input value in the current mode: the input quantizer's `bits` if binary, else 32."""
        return self.input_quantizer.bits if self.activations == "binary" else 32

    @property
    def weight_bits(self) -> int:
        """Bits per weight in the current mode: the weight quantizer's `bits` if binary, else 32."""
        return self.weight_quantizer.bits if self.weights == "binary" else 32

    def quantized_weight(self) -> Tensor:
        """The weight the layer computes with in the current mode.

        Returns:
            The weight quantizer's output in `binary` mode, else the latent weight itself.
        """
        return self.weight_quantizer(self.weight) if self.weights == "binary" else self.weight

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the current mode makes it: shifted by the threshold (where the layer has
        one), then quantized (`binary`) or passed through the stage's precision mode.

        Args:
            x: the layer's input.

        Returns:
            The tensor the convolution or the linear map is applied to.
        """
        if self.threshold is not None:
            x = x + self.threshold
        return (self.input_quantizer if self.activations == "binary" else PRECISION_MODES[self.activations])(x)

    def output_scalers(self) -> list[Quantizer]:
        """The quantizers in use now that also scale the layer's output (XNOR-Net's K,
        XNOR-Net++'s spatial factors): those with `scales_output`, whose
        `output_scale(x, out, layer)` returns a tensor that broadcasts against the output.

        Returns:
            The input quantizer where the activations are binary, the weight quantizer where
                the weights are, among those that have the method; usually none.
        """
        return [q for q, active in ((self.input_quantizer, self.activations == "binary"),
                                    (self.weight_quantizer, self.weights == "binary"))
                if active and q.scales_output]

    def scale_output(self, x: Tensor, out: Tensor, scalers: list[Quantizer]) -> Tensor:
        """The output, computed without the bias, times each scaler's scale, plus the bias.

        Args:
            x: the layer's input (the threshold, where the layer has one, is added here).
            out: the convolution or linear map of the quantized input, without the bias.
            scalers: `output_scalers()`.

        Returns:
            The layer's output.
        """
        if self.threshold is not None:
            x = x + self.threshold
        for quantizer in scalers:
            scale = quantizer.output_scale(x, out, self)
            if scale is not None:
                out = out * scale
        return out if self.bias is None else out + self.bias.reshape(1, -1, *[1] * (out.dim() - 2))


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    """A conv layer whose input and weight are quantized as the stage's precision says (both
    binary until `set_precision` says otherwise).

    Where the input quantizer declares a fused form (`Quantizer.fused`), the sign and the
    convolution run as one autograd step that keeps less for the backward pass, with the same
    gradients; setting `fused_sign = False` runs them unfused.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: the side of the square kernel.
        stride: the convolution's stride.
        padding: zeros added on each side of the input.
        groups: the convolution's groups.
        bias: whether the layer adds a learnable bias.
        input_quantizer: the input's sign estimator: a name in `INPUT_QUANTIZERS`, a
            `{name: ..., <arguments>}` mapping or a `Quantizer`. A precision mode is refused: the
            stage sets those.
        weight_quantizer: the weight's binarizer, the same way from `WEIGHT_QUANTIZERS`.
        learnable_threshold: add ReActNet's learnable per-channel shift (RSign) to the input.
        binarize: False builds the real-valued twin, which stays real whatever it is set to.
        init: `default` (PyTorch's init) or `small_positive` (Bi-Real Net's U[0, 0.001): every
            sign +1 at first).
        pad_value: what the quantized input is padded with (larq's `pad_values`): 0, zeros as
            PyTorch pads; QuickNet's 1.0 pads the signs with +1, a value a binary engine holds.

    Raises:
        ValueError: an unknown quantizer name or init, or an argument the quantizer does not take;
            a `pad_value` with a quantizer that scales the output (XNOR-Net's K, whose box
            filter pads with zeros).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False, *, input_quantizer: QuantizerSpec = "ste_sign",
                 weight_quantizer: QuantizerSpec = "scaled_sign", learnable_threshold: bool = False,
                 binarize: bool = True, init: str = "default", pad_value: float = 0.0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self._init_binary(input_quantizer, weight_quantizer, learnable_threshold, binarize, init,
                          in_channels, spatial=True)
        # Non-zero: the layer pads its quantized input itself and convolves with no padding;
        # `padding` still says by how much, for the cost report and the export.
        self.pad_value = float(pad_value)
        if self.pad_value and any(q.scales_output for q in (self.input_quantizer, self.weight_quantizer)):
            raise ValueError(f"pad_value={pad_value} with a quantizer that scales the output (XNOR-Net's K, "
                             f"computed with zero padding) is not supported")
        # The sign and the conv run as one autograd step where the input quantizer declares a
        # fused form (sign_conv.py), which keeps less for the backward pass; False runs it unfused.
        self.fused_sign = True

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of the quantized input with the quantized weight.

        Args:
            x: an (N, in_channels, H, W) batch.

        Returns:
            The (N, out_channels, H', W') output.
        """
        scalers = self.output_scalers()
        bias = None if scalers else self.bias  # a scaled output takes the bias after the scale
        fused = FUSED_SIGN_CONVS.get(self.input_quantizer.fused) if self.fused_sign else None
        # A fused form computes sign(x): padding x with +-1 pads its signs with the same value.
        if self.activations == "binary" and fused is not None and self.pad_value in (0.0, 1.0, -1.0):
            shifted = x if self.threshold is None else x + self.threshold
            padding = self.padding
            if self.pad_value:
                shifted, padding = self._pad_input(shifted), (0, 0)
            conv = (self.stride, padding, self.dilation, self.groups)
            out = fused.apply(shifted, self.quantized_weight(), bias, *conv, self.input_quantizer)
        elif self.pad_value:
            out = F.conv2d(self._pad_input(self.quantize_input(x)), self.quantized_weight(), bias, self.stride, 0,
                           self.dilation, self.groups)
        else:
            out = self._conv_forward(self.quantize_input(x), self.quantized_weight(), bias)
        return self.scale_output(x, out, scalers) if scalers else out

    def _pad_input(self, x: Tensor) -> Tensor:  # by `padding` on each side, with `pad_value`
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), value=self.pad_value)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", pad_value={self.pad_value}" if self.pad_value else "")


class BinaryLinear(BinaryMixin, nn.Linear):
    """A linear layer whose input and weight are quantized as the stage's precision says (both
    binary until `set_precision` says otherwise): a binary classifier.

    Args:
        in_features: input features.
        out_features: output features.
        bias: whether the layer adds a learnable bias.
        input_quantizer: the input's sign estimator, as `BinaryConv2d` takes it.
        weight_quantizer: the weight's binarizer, as `BinaryConv2d` takes it.
        learnable_threshold: add a learnable per-feature shift to the input.
        binarize: False builds the real-valued twin.
        init: `default` or `small_positive`, as for `BinaryConv2d`.

    Raises:
        ValueError: an unknown quantizer name or init, or an argument the quantizer does not take.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 input_quantizer: QuantizerSpec = "ste_sign", weight_quantizer: QuantizerSpec = "scaled_sign",
                 learnable_threshold: bool = False, binarize: bool = True, init: str = "default") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_binary(input_quantizer, weight_quantizer, learnable_threshold, binarize, init,
                          in_features, spatial=False)

    def forward(self, x: Tensor) -> Tensor:
        """The quantized input times the quantized weight, plus the bias.

        Args:
            x: an (N, in_features) batch.

        Returns:
            The (N, out_features) output.
        """
        scalers = self.output_scalers()
        out = F.linear(self.quantize_input(x), self.quantized_weight(), None if scalers else self.bias)
        return self.scale_output(x, out, scalers) if scalers else out


def binary_layers(model: nn.Module) -> Iterator[tuple[str, BinaryMixin]]:
    """The binary layers of a model, in `named_modules` order.

    Args:
        model: any module.

    Yields:
        (name, layer) for each BinaryConv2d and BinaryLinear in it.
    """
    for name, module in model.named_modules():
        if isinstance(module, BinaryMixin):
            yield name, module


def set_precision(model: nn.Module, activations: str, weights: str) -> None:
    """Switch every binary layer of `model` to a stage's precision (`stage.activations`,
    `stage.weights`); a layer built with `binarize=False` stays real.

    Args:
        model: any module; its binary layers are switched in place.
        activations: one of `ACTIVATION_MODES`.
        weights: one of `WEIGHT_MODES`.

    Raises:
        ValueError: a mode that is not among these.
    """
    for _, layer in binary_layers(model):
        layer.set_precision(activations, weights)
