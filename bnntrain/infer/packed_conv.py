"""The packed binary layer: `PackedBinaryConv2d` runs a binary conv (or a binary linear layer)
whose inputs and weights are both binary as numba's XNOR-popcount kernels (`kernels.py`): the
input's signs packed along the channels into uint64 words (NHWC), the weights packed once at
build time, and the conv computed as K - 2 x popcount(a xor w) over the valid taps of each
output position. The binary sums are integers and a tap in the zero padding counts for
nothing, as in PyTorch, so the outputs are the exported layer's bit for bit. A layer that pads
its signs with +-1 (larq's `pad_values`, QuickNet's +1) has its input padded with +-inf before
packing, whose sign that is whatever the threshold, and the kernels then pad nothing.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..tools.export import inference
from .buffers import POOL

WORD = 64  # bits per packed word
# binary_conv_dense's epilogue arguments when nothing is fused (post, residual, mode), and
# when it packs no signs for the next layer (next_threshold, signs).
NOT_FUSED = (np.empty((0, 0), np.float32), np.empty((0, 0, 0, 0), np.float32), 0)
NO_SIGNS = (np.empty(0, np.float32), np.empty((0, 0, 0, 0), np.uint64))
NO_NIBBLES = np.empty((0, 0, 0, 0), np.uint8)  # nibbles.binary_conv_nibbles' next_nib when unused


def require_numba():
    """The kernel module; numba is an optional extra.

    Returns:
        kernels (ModuleType): `bnntrain.infer.kernels`, imported (its kernels compile on first use).

    Raises:
        UserError: numba is not installed.
    """
    if importlib.util.find_spec("numba") is None:
        raise UserError("bnntrain.infer needs numba: pip install 'bnntrain[infer]' (or pip install numba)")
    from . import kernels
    return kernels


@functools.lru_cache(maxsize=256)
def channel_block(rows: int, channels: int, threads: int) -> int:
    """Output channels per work unit of `binary_conv_dense`: all of them where its rows of
    output positions share evenly among the threads, otherwise blocks of a multiple of 64
    channels, the fewest that share within 10% (a 7 x 7 map at batch 1 on 2 threads: 4 rows
    against 3 as rows, 7 units each as 14 half-rows).

    Args:
        rows: batch x output height.
        channels: output channels.
        threads: the kernels' threads.

    Returns:
        The channels per block: `channels`, or a multiple of 64.
    """
    best, best_share = channels, 0.0
    for wanted in range(1, max(1, channels // WORD) + 1):
        block = channels if wanted == 1 else math.ceil(channels / wanted / WORD) * WORD
        units = rows * math.ceil(channels / block)
        share = units / (threads * math.ceil(units / threads))  # the busy fraction of the threads' time
        if share > best_share + 1e-9:
            best, best_share = block, share
        if share >= 0.9:
            break
    return best


def pack_weight(weight: Tensor, groups: int) -> np.ndarray:
    """+-1 weights [O, C/G, KH, KW] -> uint64 [G, KH, KW, words per group, O/G]: bit c % 64 of
    word c // 64 set for +1, the bits past the last channel 0, the output channel innermost."""
    out_channels, per_group, kh, kw = weight.shape
    words = math.ceil(per_group / WORD)
    bits = (weight >= 0).view(groups, out_channels // groups, per_group, kh, kw).permute(0, 3, 4, 2, 1)
    bits = F.pad(bits.to(torch.int64), (0, 0, 0, words * WORD - per_group))  # pad the channel dim with 0
    bits = bits.reshape(groups, kh, kw, words, WORD, out_channels // groups)
    shifts = torch.arange(WORD, dtype=torch.int64).view(1, 1, 1, 1, WORD, 1)
    # Bit 63 makes the int64 sum negative; viewed as uint64 it is the word.
    packed = (bits << shifts).sum(4)
    return np.ascontiguousarray(packed.numpy().view(np.uint64))


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def why_not_packed(layer: inference.InferenceBinaryLayer) -> str | None:
    """Why the kernels cannot run `layer` (None: they can)."""
    if layer.activations != "binary":
        return f"{layer.activations} input activations (not binary)"
    if not layer.binary_weights:
        return "real-valued weights (a stage-1 checkpoint)"
    if layer.conv is not None and isinstance(layer.conv["padding"], str):
        return f"padding={layer.conv['padding']!r}"
    if getattr(layer, "pad_value", 0.0) not in (0.0, 1.0, -1.0):
        return f"pad_value={layer.pad_value} (the kernels pad with zeros or with signs)"
    return None


class PackedBinaryConv2d(nn.Module):
    """A binary conv (or a binary linear layer, as a 1x1 conv on a 1x1 image) run by the
    XNOR-popcount kernels: the input's signs packed once per call, the weights at build time.
    Outputs float32 scale x (whole-number sum) + bias, in the input's memory layout.

    Args:
        layer: an inference layer with binary inputs and binary weights.

    Raises:
        UserError: numba is not installed.
    """

    def __init__(self, layer: inference.InferenceBinaryLayer) -> None:
        super().__init__()
        self.kernels = require_numba()
        weight = layer.weight.detach().float().cpu()
        self.linear = layer.conv is None
        if self.linear:
            weight = weight[:, :, None, None]
            conv = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        else:
            conv = layer.conv
        self.out_channels, self.in_per_group, self.kh, self.kw = weight.shape
        self.groups = conv["groups"]
        self.in_channels = self.in_per_group * self.groups
        self.stride, self.padding, self.dilation = (_pair(conv[k]) for k in ("stride", "padding", "dilation"))
        # Signs padded with +-1: the input is padded here with +-inf (see the module's docstring).
        self.sign_padding, self.pad_fill = (0, 0), math.copysign(math.inf, getattr(layer, "pad_value", 0.0))
        if getattr(layer, "pad_value", 0.0):
            self.sign_padding, self.padding = self.padding, (0, 0)
        self.words_per_group = math.ceil(self.in_per_group / WORD)
        self.weight_words = pack_weight(weight, self.groups)
        # One group, no dilation: the faster kernel, its weights [KH, KW x words, O].
        self.dense = self.groups == 1 and self.dilation == (1, 1)
        if self.dense:
            self.weight_words = np.ascontiguousarray(self.weight_words.reshape(
                self.kh, self.kw * self.words_per_group, self.out_channels))
        # On x86 with AVX2, a dense layer runs the nibble kernel (nibbles.py; the same outputs,
        # about 1.4x faster): its weights (nibbles, each tap's popcounts). None: the word kernel.
        from . import nibbles  # numba's, so imported once require_numba has found it
        self.nibble_kernels, self.nibbles = nibbles, None
        if self.dense and nibbles.available() and nibbles.fits(self.kh, self.kw, self.words_per_group):
            self.nibbles = nibbles.nibble_weights(self.weight_words, self.kh, self.kw, self.in_channels)

        def vector(t: Tensor | None, n: int, fill: float) -> np.ndarray:
            v = np.full(n, fill, np.float32) if t is None else t.detach().float().cpu().reshape(-1).numpy()
            return np.ascontiguousarray(v, dtype=np.float32)

        self.scale = vector(layer.scale, self.out_channels, 1.0)
        self.bias = vector(layer.bias, self.out_channels, 0.0)
        # Adding a zero threshold changes no sign (-0.0 + 0.0 = +0.0, and x >= 0 holds for both).
        self.threshold = vector(layer.threshold, self.in_channels, 0.0)
        self._shapes: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}  # output shape by input's

    def extra_repr(self) -> str:
        kind = "linear" if self.linear else f"conv {self.kh}x{self.kw}"
        pad = (f"padding {self.padding}" if self.sign_padding == (0, 0)
               else f"padding {self.sign_padding} with {'+' if self.pad_fill > 0 else '-'}1")
        return (f"{kind}, {self.in_channels} -> {self.out_channels}, stride {self.stride}, {pad}, "
                f"groups {self.groups}: XNOR-popcount, {self.words_per_group} uint64 words per tap")

    def pack(self, x: Tensor) -> np.ndarray:
        """The signs of x + threshold, uint64 [N, H, W, groups * words per group].

        Args:
            x: a float32 (N, C, H, W) batch on the CPU, in either memory layout.

        Returns:
            The packed words: within each group, bit c % 64 of word c // 64 is set where
                channel c of x + threshold is >= 0.
        """
        n, _, h, w = x.shape
        words = POOL.empty((n, h, w, self.groups * self.words_per_group), np.uint64)
        if x.is_contiguous():
            self.kernels.pack_nchw(x.numpy(), self.threshold, self.groups, self.words_per_group, words)
        elif x.is_contiguous(memory_format=torch.channels_last):
            self.kernels.pack_nhwc(x.permute(0, 2, 3, 1).numpy(), self.threshold, self.groups,
                                   self.words_per_group, words)
        else:
            self.kernels.pack_nchw(x.contiguous().numpy(), self.threshold, self.groups, self.words_per_group, words)
        return words

    def forward(self, x: Tensor, epilogue: tuple[np.ndarray, np.ndarray, int] | None = None,
                signs: np.ndarray | None = None, next_layer: PackedBinaryConv2d | None = None) -> Tensor:
        """The layer on a batch; the last three arguments are for a dense conv in a fused block
        (`bnntrain.infer.fused`) and left out otherwise.

        Args:
            x: a float32 (N, C, H, W) batch on the CPU (or (N, C) for a linear layer).
            epilogue: (post, residual NHWC, mode): what follows the conv in its block, run in
                the kernel's output pass (`kernels._finish`).
            signs: x already packed, by the layer before, for this layer.
            next_layer: pack the output's signs for this layer too, handed on as the output's
                `packed_signs` attribute.

        Returns:
            The output, in x's memory layout.

        Raises:
            UserError: x is not on the CPU or has the wrong number of channels.
        """
        if x.device.type != "cpu":
            raise UserError(f"bnntrain.infer runs on the CPU; the input is on {x.device}")
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        if self.linear:
            x = x.reshape(x.shape[0], -1, 1, 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"a packed binary layer of {self.in_channels} input channels got shape {tuple(x.shape)}")
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if self.sign_padding != (0, 0):
            ph, pw = self.sign_padding
            x = F.pad(x, (pw, pw, ph, ph), value=self.pad_fill)
        if not self.dense:
            if epilogue is not None or next_layer is not None:
                raise UserError("a fused epilogue or a sign hand-over needs a dense conv (one group, no dilation)")
            n, _, h, w = x.shape
            words = self.pack(x) if signs is None else signs
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            out = POOL.empty(self._output_shape(n, h, w), np.float32)  # reused once no one holds it
            self.kernels.binary_conv(words, self.weight_words, self.scale, self.bias, sh, sw, ph, pw, dh, dw,
                                     self.in_per_group, out)
            return self._result(out, channels_last)
        return self.run_dense(x, signs, epilogue, next_layer, channels_last)

    def _output_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        key = (n, h, w)
        shape = self._shapes.get(key)
        if shape is None:
            (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
            oh = (h + 2 * ph - dh * (self.kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (self.kw - 1) - 1) // sw + 1
            shape = self._shapes[key] = (n, oh, ow, self.out_channels)
        return shape

    def _result(self, out: np.ndarray, channels_last: bool) -> Tensor:
        result = torch.from_numpy(out)
        if self.linear:
            return result.reshape(out.shape[0], self.out_channels)
        # The layout it came in: PyTorch's real-valued layers round differently on the two
        # layouts, and this keeps the model's outputs those of packed.load's in that layout.
        result = result.permute(0, 3, 1, 2)
        return result if channels_last else result.contiguous()

    def _nibble_input(self, n: int, h: int, w: int) -> np.ndarray:
        # The nibble kernel's input buffer for an (n, h, w) input: padded, a byte per nibble.
        ph, pw = self.padding
        return POOL.empty((n, h + 2 * ph, w + 2 * pw, self.nibbles[0].shape[2] // self.kw), np.uint8)

    def run_dense(self, x: Tensor, signs: np.ndarray | None, epilogue: tuple[np.ndarray, np.ndarray, int] | None,
                  next_layer: PackedBinaryConv2d | None, channels_last: bool = True) -> Tensor:
        """forward's dense path, for a caller that has checked x (float32 on the CPU, its
        channel count, padded where the signs are) as forward does: a fused block, per call.

        Args:
            x: the input batch (N, C, H, W), detached.
            signs: x already packed for this layer (words, or this layer's nibble input), or
                None to pack it here.
            epilogue: (post, residual NHWC, mode), or None (see forward).
            next_layer: the layer to pack the output's signs for, or None.
            channels_last: x's memory layout, which the output takes.

        Returns:
            The output (see forward); with next_layer, its `packed_signs` attribute holds
                (next_layer, its packed input (words or nibbles), the output's version, the
                output as an NHWC array).
        """
        n, _, h, w = x.shape
        signs = self.pack(x) if signs is None else signs
        shape = self._output_shape(n, h, w)
        out = POOL.empty(shape, np.float32)  # reused once no one holds it
        if epilogue is not None and epilogue[1].shape != shape:  # the kernel reads it unchecked
            raise UserError(f"a fused block's shortcut gave shape {epilogue[1].shape} (NHWC) for an output of {shape}")
        threshold, next_signs = NO_SIGNS
        if next_layer is not None:  # nibbles from nibble layer to nibble layer, words otherwise
            threshold = next_layer.threshold
            next_signs = (next_layer._nibble_input(*shape[:3]) if self.nibbles is not None and next_layer.nibbles is not None
                          else POOL.empty(shape[:3] + (next_layer.words_per_group,), np.uint64))
        (sh, sw), (ph, pw) = self.stride, self.padding
        if self.nibbles is not None:
            nibbles = self.nibble_kernels
            if signs.dtype != np.uint8:  # words: packed here, or handed on by a word-kernel layer
                words, signs = signs, self._nibble_input(n, h, w)
                nibbles.words_to_nibbles(words, ph, pw, signs)
            as_words, as_nibbles = (NO_SIGNS[1], next_signs) if next_signs.dtype == np.uint8 else (next_signs, NO_NIBBLES)
            nibbles.binary_conv_nibbles(signs, *self.nibbles, nibbles.POPCOUNTS, self.kw, self.scale, self.bias, sh, sw,
                                        ph, pw, self.in_channels, out, *(epilogue or NOT_FUSED), threshold, as_words,
                                        as_nibbles, self.kernels.threads(), nibbles.GROUP)
        else:
            block = channel_block(n * shape[1], self.out_channels, self.kernels.threads())
            self.kernels.binary_conv_dense(signs, self.weight_words, self.scale, self.bias, sh, sw, ph, pw,
                                           self.in_channels, out, *(epilogue or NOT_FUSED), threshold, next_signs, block)
        result = self._result(out, channels_last)
        if next_layer is not None:
            # The next layer's input, packed: it is this very tensor, so the words go with it,
            # with its version (changed in place, outside inference mode, it no longer matches)
            # and its NHWC array (the next block's residual, without a new view).
            result.packed_signs = (next_layer, next_signs, _version(result), out)
        return result


def _version(t: Tensor) -> int:
    """The tensor's in-place version, or -1 for an inference-mode tensor (which has none)."""
    return -1 if t.is_inference() else t._version
