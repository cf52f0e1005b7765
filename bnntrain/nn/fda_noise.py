"""FDA's noise adaptation (Xu et al., "Learning Frequency Domain Approximation for Binary
Neural Networks", NeurIPS 2021), as BiBench re-implements it (htqin/BiBench,
`bibench/models/layers/fda.py`: `NoiseAdaption`, `NoiseAdaption_a`, `FDAConv2d`; the authors
released evaluation code only, whose network has no such module). During training a binary
layer's binary input and weight each get a learnt correction alpha e(x), alpha decaying to 0
over the stage. The FDA quantizers hold it (`bnntrain.nn.quantizers.fda`, `noise: true`).
"""
from __future__ import annotations

import math

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
