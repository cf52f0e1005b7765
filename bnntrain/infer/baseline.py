"""The baseline `bnntrain.infer` is measured against: the packed file's network with every
binary layer a float convolution in PyTorch (oneDNN), its weights pre-scaled."""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from ..tools.export import inference, packed
from .runtime import _swap


class FloatBinaryConv2d(nn.Module):
    """The baseline: an InferenceBinaryLayer as float convolution with its weight x scale
    computed once (the export's module multiplies them on every call).

    Args:
        layer: the inference layer to run.
    """

    def __init__(self, layer: inference.InferenceBinaryLayer) -> None:
        super().__init__()
        self.layer = layer
        weight = layer.weight if layer.scale is None else layer.weight * layer.scale
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        if layer.threshold is not None:
            x = x + layer.threshold
        x = inference.INPUT_FUNCTIONS[layer.activations](x)
        if layer.conv is None:
            return F.linear(x, self.weight, layer.bias)
        return F.conv2d(x, self.weight, layer.bias, **layer.conv)


def float_model(path: str | Path) -> nn.Module:
    """The packed file's model with every binary layer a float convolution in PyTorch
    (oneDNN), weights pre-scaled: the baseline the benchmarks compare with.

    Args:
        path: the packed file.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: the file is not a readable packed file.
    """
    model = packed.load(path)
    _swap(model, lambda name, layer: FloatBinaryConv2d(layer))
    return model
