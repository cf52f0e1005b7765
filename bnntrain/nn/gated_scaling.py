"""Real-to-Binary Net's data-driven channel re-scaling (Martinez et al., ICLR 2020, section 4.3;
larq-zoo's `RealToBinNetFactory._scale_binary_conv_output`).

A binary conv's output loses the magnitude of its input; the real-valued input, still at hand
before the sign, says how much each output channel should count. A squeeze-and-excitation gate
reads it: s = sigmoid(W2 relu(W1 mean_hw(x_real))), W1 of cin -> cin // 8, W2 of cin // 8 -> cout,
no biases, both drawn as Keras's he_normal draws them; the binary conv's output is multiplied by s
per sample and per output channel. The gate's layers are real-valued whatever the stage.
"""
from __future__ import annotations

from torch import Tensor, nn

from .quicknet_blocks import keras_init_


class GatedScaling(nn.Module):
    """Per-channel scales of a binary conv's output, computed from that conv's real-valued input.

    Args:
        cin: the channels of the real-valued input the scales are read from.
        cout: the channels of the output they scale.
        reduction: the hidden layer is cin // reduction wide (at least 1); larq-zoo's 8.
    """

    def __init__(self, cin: int, cout: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, cin // reduction)
        self.reduce = nn.Linear(cin, hidden, bias=False)
        self.expand = nn.Linear(hidden, cout, bias=False)
        for layer in (self.reduce, self.expand):
            keras_init_(layer, "he_normal")

    def scales(self, x_real: Tensor) -> Tensor:
        """The scales, in (0, 1).

        Args:
            x_real: the (N, cin, H, W) real-valued input of the binary conv (before its sign).

        Returns:
            The (N, cout, 1, 1) scales.
        """
        hidden = self.reduce(x_real.mean((2, 3))).relu()
        return self.expand(hidden).sigmoid()[:, :, None, None]

    def forward(self, x_real: Tensor, out: Tensor) -> Tensor:
        """The binary conv's output, scaled.

        Args:
            x_real: the (N, cin, H, W) real-valued input of the binary conv.
            out: the conv's (N, cout, H', W') output.

        Returns:
            out times the scales of x_real.
        """
        return out * self.scales(x_real)
