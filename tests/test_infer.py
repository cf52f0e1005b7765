"""bnntrain.infer: the XNOR-popcount runtime gives the exported model's outputs (the integer
binary sums exactly), on every preset the exporter accepts and on real images, and its
command line predicts, benchmarks and fails in one line."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import forked_cli
from bnntrain.tools import export
from bnntrain.engine import load_checkpoint, save_checkpoint
from bnntrain.errors import ConfigError
from bnntrain.nn import BinaryConv2d, BinaryLinear
from conftest import main_in_process, need
from test_export import VARIANTS, digits, digits_test_set, export_variant  # noqa: F401 (a fixture)

numba = need("numba", extra="infer")  # bnntrain.infer's kernels
from bnntrain import infer  # noqa: E402  (needs numba)

numba.set_num_threads(1)  # the suite's two workers share two cores

# (in, out, kernel, stride, padding, dilation, groups, height, width): channels that fill
# one word, part of one, several with a remainder; every border case of the padding.
CONVS = {
    "3x3, 64 channels, padding 1": (64, 32, 3, 1, 1, 1, 1, 9, 7),
    "3x3 stride 2, 70 channels": (70, 16, 3, 2, 1, 1, 1, 11, 10),
    "3x3, 130 channels (3 words), wide output": (130, 300, 3, 1, 1, 1, 1, 6, 13),
    "5x5, padding 2 beyond a 4x4 image": (8, 8, 5, 1, 2, 1, 1, 4, 4),
    "1x1 stride 2": (96, 24, 1, 2, 0, 1, 1, 8, 8),
    "3x1 kernel": (20, 12, (3, 1), 1, (1, 0), 1, 1, 7, 5),
    "dilation 2": (48, 16, 3, 1, 2, 2, 1, 9, 9),
    "groups 2 (a word each)": (80, 32, 3, 1, 1, 1, 2, 6, 6),
    "depthwise": (32, 32, 3, 2, 1, 1, 32, 8, 8),
}


def binary_layer(cin, cout, kernel, stride, padding, dilation, groups, threshold=True, scale=True):
    torch.manual_seed(0)
    conv = BinaryConv2d(cin, cout, kernel, stride, padding, groups=groups, bias=True,
                        weight_quantizer="scaled_sign" if scale else "sign", learnable_threshold=threshold)
    conv.dilation = (dilation, dilation)
    with torch.no_grad():
        conv.bias.normal_()
        if threshold:
            conv.threshold.normal_(0, 0.3)
    conv.set_precision("binary", "binary")
    return export.InferenceBinaryLayer(conv).eval()


def inputs(cin, h, w):
    x = torch.randn(3, cin, h, w)
    x[:, :, ::3, ::2] = 0.0  # exact zeros: sign(0) = +1, as the export's GreaterOrEqual
    return x


@pytest.mark.parametrize("case", CONVS)
def test_packed_conv_equals_the_float_conv(case):
    cin, cout, kernel, stride, padding, dilation, groups, h, w = CONVS[case]
    layer = binary_layer(cin, cout, kernel, stride, padding, dilation, groups)
    packed = infer.PackedBinaryConv2d(layer)
    x = inputs(cin, h, w)
    with torch.no_grad():
        want = layer(x)
        # The export's layer also sums +-1 x +-1 (whole numbers, exact in any order), then
        # applies scale and bias once each: equal bit for bit, in the layout it was given.
        nchw, channels_last = packed(x), packed(x.contiguous(memory_format=torch.channels_last))  # both packing kernels
        assert torch.equal(nchw, want) and torch.equal(channels_last, want)
        assert nchw.is_contiguous() and channels_last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["3x3, 64 channels, padding 1", "5x5, padding 2 beyond a 4x4 image",
                                  "3x3 stride 2, 70 channels", "groups 2 (a word each)", "dilation 2"])
def test_binary_sums_are_exact_integers_with_zero_padding(case):
    """Without scale, bias and threshold the outputs are the integer sums themselves: equal bit
    for bit, taps in the zero padding contributing nothing (not -1)."""
    cin, cout, kernel, stride, padding, dilation, groups, h, w = CONVS[case]
    layer = binary_layer(cin, cout, kernel, stride, padding, dilation, groups, threshold=False, scale=False)
    layer.bias = None
    x = inputs(cin, h, w)
    with torch.no_grad():
        got, want = infer.PackedBinaryConv2d(layer)(x), layer(x)
    assert torch.equal(got, want)
    # Corners see fewer taps than the centre: the padding really is not counted as -1.
    assert got.abs().amax() <= (cin // groups) * (kernel * kernel if isinstance(kernel, int) else 3)


def test_binary_linear_layer():
    torch.manual_seed(0)
    linear = BinaryLinear(200, 10)
    linear.set_precision("binary", "binary")
    layer = export.InferenceBinaryLayer(linear).eval()
    x = torch.randn(5, 200)
    with torch.no_grad():
        assert torch.equal(infer.PackedBinaryConv2d(layer)(x), layer(x))


def exported(tmp_path, *extra):
    export_variant(extra, tmp_path)
    return tmp_path / "m.bnn"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("stage 1")])
def test_every_exportable_preset_runs_packed(variant, tmp_path):
    path = exported(tmp_path, *VARIANTS[variant])
    model = infer.load(path)
    binary = sum(isinstance(m, export.InferenceBinaryLayer) for m in export.load(path).modules())
    assert sum(isinstance(m, infer.PackedBinaryConv2d) for m in model.modules()) == binary > 0
    assert not any(isinstance(m, export.InferenceBinaryLayer) for m in model.modules())
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        # Bit for bit the export's outputs in the same memory layout: channels-last (the
        # runtime's default, the faster) and NCHW.
        assert torch.equal(model(x), export.load(path).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)))
        assert torch.equal(infer.load(path, channels_last=False)(x), export.load(path)(x))


def test_a_stage1_file_is_refused_unless_not_strict(tmp_path):
    path = exported(tmp_path, "stage='1'")
    with pytest.raises(ConfigError, match=r"16 of 16 binary layers .*real-valued weights.*strict=false") as error:
        infer.load(path)
    assert "\n" not in str(error.value)
    with pytest.warns(UserWarning, match="16 of 16 binary layers run as float convs"):
        model = infer.load(path, strict=False)
    assert len(model.fallbacks) == 16
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), pytest.warns(UserWarning, match="16 of 16"):
        assert torch.equal(infer.load(path, channels_last=False, strict=False)(x), export.load(path)(x))


@pytest.fixture(scope="module")
def digits_export(digits, tmp_path_factory):  # noqa: F811
    _, ckpt = digits
    path = tmp_path_factory.mktemp("digits_export") / "digits.bnn"
    export.export_checkpoint(ckpt, path)
    return ckpt, path


@pytest.mark.slow
def test_trained_model_on_real_digits(digits_export):
    """On the real test set: the export's logits bit for bit (NCHW), and its predictions and
    top-1 in the runtime's default channels-last layout."""
    ckpt, path = digits_export
    packed, nchw, plain = infer.load(path), infer.load(path, channels_last=False), export.load(path)
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in digits_test_set(ckpt):
            want, got = plain(images), packed(images)
            assert torch.equal(nchw(images), want)
            assert torch.equal(got.argmax(1), want.argmax(1))
            correct += (got.argmax(1) == labels).sum().item()
            total += len(labels)
    assert total == 360 and 100.0 * correct / total == pytest.approx(load_checkpoint(ckpt)["metrics"]["top1"])


