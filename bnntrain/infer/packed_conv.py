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
from .layout import WORD, channel_block, nibble_weights, nibble_sums_fit, pack_weight  # noqa: F401 (API)

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
        use_nibbles: a dense layer runs the nibble kernel where the CPU has AVX2 (False: the
            word kernel everywhere; the outputs are the same).

    Raises:
        UserError: numba is not installed.
    """

    def __init__(self, layer: inference.InferenceBinaryLayer, use_nibbles: bool = True) -> None:
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

        def vector(t: Tensor | None, n: int, fill: float) -> np.ndarray:
            v = np.full(n, fill, np.float32) if t is None else t.detach().float().cpu().reshape(-1).numpy()
            return np.ascontiguousarray(v, dtype=np.float32)

        self.scale = vector(layer.scale, self.out_channels, 1.0)
        self.bias = vector(layer.bias, self.out_channels, 0.0)
        # Adding a zero threshold changes no sign (-0.0 + 0.0 = +0.0, and x >= 0 holds for both).
        self.threshold = vector(layer.threshold, self.in_channels, 0.0)
        # On x86 with AVX2, a dense layer runs the nibble kernel (nibbles.py; the same outputs,
        # about 1.4x faster): its weights (nibbles, each tap's popcounts). None: the word kernel.
        from . import nibbles  # numba's, so imported once require_numba has found it
        self.nibble_kernels, self.nibbles = nibbles, None
        if use_nibbles and self.dense and nibbles.available() and nibble_sums_fit(self.kh, self.kw, self.words_per_group):
            self.nibbles = nibble_weights(self.weight_words, self.kh, self.kw, self.in_channels)
            self._nibble_arguments = (*self.nibbles, nibbles.POPCOUNTS, self.kw, self.scale, self.bias, *self.stride,
                                      *self.padding, self.in_channels)
        self._shapes: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}  # output shape by input's
        self._plans: dict[tuple, tuple] = {}  # by input shape and next layer: see _plan

    def extra_repr(self) -> str:
        kind = "linear" if self.linear else f"conv {self.kh}x{self.kw}"
        pad = (f"padding {self.padding}" if self.sign_padding == (0, 0)
               else f"padding {self.sign_padding} with {'+' if self.pad_fill > 0 else '-'}1")
        kernel = "nibble kernel" if self.nibbles is not None else "word kernel"
        return (f"{kind}, {self.in_channels} -> {self.out_channels}, stride {self.stride}, {pad}, "
                f"groups {self.groups}: XNOR-popcount ({kernel}), {self.words_per_group} uint64 words per tap")

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

    def _nibble_shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        # The nibble kernel's input for an (n, h, w) input: padded, a byte per nibble.
        ph, pw = self.padding
        return (n, h + 2 * ph, w + 2 * pw, self.nibbles[0].shape[2] // self.kw)

    def _plan(self, n: int, h: int, w: int, next_layer: PackedBinaryConv2d | None) -> tuple:
        """What a dense run on an (n, h, w) input needs beyond the arrays, worked out once per
        shape (at batch 1 a block's Python work is a tenth of its time): the output's shape,
        the next layer's threshold and its packed input's shape and type (nibbles from a
        nibble layer to a nibble layer, words otherwise), and this layer's nibble input's."""
        key = (n, h, w, next_layer)
        plan = self._plans.get(key)
        if plan is None:
            shape = self._output_shape(n, h, w)
            threshold, next_shape, next_type = NO_SIGNS[0], None, None
            if next_layer is not None:
                threshold = next_layer.threshold
                if self.nibbles is not None and next_layer.nibbles is not None:
                    next_shape, next_type = next_layer._nibble_shape(*shape[:3]), np.uint8
                else:
                    next_shape, next_type = shape[:3] + (next_layer.words_per_group,), np.uint64
            own = self._nibble_shape(n, h, w) if self.nibbles is not None else None
            plan = self._plans[key] = (shape, threshold, next_shape, next_type, own)
        return plan

    def _as_nibbles(self, signs: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
        # The nibble kernel's input (`shape`: _plan's own) from packed signs: words (packed here,
        # or handed on by a word-kernel layer) turned into nibbles, or nibbles as they are.
        if signs.dtype == np.uint8:
            return signs
        nibbles = POOL.empty(shape, np.uint8)
        self.nibble_kernels.words_to_nibbles(signs, self.padding[0], self.padding[1], nibbles)
        return nibbles

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
        shape, threshold, next_shape, next_type, own = self._plan(n, h, w, next_layer)
        signs = self.pack(x) if signs is None else signs
        out = POOL.empty(shape, np.float32)  # reused once no one holds it
        if epilogue is None:
            epilogue = NOT_FUSED
        elif epilogue[1].shape != shape:  # the kernel reads it unchecked
            raise UserError(f"a fused block's shortcut gave shape {epilogue[1].shape} (NHWC) for an output of {shape}")
        next_signs = NO_SIGNS[1] if next_shape is None else POOL.empty(next_shape, next_type)
        # The kernels' share of the work by threads: PyTorch's count, which set_threads makes
        # numba's too (numba's own query costs more than some layers' Python work).
        threads = torch.get_num_threads()
        if own is not None:
            nibbles = self.nibble_kernels
            signs = self._as_nibbles(signs, own)
            as_words, as_nibbles = (NO_SIGNS[1], next_signs) if next_type is np.uint8 else (next_signs, NO_NIBBLES)
            nibbles.binary_conv_nibbles(signs, *self._nibble_arguments, out, *epilogue, threshold, as_words, as_nibbles,
                                        threads, nibbles.GROUP)
        else:
            if signs.dtype != np.uint64:  # nibbles, handed on by a block planned before this layer's kernel changed
                signs = self.pack(x)
            (sh, sw), (ph, pw) = self.stride, self.padding
            block = channel_block(n * shape[1], self.out_channels, threads)
            self.kernels.binary_conv_dense(signs, self.weight_words, self.scale, self.bias, sh, sw, ph, pw,
                                           self.in_channels, out, *epilogue, threshold, next_signs, block)
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
