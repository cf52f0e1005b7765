"""IR-Net (Qin et al., "Forward and Backward Information Retention for Accurate Binary Neural
Networks", CVPR 2020), as its authors' code computes it (github.com/htqin/IR-Net, the same in
every network: `CIFAR-10/ResNet20/1w1a/modules/ir_1w1a.py` and `binaryfunction.py`, and the
ResNet-18, VGG-Small and ImageNet ResNet-18/34 copies):

- EDE, the error decay estimator: sign(x) whose gradient is k t (1 - tanh(t x)^2) g, with t
  rising over training from t_min to t_max on a log scale and k = max(1/t, 1)
  (`CIFAR-10/ResNet20/1w1a/trainer.py`, `Log_UP`); their code applies it to the activations
  and to the weights alike;
- Libra-PB, the weights: each output channel's weights centred and divided by their standard
  deviation, binarized with EDE, times 2^round(log2(mean |standardised w|)) per output channel.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, registered
from .estimators import SurrogateSign, SurrogateSignEstimator


def ede_schedule(progress: float, t_min: float, t_max: float) -> tuple[float, float]:
    """EDE's t and k at a point of training, as the authors' `Log_UP` computes them per epoch.

    Args:
        progress: epoch / epochs (the epoch counted from 0): 0 at the first epoch.
        t_min: t at the first epoch.
        t_max: the t that training approaches (reached only at progress 1).

    Returns:
        (t, k): t = 10^(log10 t_min + progress (log10 t_max - log10 t_min)), k = max(1/t, 1).
    """
    low, high = math.log10(t_min), math.log10(t_max)
    t = 10 ** (low + (high - low) * progress)
    return t, (1 / t if t < 1 else 1.0)  # their `k = 1 / t if t < 1 else 1`


class ErrorDecay:
    """EDE's state: t and k for the current epoch, and the gradient they give. A plain object,
    not a module: t and k follow the epoch, which the training loop sets again at every epoch's
    start (a resumed run included), so they are not saved.

    Args:
        t_min: t at the first epoch.
        t_max: the t that training approaches.
    """

    def __init__(self, t_min: float, t_max: float) -> None:
        self.t_min, self.t_max = t_min, t_max
        self.set_progress(0.0)

    def set_progress(self, progress: float) -> None:
        """Move t and k to `progress` (epoch / epochs).

        Args:
            progress: 0 at the first epoch, towards 1 at the last.
        """
        self.t, self.k = ede_schedule(progress, self.t_min, self.t_max)

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        """k t (1 - tanh(t x)^2) g: the derivative of k tanh(t x).

        Args:
            x: the binarized tensor.
            grad: the gradient with respect to sign(x).
            signs: unused (the formula needs x itself).

        Returns:
            The gradient with respect to x.
        """
        return torch.tanh(x * self.t).square_().neg_().add_(1).mul_(self.k * self.t).mul_(grad)


class ErrorDecayQuantizer(Quantizer):
    """A quantizer whose gradient is EDE's: it holds the schedule and follows the training loop.

    Args:
        t_min: t at the first epoch.
        t_max: the t that training approaches.
    """

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0) -> None:
        super().__init__()
        self.ede = ErrorDecay(t_min, t_max)

    def arguments(self) -> dict[str, Any]:
        return {"t_min": self.ede.t_min, "t_max": self.ede.t_max}

    def set_progress(self, progress: float) -> None:
        self.ede.set_progress(progress)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, t={self.ede.t:.4g}, k={self.ede.k:.4g}"


@registered(INPUT_QUANTIZERS, "ede_sign")
class EdeSign(ErrorDecayQuantizer, SurrogateSignEstimator):
    """IR-Net's activations: sign(x) with EDE's gradient k t (1 - tanh(t x)^2) g. t starts at
    t_min (k = 1/t_min: close to the identity's gradient) and rises to t_max (k = 1: close
    to the sign's). sign(0) is +1 here; their `torch.sign` gives 0 at 0, the only difference.

    Defaults: t_min = 0.1, t_max = 10, the paper's, the module's initial `t = 0.1, k = 10` and
    the 1w32a and VGG-Small trainers' (`CIFAR-10/VGG-Small/main.py`); their ResNet-20 1w1a
    trainer uses t_min = 1e-3 (`CIFAR-10/ResNet20/1w1a/trainer.py`).

    Args:
        t_min: t at the first epoch.
        t_max: the t that training approaches.
    """

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        return self.ede.gradient(x, grad)


def _per_channel(values: Tensor, w: Tensor) -> Tensor:
    return values.view(-1, *[1] * (w.dim() - 1))


def libra_balance(w: Tensor) -> Tensor:
    """Libra-PB's balanced weights: per output channel, w minus its mean, divided by the
    standard deviation (Bessel-corrected, as `Tensor.std`). The gradient flows through both.

    Args:
        w: a weight whose first dimension is the output channels.

    Returns:
        The standardised weight, of w's shape.
    """
    centred = w - _per_channel(w.flatten(1).mean(-1), w)
    return centred / _per_channel(centred.flatten(1).std(-1), w)


def power_of_two_scale(balanced: Tensor) -> Tensor:
    """Libra-PB's scale: 2^round(log2(mean |balanced|)) per output channel, detached. For
    standardised weights mean |w| lies below 1 and, for a bell-shaped channel, above 2^-0.5,
    so the scale is 1 for most channels and 1/2 for a heavy-tailed one.

    Args:
        balanced: the standardised weight (`libra_balance`).

    Returns:
        A power of two per output channel, shaped to broadcast against the weight.
    """
    exponent = torch.round(torch.log(balanced.detach().abs().flatten(1).mean(-1)) / math.log(2))
    return _per_channel(torch.pow(2.0, exponent), balanced)


@registered(WEIGHT_QUANTIZERS, "irnet_libra_pb")
class LibraPB(ErrorDecayQuantizer):
    """IR-Net's weights (Libra-PB): sign(standardised w) with EDE's gradient, times a power
    of two per output channel (`libra_balance`, `power_of_two_scale`). The gradient flows
    through the standardisation, whose mean and standard deviation are not detached. sign(0)
    is +1 here; their `torch.sign` gives 0, which a standardised weight hardly ever is.

    Its signs are those of w minus its channel's mean, not of w; the export keeps the signs of
    the quantized weight and its one magnitude per output channel, so it packs exactly.

    Args:
        t_min: EDE's t at the first epoch (IR-Net applies the activations' schedule here too).
        t_max: the t that training approaches.
    """

    channel_scaled = True
    packable = True

    def values(self, w: Tensor) -> Tensor:
        scale = power_of_two_scale(libra_balance(w.detach())).unsqueeze(-1)
        return torch.cat([-scale, scale], dim=-1)

    def forward(self, w: Tensor) -> Tensor:
        balanced = libra_balance(w)
        return SurrogateSign.apply(balanced, self.ede.gradient) * power_of_two_scale(balanced)
