"""Training losses from the `loss` config."""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn


def build_criterion(cfg: DictConfig) -> nn.Module:
    """Cross-entropy, with label smoothing where the recipe asks for it (seed trick 14).

    `CrossEntropyLoss` also takes soft (probability) targets, so batch mixing (mixup,
    CutMix) needs no special case in the training loop.
    """
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
