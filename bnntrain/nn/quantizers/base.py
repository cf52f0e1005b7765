"""What a quantizer is: one module that owns everything about one way of quantizing a tensor.

Every binary quantizer returns +1 for x >= 0 and -1 otherwise, or a scale times that
(sign(0) = +1, so a binary tensor never holds zeros); they differ in the gradient they pass
back. A binary layer holds one for its input and one for its weight (layers.py), built by
name from the config (`model.input_quantizer: {name: approx_sign}`) or given as an object.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Mapping, Union

import torch
from torch import Tensor, nn

from ...registry import Registry


def sign(x: Tensor) -> Tensor:
    """+1 or -1 by the sign bit of x, in x's dtype: sign(0) = +1, so a binary tensor holds no
    zeros. (IEEE's negative zero, which only a product with a negative factor yields, maps to
    -1.) copysign is one pass over memory, several times faster than a compare-and-select.

    Args:
        x: any floating-point tensor.

    Returns:
        A tensor of x's shape, dtype and device holding +1 and -1.
    """
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x)


class Quantizer(nn.Module):
    """One way to quantize a tensor. A subclass states:

    - `forward(x)`: the quantized tensor, carrying the quantizer's own gradient;
    - `values(x)`: the values forward(x) may take, along a new last dimension that
      broadcasts against x (e.g. [-1, +1], or [-alpha, +alpha] per output channel);
    - `bits`: what one quantized value costs in the cost report;
    - `channel_scaled`: its values are +-(a scale per output channel), which the packed
      export keeps beside the signs;
    - `fused`: how a binary conv may fuse it with the convolution (sign_conv.py) and keep
      exactly its gradient: "mask" (the gradient is g where `mask(x)` holds; the conv keeps
      one byte per input), "input" (`gradient(x, g)` needs x; the conv keeps x), or None
      (the conv runs it unfused, never with another gradient);
    - `packable`: its forward is sign(x) (an input quantizer: +1 where x >= 0, else -1) or
      +-(one scale per output channel) (a weight quantizer: the signs its own), which the
      packed export, ONNX and `bnntrain.infer` reproduce exactly; a quantizer that is not
      (other values, an affine term, a scale per element) is refused by the export in one
      line rather than exported as another network;
    - `projects_weights` and `project_(w)`: latent weights kept in a set by the method
      (XNOR-Net mean-centres and clamps them before each step);
    - `scales_output` and `output_scale(x, out, layer)`: a factor the layer multiplies into
      its output (XNOR-Net's K); `attach(layer)`: parameters sized to the layer;
    - `arguments()`: its constructor's arguments, so `config()` gives back what built it;
    - `set_progress(progress)`: a schedule over the stage's epochs (0 at the first, towards
      1 at the last), which the training loop calls at each epoch's start; none by default.
      A quantizer that also reads where the epoch ends defines `set_progress_span(start,
      end)`, which the loop then calls instead (FDA's).
    """

    name: ClassVar[str]
    bits: ClassVar[int] = 1
    channel_scaled: ClassVar[bool] = False
    fused: ClassVar[str | None] = None
    packable: ClassVar[bool] = False
    scales_output: ClassVar[bool] = False
    projects_weights: ClassVar[bool] = False

    def values(self, x: Tensor) -> Tensor:
        """The values `forward(x)` may take (the cost report and the export read them).

        Args:
            x: the tensor to quantize.

        Returns:
            The values along a new last dimension that broadcasts against `x`: [-1, +1], or
                [-alpha, +alpha] per output channel.

        Raises:
            NotImplementedError: a subclass that does not state them.
        """
        raise NotImplementedError

    def mask(self, x: Tensor) -> Tensor:
        """Where the gradient passes, for `fused = "mask"`.

        Args:
            x: the quantizer's input.

        Returns:
            A boolean tensor of x's shape: the gradient passes where it holds and is 0 elsewhere.

        Raises:
            NotImplementedError: a quantizer whose gradient is not a mask.
        """
        raise NotImplementedError

    def gradient(self, x: Tensor, grad: Tensor, signs: Tensor | None = None) -> Tensor:
        """The gradient with respect to x, for `fused = "input"`.

        Args:
            x: the quantizer's input.
            grad: the gradient with respect to its output.
            signs: sign(x) where the caller has it at hand, else None.

        Returns:
            The gradient with respect to `x`.

        Raises:
            NotImplementedError: a quantizer without a gradient formula of x.
        """
        raise NotImplementedError

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments this quantizer was built with.

        Returns:
            {argument: value}; empty for a quantizer that takes none.
        """
        return {}

    def config(self) -> dict[str, Any]:
        """What builds this quantizer again with `build_quantizer`.

        Returns:
            `{name: ..., <arguments>}`.
        """
        return {"name": self.name, **self.arguments()}

    def attach(self, layer: nn.Module) -> None:
        """Called once by the binary layer that holds this quantizer, when the layer is built:
        a quantizer whose learnable parameters are sized to the layer (a scale per output
        channel) makes them here, so the optimizer and the checkpoint see them. Nothing by
        default.

        Args:
            layer: the BinaryConv2d or BinaryLinear.
        """

    def project_(self, w: Tensor) -> None:
        """For a weight quantizer with `projects_weights`: put the latent weights back in the
        set the method keeps them in, in place; the stage calls it once as a fresh stage
        starts and after each optimizer step (engine/hooks.py, `WeightProjection`).

        Args:
            w: the latent weight.
        """

    @torch.no_grad()
    def weight_signs(self, w: Tensor) -> Tensor:
        """The binary choice the quantizer makes for each weight, as the evaluated network
        makes it: True where it takes the upper value (the flip-ratio tracker reads these).

        Args:
            w: the latent weight.

        Returns:
            A boolean tensor of w's shape: the sign bit of `forward(w)` in evaluation mode
                (IR-Net's and ReCU's signs are those of the standardised weight, not of w).
        """
        training = self.training
        self.eval()  # a training-only branch (FDA's noise) is no part of the choice
        try:
            return ~torch.signbit(self(w))
        finally:
            self.train(training)

    def output_scale(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor | None:
        """A factor the layer multiplies into its output before the bias, for a quantizer with
        `scales_output` (XNOR-Net's K, XNOR-Net++'s spatial factors). None by default.

        Args:
            x: the layer's input, shifted by its threshold where it has one.
            out: the layer's output before the factor and the bias.
            layer: the BinaryConv2d or BinaryLinear.

        Returns:
            A tensor that broadcasts against `out`, or None.
        """
        return None

    def set_progress(self, progress: float) -> None:
        """Follow a schedule over the stage's epochs; the training loop calls this at each
        epoch's start (`QuantizerSchedule`). The base quantizer has none.

        Args:
            progress: epoch / epochs: 0 at the stage's first epoch, towards 1 at its last.
        """
        pass

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.arguments().items())


QuantizerSpec = Union[str, Mapping[str, Any], Quantizer]
"""A quantizer as a config or a caller gives it: a registered name, a `{name: ..., <arguments>}`
mapping, or a `Quantizer` object."""

# Read `model.input_quantizer` and `model.weight_quantizer`: a sign estimator for the
# activations, a binarizer for the latent weights. Each entry is a Quantizer subclass.
INPUT_QUANTIZERS: Registry[type[Quantizer]] = Registry("model.input_quantizer", package=__package__)
"""The sign estimators of a binary layer's input, by name (`model.input_quantizer`)."""
WEIGHT_QUANTIZERS: Registry[type[Quantizer]] = Registry("model.weight_quantizer", package=__package__)
"""The binarizers of a binary layer's latent weight, by name (`model.weight_quantizer`)."""


def registered(registry: Registry[type[Quantizer]], name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: registers a quantizer under `name`, which it also takes as its own.

    Args:
        registry: `INPUT_QUANTIZERS` or `WEIGHT_QUANTIZERS`.
        name: the name a config chooses it by.

    Returns:
        The decorator; it returns the class itself, and raises KeyError where `name` is
            registered already.
    """
    def add(cls: type[Quantizer]) -> type[Quantizer]:
        cls.name = name
        return registry.register(name)(cls)
    return add


def build_quantizer(registry: Registry[type[Quantizer]], spec: QuantizerSpec) -> Quantizer:
    """A quantizer from a name, a `{name: ..., <arguments>}` mapping, or itself.

    Args:
        registry: where the name is looked up.
        spec: a name, a mapping of `name` and the class's arguments (a key the class does not
            take, set to None, is left out), or a `Quantizer` (returned as it is).

    Returns:
        The quantizer: a new one, unless `spec` is one.

    Raises:
        ValueError: an unknown name (`UnknownChoice`), or an argument the class does not take.
    """
    if isinstance(spec, Quantizer):
        return spec
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    cls = registry.get(name)
    accepted = [p.name for p in inspect.signature(cls).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    # An argument the class does not take, set to null, is "not set": a preset that names
    # another quantizer drops one it inherits (the `gradient` of _base.yaml's scaled_sign) this
    # way, since configs merge mappings. One the class takes keeps its null (larq's clip_value).
    options = {key: value for key, value in options.items() if key in accepted or value is not None}
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ValueError(f"{registry.kind}={name} takes {', '.join(accepted) or 'no arguments'}; "
                         f"got {', '.join(unknown)}")
    return cls(**options)
