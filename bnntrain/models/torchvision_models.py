"""Any torchvision classification network, binarized (`model=torchvision model.arch=NAME`).

torchvision builds the network by name (`torchvision.models.get_model`) for the data's
classes and input channels; `bnntrain.nn.binarize` then turns its convs and linears into
binary layers with the `model` group's quantizers. The module tree, and so the checkpoint's
keys, are torchvision's, with binary layers where the convs were.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..nn.binarize import binarize as binarize_network
from ..nn.quantizers import QuantizerSpec
from ..registry import choose
from .registry import MODELS
from .resnet import STEMS

# Networks whose training-mode output is a tuple with their auxiliary heads' logits, which the
# training loop does not read: built without those heads, with torchvision's truncated-normal
# init asked for by name (left unsaid, it warns that its default will change).
ARCH_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                "inception_v3": {"aux_logits": False, "init_weights": True}}
# The collection's block options, which a torchvision network's own blocks do not read: the
# preset sets them to null, and any other value is refused rather than ignored.
BLOCK_KEYS = ("downsample", "bn_position", "attention", "binary_init")


def torchvision_arch(arch: str, num_classes: int, in_channels: int, width: float) -> nn.Module:
    """torchvision's network `arch`, untrained, for `num_classes` classes and `in_channels`
    input channels, at `width` where torchvision has a width multiplier (`width_mult`).

    Args:
        arch: a classification network of `torchvision.models` (`resnet18`, `mobilenet_v2`).
        num_classes: the classifier's outputs.
        in_channels: the input images' channels; torchvision's networks take 3, so the first
            conv is rebuilt for any other number.
        width: the channel multiplier; 1 for a network torchvision builds at one width.

    Returns:
        The real-valued network.

    Raises:
        ValueError: an unknown `arch` (`UnknownChoice`), or a width other than 1 for a network
            without a width multiplier.
    """
    import torchvision  # here: a run with another model need not import torchvision.models

    choose("model.arch", arch, torchvision.models.list_models(module=torchvision.models))
    options: dict[str, Any] = {"num_classes": num_classes, **ARCH_OPTIONS.get(arch, {})}
    if width != 1:
        options["width_mult"] = width
    try:
        net = torchvision.models.get_model(arch, **options)
    except TypeError as err:
        if "width_mult" not in str(err):
            raise
        raise ValueError(f"model.arch={arch} has no width multiplier in torchvision (mobilenet_v2 and "
                         f"mobilenet_v3_* have one): give model.width=1 (got {width}; data=digits sets 0.5 "
                         f"for the collection's networks)") from None
    if in_channels != 3:
        _set_input_channels(net, in_channels)
    return net


def _first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d))


def _set_input_channels(net: nn.Module, in_channels: int) -> None:
    """The first conv, rebuilt (freshly initialised) for `in_channels` inputs."""
    name, old = _first_conv(net)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode, device=old.weight.device)
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, new)


def small_input_stem(net: nn.Module) -> None:
    """The stem for small images (`model.stem=cifar`): the first conv at stride 1, and a
    ResNet's max-pool after it (a top-level `maxpool`) the identity; the map then stays 4x as
    large. A patch embedding (kernel no larger than its stride: ViT, Swin, ConvNeXt) is left
    as it is: its stride is the patch size.

    Args:
        net: a torchvision network; changed in place.
    """
    _, conv = _first_conv(net)
    if max(conv.kernel_size) > max(conv.stride):
        conv.stride = (1, 1)
        if isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
            net.maxpool = nn.Identity()


def refuse_block_options(options: dict[str, Any]) -> None:
    """The collection's block options set to anything but null, or an unknown key, stop the
    build: torchvision's blocks do not read them.

    Args:
        options: the `model` keys the builder takes no argument for.

    Raises:
        ValueError: one of them set, or a key no model reads.
    """
    unknown = sorted(set(options) - set(BLOCK_KEYS))
    if unknown:
        raise ValueError(f"model=torchvision does not take {', '.join(unknown)}")
    given = [f"model.{key}={value}" for key, value in options.items() if value is not None]
    if given:
        raise ValueError(f"model=torchvision keeps the torchvision network's own blocks: {given[0]} does not "
                         f"apply to it (it sets the collection's blocks)")


@MODELS.register("torchvision")
def torchvision_model(arch: str, num_classes: int, input_quantizer: QuantizerSpec, weight_quantizer: QuantizerSpec,
                      in_channels: int = 3, stem: str = "imagenet", width: float = 1.0, groups: int = 1,
                      activation: str = "prelu", learnable_threshold: bool = False, binary_stem: bool = False,
                      binary_classifier: bool = False, binary_depthwise: bool = False,
                      keep_real: Iterable[str] = (), bn_momentum: float | None = None, se_reduction: int = 16,
                      binarize: bool = True, **block_options: Any) -> nn.Module:
    """A torchvision classification network, binarized by `bnntrain.nn.binarize`.

    Args:
        arch: the network's name in `torchvision.models` (`resnet18`, `mobilenet_v2`, ...).
        num_classes: the classifier's outputs.
        input_quantizer: every binary layer's sign estimator.
        weight_quantizer: every binary layer's weight binarizer.
        in_channels: the input images' channels (the first conv is rebuilt for other than 3).
        stem: `imagenet` (torchvision's stem) or `cifar` (see `small_input_stem`).
        width: torchvision's `width_mult` (MobileNets); 1 for the networks without one.
        groups: 1; the collection's grouped convs do not apply to torchvision's blocks.
        activation: what the network's ReLUs become: `prelu`, `identity` or `relu` (kept).
        learnable_threshold: ReActNet's learnable shift before each binary layer's sign.
        binary_stem: binarize the first conv too.
        binary_classifier: binarize the classifier too.
        binary_depthwise: binarize the depthwise convs too.
        keep_real: layer names (wildcards allowed) left real, e.g. `*.downsample.0`.
        bn_momentum: every BN's momentum (trick 10); None keeps torchvision's.
        se_reduction: read only with the collection's attention, which does not apply here.
        binarize: False builds the real-valued twin (teachers, baselines).
        **block_options: the collection's block options (`downsample`, `bn_position`,
            `attention`, `binary_init`): each must be null.

    Returns:
        The binarized network, fully binary until the stage sets its precision.

    Raises:
        ValueError: an unknown `arch`, `stem` or `activation`, a width torchvision cannot
            build, `groups` other than 1, or a block option that is set.
    """
    del se_reduction  # the collection's squeeze-excitation, refused with `attention`
    refuse_block_options(block_options)
    if groups != 1:
        raise ValueError(f"model=torchvision keeps the torchvision network's own convs: model.groups={groups} "
                         f"does not apply to it")
    net = torchvision_arch(arch, num_classes, in_channels, width)
    if choose("model.stem", stem, STEMS) == "cifar":
        small_input_stem(net)
    if bn_momentum is not None:
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return binarize_network(net, input_quantizer, weight_quantizer, binary_stem=binary_stem,
                            binary_classifier=binary_classifier, binary_depthwise=binary_depthwise,
                            keep_real=keep_real, activation=activation, learnable_threshold=learnable_threshold,
                            stay_real=not binarize)