def infer_cli(*args):
    return forked_cli.run(["-m", "bnntrain.infer", *map(str, args)], timeout=300,
                          env={"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PATH": ""})


@pytest.mark.slow
def test_command_line_predicts_digit_images(digits_export, tmp_path):
    """PNG files of the digits test set, in class folders: the command's predictions are the
    export's on the same pixels normalised by hand, and right for most of them."""
    ckpt, path = digits_export
    images, labels = map(torch.cat, zip(*digits_test_set(ckpt)))
    mean, std = 0.3053, 0.3760
    pixels = (images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)  # undo the preset's normalisation
    for i in range(120):
        folder = tmp_path / "images" / str(labels[i].item())
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, 0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    done = infer_cli(f"model={path}", f"images={tmp_path / 'images'}", "data=digits", "batch=32")
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(lines) == 120
    files = [tmp_path / "images" / name for name, _ in lines]
    by_hand = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255) for f in files])
    with torch.no_grad():
        want = export.load(path)(((by_hand - mean) / std)[:, None]).argmax(1)
    predicted = torch.tensor([int(c) for _, c in lines])
    assert torch.equal(predicted, want)
    truth = torch.tensor([int(name.split("/")[0]) for name, _ in lines])
    assert (predicted == truth).float().mean() > 0.8  # the model has learned (90% on the test set)


