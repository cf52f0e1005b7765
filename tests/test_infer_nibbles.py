"""bnntrain.infer's nibble kernel (infer/nibbles.py, x86 with AVX2): the same outputs as the word
kernel bit for bit, in every epilogue mode and for every way of handing on the next layer's
signs, its byte accumulators never overflow, and a whole model gives the same outputs with
it and without it."""
import numpy as np
import pytest
import torch

from conftest import need
from test_infer_fused import exported

numba = need("numba", extra="infer")
from bnntrain import infer  # noqa: E402  (needs numba)
from bnntrain.infer import kernels, layout, nibbles  # noqa: E402
from bnntrain.infer.packed_conv import NO_SIGNS, NOT_FUSED, NO_NIBBLES  # noqa: E402

numba.set_num_threads(1)  # the suite's two workers share two cores
pytestmark = pytest.mark.skipif(not nibbles.available(), reason="the nibble kernel needs x86-64 with AVX2")

# (batch, in channels, height, width, out channels, kernel, stride, padding): channels filling
# words, part words, more than one 64-channel block with a part block; strides, 1x1 convs.
CASES = [
    (1, 64, 9, 9, 64, 3, 1, 1),
    (2, 64, 8, 7, 128, 3, 2, 1),
    (1, 100, 7, 7, 96, 3, 1, 1),
    (3, 130, 5, 6, 200, 3, 1, 1),
    (1, 32, 12, 11, 32, 3, 1, 1),
    (2, 256, 5, 5, 72, 1, 1, 0),
    (1, 64, 10, 10, 64, 1, 2, 0),
    (1, 512, 4, 4, 64, 3, 2, 1),
]


