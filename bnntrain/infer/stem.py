"""The real-valued stem run a few samples at a time.

A ResNet stem at 224 px writes 64 x 112 x 112 floats per image before its max-pool shrinks them
4x: 51 MB at batch 16. An array that large comes fresh from the operating system on every call
(the allocator maps it anew), page by page, and is read back by the pool from main memory.
Run a sample or two at a time, the conv's output stays a few megabytes (reused memory, in cache
when the pool reads it); the pooled chunks are then joined. The result is the batched stem's
bit for bit where the conv computes each sample as it does in a batch, which `ChunkedStem`
checks on the first batch of each size, keeping the batched stem for a size where any bit differs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..tools.export.inference import InferenceBinaryLayer
from .packed_conv import PackedBinaryConv2d

CHUNK_BYTES = 8 << 20  # the largest intermediate output a chunk may write


class ChunkedStem(nn.Module):
    """A stem (an nn.Sequential of real-valued layers) run on chunks of the batch.

    Args:
        stem: the stem; its outputs are those of this module, bit for bit (checked per batch size).
    """

    def __init__(self, stem: nn.Sequential) -> None:
        super().__init__()
        self.stem = stem
        self.train(stem.training)
        # By the input's shape and type: samples per chunk (the batch: not chunked), and the
        # batched output's layout.
        self.chunk: dict[tuple, int] = {}
        self.channels_last: dict[tuple, bool] = {}

    def _chunked(self, x: Tensor, size: int) -> Tensor:
        out = torch.cat([self.stem(x[i:i + size]) for i in range(0, x.shape[0], size)])
        # In the batched stem's layout: the layers after it round differently by layout.
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last[_key(x)] else out.contiguous()

    def _choose(self, x: Tensor) -> Tensor:
        # The first batch of this size: how large each layer's output is per sample, and whether
        # the chunks give the batched outputs exactly.
        n, key, largest, y = x.shape[0], _key(x), 0, x
        for layer in self.stem:
            y = layer(y)
            largest = max(largest, y[:1].numel() * y.element_size())
        size = max(1, CHUNK_BYTES // max(largest, 1))
        self.channels_last[key] = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)
        self.chunk[key] = size if size < n and torch.equal(self._chunked(x, size), y) else n
        return y

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # batch statistics: the batch whole
            return self.stem(x)
        size = self.chunk.get(_key(x))
        if size is None:
            return self._choose(x)
        return self.stem(x) if size >= x.shape[0] else self._chunked(x, size)


def _key(x: Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))


def chunk_stem(model: nn.Module) -> bool:
    """Run the model's `stem` (an nn.Sequential with no binary layer) as a ChunkedStem, in place.

    Args:
        model: a packed inference model.

    Returns:
        Whether it has such a stem.
    """
    stem = getattr(model, "stem", None)
    if not isinstance(stem, nn.Sequential) or any(
            isinstance(m, (PackedBinaryConv2d, InferenceBinaryLayer)) for m in stem.modules()):
        return False
    model.stem = ChunkedStem(stem)
    return True
