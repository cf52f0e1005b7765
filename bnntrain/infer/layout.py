"""How the packed layers lay out their weights and share their work: numpy and torch, no
numba, so that it imports where numba is not installed.

Words. +-1 weights pack 64 input channels to a uint64 word (bit c % 64 of word c // 64 set
for +1, the bits past the last channel 0), the output channel innermost (`pack_weight`), the
layout of the word kernel (`kernels.py`). Nibbles. The nibble kernel (`nibbles.py`) reads the
same bits four at a time, a byte per nibble, in blocks of 64 output channels
(`nibble_weights`).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

WORD = 64          # bits per packed word
NIBBLE_BLOCK = 64  # output channels per block of the nibble kernel's weights


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
    """The word kernels' weights: bit c % 64 of word c // 64 set for +1, the bits past the last
    channel 0, the output channel innermost.

    Args:
        weight: +-1 weights [O, C/G, KH, KW].
        groups: the conv's groups.

    Returns:
        uint64 [G, KH, KW, words per group, O/G].
    """
    out_channels, per_group, kh, kw = weight.shape
    words = math.ceil(per_group / WORD)
    bits = (weight >= 0).view(groups, out_channels // groups, per_group, kh, kw).permute(0, 3, 4, 2, 1)
    bits = F.pad(bits.to(torch.int64), (0, 0, 0, words * WORD - per_group))  # pad the channel dim with 0
    bits = bits.reshape(groups, kh, kw, words, WORD, out_channels // groups)
    shifts = torch.arange(WORD, dtype=torch.int64).view(1, 1, 1, 1, WORD, 1)
    # Bit 63 makes the int64 sum negative; viewed as uint64 it is the word.
    packed = (bits << shifts).sum(4)
    return np.ascontiguousarray(packed.numpy().view(np.uint64))


def nibble_weights(weight_words: np.ndarray, kh: int, kw: int, in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense word kernel's weights as the nibble kernel's, with each tap's popcounts (which
    the kernel takes back where a tap reads the padding).

    Args:
        weight_words: uint64 [KH, KW x words, O], as the dense word kernel takes them.
        kh: kernel height.
        kw: kernel width.
        in_channels: input channels; the nibbles past the last one (all zero) are left out.

    Returns:
        (uint8 [blocks of 64 output channels, KH, KW x ceil(in_channels / 4), 64], one nibble
            a byte, zeros past the last output channel; int32 [KH, KW, O], each tap's count of
            +1 weights per output channel).
    """
    _, run, out_channels = weight_words.shape
    words = run // kw
    nibbles = -(-in_channels // 4)
    shifts = np.arange(0, 64, 4, dtype=np.uint64)
    split = (weight_words.reshape(kh, kw, words, 1, out_channels) >> shifts[:, None]) & np.uint64(15)
    split = split.reshape(kh, kw, words * 16, out_channels)[:, :, :nibbles]
    blocks = -(-out_channels // NIBBLE_BLOCK)
    wn = np.zeros((kh, kw * nibbles, blocks * NIBBLE_BLOCK), np.uint8)
    wn[:, :, :out_channels] = split.reshape(kh, kw * nibbles, out_channels)
    # Block by block: a unit's 64 channels then read 64 contiguous bytes per step.
    wn = np.ascontiguousarray(wn.reshape(kh, kw * nibbles, blocks, NIBBLE_BLOCK).transpose(2, 0, 1, 3))
    counts = np.zeros(weight_words.shape, np.int64)
    for b in range(64):
        counts += ((weight_words >> np.uint64(b)) & np.uint64(1)).astype(np.int64)
    wpop = counts.reshape(kh, kw, words, out_channels).sum(axis=2).astype(np.int32)
    return wn, np.ascontiguousarray(wpop)


def nibble_sums_fit(kh: int, kw: int, words: int) -> bool:
    """Whether a dense layer's sums fit the nibble kernel's 16-bit accumulators.

    Args:
        kh: kernel height.
        kw: kernel width.
        words: uint64 words per tap (64 input channels each).

    Returns:
        True where the largest sum, kh x kw x 64 x words, is at most 65535.
    """
    return kh * kw * words * 64 <= (1 << 16) - 1
