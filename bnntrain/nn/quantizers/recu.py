"""ReCU (Xu et al., "ReCU: Reviving the Dead Weights in Binary Neural Networks", ICCV 2021),
as the authors' code does it (z-hXu/ReCU, `imagenet/modules/binarized_modules.py`, the same
in `cifar/` and `imagenet_two-stage/`; the tau schedule is `cpt_tau` in `imagenet/main.py`).
BiBench's `bibench/models/layers/recu.py` is the same code.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, registered
from .estimators import MaskedSign, SurrogateSign
from .xnor import LearnedChannelScale

EPS = 1e-5  # the code's variance epsilon, for the weights and the activations


def recu_tau(progress: float, tau_min: float, tau_max: float) -> float:
    """The code's tau at `progress` = epoch / epochs: A e^progress + B, from tau_min at 0 to
    tau_max at 1 (A = (tau_max - tau_min) / (e - 1), B = tau_min - A).

    Args:
        progress: epoch / epochs.
        tau_min: tau at the first epoch.
        tau_max: tau where progress reaches 1.

    Returns:
        tau.
    """
    a = (tau_max - tau_min) / (math.e - 1)
    return a * math.exp(progress) + tau_min - a


def standardized(w: Tensor) -> Tensor:
    """The code's balanced weight: w minus its per-output-channel mean, divided by its
    per-channel standard deviation (unbiased, + 1e-5 under the root) over 2 sqrt(2).

    Args:
        w: the latent weight, (out, ...).

    Returns:
        A tensor of w's shape, differentiable in w.
    """
    dims = tuple(range(1, w.dim()))
    centred = w - w.mean(dims, keepdim=True)
    return centred / (torch.sqrt(centred.var(dims, keepdim=True) + EPS) / 2 / math.sqrt(2))


@registered(WEIGHT_QUANTIZERS, "recu")
class Recu(LearnedChannelScale):
    """ReCU's weights: alpha sign(clamp(w', -Q, Q)), w' the standardised weight (above),
    Q = -mean(|w'|) log(2 - 2 tau) over the whole layer (held constant), alpha a learnable
    scale per output channel, initialised U[0, 1) as the code's `torch.rand`.

    The gradient is the code's: the sign passes g unchanged (`BinaryQuantize`), the clamp
    where -Q < w' < Q (torch.clamp's gradient), then through the standardisation. The code
    multiplies the conv's output by alpha; alpha times the binary weight is the same product.
    tau follows `recu_tau` over the stage (`set_progress`); it starts at tau_min. It changes
    only the gradient (Q > 0 keeps every sign), so it is not saved: the loop sets it each epoch.

    The signs are those of w minus its channel mean (times alpha's sign: alpha may turn
    negative), one magnitude |alpha| per output channel: the export keeps exactly that.

    Args:
        tau_min: tau at the stage's first epoch (the code's default, 0.85).
        tau_max: tau as the stage ends (0.99).

    Raises:
        ValueError: taus outside 0.5 < tau_min <= tau_max < 1 (Q would be 0 or infinite).
    """

    packable = True  # +-|alpha| per output channel, whatever signs

    def __init__(self, tau_min: float = 0.85, tau_max: float = 0.99) -> None:
        super().__init__()
        if not 0.5 < tau_min <= tau_max < 1:
            raise ValueError(f"recu needs 0.5 < tau_min <= tau_max < 1; got tau_min={tau_min}, tau_max={tau_max}")
        self.tau_min, self.tau_max = tau_min, tau_max
        self.tau = tau_min

    def arguments(self) -> dict[str, Any]:
        return {"tau_min": self.tau_min, "tau_max": self.tau_max}

    def set_progress(self, progress: float) -> None:
        self.tau = recu_tau(progress, self.tau_min, self.tau_max)

    def initial_scale(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.rand(shape, dtype=like.dtype, device=like.device)

    def forward(self, w: Tensor) -> Tensor:
        balanced = standardized(w)
        # Q as a tensor, not the code's `.item()`: the same value without a device sync.
        bound = -balanced.detach().abs().mean() * math.log(2 - 2 * self.tau)
        return MaskedSign.apply(balanced, lambda b: b.abs() < bound) * self.scale_for(w)


def approx_sign_gradient(x: Tensor, grad: Tensor) -> Tensor:
    """The code's `BinaryQuantize_a` backward: g (2 - |2x|), clamped at 0.

    Args:
        x: the sign's input.
        grad: the gradient with respect to its output.

    Returns:
        The gradient with respect to x.
    """
    return (2 - (2 * x).abs()).clamp(min=0) * grad


@registered(INPUT_QUANTIZERS, "recu_sign")
class RecuSign(Quantizer):
    """ReCU's activations: sign(x / s) = sign(x), s = sqrt(var(x) + 1e-5) over each sample's
    channels, height and width (unbiased), in training only (the code's `a0`); the gradient
    g (2 - |2 x/s|) clamped at 0 (`BinaryQuantize_a`, Bi-Real's ApproxSign) at x/s, then
    through the division by s. In eval mode s = 1. The gradient needs the whole sample's
    statistics: no fused form."""

    packable = True  # the forward is sign(x): s > 0 keeps every sign bit

    def values(self, x: Tensor) -> Tensor:
        return torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            dims = tuple(range(1, x.dim()))
            x = x / torch.sqrt(x.var(dims, keepdim=True) + EPS)
        return SurrogateSign.apply(x, approx_sign_gradient)

