"""Binary conv and linear layers whose quantizers are switched at run time.

Stage 1 (binary activations, real weights, or the reverse) and stage 2 (both binary)
run the same module tree, so a stage-1 checkpoint loads into stage 2 key for key.
`set_precision` flips a layer between the modes; nothing about it is saved in the
state dict.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .quantizers import PRECISION_MODES, SIGN_ESTIMATORS, binarize_weight, surrogate_grad
from .sign_conv import SignConv2d, SurrogateSignConv2d

ACTIVATION_MODES = ("binary", *PRECISION_MODES)
WEIGHT_INITS = ("default", "small_positive")  # PyTorch's conv/linear init, or Bi-Real's U[0, 0.001)
WEIGHT_MODES = ("binary", "real")


class BinaryMixin:
    """Shared by BinaryConv2d and BinaryLinear: which quantizers apply right now."""

    def _init_binary(self, quantizer: str, quantizer_args: dict | None, weight_scale: bool,
                     learnable_threshold: bool, binarize: bool, in_features: int, spatial: bool,
                     weight_gradient: str = "scaled", init: str = "default") -> None:
        self.binarize = binarize  # False: the real-valued twin, whatever the stage says
        self.quantizer = quantizer
        self.weight_scale, self.weight_gradient = weight_scale, weight_gradient
        if init not in WEIGHT_INITS:
            raise ConfigError(f"unknown model.binary_init '{init}'; expected one of: {', '.join(WEIGHT_INITS)}")
        if init == "small_positive":  # Bi-Real's HardBinaryConv: U[0, 0.001), every sign +1 at first
            with torch.no_grad():
                self.weight.uniform_(0, 1e-3)
        if quantizer in PRECISION_MODES:
            raise ConfigError(f"model.quantizer={quantizer} is a precision mode, which the stage sets "
                              f"(stage.activations={quantizer}); model.quantizer is a sign estimator, one of: "
                              f"{', '.join(SIGN_ESTIMATORS.names())}")
        self._binary_act = SIGN_ESTIMATORS.get(quantizer)(**(quantizer_args or {}))
        # ReActNet's RSign: a learnable per-channel threshold in front of the sign.
        shape = (1, in_features, 1, 1) if spatial else (1, in_features)
        self.threshold = nn.Parameter(torch.zeros(shape)) if learnable_threshold else None
        self.set_precision("binary", "binary")

    def set_precision(self, activations: str, weights: str) -> None:
        if activations not in ACTIVATION_MODES or weights not in WEIGHT_MODES:
            raise ConfigError(f"precision must be activations in {ACTIVATION_MODES} and weights in {WEIGHT_MODES}; "
                              f"got activations={activations!r}, weights={weights!r}")
        if not self.binarize:
            activations, weights = "real", "real"
        self.activations, self.weights = activations, weights
        self._input_quantizer = self._binary_act if activations == "binary" else PRECISION_MODES[activations]

    @property
    def input_bits(self) -> int:
        return 1 if self.activations == "binary" else 32

    @property
    def weight_bits(self) -> int:
        return 1 if self.weights == "binary" else 32

    def quantized_weight(self) -> Tensor:
        if self.weights != "binary":
            return self.weight
        return binarize_weight(self.weight, self.weight_scale, self.weight_gradient)

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.threshold is not None:
            x = x + self.threshold
        return self._input_quantizer(x)


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = False, *, quantizer: str = "ste_sign",
                 quantizer_args: dict | None = None, weight_scale: bool = True,
                 learnable_threshold: bool = False, binarize: bool = True, weight_gradient: str = "scaled",
                 init: str = "default") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self._init_binary(quantizer, quantizer_args, weight_scale, learnable_threshold, binarize,
                          in_channels, spatial=True, weight_gradient=weight_gradient, init=init)
        # The sign and the conv run as one autograd step (sign_conv.py), which keeps less for
        # the backward pass: the straight-through sign one byte per input element (its mask and
        # sign bit), the others x alone, not x and the +-1 tensor besides.
        self.fused_sign = True
        self._surrogate = surrogate_grad(quantizer, quantizer_args or {})

    def forward(self, x: Tensor) -> Tensor:
        if self.activations == "binary" and self.fused_sign:
            if self.threshold is not None:
                x = x + self.threshold
            conv = (self.stride, self.padding, self.dilation, self.groups)
            if self._surrogate is None:
                return SignConv2d.apply(x, self.quantized_weight(), self.bias, *conv)
            return SurrogateSignConv2d.apply(x, self.quantized_weight(), self.bias, *conv, self._surrogate)
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class BinaryLinear(BinaryMixin, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quantizer: str = "ste_sign",
                 quantizer_args: dict | None = None, weight_scale: bool = True,
                 learnable_threshold: bool = False, binarize: bool = True, weight_gradient: str = "scaled",
                 init: str = "default") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_binary(quantizer, quantizer_args, weight_scale, learnable_threshold, binarize,
                          in_features, spatial=False, weight_gradient=weight_gradient, init=init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


def binary_layers(model: nn.Module) -> Iterator[tuple[str, BinaryMixin]]:
    for name, module in model.named_modules():
        if isinstance(module, BinaryMixin):
            yield name, module


def set_precision(model: nn.Module, activations: str, weights: str) -> None:
    """Switch every binary layer of `model` to a stage's precision (see stage configs)."""
    for _, layer in binary_layers(model):
        layer.set_precision(activations, weights)
