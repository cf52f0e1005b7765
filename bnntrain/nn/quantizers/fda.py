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
  binary activations and weights during training, alpha decaying from 0.1 to 0 on a cosine
  (`noise: true` on either quantizer). It is gone from the network they deploy: the
  quantizers leave it out in evaluation, and the export never sees it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ...registry import choose
from ..fda_noise import NoiseAdaptation, noise_alpha
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

    With `noise`, FDA's noise adaptation joins its output during training (BiBench's
    `FDAConv2d`): alpha e(t) is added, e a `NoiseAdaptation` sized to the layer when the layer
    attaches it, alpha `noise_alpha` of the stage's progress. In evaluation, and so in the
    export, the output is the plain binary one, the network the authors deploy. BiBench reads
    alpha's cosine at the epoch's end, (epoch + 1) / epochs; the training loop gives the
    epoch's start, so alpha here is BiBench's of the epoch before.

    Args:
        omega: the series' base frequency (BiBench's 0.1).
        n_min: n at the first epoch (BiBench's 9).
        n_max: the n that training approaches (BiBench's 9 + 9).
        noise: add the noise-adaptation term in training.
        reduction: the noise module's bottleneck reduction (BiBench's 64).
        alpha_max: the noise's weight at the stage's start (BiBench's 0.1).

    Raises:
        ValueError: n_min < 0 or n_max < n_min.
    """

    noise_flatten = False  # how the noise module reads the tensor (NoiseAdaptation's `flatten`)

    def __init__(self, omega: float = 0.1, n_min: int = 9, n_max: int = 18, noise: bool = False,
                 reduction: int = 64, alpha_max: float = 0.1) -> None:
        super().__init__()
        if not 0 <= n_min <= n_max:
            raise ValueError(f"fda needs 0 <= n_min <= n_max; got n_min={n_min}, n_max={n_max}")
        self.omega, self.n_min, self.n_max = omega, n_min, n_max
        self.noise_on, self.reduction, self.alpha_max = bool(noise), reduction, alpha_max
        self.noise: NoiseAdaptation | None = None
        self.set_progress(0.0)  # alpha = alpha_max: BiBench's buffer before its first update

    def arguments(self) -> dict[str, Any]:
        noise = {"noise": True, "reduction": self.reduction, "alpha_max": self.alpha_max} if self.noise_on else {}
        return {"omega": self.omega, "n_min": self.n_min, "n_max": self.n_max, **noise}

    def noise_size(self, layer: nn.Module) -> int:
        """The features the noise module maps, for `layer`."""
        raise NotImplementedError

    def attach(self, layer: nn.Module) -> None:
        if self.noise_on:
            self.noise = NoiseAdaptation(self.noise_size(layer), self.reduction, flatten=self.noise_flatten)
            self.noise.to(dtype=layer.weight.dtype, device=layer.weight.device)

    @property
    def fused(self) -> str | None:  # type: ignore[override]
        """The noise needs the binary output itself: with it the layer runs unfused."""
        return None if self.noise_on else type(self).fused_form

    def with_noise(self, t: Tensor, binary: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        """binary + alpha e(t) scale in training with the noise on; binary otherwise.

        Args:
            t: the quantizer's input.
            binary: its binary output.
            scale: the weight's scale (1 for the input).

        Returns:
            What the layer uses.
        """
        if self.noise is None or not self.training:
            return binary
        return binary + self.alpha * self.noise(t) * scale

    def set_progress(self, progress: float) -> None:
        self.n = fourier_terms(progress, self.n_min, self.n_max)
        self.alpha = noise_alpha(progress, self.alpha_max)

    def set_progress_span(self, start: float, end: float) -> None:
        """The schedule for an epoch that runs from `start` to `end` of the stage, read as
        BiBench's hook reads it before each epoch: the Fourier terms n at the epoch's start
        (epoch / epochs), the noise's weight alpha at its end ((epoch + 1) / epochs).

        Args:
            start: epoch / epochs.
            end: (epoch + 1) / epochs.
        """
        self.n = fourier_terms(start, self.n_min, self.n_max)
        self.alpha = noise_alpha(end, self.alpha_max)

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

    Args:
        omega: the series' base frequency.
        n_min: n at the first epoch.
        n_max: the n that training approaches.
    """

    fused_form = "input"

    def noise_size(self, layer: nn.Module) -> int:
        return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        return self.sign_gradient(x, grad)

    def forward(self, x: Tensor) -> Tensor:
        return self.with_noise(x, SurrogateSign.apply(x, self.sign_gradient))


@registered(WEIGHT_QUANTIZERS, "fda")
class FdaWeight(FourierQuantizer):
    """FDA's weights: sign(w) times the mean |w|, held constant, with the Fourier gradient
    (`fourier_sign_gradient`) times that scale. The scale is `layer`, one mean over the whole
    weight (the authors' MindSpore `ScaleSigner`, default), or `channel`, one per output
    channel (BiBench's `FDAConv2d`).

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

    def __init__(self, scale: str = "layer", omega: float = 0.1, n_min: int = 9, n_max: int = 18,
                 noise: bool = False, reduction: int = 64, alpha_max: float = 0.1) -> None:
        super().__init__(omega, n_min, n_max, noise, reduction, alpha_max)
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

    fused_form = None
    noise_flatten = True  # each output channel's weights, flattened (BiBench's `NoiseAdaption`)

    def noise_size(self, layer: nn.Module) -> int:
        return math.prod(layer.weight.shape[1:])

    def forward(self, w: Tensor) -> Tensor:
        scale = self.scale(w)
        return self.with_noise(w, SurrogateSign.apply(w, self.sign_gradient) * scale, scale)
