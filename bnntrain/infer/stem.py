"""The real-valued stem: its conv in numba, its max-pool in the conv's pass, and the batch run a
few samples at a time.

`DirectConv2d` runs a stem conv (few input channels) with `stem_conv.direct_conv`, and
`DirectConvMaxPool` that conv and the max-pool after it with `stem_conv.conv_max_pool`, each
where it gives PyTorch's modules' outputs bit for bit (checked on the first batch of each shape
and thread count; stem_conv.py says why they can). The max-pooled pass also packs the first
binary block's input signs (`hand_on_signs`), as a fused block does for the next one.

`ChunkedStem`: a ResNet stem at 224 px writes 64 x 112 x 112 floats per image before its
max-pool shrinks them 4x: 51 MB at batch 16. An array that large comes fresh from the operating
system on every call (the allocator maps it anew), page by page, and is read back by the pool
from main memory. Run a sample or two at a time, the conv's output stays a few megabytes
(reused memory, in cache when the pool reads it); the pooled chunks are then joined. The result
is the batched stem's bit for bit where the conv computes each sample as it does in a batch,
which `ChunkedStem` checks on the first batch of each size, keeping the batched stem for a size
where any bit differs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks

from ..tools.export.inference import InferenceBinaryLayer
from .buffers import POOL
from .fma import CHANNELS
from .kernels import _ceil_div
from .packed_conv import NO_NIBBLES, NO_SIGNS, PackedBinaryConv2d, _version
from .pooling import FastMaxPool2d
from .stem_conv import conv_max_pool, direct_conv

MAX_IN_CHANNELS = 8  # the convs whose order stem_conv.py found: an image's channels
# Taps per output (kh x kw x in channels) below which oneDNN's kernel is the faster: measured at
# 224 px on 2 threads, direct_conv took 0.90x its time for a 7x7 stem (147 taps) but 1.12x for
# a 5x5 (75) and 1.75x for ReActNet-A's 3x3 (27), whose tiles are all overhead.
MIN_TAPS = 128

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


def fits(conv: nn.Module) -> bool:
    """Whether `DirectConv2d` can run a conv.

    Args:
        conv: any module.

    Returns:
        True for a float32 nn.Conv2d of at most MAX_IN_CHANNELS inputs and at least
            MIN_TAPS taps per output, one group, no dilation, zero padding given as numbers.
    """
    return (type(conv) is nn.Conv2d and conv.in_channels <= MAX_IN_CHANNELS and conv.groups == 1
            and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] >= MIN_TAPS
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32)


class DirectConv2d(nn.Module):
    """A `fits` conv run by `direct_conv` wherever that gives its outputs bit for bit (checked
    on the first batch of each shape and thread count); channels-last float32 CPU input,
    otherwise the conv itself.

    Args:
        conv: the conv, kept for those checks and as the fallback.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.train(conv.training)
        out_channels = conv.out_channels
        wide = _ceil_div(out_channels, CHANNELS) * CHANNELS
        taps = conv.weight.detach().float().permute(2, 3, 1, 0).reshape(-1, out_channels)  # (ky, kx, c) by o
        weight = np.zeros((taps.shape[0], wide), np.float32)
        weight[:, :out_channels] = taps.numpy()
        # Block-major: each block of CHANNELS channels' weights contiguous, tap by tap.
        self.weight = np.ascontiguousarray(weight.reshape(-1, wide // CHANNELS, CHANNELS).transpose(1, 0, 2))
        self.bias = np.zeros(wide, np.float32)
        if conv.bias is not None:
            self.bias[:out_channels] = conv.bias.detach().float().numpy()
        self.fast: dict[tuple, bool] = {}  # by input shape and threads: whether direct_conv gives the conv's outputs

    def forward(self, x: Tensor) -> Tensor:
        if (self.training or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4
                or not x.is_contiguous(memory_format=torch.channels_last) or x.requires_grad):
            return self.reference(x)
        key = (tuple(x.shape), torch.get_num_threads())
        fast = self.fast.get(key)
        if fast is None:
            expected = self.reference(x)
            self.fast[key] = torch.equal(self._run(x).view(torch.int32), expected.view(torch.int32))  # every bit
            return expected
        return self._run(x) if fast else self.reference(x)

    def reference(self, x: Tensor) -> Tensor:
        """What this module computes, as PyTorch's modules compute it.

        Args:
            x: the input batch.

        Returns:
            The conv's output (and the max-pool's, in DirectConvMaxPool).
        """
        return self.conv(x)

    def _geometry(self, x: Tensor) -> tuple:
        (kh, kw), (sh, sw), (ph, pw) = self.conv.kernel_size, self.conv.stride, self.conv.padding
        n, c, h, w = x.shape
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        padded = POOL.empty((n, h + 2 * ph, w + 2 * pw, c), np.float32)  # scratch, reused across calls
        return (kh, kw, sh, sw, ph, pw), (n, oh, ow), padded

    def _run(self, x: Tensor) -> Tensor:
        conv, (n, oh, ow), padded = self._geometry(x)
        out = POOL.empty((n, oh, ow, self.conv.out_channels), np.float32)  # reused once no one holds it
        direct_conv(x.detach().permute(0, 2, 3, 1).numpy(), self.weight, self.bias, *conv, padded, out,
                    torch.get_num_threads())
        return torch.from_numpy(out).permute(0, 3, 1, 2)


class DirectConvMaxPool(DirectConv2d):
    """A DirectConv2d and the max-pool after it run together by `conv_max_pool` wherever that
    gives the pool's outputs on the conv's bit for bit (checked as DirectConv2d checks): the
    conv's output, 3 MB per image at 224 px, then never goes to memory and back.

    Args:
        conv: the conv.
        pool: the max-pool (a FastMaxPool2d, for its kernel, stride and padding).
    """

    def __init__(self, conv: nn.Conv2d, pool: FastMaxPool2d) -> None:
        super().__init__(conv)
        self.pool = pool
        self.next_layer = None  # the first block's conv, where this pass packs its input (stem.hand_on_signs)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "next_layer":  # a reference: the block owns it
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def reference(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(x))

    def _run(self, x: Tensor) -> Tensor:
        conv, (n, oh, ow), padded = self._geometry(x)
        pool = self.pool
        poh, pw = ((size + 2 * pool.padding - pool.kernel) // pool.stride + 1 for size in (oh, ow))
        threads = torch.get_num_threads()
        ring = POOL.empty((threads, pool.kernel, ow, self.weight.shape[0] * CHANNELS), np.float32)
        out = POOL.empty((n, poh, pw, self.conv.out_channels), np.float32)
        # The first block's signs, packed in this pass, where no hook could change the output first.
        hand_to = None if _global_forward_hooks or self._forward_hooks else self.next_layer
        threshold, nib = (NO_SIGNS[0], NO_NIBBLES) if hand_to is None else (
            hand_to.threshold, POOL.empty(hand_to._nibble_shape(n, poh, pw), np.uint8))
        conv_max_pool(x.detach().permute(0, 2, 3, 1).numpy(), self.weight, self.bias, *conv, pool.kernel, pool.stride,
                      pool.padding, padded, ring, out, threshold, nib, threads)
        result = torch.from_numpy(out).permute(0, 3, 1, 2)
        if hand_to is not None:  # as a fused block hands its output's signs on
            result.packed_signs = (hand_to, nib, _version(result), out)
        return result


def speed_up_stem_convs(model: nn.Module) -> int:
    """Run each `fits` conv of the model's `stem` (an nn.Sequential) as a DirectConv2d, in place.

    Args:
        model: a packed inference model.

    Returns:
        How many convs were swapped.
    """
    stem = getattr(model, "stem", None)
    if not isinstance(stem, nn.Sequential):
        return 0
    swapped = 0
    for i, layer in enumerate(stem):
        if fits(layer):
            # A max-pool right after it (Identity layers between) runs with it.
            j = i + 1
            while j < len(stem) and isinstance(stem[j], nn.Identity):
                j += 1
            if j < len(stem) and isinstance(stem[j], FastMaxPool2d):
                stem[i], stem[j] = DirectConvMaxPool(layer, stem[j]), nn.Identity()
            else:
                stem[i] = DirectConv2d(layer)
            swapped += 1
    return swapped


def hand_on_signs(model: nn.Module, probe: Tensor) -> bool:
    """Have the stem's DirectConvMaxPool pack the first fused block's input signs in its pass,
    where the stem's output reaches that block as the very tensor it made (nothing in between
    makes another) and the block's conv runs the nibble kernel; kept only if the model's output
    on the probe stays the same bit for bit.

    Args:
        model: a model after `fused.fuse_blocks` and `speed_up_stem_convs`, in eval mode.
        probe: an input batch for the whole model.

    Returns:
        Whether the stem hands its signs on.
    """
    from .fused import FusedBinaryBlock  # it imports the packed layer, as this module does
    stem = getattr(model, "stem", None)
    layers = stem.stem if isinstance(stem, ChunkedStem) else stem
    first = next((m for m in model.modules() if isinstance(m, FusedBinaryBlock)), None)
    if not isinstance(layers, nn.Sequential) or first is None or not isinstance(layers[0], DirectConvMaxPool):
        return False
    conv, pool = first.conv, layers[0]
    if (conv.nibbles is None or conv.sign_padding != (0, 0) or conv.in_channels != pool.conv.out_channels
            or not all(isinstance(m, nn.Identity) for m in layers[1:])):
        return False
    seen = []
    hooks = [stem.register_forward_hook(lambda m, args, out: seen.append(out)),
             first.register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
    with torch.inference_mode():
        reference = model(probe)
        for hook in hooks:
            hook.remove()
        if len(seen) != 2 or seen[0] is not seen[1]:
            return False
        pool.next_layer = conv
        if torch.equal(model(probe), reference):
            return True
    pool.next_layer = None
    return False
