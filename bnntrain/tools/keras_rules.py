"""Which module of ours each layer of larq-zoo's Keras weight files fills, per network
(keras_weights.py reads the files and fills the tensors).

A layer's arrays are named by their last part (`kernel`, `gamma`, `alpha`, ...); a `Layout`
maps each onto one tensor of our module and says how the array is laid out in Keras. A
network's layers are paired with our modules one of two ways: `Rules`, patterns over our
module names, paired in order with the file's layers (Keras's automatic names, as QuickNet's
`batch_normalization_7`, say nothing the order does not); or `Named`, patterns over the Keras
layer names themselves, where the network names every layer (Real-to-Binary Net's
`r2b_bnn_block_2a_conv2d`): the order of the file then does not matter. `by_order` and
`by_name` pair them, each layer left over on either side an error naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .keras_weights import KerasLayer

# A Keras layer's arrays, by their last name part: (the tensor of our module it fills, its layout).
Layout = dict[str, tuple[str, str]]
CONV: Layout = {"kernel": ("weight", "conv")}
DEPTHWISE: Layout = {"depthwise_kernel": ("weight", "depthwise")}
BATCHNORM: Layout = {"gamma": ("weight", "same"), "beta": ("bias", "same"),
                     "moving_mean": ("running_mean", "same"), "moving_variance": ("running_var", "same")}
DENSE: Layout = {"kernel": ("weight", "dense"), "bias": ("bias", "same")}  # a Dense without bias: kernel only
PRELU: Layout = {"alpha": ("weight", "prelu")}  # PReLU(shared_axes=[1, 2]): (1, 1, C), ours (C,)
BLUR: Layout = {"depthwise_kernel": ("kernel", "depthwise")}  # BlurPool2d's fixed kernel: compared, not loaded
# A network's rules by order: a pattern over our module names, and the layout of the Keras layer it pairs with.
Rules = list[tuple[str, Layout]]


@dataclass(frozen=True)
class Named:
    """A network whose Keras layers are named by its code: each layer's name picks the module
    of ours it fills.

    Attributes:
        rules: (a pattern the whole layer name matches, the name of our module from the match,
            the layer's layout); the first that matches is the layer's.
    """

    rules: tuple[tuple[str, Callable[[re.Match], str], Layout], ...]

    def target(self, layer: str) -> tuple[str, Layout] | None:
        """Our module for the Keras layer called `layer`, and its layout; None where no rule matches.

        Args:
            layer: the layer's name in the file.

        Returns:
            (our module's name, the layout), or None.
        """
        for pattern, module, layout in self.rules:
            if match := re.fullmatch(pattern, layer):
                return module(match), layout
        return None


# larq_zoo/sota/quicknet.py: the stem's QuantConv2D, BN, QuantDepthwiseConv2D, BN without scale
# or shift, QuantConv2D, BN; each residual block's QuantConv2D and BN; each transition's fixed
# blur DepthwiseConv2D (trainable=False, still saved), QuantConv2D and BN; the QuantDense.
QUICKNET: Rules = [
    (r"stem\.[17]", CONV), (r"stem\.5", DEPTHWISE), (r"stem\.[268]", BATCHNORM),
    (r"stages\.\d+\.\d+\.conv", CONV), (r"stages\.\d+\.\d+\.norm", BATCHNORM),
    (r"stages\.\d+\.\d+\.2", BLUR), (r"stages\.\d+\.\d+\.3", CONV), (r"stages\.\d+\.\d+\.4", BATCHNORM),
    (r"classifier", DENSE),
]

# larq_zoo/literature/real_to_bin_nets.py names every layer `{model_name}_block_{n}...`
# (model_name `r2b_bnn` for RealToBinaryNet; any prefix is taken): block 1 the stem's Conv2D,
# BN, PReLU; blocks 2 to 9 (our blocks.0 to 7) two halves `a` and `b` each, with the shortcut's
# 1x1 Conv2D and BN where the channels double, the BN before the sign, the QuantConv2D, the
# gate's two Dense layers without bias, the PReLU; block 10 the Dense `logits`.
BLOCK = r"(?:.+_)?block_"
HALF = BLOCK + r"([2-9])([ab])_"


def _half(leaf: str) -> Callable[[re.Match], str]:
    return lambda m: f"blocks.{int(m[1]) - 2}.{m[2]}.{leaf}"


REAL_TO_BINARY = Named((
    (BLOCK + "1_conv2d", lambda m: "stem.conv", CONV),
    (BLOCK + "1_batch_norm", lambda m: "stem.bn", BATCHNORM),
    (BLOCK + "1_prelu", lambda m: "stem.act", PRELU),
    (HALF + "shortcut_conv2d", _half("shortcut.1"), CONV),
    (HALF + "shortcut_batch_norm", _half("shortcut.2"), BATCHNORM),
    (HALF + "batch_norm", _half("norm"), BATCHNORM),
    (HALF + "conv2d", _half("conv"), CONV),
    (HALF + "scaling_dense_reduce", _half("scale.reduce"), DENSE),
    (HALF + "scaling_dense_expand", _half("scale.expand"), DENSE),
    (HALF + "prelu", _half("act"), PRELU),
    (BLOCK + "10_logits", lambda m: "classifier", DENSE),
))

# model.name: how its Keras layers pair with our modules.
KERAS_RULES: dict[str, Rules | Named] = {"quicknet_small": QUICKNET, "quicknet": QUICKNET,
                                         "quicknet_large": QUICKNET, "real_to_binary": REAL_TO_BINARY}


NOTOP = " (a *_notop file holds no classifier: convert the file with the top)"
Pair = tuple["KerasLayer", tuple[str, nn.Module, Layout]]  # a layer of the file, our module (named), its layout


def by_order(layers: list[KerasLayer], model: nn.Module, rules: Rules) -> list[Pair]:
    """The n-th layer with arrays for the n-th module of ours that `rules` pick, as Keras loads."""
    ours = [(name, module, layout) for name, module in model.named_modules()
            for layout in [next((lay for pattern, lay in rules if re.fullmatch(pattern, name)), None)] if layout]
    if len(layers) < len(ours):
        name = ours[len(layers)][0]
        raise CheckpointError(f"the Keras file has {len(layers)} layers with weights, this model {len(ours)}: "
                              f"nothing for {name}{NOTOP if name == 'classifier' else ''}")
    if len(layers) > len(ours):
        raise CheckpointError(f"the Keras file has {len(layers)} layers with weights, this model {len(ours)}: "
                              f"{layers[len(ours)].name} has no place in it (another network or size?)")
    return list(zip(layers, ours))


def by_name(layers: list[KerasLayer], model: nn.Module, rules: Named) -> list[Pair]:
    """Each layer with arrays for the module of ours its name picks, one layer a module, and
    every module of ours with tensors (but BN batch counters) picked."""
    modules, taken, pairs = dict(model.named_modules()), {}, []
    for layer in layers:
        found = rules.target(layer.name)
        if found is None:
            raise CheckpointError(f"the Keras layer {layer.name} has no place in this model (another network?)")
        name, layout = found
        if name not in modules:
            raise CheckpointError(f"the Keras layer {layer.name} is for {name}, which this model does not have "
                                  f"(another network or size?)")
        if name in taken:
            raise CheckpointError(f"the Keras layers {taken[name]} and {layer.name} are both for {name}")
        taken[name] = layer.name
        pairs.append((layer, (name, modules[name], layout)))
    owners = (key.rpartition(".")[0] for key in model.state_dict() if not key.endswith("num_batches_tracked"))
    missing = [name for name in dict.fromkeys(owners) if name not in taken]
    if missing:
        raise CheckpointError(f"no layer of the Keras file is for {len(missing)} of this model's layers: "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                              f"{NOTOP if 'classifier' in missing else ''}")
    return pairs
