"""FDA (Xu et al., "Learning Frequency Domain Approximation for Binary Neural Networks",
NeurIPS 2021). The authors released evaluation code only (MindSpore, mindspore-ai/models,
`research/cv/FDA-BNN/src/quan.py`: sign(x) for the activations, sign(w) times the layer's mean
|w| for the weights, no noise module). The training side follows BiBench's re-implementation
(htqin/BiBench, `bibench/models/layers/fda.py`, `FDA_BinaryQuantize`, `NoiseAdaption`,
`NoiseAdaption_a`, `FDAConv2d`):

- the sign's gradient is the derivative of the first n + 1 terms of the sign's Fourier series,
  4 omega / pi sum_{i=0..n} cos((2i + 1) omega x), 0 where |x| > 1, for the activations and
  the weights alike; n rises from 9 to 17 over training;
- a noise-adaptation module per layer (`bnntrain.nn.fda_noise`) adds alpha e(x) to the
  binary activations and weights during training, alpha decaying from 0.1 to 0 on a cosine.
  It is gone from the network they deploy, and it is not part of these quantizers.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...registry import choose
from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, registered
from .estimators import SurrogateSign, SurrogateSignEstimator

FDA_SCALES = ("layer", "channel")


def fourier_terms(progress: float, n_min: int, n_max: int) -> int:
    """The series' last index n at a point of training, as BiBench's `model_params_update`
    sets it before each epoch: `9 + int(epoch / max_epochs * 9)` for n_min = 9, n_max = 18.

    Args:
        progress: epoch / epochs, 0 at the first epoch.
        n_min: n at the first epoch.
        n_max: the n that training approaches (reached only at progress 1).

    Returns:
        n_min + int(progress (n_max - n_min)).
    """
    return n_min + int(progress * (n_max - n_min))


def fourier_sign_gradient(x: Tensor, grad: Tensor, n: int, omega: float) -> Tensor:
    """FDA's gradient of sign(x): g 4 omega / pi sum_{i=0..n} cos((2i + 1) omega x) where
    |x| <= 1, else 0: the derivative of the sign's Fourier series (period 2 pi / omega) cut
    after n + 1 terms, summed term by term in the order BiBench sums them.

    Args:
        x: the binarized tensor.
        grad: the gradient with respect to sign(x).
        n: the last index of the series.
        omega: the series' base frequency.

    Returns:
        The gradient with respect to x.
    """
    total = torch.cos(x * omega)
    for i in range(1, n + 1):
        total.add_(torch.cos(x * ((2 * i + 1) * omega)))
    return total.mul_(4 * omega / math.pi).mul_(grad).masked_fill_(x.abs() > 1, 0)


class FourierQuantizer(Quantizer):
    """A quantizer whose gradient is FDA's: it holds the series and follows the training loop.
    n follows the epoch, which the loop sets again at every epoch's start (a resumed run
    included), so it is not saved.

    Args:
        omega: the series' base frequency (BiBench's 0.1).
        n_min: n at the first epoch (BiBench's 9).
        n_max: the n that training approaches (BiBench's 9 + 9).

    Raises:
        ValueError: n_min < 0 or n_max < n_min.
    """

    def __init__(self, omega: float = 0.1, n_min: int = 9, n_max: int = 18) -> None:
        super().__init__()
        if not 0 <= n_min <= n_max:
            raise ValueError(f"fda needs 0 <= n_min <= n_max; got n_min={n_min}, n_max={n_max}")
        self.omega, self.n_min, self.n_max = omega, n_min, n_max
        self.set_progress(0.0)

    def arguments(self) -> dict[str, Any]:
        return {"omega": self.omega, "n_min": self.n_min, "n_max": self.n_max}

    def set_progress(self, progress: float) -> None:
        self.n = fourier_terms(progress, self.n_min, self.n_max)

    def sign_gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        """`fourier_sign_gradient` with the current n.

        Args:
            x: the binarized tensor.
            grad: the gradient with respect to sign(x).
            signs: unused (the formula needs x itself).

        Returns:
            The gradient with respect to x.
        """
        return fourier_sign_gradient(x, grad, self.n, self.omega)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}"


@registered(INPUT_QUANTIZERS, "fda_sign")
class FdaSign(FourierQuantizer, SurrogateSignEstimator):
    """FDA's activations: sign(x), with the gradient of the sign's Fourier series cut after
    n + 1 terms (`fourier_sign_gradient`), 0 where |x| > 1; n = n_min + int(progress (n_max -
    n_min)), 9 to 17 with the defaults. sign(0) is +1 here; BiBench's `torch.sign` gives 0.
    The noise-adaptation term is not part of it (`bnntrain.nn.fda_noise.FdaNoise`).

    Args:
        omega: the series' base frequency.
        n_min: n at the first epoch.
        n_max: the n that training approaches.
    """

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        return self.sign_gradient(x, grad)


@registered(WEIGHT_QUANTIZERS, "fda")
class FdaWeight(FourierQuantizer):
    """FDA's weights: sign(w) times the mean |w|, held constant, with the Fourier gradient
    (`fourier_sign_gradient`) times that scale. The scale is `layer`, one mean over the whole
    weight (the authors' MindSpore `ScaleSigner`, default), or `channel`, one per output
    channel (BiBench's `FDAConv2d`). The noise-adaptation term is not part of it
    (`bnntrain.nn.fda_noise.FdaNoise`).

    Args:
        scale: `layer` or `channel`.
        omega: the series' base frequency.
        n_min: n at the first epoch.
        n_max: the n that training approaches.

    Raises:
        ValueError: another scale (`UnknownChoice`), or n_min < 0 or n_max < n_min.
    """

    channel_scaled = True
    packable = True  # sign(w)'s signs times one scale (a layer's is each channel's)

    def __init__(self, scale: str = "layer", omega: float = 0.1, n_min: int = 9, n_max: int = 18) -> None:
        super().__init__(omega, n_min, n_max)
        self.scale_mode = choose("model.weight_quantizer.scale", scale, FDA_SCALES)

    def arguments(self) -> dict[str, Any]:
        return {"scale": self.scale_mode, **super().arguments()}

    def scale(self, w: Tensor) -> Tensor:
        """The mean |w|, detached: the layer's, or the output channel's.

        Args:
            w: the latent weight.

        Returns:
            A 0-dimensional tensor (`layer`) or one of shape (out, 1, ...) (`channel`).
        """
        magnitude = w.detach().abs()
        if self.scale_mode == "layer":
            return magnitude.mean()
        return magnitude.mean(tuple(range(1, w.dim())), keepdim=True)

    def values(self, w: Tensor) -> Tensor:
        scale = self.scale(w)
        return torch.stack([-scale, scale], dim=-1)

    def forward(self, w: Tensor) -> Tensor:
        return SurrogateSign.apply(w, self.sign_gradient) * self.scale(w)
