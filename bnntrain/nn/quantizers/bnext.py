"""BNext's quantizers (Guo et al., "Join the High Accuracy Club on ImageNet with a Binary Neural
Network Ticket", 2022), as the authors' code computes them (hpi-xnor/BNext, `src/bnext.py`:
`HardSign` and `HardBinaryConv`; the temperature curriculum is `adjust_temperature` in
`src/train_assistant_group_amp.py`).

The activations are sign(x) from the first epoch, with the straight-through gradient of
clamp(x, -1.5, 1.5). The weights start soft, clamp(w / T, -1, 1), and harden as the
temperature T falls by 0.9 an epoch: from the epoch where T < 1e-7 (epoch 153, counted from
0) they are sign(w). The code also gives each `HardSign` a temperature; it divides x by it
before the sign, which changes no sign and no gradient. The activations' quantizer is
`ste_sign` with `clip_value: 1.5` (larq's SteSign: g where |x| <= 1.5, both ends included, as
torch.clamp passed it when the code was run; recent PyTorch gives 0 exactly at the bounds).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .base import WEIGHT_QUANTIZERS, Quantizer, registered, sign

HARD_BELOW = 1e-7  # the code's `if self.temperature < 1e-7`: sign(w) from there on
MIN_TEMPERATURE = 1e-8  # the code's `temperature.clamp(min=1e-8)` before it divides


@functools.lru_cache(maxsize=None)
def curriculum(decay: float, epoch: int, dtype: torch.dtype = torch.float32) -> float:
    """The temperature during epoch `epoch` (from 0): 1 multiplied by `decay` once after each
    epoch, in `dtype`, as the code's `temperature.mul_(0.9)` does to its float32 buffer (so
    the value is the code's bit for bit, not decay ** epoch rounded once).

    Args:
        decay: the factor per epoch (the code's 0.9).
        epoch: the epoch, counted from 0.
        dtype: the temperature buffer's dtype.

    Returns:
        The temperature, exactly representable in `dtype`.
    """
    t = torch.ones((), dtype=dtype)
    for _ in range(epoch):
        t.mul_(decay)
    return t.item()


class SoftSignFunction(torch.autograd.Function):
    """clamp(w / T, -1, 1) while T >= 1e-7, else sign(w); the gradient g itself (the code's
    `binary.detach() - w.detach() + w`, without its rounding in the forward)."""

    @staticmethod
    def forward(ctx, w: Tensor, temperature: Tensor) -> Tensor:
        # A select rather than the code's Python `if` on the buffer: the same values, no host sync.
        soft = (w / temperature.clamp(min=MIN_TEMPERATURE)).clamp(-1, 1)
        return torch.where(temperature < HARD_BELOW, sign(w), soft)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


@registered(WEIGHT_QUANTIZERS, "bnext_weight")
class BNextWeight(Quantizer):
    """BNext's `HardBinaryConv` weights: clamp(w / T, -1, 1) while the temperature T >= 1e-7,
    sign(w) below (sign(0) = +1 here, 0 in the code's torch.sign), with no scale; the gradient
    passes unchanged (no clip mask). T is a buffer (checkpoints and the converter carry it); the
    training loop sets it to decay^epoch at each epoch's start (`set_epoch`, the code's 0.9 per
    epoch), so the weights are soft up to epoch 152 and signs from epoch 153 on.

    The latent weights are kept in [-clip, clip] (`project_`). The code clamps them in place at
    the start of every training forward; bnntrain projects once as a fresh stage starts and
    after every optimizer step (`WeightProjection`). The weights change only in a step, so every
    training forward sees the same clamped weights and the steps are the same. They differ in
    two places: the code evaluates with the weights as its last step left them, bnntrain with
    them clamped, which gives the same forward (where |w| > clip >= T, clamp(w / T) and sign
    both give sign(w)); and the code keeps unclamped values in its checkpoints. A stage with
    real weights projects nothing (the code has none).

    In the soft phase the weights are not +-1: `packable` is false and the export refuses the
    layer in one line; from T < 1e-7 it packs sign(w).

    Args:
        decay: the temperature's factor per epoch (the code's 0.9).
        clip: the bound of the latent weights (the code's 1.5).
    """

    projects_weights = True

    def __init__(self, decay: float = 0.9, clip: float = 1.5) -> None:
        super().__init__()
        self.decay, self.clip = decay, clip
        self.register_buffer("temperature", torch.ones(1))

    def arguments(self) -> dict[str, Any]:
        return {"decay": self.decay, "clip": self.clip}

    @property
    def hard(self) -> bool:
        """Whether T < 1e-7: the forward is sign(w) (reads the buffer: a host sync on a GPU)."""
        return bool(self.temperature.item() < HARD_BELOW)

    @property
    def packable(self) -> bool:  # type: ignore[override]
        """sign(w) once hard; soft weights are no +-1 (nor a scale times it)."""
        return self.hard

    def set_epoch(self, epoch: int) -> None:
        """The temperature of epoch `epoch`: decay^epoch, as the code's curriculum reaches it.

        Args:
            epoch: the stage's epoch, counted from 0.
        """
        self.temperature.fill_(curriculum(self.decay, epoch, self.temperature.dtype))

    def values(self, w: Tensor) -> Tensor:
        if self.hard:
            return torch.tensor([-1.0, 1.0], dtype=w.dtype, device=w.device)
        return self(w).detach().unsqueeze(-1)  # soft: each weight's own value

    def forward(self, w: Tensor) -> Tensor:
        return SoftSignFunction.apply(w, self.temperature)

    @torch.no_grad()
    def project_(self, w: Tensor) -> None:
        """The code's `weight.data.clamp_(-1.5, 1.5)`.

        Args:
            w: the latent weight, changed in place.
        """
        w.clamp_(-self.clip, self.clip)
