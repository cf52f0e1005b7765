"""FDA's noise adaptation (Xu et al., "Learning Frequency Domain Approximation for Binary
Neural Networks", NeurIPS 2021), as BiBench re-implements it (htqin/BiBench,
`bibench/models/layers/fda.py`: `NoiseAdaption`, `NoiseAdaption_a`, `FDAConv2d`; the authors
released evaluation code only, whose network has no such module). During training a binary
layer's binary input and weight each get a learnt correction alpha e(x), alpha decaying to 0
over the stage; FDA's sign gradient is `bnntrain.nn.quantizers.fda`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NoiseAdaptation(nn.Module):
    """FDA's noise-adaptation module e(x): a bottleneck of two bias-free linear maps with a
    ReLU between them, size -> size // reduction -> size, plus 0.1 sin(x) (BiBench's
    `NoiseAdaption` and `NoiseAdaption_a`). Where size // reduction is 0 the bottleneck is
    empty and e(x) = 0.1 sin(x): BiBench builds a zero-width `nn.Linear` there, which PyTorch
    accepts (so its `except` fallback to a reduction of 4 does not run) and which outputs 0.

    Args:
        size: the features the maps act on.
        reduction: the bottleneck's reduction (BiBench's k = 64).
        flatten: True maps each sample's (each output channel's, for a weight) whole tensor,
            flattened (`NoiseAdaption`, BiBench's weights); False maps dimension 1 at each
            position (`NoiseAdaption_a`, BiBench's activations: the channels of each pixel).
    """

    def __init__(self, size: int, reduction: int = 64, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        hidden = size // reduction
        self.fc1 = nn.Linear(size, hidden, bias=False) if hidden else None
        self.fc2 = nn.Linear(hidden, size, bias=False) if hidden else None

    def forward(self, x: Tensor) -> Tensor:
        """e(x).

        Args:
            x: (N, size, ...) with `flatten` False, (N, ...) of size features per sample with
                `flatten` True.

        Returns:
            A tensor of x's shape.
        """
        sine = 0.1 * torch.sin(x)
        if self.fc1 is None:
            return sine
        rows = x.flatten(1) if self.flatten else x.movedim(1, -1)
        mapped = self.fc2(F.relu(self.fc1(rows)))
        return (mapped.reshape(x.shape) if self.flatten else mapped.movedim(-1, 1)) + sine


def noise_alpha(progress: float, alpha_max: float = 0.1) -> float:
    """The noise's weight alpha at a point of training: alpha_max / 2 (1 + cos(pi progress)),
    BiBench's `0.05 * (1 + cos(pi t))` for alpha_max = 0.1.

    Args:
        progress: where the cosine is read: 0 gives alpha_max, 1 gives 0.
        alpha_max: alpha at progress 0.

    Returns:
        alpha.
    """
    return alpha_max / 2 * (1 + math.cos(math.pi * progress))


class FdaNoise(nn.Module):
    """The noise-adaptation of one binary layer: during training its binary input and binary
    weight become sign(x) + alpha e_x(x) and (sign(w) + alpha e_w(w)) s, s the weight's scale
    (BiBench's `FDAConv2d.forward`). e_x maps the input's channels at each position, e_w each
    output channel's flattened weights (`NoiseAdaptation`). alpha follows `noise_alpha` over
    the stage (`set_progress`, which the training loop calls on every module that has it).

    BiBench reads the cosine at the epoch's end, (epoch + 1) / epochs, so that its last epoch
    trains with alpha = 0; the training loop gives the epoch's start, epoch / epochs: here alpha
    is BiBench's of the epoch before (0.1 in the first epoch, alpha_max / 2 (1 - cos(pi /
    epochs)) rather than 0 in the last). BiBench makes e_x at the layer's first forward pass,
    after its optimizer is built; here the layer makes both at once, and both train.

    Args:
        weight_shape: the layer's weight shape, (out, ...).
        in_features: the layer's input channels (a conv) or features (a linear layer).
        reduction: the bottleneck's reduction (64).
        alpha_max: alpha at the stage's start (0.1).
    """

    def __init__(self, weight_shape: Sequence[int], in_features: int, reduction: int = 64,
                 alpha_max: float = 0.1) -> None:
        super().__init__()
        self.weight_noise = NoiseAdaptation(math.prod(weight_shape[1:]), reduction, flatten=True)
        self.input_noise = NoiseAdaptation(in_features, reduction, flatten=False)
        self.alpha_max = alpha_max
        self.alpha = alpha_max  # BiBench's initial `alpha` buffer

    @classmethod
    def for_layer(cls, layer: nn.Module, reduction: int = 64, alpha_max: float = 0.1) -> "FdaNoise":
        """The module for a BinaryConv2d or BinaryLinear (or any conv or linear layer).

        Args:
            layer: the layer whose input and weight it acts on.
            reduction: the bottleneck's reduction.
            alpha_max: alpha at the stage's start.

        Returns:
            A new FdaNoise sized to the layer, in its weight's dtype and device.
        """
        features = layer.in_channels if hasattr(layer, "in_channels") else layer.in_features
        noise = cls(tuple(layer.weight.shape), features, reduction, alpha_max)
        return noise.to(dtype=layer.weight.dtype, device=layer.weight.device)

    def set_progress(self, progress: float) -> None:
        """Move alpha to `progress` (epoch / epochs).

        Args:
            progress: 0 at the stage's first epoch, towards 1 at its last.
        """
        self.alpha = noise_alpha(progress, self.alpha_max)

    def noisy_input(self, x: Tensor, binary: Tensor) -> Tensor:
        """binary + alpha e_x(x).

        Args:
            x: the input quantizer's input (after the layer's threshold, where it has one).
            binary: the input quantizer's output, sign(x).

        Returns:
            The tensor the layer convolves in place of `binary`.
        """
        return binary + self.alpha * self.input_noise(x)

    def noisy_weight(self, w: Tensor, binary: Tensor, scale: Tensor) -> Tensor:
        """binary + alpha e_w(w) s.

        Args:
            w: the latent weight.
            binary: the weight quantizer's output, sign(w) s.
            scale: s, the weight quantizer's scale (`bnntrain.nn.quantizers.fda.FdaWeight.scale`).

        Returns:
            The weight the layer uses in place of `binary`.
        """
        return binary + self.alpha * self.weight_noise(w) * scale

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4g}"
