"""AdaBin (Tu et al., "AdaBin: Improving Binary Neural Networks with Adaptive Binary Sets",
ECCV 2022), as the authors' code computes it (huawei-noah/Efficient-Computing,
`BinaryNetworks/AdaBin/cifar10/utils/binarylib.py`, `BinaryActivation` and `AdaBin_Conv2d`;
the ImageNet copy `imagenet/utils/binarylib.py` is the same code; the weights' schedule is
`Log_UP` in `cifar10/utils/utils.py` and `imagenet/main.py`). Each layer binarizes to its own
pair of values instead of -1 and +1: a learnt pair for the activations, a per-output-channel
pair from the weights' mean and standard deviation. Its non-linearity is `bnntrain.nn.maxout`.

Neither is what the packed export computes (+-1 times a per-channel scale): a conv of AdaBin's
activations and weights is a +-1 conv plus a conv of the signs with an all-ones kernel and
per-channel constants (and, with zero padding, a correction at the borders), which the export
does not build.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, registered
from .estimators import SurrogateSign
from .irnet import ErrorDecayQuantizer


def approx_sign_gradient(x: Tensor, grad: Tensor) -> Tensor:
    """Bi-Real Net's ApproxSign gradient, which AdaBin's activations use: g (2 - 2|x|) where
    |x| < 1, else 0 (their piecewise polynomial's derivative: 2 + 2x below 0, 2 - 2x above).

    Args:
        x: the tensor whose sign is taken.
        grad: the gradient with respect to sign(x).

    Returns:
        The gradient with respect to x.
    """
    return x.abs().mul(-2).add_(2).clamp_(min=0).mul_(grad)


@registered(INPUT_QUANTIZERS, "adabin_sign")
class AdaBinSign(Quantizer):
    """AdaBin's activations: alpha (sign((x - beta) / alpha) + beta), with two learnt scalars
    per layer, alpha and beta (their `BinaryActivation`: `alpha_a * (x + beta_a)` of the
    signs). The values are alpha (beta - 1) and alpha (beta + 1): the centre of the pair is
    alpha beta, while the sign's threshold is beta itself.

    The sign's gradient is Bi-Real Net's ApproxSign of (x - beta) / alpha (their
    `gradient_approx`); autograd carries it through the division and on to alpha and beta,
    as their code does: dx = g A, dbeta = g (alpha - A), dalpha = g (s + beta - A (x - beta)
    / alpha), A = max(2 - 2|x - beta| / |alpha|, 0), s the sign. sign(0) is +1 here; their
    `torch.sign` gives 0 where x equals beta exactly.

    With learnt parameters and a shifted threshold, its sign is not that of x: it has no fused
    form, and the export refuses it.

    Args:
        alpha: alpha's initial value (their code's 1).
        beta: beta's initial value (their code's 0).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0) -> None:
        super().__init__()
        self.alpha_init, self.beta_init = alpha, beta
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha_init, "beta": self.beta_init}

    def values(self, x: Tensor) -> Tensor:
        signs = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)
        return self.alpha.detach() * (signs + self.beta.detach())  # as forward computes them

    def forward(self, x: Tensor) -> Tensor:
        signs = SurrogateSign.apply((x - self.beta) / self.alpha, approx_sign_gradient)
        return self.alpha * (signs + self.beta)


def centre_and_spread(w: Tensor) -> tuple[Tensor, Tensor]:
    """AdaBin's per-output-channel centre and distance of the weights: the mean, and the root
    mean square of w minus the mean (the standard deviation without Bessel's correction, their
    `sqrt(sum((w - beta_w)^2) / filter_size)`). Not detached: the gradient flows through both.

    Args:
        w: a weight whose first dimension is the output channels.

    Returns:
        (beta_w, alpha_w), each (out, 1, ...), broadcasting against w.
    """
    dims = tuple(range(1, w.dim()))
    beta = w.mean(dims, keepdim=True)
    alpha = torch.sqrt((w - beta).square().sum(dims, keepdim=True) / math.prod(w.shape[1:]))
    return beta, alpha


@registered(WEIGHT_QUANTIZERS, "adabin")
class AdaBinWeight(ErrorDecayQuantizer):
    """AdaBin's weights: per output channel, alpha_w sign((w - beta_w) / alpha_w) + beta_w,
    beta_w the channel's mean and alpha_w its standard deviation (`centre_and_spread`): the
    values beta_w -+ alpha_w. Neither is detached, as in their `AdaBin_Conv2d`.

    The sign's gradient is IR-Net's EDE, k t (1 - tanh(t u)^2) g at u = (w - beta_w) /
    alpha_w, with their schedule: t from t_min = 1e-3 at the first epoch towards t_max = 10
    on a log scale and k = max(1/t, 1) (`Log_UP`, which both their CIFAR-10 script with
    `--progressive`, as its train.sh runs it, and their ImageNet script apply before each
    epoch). sign(0) is +1 here; their `torch.sign` gives 0 where w equals its channel mean.

    Their `filter_size` is kh kw in_channels; here it is the weight's size per output
    channel, the same for an ungrouped conv (theirs has no groups) and defined for a linear
    layer too.

    The signs are those of w minus its channel mean, and the values are not +-(a scale): the
    export refuses it.

    Args:
        t_min: EDE's t at the stage's first epoch.
        t_max: the t that training approaches.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 10.0) -> None:  # their Log_UP's t_min
        super().__init__(t_min, t_max)

    def values(self, w: Tensor) -> Tensor:
        beta, alpha = centre_and_spread(w.detach())
        return torch.stack([-alpha + beta, alpha + beta], dim=-1)  # as forward computes them

    def forward(self, w: Tensor) -> Tensor:
        beta, alpha = centre_and_spread(w)
        signs = SurrogateSign.apply((w - beta) / alpha, self.ede.gradient)
        return signs * alpha + beta

    @torch.no_grad()
    def weight_signs(self, w: Tensor) -> Tensor:
        """Which of its two values each weight takes: the sign of w - beta_w, not of the value."""
        beta, alpha = centre_and_spread(w)
        return ~torch.signbit((w - beta) / alpha)
