"""XNOR-Net (Rastegari et al., ECCV 2016) and XNOR-Net++ (Bulat and Tzimiropoulos, BMVC 2019).

XNOR-Net follows the authors' Torch code (allenai/XNOR-Net): `newLayers/BinActiveZ.lua` for
the activations, `util.lua` (`meancenterConvParms`, `clampConvParms`, `binarizeConvParms`,
`updateBinaryGradWeight`) for the weights. XNOR-Net++ has no code from its authors; it
follows BiBench's re-implementation (htqin/BiBench, `bibench/models/layers/xnorplusplus.py`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import choose
from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, registered
from .estimators import MaskedSign, SteSign
from .weights import ScaledSign, channel_scale

XNOR_SCALES = ("none", "box")
XNOR_GRADIENTS = ("code", "paper")
XNOR_PLUS_PLUS_FACTORS = ("channel_height_width", "channel")


@registered(INPUT_QUANTIZERS, "xnor_sign")
class XnorSign(SteSign):
    """XNOR-Net's activation: sign(x), gradient g where |x| < 1 (the authors' `BinActiveZ`,
    which is `ste_sign`), and optionally the paper's scale K on the binary conv's output.

    K (the paper's section 3.2): A = the mean of |x| over the channels, convolved with a
    k x k box filter of 1/(k k) at the conv's stride, padding and dilation (for a linear
    layer, the mean of |x| over the features); the layer multiplies its output by K before
    the bias. K is held constant in the backward pass (the paper gives it no gradient; BiBench
    detaches its K too). The authors' released code computes no K, and neither do the PyTorch
    ports (jiecaoyu/XNOR-Net-PyTorch computes the channel mean and drops it; BiBench's
    `xnor.py` scales by one mean per sample instead): `scale: none` is that code, the default.

    Args:
        scale: `none` (the authors' code) or `box` (the paper's K).

    Raises:
        ValueError: another scale (`UnknownChoice`).
    """

    def __init__(self, scale: str = "none") -> None:
        super().__init__()
        self.scale = choose("model.input_quantizer.scale", scale, XNOR_SCALES)

    @property
    def packable(self) -> bool:  # type: ignore[override]
        """With K the output is not +-1 x +-1 times a per-channel scale: the export refuses it."""
        return self.scale == "none"

    @property
    def scales_output(self) -> bool:  # type: ignore[override]
        """K multiplies the layer's output."""
        return self.scale == "box"

    def arguments(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def output_scale(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor | None:
        """K for the layer's output, or None without it.

        Args:
            x: the quantizer's input (the layer's input, shifted by its threshold).
            out: the layer's output before K and the bias.
            layer: the BinaryConv2d or BinaryLinear that applies it.

        Returns:
            (N, 1, H', W') for a conv, (N, 1) for a linear layer; None where `scale` is `none`.
        """
        if self.scale == "none":
            return None
        mean = x.detach().abs().mean(1, keepdim=True)
        if mean.dim() != 4:
            return mean
        kh, kw = layer.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=mean.dtype, device=mean.device)
        return F.conv2d(mean, box, None, layer.stride, layer.padding, layer.dilation)


class XnorWeightFunction(torch.autograd.Function):
    """alpha * sign(w) with XNOR-Net's weight gradient (see XnorWeight)."""

    @staticmethod
    def forward(ctx, w: Tensor, paper: bool) -> Tensor:
        alpha = channel_scale(w)
        ctx.save_for_backward(w, alpha)
        ctx.paper = paper
        return torch.copysign(alpha, w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, alpha = ctx.saved_tensors
        n = math.prod(w.shape[1:])
        inside = w.abs() <= 1 if ctx.paper else w.abs() < 1
        factor = torch.where(inside, alpha, 0.0) + 1.0 / n
        if not ctx.paper:  # the derivative of the mean-centring over the input channels
            factor = factor * (1.0 - 1.0 / w.shape[1])
        return grad * factor, None


@registered(WEIGHT_QUANTIZERS, "xnor_weight")
class XnorWeight(ScaledSign):
    """XNOR-Net's weights: alpha * sign(w), alpha the per-output-channel mean |w| (as
    `scaled_sign`), with the authors' gradient, n the weights per output channel and C the
    input channels:

    - `code` (`util.lua` `updateBinaryGradWeight`, as the released Adam recipe runs it):
      g (alpha 1{|w| < 1} + 1/n) (1 - 1/C). Their SGD branch also multiplies by n, and their
      Adam branch multiplies every gradient of the network by 1e9: optimizer settings,
      not part of this gradient.
    - `paper` (section 3.1): g (1/n + alpha 1{|w| <= 1}).

    Before each training step the authors' code also mean-centres the latent weights over
    the input channels and clamps them to [-1, 1], in place (`meancenterConvParms`,
    `clampConvParms`): that is `project_`, which the stage calls (`WeightProjection`), not the forward.

    Args:
        gradient: `code` or `paper`.

    Raises:
        ValueError: another gradient (`UnknownChoice`).
    """

    projects_weights = True

    def __init__(self, gradient: str = "code") -> None:
        Quantizer.__init__(self)  # scaled_sign's values and scale, XNOR-Net's gradients
        self.gradient_mode = choose("model.weight_quantizer.gradient", gradient, XNOR_GRADIENTS)

    def forward(self, w: Tensor) -> Tensor:
        return XnorWeightFunction.apply(w, self.gradient_mode == "paper")

    @torch.no_grad()
    def project_(self, w: Tensor) -> None:
        """The authors' step before each forward in training: w minus its mean over the input
        channels (one mean per output channel and kernel position), clamped to [-1, 1].

        Args:
            w: the latent weight, changed in place.
        """
        w.sub_(w.mean(1, keepdim=True)).clamp_(-1, 1)


def inside_unit(w: Tensor) -> Tensor:
    """Where torch.clamp(w, -1, 1) passes its gradient: -1 < w < 1.

    Args:
        w: the latent weight.

    Returns:
        A boolean tensor of w's shape.
    """
    return w.abs() < 1


class LearnedChannelScale(Quantizer):
    """A weight binarizer with a learnable scale per output channel, `alpha`, made by the
    layer that holds it (`attach`) with the layer's weight's shape, dtype and device; a
    quantizer used on its own makes it for the first weight it is given. One object, one layer.
    A subclass states `initial_scale`."""

    channel_scaled = True

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("alpha", None)

    def initial_scale(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The scale's initial value.

        Args:
            shape: (out, 1, ...): one per output channel, broadcasting against the weight.
            like: the weight, whose dtype and device it takes.

        Returns:
            A tensor of `shape`.

        Raises:
            NotImplementedError: a subclass that does not state it.
        """
        raise NotImplementedError

    def attach(self, layer: nn.Module) -> None:
        """Make the learnable parameters for `layer` (BinaryConv2d and BinaryLinear call this).

        Args:
            layer: the layer whose weight this quantizer binarizes.

        Raises:
            ValueError: the quantizer belongs to another layer already.
        """
        if self.alpha is not None:
            raise ValueError(f"{self.name}: this quantizer object belongs to a layer already; "
                             f"give each layer its own")
        self._make_scale(layer.weight)

    def _make_scale(self, w: Tensor) -> None:
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        self.alpha = nn.Parameter(self.initial_scale(shape, w))

    def scale_for(self, w: Tensor) -> Tensor:
        """The learnable scale, made first for `w` where no layer made it.

        Args:
            w: the latent weight.

        Returns:
            `alpha`, (out, 1, ...).
        """
        if self.alpha is None:
            self._make_scale(w)
        return self.alpha

    def values(self, w: Tensor) -> Tensor:
        alpha = self.scale_for(w).detach().unsqueeze(-1)
        return torch.cat([-alpha, alpha], dim=-1)


@registered(WEIGHT_QUANTIZERS, "xnor_plus_plus")
class XnorPlusPlus(LearnedChannelScale):
    """XNOR-Net++: sign(w) with the gradient g where |w| < 1 (BiBench's clamp estimator), the
    output scaled by learned factors (initialised to 1, as BiBench does):

    - `channel_height_width` (BiBench's layer): alpha (out) x beta (height) x gamma (width)
      of the output, the paper's rank-1 Gamma = alpha (x) beta (x) gamma. beta and gamma
      hold `max_size` entries (BiBench's 2000), of which an output of height H and width W
      uses the first H and W. The export refuses it (a scale per output position).
    - `channel`: alpha alone, one learned scale per output channel. It is a per-channel weight
      scale (alpha sign(w)), which the export keeps.

    alpha multiplies the binary weight here, which gives the conv's output times alpha exactly
    as BiBench's `y * o_scale` does, with the same gradients. BiBench pairs it with sign(x) and
    the same clamp estimator for the activations: `ste_sign`.

    Args:
        factors: `channel_height_width` or `channel`.
        max_size: the largest output height and width `channel_height_width` can scale.

    Raises:
        ValueError: other factors (`UnknownChoice`).
    """

    def __init__(self, factors: str = "channel_height_width", max_size: int = 2000) -> None:
        super().__init__()
        self.factors = choose("model.weight_quantizer.factors", factors, XNOR_PLUS_PLUS_FACTORS)
        self.max_size = max_size
        self.register_parameter("beta", None)
        self.register_parameter("gamma", None)

    @property
    def packable(self) -> bool:  # type: ignore[override]
        """Only the per-channel factor is a weight scale the export keeps."""
        return self.factors == "channel"

    @property
    def scales_output(self) -> bool:  # type: ignore[override]
        """The height and width factors multiply the layer's output."""
        return self.factors == "channel_height_width"

    def arguments(self) -> dict[str, Any]:
        return {"factors": self.factors, "max_size": self.max_size}

    def initial_scale(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.ones(shape, dtype=like.dtype, device=like.device)

    def attach(self, layer: nn.Module) -> None:
        super().attach(layer)
        if self.factors == "channel_height_width" and layer.weight.dim() == 4:
            like = layer.weight
            self.beta = nn.Parameter(torch.ones(self.max_size, dtype=like.dtype, device=like.device))
            self.gamma = nn.Parameter(torch.ones(self.max_size, dtype=like.dtype, device=like.device))

    def forward(self, w: Tensor) -> Tensor:
        return MaskedSign.apply(w, inside_unit) * self.scale_for(w)

    def output_scale(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor | None:
        """beta (x) gamma over the output's height and width, or None without them.

        Args:
            x: the layer's input (unused).
            out: the layer's output before the scale and the bias.
            layer: the layer that applies it.

        Returns:
            (H, W), or None for `channel` or a layer without spatial output.

        Raises:
            ValueError: an output larger than `max_size`.
        """
        if self.beta is None or out.dim() != 4:
            return None
        height, width = out.shape[-2:]
        if max(height, width) > self.max_size:
            raise ValueError(f"xnor_plus_plus: an output of {height}x{width} is larger than max_size={self.max_size}")
        return self.beta[:height].unsqueeze(1) * self.gamma[:width]
