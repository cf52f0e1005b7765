"""DoReFa-Net's 1-bit weights (Zhou et al., 2016), as tensorpack's `examples/DoReFa-Net/dorefa.py`
computes them (`get_dorefa(bitW=1, ...)`'s `fw`, the authors' code): sign(w) times the mean
|w| of the whole layer, with the identity as the gradient of the sign."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import WEIGHT_QUANTIZERS, Quantizer, registered


def layer_scale(w: Tensor) -> Tensor:
    """E, the mean |w| over the whole weight, detached (their `stop_gradient(reduce_mean(abs(x)))`).

    Args:
        w: the latent weight.

    Returns:
        A 0-dimensional tensor.
    """
    return w.detach().abs().mean()


class LayerScaledSign(torch.autograd.Function):
    """E sign(w) forward; g itself backward (their `custom_gradient`: `lambda dy: dy`)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        return torch.copysign(layer_scale(w), w)  # E with w's sign bit: +E at w = 0, as theirs

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


@registered(WEIGHT_QUANTIZERS, "dorefa_sign")
class DoReFaSign(Quantizer):
    """DoReFa-Net's 1-bit weights: E sign(w), E the mean |w| of the whole layer (held
    constant), and the unclipped straight-through gradient: g everywhere, not scaled by E.
    sign(0) is +1, as in their code (`where(x == 0, 1, sign(x / E))`).

    One scale for the layer is one per output channel with all channels equal: the packed
    export keeps it beside the signs. (BiBench's `DoReFaConv2d` differs: a per-channel mean
    |w| and the gradient clipped at |w| < 1, which is `scaled_sign` with `gradient: unscaled`.)
    """

    channel_scaled = True
    packable = True  # sign(w)'s signs times one magnitude

    def values(self, w: Tensor) -> Tensor:
        scale = layer_scale(w)
        return torch.stack([-scale, scale])

    def forward(self, w: Tensor) -> Tensor:
        return LayerScaledSign.apply(w)