@pytest.mark.slow
def test_command_line_benchmark(digits_export):
    _, path = digits_export
    done = infer_cli(f"model={path}", "--bench", "batch=1", "threads=1")
    assert done.returncode == 0, done.stderr
    assert "16 binary layers packed, 0 in PyTorch; 1 threads" in done.stdout
    assert __import__("re").search(r"batch +1: +[\d.]+ ms \(XNOR-popcount\), +[\d.]+ ms \(PyTorch float convs\), "
                                   r"[\d.]+x", done.stdout), done.stdout


@pytest.mark.parametrize("args, words", [
    (["images=."], "expected model=FILE"),
    (["model=nope.bnn", "--bench"], "no such file"),
    (["model={ckpt}", "--bench"], "is not a bnntrain-packed file"),
    (["model={file}"], "give images=FOLDER (predictions) or --bench"),
    (["model={file}", "--bench", "threads=0"], "threads=0: expected a whole number >= 1"),
    (["model={file}", "--bench", "strict=maybe"], "strict=maybe: expected true or false"),
    (["model={file}", "images={missing}"], "no such folder"),
    (["model={file}", "--fast"], "unknown argument(s): --fast"),
])
def test_command_line_errors_are_one_line(args, words, tmp_path):
    """The command's `main` in this process (the tests above run the real one)."""
    from bnntrain.infer.cli import main

    file = exported(tmp_path)
    save_checkpoint({"model": {}}, tmp_path / "c.pt")
    args = [a.format(file=file, ckpt=tmp_path / "c.pt", missing=tmp_path / "missing") for a in args]
    done = main_in_process(main, ["bnntrain.infer", *args])
    assert done.returncode != 0
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_without_numba_one_line_names_the_extra(tmp_path):
    """numba hidden from the import system, as on a machine without the extra."""
    code = ("import sys; sys.modules['numba'] = None; from bnntrain.infer.cli import main; "
            f"main(['model={exported(tmp_path)}', '--bench'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip() == "error: bnntrain.infer needs numba: pip install 'bnntrain[infer]' (or pip install numba)"


@pytest.mark.parametrize("channels, groups", [(64, 1), (200, 1), (256, 2), (70, 1)])
def test_sign_packing_matches_numpy_on_edge_values(channels, groups):
    """pack_nhwc (a full word one vector compare, a part word bit by bit) and the hand-over
    packing in the conv's output pass set bit c where x + threshold >= 0 in float32, as numpy
    says, on zeros of both signs, infinities, NaN and values a rounding away from the threshold."""
    from bnntrain.infer import kernels
    rng = np.random.default_rng(channels)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 0.5], np.float32)
    x = rng.standard_normal((2, 3, 5, channels)).astype(np.float32)
    x.reshape(-1)[::3] = rng.choice(special, x.size // 3 + 1)[: len(x.reshape(-1)[::3])]
    threshold = rng.standard_normal(channels).astype(np.float32)
    threshold[::4] = 0.0
    x[0, 0, 0] = -threshold  # exactly on the threshold: +1
    x[0, 0, 1] = np.nextafter(-threshold, np.float32(-np.inf))  # just below it: -1
    per_group = channels // groups
    words = -(-per_group // 64)
    packed = np.empty((2, 3, 5, groups * words), np.uint64)
    kernels.pack_nhwc(x, threshold, groups, words, packed)
    bits = (x + threshold >= 0).reshape(2, 3, 5, groups, per_group)
    padded = np.zeros((2, 3, 5, groups, words * 64), bool)
    padded[..., :per_group] = bits
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    want = (padded.reshape(2, 3, 5, groups, words, 64) * weights).sum(-1, dtype=np.uint64).reshape(2, 3, 5, -1)
    assert np.array_equal(packed, want)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_channel_blocks_give_the_same_outputs(mode):
    """binary_conv_dense shares rows of output positions and, in blocks of a multiple of 64
    channels, the channels among the threads: every split gives the same bits (the sums, the
    fused epilogue of each mode and the next layer's signs, a part word among them)."""
    from bnntrain.infer import kernels
    rng = np.random.default_rng(mode)
    n, h, w, cw, out_channels = 1, 7, 7, 3, 300
    words = rng.integers(0, 2**63, (n, h, w, cw), dtype=np.uint64)
    weights = rng.integers(0, 2**63, (3, 3 * cw, out_channels), dtype=np.uint64)
    scale, bias = (rng.standard_normal(out_channels).astype(np.float32) for _ in range(2))
    post = rng.standard_normal((5, out_channels)).astype(np.float32)
    residual = rng.standard_normal((n, h, w, out_channels)).astype(np.float32)
    threshold = rng.standard_normal(out_channels).astype(np.float32)
    results = []
    for block in (out_channels, 128, 64):
        out = np.full((n, h, w, out_channels), np.nan, np.float32)
        signs = np.zeros((n, h, w, 5), np.uint64)
        kernels.binary_conv_dense(words, weights, scale, bias, 1, 1, 1, 1, 3 * 64, out, post, residual, mode,
                                  threshold, signs, block)
        results.append((out, signs))
    assert not np.isnan(results[0][0]).any()
    for out, signs in results[1:]:
        assert np.array_equal(out.view(np.uint32), results[0][0].view(np.uint32))
        assert np.array_equal(signs, results[0][1])


def test_a_channel_block_packs_only_its_own_words():
    """Each block packs the next layer's words of its own channels only: two threads packing
    the same word from half-written channels would race."""
    from bnntrain.infer.kernels import _pack_position

    @numba.njit
    def pack(out, threshold, signs, o0, o1):
        _pack_position(out, threshold, signs, 0, 0, 0, o0, o1)

    out = np.random.default_rng(0).standard_normal((1, 1, 1, 200)).astype(np.float32)
    threshold = np.zeros(200, np.float32)
    sentinel = np.uint64(0xDEADBEEF)
    for o0, o1, written in ((0, 64, [0]), (64, 192, [1, 2]), (192, 200, [3])):
        signs = np.full((1, 1, 1, 4), sentinel, np.uint64)
        pack(out, threshold, signs, o0, o1)
        assert [k for k in range(4) if signs[0, 0, 0, k] != sentinel] == written


def test_a_layer_split_by_channels_on_two_threads_equals_the_float_conv():
    """End to end on two threads, where the choice splits a layer's channels (3 output rows,
    300 channels: 6 units rather than 3), and the choice itself."""
    from bnntrain.infer.packed_conv import channel_block
    assert channel_block(3, 300, 2) == 192 and channel_block(7, 512, 2) == 256 and channel_block(7, 1024, 2) == 512
    assert channel_block(14, 512, 2) == 512 and channel_block(56, 64, 2) == 64 and channel_block(7, 512, 1) == 512
    assert channel_block(1, 1000, 2) == 512  # a linear layer at batch 1: both threads
    layer = binary_layer(130, 300, 3, 2, 1, 1, 1)
    packed = infer.PackedBinaryConv2d(layer)
    x = inputs(130, 6, 6)[:1].contiguous(memory_format=torch.channels_last)
    numba.set_num_threads(2)
    try:
        with torch.no_grad():
            assert torch.equal(packed(x), layer(x))
    finally:
        numba.set_num_threads(1)


def test_small_integers_convert_to_float64_exactly():
    from bnntrain.infer.kernels import small_to_float64

    @numba.njit
    def convert(values):
        out = np.empty(values.shape[0], np.float64)
        for i in range(values.shape[0]):
            out[i] = small_to_float64(values[i])
        return out

    values = np.concatenate([np.array([0, 1, 2, 3, 2**31, 2**32 + 1, 2**52 - 1], np.uint64),
                             np.random.default_rng(0).integers(0, 2**52, 1000, dtype=np.uint64)])
    assert np.array_equal(convert(values), values.astype(np.float64))
