"""Whole-network weight initialisations that some papers' code applies after building
(`model.weight_init`); without one every layer keeps PyTorch's own init (and `binary_init`)."""
from __future__ import annotations

from torch import nn

from ..registry import choose

MODES = ("fan_in", "fan_out")


def init_weights(model: nn.Module, mode: str = "fan_in", linear: bool = False,
                 bn_weight: float | None = None) -> None:
    """He et al.'s normal init, N(0, 2 / fan), on every conv (binary ones included), as IR-Net's
    and ReCU's code does after building its ResNets.

    Args:
        model: the network, changed in place.
        mode: `fan_in` (`init.kaiming_normal_`'s default: IR-Net's CIFAR code, ReCU's) or
            `fan_out` (k x k x out channels: IR-Net's ImageNet code, `normal_(0, sqrt(2 / n))`).
        linear: the linear layers' weights too (IR-Net's CIFAR code); their biases keep PyTorch's.
        bn_weight: every BatchNorm2d's scale set to this and its shift to 0 (ReCU's ImageNet
            code: 1e-8); None keeps PyTorch's 1 and 0.

    Raises:
        ValueError: an unknown `mode` (`UnknownChoice`).
    """
    choose("model.weight_init.mode", mode, MODES)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) or (linear and isinstance(module, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode=mode)
        elif bn_weight is not None and isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, bn_weight)
            nn.init.zeros_(module.bias)
