"""Binarize a network built elsewhere: its convs and linears become binary layers.

`binarize` takes any PyTorch model (torchvision's classification networks are what it is
written for) and replaces, in place, each `nn.Conv2d` and `nn.Linear` by a `BinaryConv2d` or
`BinaryLinear` holding the same latent weight and bias, with the same stride, padding,
dilation and groups. The stage's precision then switches them like any binary layer
(`set_precision`), so stage 1 (binary activations, real weights) and stage 2 (fully binary)
train the same module tree, and a stage-1 checkpoint loads into stage 2 key for key.

What stays real by default, as in the BNN literature:

- the first conv (the stem) and the classifier (XNOR-Net, Bi-Real Net, ReActNet and nearly
  every published BNN keep them real-valued);
- depthwise convs. ReActNet (Liu et al., ECCV 2020) replaces MobileNetV1's depthwise 3x3 convs
  by full binary 3x3 convs, and Phan et al. (Binarizing MobileNet via Evolution-based
  Searching, CVPR 2020) by binary group convs, because a binary depthwise filter sums only
  k x k signs of one channel; MoBiNet (Phan et al., WACV 2020) binarizes them, with extra
  skip connections to keep training from diverging. `binary_depthwise=True` binarizes them.
  They are 7% of MobileNetV2's multiply-accumulates (20.7M of 301M at 224 px), but kept real
  they are most of its OPs once the rest is binary: 20.7M FLOPs beside about 4M for the binary
  layers' BOPs / 64.

Only modules whose type is exactly `nn.Conv2d` or `nn.Linear` are replaced: a subclass may be
read other than through its forward (`nn.MultiheadAttention` reads its `out_proj`'s weight
directly), so it stays as it is.

The network's ReLUs (`nn.ReLU`, `nn.ReLU6` modules) become PReLUs by default: the sign of a
ReLU's output is +1 everywhere (sign(0) = +1), so a binary layer behind one would see one
constant input. A ReLU applied as a function in a forward (`F.relu`) cannot be replaced.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from ..registry import choose
from .layers import BinaryConv2d, BinaryLinear
from .quantizers import QuantizerSpec

RELUS = (nn.ReLU, nn.ReLU6)
RELU_REPLACEMENTS: dict[str, Callable[[], nn.Module] | None] = {
    "prelu": nn.PReLU,      # one learnable slope per module, 0.25 at first: signs keep their information
    "identity": nn.Identity,  # Bi-Real Net's blocks: nothing between the addition and the next sign
    "relu": None,           # kept as they are
}
"""What `binarize` turns the network's ReLUs into (`activation`): `prelu`, `identity`, or
`relu` (kept)."""


def is_depthwise(module: nn.Module) -> bool:
    """Whether `module` is a depthwise conv: one group per input channel.

    Args:
        module: any module.

    Returns:
        True for a conv with as many groups as input channels (and more than one).
    """
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def stem_and_classifier(model: nn.Module) -> tuple[str | None, str | None]:
    """The names of the layers `binarize` keeps real unless asked: the first conv (or, in a
    network without convs, the first linear) and the last linear (or, without linears, the
    last conv: SqueezeNet's classifier), in `named_modules` order. Binary layers count too, so
    that binarizing twice finds the same two.

    Args:
        model: any module.

    Returns:
        (stem, classifier); None where the model has no conv nor linear.
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    first, last = (convs or linears or [None]), (linears or convs or [None])
    return first[0], last[-1]


def binary_twin(name: str, module: nn.Conv2d | nn.Linear, options: dict) -> BinaryConv2d | BinaryLinear:
    """A binary layer with `module`'s shape, stride, padding, dilation, groups, latent weight
    and bias, on its device, in its dtype and training mode.

    Args:
        name: the module's name in the model, for the errors.
        module: the conv or linear layer it replaces.
        options: the binary layer's keyword arguments (quantizers, threshold, `binarize`).

    Returns:
        The binary layer; its quantizers' own parameters (a learnable scale) are new.

    Raises:
        ValueError: a conv padded other than with zeros by a fixed amount, which the binary
            conv's fused sign and the export do not reproduce.
    """
    with torch.device(module.weight.device):
        if isinstance(module, nn.Linear):
            layer = BinaryLinear(module.in_features, module.out_features, module.bias is not None, **options)
        else:
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"binarize: {name} pads with padding={module.padding!r}, "
                                 f"padding_mode={module.padding_mode!r}; a binary conv pads with a fixed number of "
                                 f"zeros: leave it real with keep_real=['{name}']")
            layer = BinaryConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                 module.padding, module.groups, module.bias is not None, **options)
            layer.dilation = module.dilation  # BinaryConv2d takes no dilation argument; nn.Conv2d reads this
    layer.to(module.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(module.weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    layer.weight.requires_grad_(module.weight.requires_grad)
    return layer.train(module.training)


def _replace(model: nn.Module, new: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Swap each module `new` returns a module for; a module registered in several places
    (torchvision's ResNet blocks call one ReLU twice) is swapped for one new module in all."""
    made: dict[int, nn.Module | None] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name:  # the model itself
            continue
        if id(module) not in made:
            made[id(module)] = new(name, module)
        if made[id(module)] is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, made[id(module)])


def binarize(model: nn.Module, input_quantizer: QuantizerSpec = "ste_sign",
             weight_quantizer: QuantizerSpec = "scaled_sign", *, binary_stem: bool = False,
             binary_classifier: bool = False, binary_depthwise: bool = False, keep_real: Iterable[str] = (),
             activation: str = "prelu", learnable_threshold: bool = False, stay_real: bool = False) -> nn.Module:
    """Turn the convs and linears of `model` into binary layers, in place; the same model is
    returned, for chaining.

    Each replaced layer keeps its latent weight and bias (a trained network's are its
    starting point), stride, padding, dilation and groups; the new layers are fully binary
    until `set_precision` says otherwise.

    Args:
        model: any module, e.g. `torchvision.models.resnet18(num_classes=10)`.
        input_quantizer: every binary layer's sign estimator, as `BinaryConv2d` takes it (a
            name in `INPUT_QUANTIZERS`, a `{name: ..., <arguments>}` mapping); one object per
            layer is built from it.
        weight_quantizer: every binary layer's weight binarizer, the same way.
        binary_stem: binarize the first conv too (see `stem_and_classifier`).
        binary_classifier: binarize the classifier too.
        binary_depthwise: binarize the depthwise convs too (MoBiNet); by default they stay
            real (ReActNet, Phan et al. replace them rather than binarize them).
        keep_real: names of layers to leave real, as `named_modules` gives them, with `*`
            and `?` wildcards (`*.downsample.0`: torchvision ResNets' shortcut convs).
        activation: what the network's `nn.ReLU` and `nn.ReLU6` modules become: `prelu`
            (default), `identity`, or `relu` (kept: a binary layer behind one sees only +1).
        learnable_threshold: give each binary layer ReActNet's learnable per-channel shift
            before its sign.
        stay_real: build the real-valued twin: the same binary layers, made to stay real
            whatever the stage says (teachers, baselines).

    Returns:
        `model` itself, changed.

    Raises:
        ValueError: an unknown `activation` (`UnknownChoice`) or quantizer, or a conv that
            pads other than with a fixed number of zeros (leave it real with `keep_real`).
    """
    choose("model.activation", activation, RELU_REPLACEMENTS)
    stem, classifier = stem_and_classifier(model)
    patterns = list(keep_real)
    options = {"input_quantizer": input_quantizer, "weight_quantizer": weight_quantizer,
               "learnable_threshold": learnable_threshold, "binarize": not stay_real}

    def binary(name: str, module: nn.Module) -> nn.Module | None:
        if type(module) not in (nn.Conv2d, nn.Linear):
            return None
        kept = ((name == stem and not binary_stem) or (name == classifier and not binary_classifier)
                or (is_depthwise(module) and not binary_depthwise) or any(fnmatch(name, p) for p in patterns))
        return None if kept else binary_twin(name, module, options)

    _replace(model, binary)
    make = RELU_REPLACEMENTS[activation]
    if make is not None:
        like = next(model.parameters(), torch.empty(0))  # the new activations' device and dtype
        _replace(model, lambda name, module: make().to(like.device, like.dtype) if type(module) in RELUS else None)
    return model