def packed_operands(rng, batch, cin, h, w, cout, k):
    """Random packed activations and weights with the bits past the last channel 0 (as packing leaves them)."""
    cw = -(-cin // 64)
    last = np.uint64((1 << (cin - 64 * (cw - 1))) - 1) if cin % 64 else np.uint64(2**64 - 1)
    words = rng.integers(0, 2**64, (batch, h, w, cw), dtype=np.uint64)
    words[..., -1] &= last
    weights = rng.integers(0, 2**64, (k, k, cw, cout), dtype=np.uint64)
    weights[:, :, -1] &= last
    return words, np.ascontiguousarray(weights.reshape(k, k * cw, cout))


def run_both(case, mode, hand_on, seed=0, operands=None):
    """The word kernel and the nibble kernel on the same operands: (outputs, next signs) of each."""
    batch, cin, h, w, cout, k, s, p = case
    rng = np.random.default_rng(seed)
    words, weights = operands or packed_operands(rng, batch, cin, h, w, cout, k)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    scale, bias, threshold = (rng.standard_normal(cout).astype(np.float32) for _ in range(3))
    epilogue = NOT_FUSED if mode == 0 else (rng.standard_normal((5, cout)).astype(np.float32),
                                            rng.standard_normal((batch, oh, ow, cout)).astype(np.float32), mode)
    next_words = -(-cout // 64)
    word_signs = np.zeros((batch, oh, ow, next_words), np.uint64) if hand_on else NO_SIGNS[1]
    expected = np.full((batch, oh, ow, cout), np.nan, np.float32)
    kernels.binary_conv_dense(words, weights, scale, bias, s, s, p, p, cin, expected, *epilogue,
                              threshold if hand_on else NO_SIGNS[0], word_signs, cout)

    wn, wpop = layout.nibble_weights(weights, k, k, cin)
    nib = np.full((batch, h + 2 * p, w + 2 * p, -(-cin // 4)), 0xAB, np.uint8)  # a stale border is zeroed
    nibbles.words_to_nibbles(words, p, p, nib)
    got = np.full_like(expected, np.nan)
    signs, next_nib = NO_SIGNS[1], NO_NIBBLES
    if hand_on == "words":
        signs = np.zeros_like(word_signs)
    elif hand_on == "nibbles":  # for a next 3x3 layer with padding 1
        next_nib = np.full((batch, oh + 2, ow + 2, -(-cout // 4)), 0xCD, np.uint8)
    nibbles.binary_conv_nibbles(nib, wn, wpop, nibbles.POPCOUNTS, k, scale, bias, s, s, p, p, cin, got, *epilogue,
                                threshold if hand_on else NO_SIGNS[0], signs, next_nib, 2, nibbles.GROUP)
    return (expected, word_signs), (got, signs if hand_on != "nibbles" else next_nib)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_nibble_kernel_equals_the_word_kernel(case, mode):
    (expected, _), (got, _) = run_both(case, mode, None, seed=mode)
    assert not np.isnan(expected).any()
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "x".join(map(str, c)))
def test_next_signs_as_words_and_as_nibbles(case):
    (expected, word_signs), (got, signs) = run_both(case, 2, "words")
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)) and np.array_equal(signs, word_signs)
    (expected, word_signs), (got, next_nib) = run_both(case, 2, "nibbles")
    want = np.full_like(next_nib, 0x11)
    nibbles.words_to_nibbles(word_signs, 1, 1, want)
    assert np.array_equal(next_nib, want)  # the border zeroed, the signs as words_to_nibbles writes them


def test_words_to_nibbles_layout():
    """Byte j of a position is 16 x nibble j (bits 4j to 4j + 3 across the words), the border zero."""
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**64, (2, 3, 4, 2), dtype=np.uint64)
    nib = np.full((2, 5, 8, 27), 0xFF, np.uint8)  # 27 of the 32 nibbles: 108 channels
    nibbles.words_to_nibbles(words, 1, 2, nib)
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little").reshape(2, 3, 4, 128)
    values = (bits[..., :108].reshape(2, 3, 4, 27, 4) * np.array([1, 2, 4, 8])).sum(-1) * 16
    assert np.array_equal(nib[:, 1:4, 2:6], values)
    border = np.ones(nib.shape[:3], bool)
    border[:, 1:4, 2:6] = False
    assert not nib[border].any()


def test_the_byte_accumulators_do_not_overflow():
    """Every tap at its largest count (all 512 channels differ, 4 per step, 63 steps a chunk):
    the sums are -K exactly. Longer chunks would wrap a byte."""
    case = (1, 512, 3, 3, 64, 3, 1, 1)
    words = np.zeros((1, 3, 3, 8), np.uint64)
    weights = np.full((3, 3 * 8, 64), 2**64 - 1, np.uint64)
    (expected, _), (got, _) = run_both(case, 0, None, operands=(words, weights))
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    wn, wpop = layout.nibble_weights(weights, 3, 3, 512)
    assert wn.shape == (1, 3, 3 * 128, 64) and (wpop == 512).all()
    assert layout.nibble_sums_fit(3, 3, 113) and not layout.nibble_sums_fit(3, 3, 114)  # sums up to 65535 in 16 bits


def test_a_model_gives_the_same_outputs_with_and_without_nibbles(tmp_path):
    path = exported(tmp_path, "reactnet18")
    with_nibbles, without = infer.load(path), infer.load(path, nibbles=False)
    convs = [m for m in without.modules() if isinstance(m, infer.PackedBinaryConv2d)]
    assert convs and all(m.nibbles is None for m in convs)
    assert all(m.nibbles is not None for m in with_nibbles.modules() if isinstance(m, infer.PackedBinaryConv2d))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(with_nibbles(x), without(x))
        first = with_nibbles.stages[0][0](with_nibbles.stem(x.contiguous(memory_format=torch.channels_last)))
    handed = first.packed_signs[1]  # the block hands the next block its input as padded nibbles
    assert handed.dtype == np.uint8 and handed.shape[1:3] == (first.shape[2] + 2, first.shape[3] + 2)
