"""Flip ratio: the fraction of binary weights whose sign changed since the last look.

The signal BNN training is watched by: latent weights keep moving long after accuracy
stops improving, but once few signs flip per epoch the binary network has settled.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import binary_layers


class FlipTracker:
    """Keeps one boolean snapshot per binary layer of the binary choices its weight quantizer
    makes (the sign of w for most; of the standardised weight for IR-Net and ReCU)."""

    def __init__(self, model: nn.Module) -> None:
        # The real-valued twin's layers never binarize their weights: nothing to watch.
        self.layers = [(name, layer) for name, layer in binary_layers(model) if layer.binarize]
        self.signs = [self._signs(layer) for _, layer in self.layers]

    @staticmethod
    def _signs(layer: nn.Module) -> torch.Tensor:
        return layer.weight_quantizer.weight_signs(layer.weight.detach())

    def update(self) -> dict[str, float]:
        """`train/flip_ratio` over all binary weights and `flip_ratio/<layer>` for each,
        since the previous call (or since the tracker was made); {} without binary layers."""
        if not self.layers:
            return {}
        current = [self._signs(layer) for _, layer in self.layers]
        flipped = torch.stack([(now != before).sum() for now, before in zip(current, self.signs)])
        self.signs = current
        sizes = [layer.weight.numel() for _, layer in self.layers]
        counts = flipped.tolist()  # one device sync per epoch
        ratios = {f"flip_ratio/{name}": n / size for (name, _), n, size in zip(self.layers, counts, sizes)}
        return {"train/flip_ratio": sum(counts) / sum(sizes), **ratios}
