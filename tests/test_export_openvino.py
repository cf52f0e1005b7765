"""The OpenVINO export: every +-1 x +-1 layer runs as OpenVINO's BinaryConvolution (read from
the compiled model's runtime graph, what the CPU plugin actually runs), the binarization is
the sign of training at zero and around it, and the outputs are those of the module that was
trained on real images and of `export.load` on every exportable variant."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import need
from test_export import VARIANTS, digits, digits_test_set, export_variant, trained  # noqa: F401 (fixtures)

ov = need("openvino", extra="openvino")
ops = need("openvino.opset13", extra="openvino")

from bnntrain.engine import load_checkpoint  # noqa: E402
from bnntrain.infer.cli import main as infer_main  # noqa: E402
from bnntrain.tools import export  # noqa: E402
from bnntrain.tools.export.openvino import (compile_openvino, export_openvino, runtime_layer_types,  # noqa: E402
                                            to_openvino)

TINY = np.finfo(np.float32).tiny  # 2^-126, the smallest normal float32


class SignConv(torch.nn.Module):
    """compare_sign(x + threshold) into a 1x1 conv whose output channel 0 has weights +1 on
    channel 0 and -1 on the other 7 (which hold +1): it reads sign(x_0 + threshold) - 7."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = torch.tensor([threshold] + [0.0] * 7).view(1, 8, 1, 1)
        self.weight = -torch.ones(8, 8, 1, 1)
        self.weight[range(8), range(8)] = 1

    def forward(self, x):
        return torch.nn.functional.conv2d(export.compare_sign(x + self.threshold), self.weight)


def edge_inputs(values: np.ndarray) -> torch.Tensor:
    x = torch.ones(1, 8, 1, len(values))
    x[0, 0] = torch.from_numpy(values)
    return x


@pytest.mark.parametrize("threshold", [0.0, 0.8125, -3.3])
def test_binarization_is_the_sign_of_training_at_its_edges(threshold):
    """x + threshold >= 0 -> +1, as compare_sign, at -threshold itself, the floats next to it,
    zero's smallest neighbours and further out: OpenVINO folds the threshold into what
    precedes the FakeQuantize, and the sign must survive that."""
    t = np.float32(-threshold)
    near = [np.nextafter(t, np.float32(-1e9)), t, np.nextafter(t, np.float32(1e9))]
    values = np.array([-1.0, -1e-6, -TINY, -0.0, 0.0, TINY, 1e-9, 1e-6, 0.25, 3.0, *near], np.float32)
    module = SignConv(threshold)
    model, count = to_openvino(module, edge_inputs(values))
    compiled = compile_openvino(model, 1, 1)
    assert count == 1 and runtime_layer_types(compiled).count("BinaryConvolution") == 1
    got = compiled.create_infer_request().infer({0: edge_inputs(values).numpy()})[0]
    want = module(edge_inputs(values)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want[0, 0, 0] + 7, np.where(values + np.float32(threshold) >= 0, 1, -1))


def fake_quantized_on_values(values: np.ndarray, low: float, high: float, shift: float) -> np.ndarray:
    """The usual binarization instead: a FakeQuantize with input bounds around 0 on the values
    plus a constant `shift`, into SignConv's 1x1 conv; the sign it gives each value."""
    x = edge_inputs(values).numpy()
    param = ops.parameter(x.shape, np.float32)
    shifted = ops.add(param, np.array([shift] + [0.0] * 7, np.float32).reshape(1, 8, 1, 1))
    signs = ops.fake_quantize(shifted, np.float32(low), np.float32(high), np.float32(-1), np.float32(1), 2)
    conv = ops.convolution(signs, SignConv(0.0).weight.numpy(), [1, 1], [0, 0], [0, 0], [1, 1])
    out = compile_openvino(ov.Model([conv], [param]), 1, 1).create_infer_request().infer({0: x})[0]
    return out[0, 0, 0] + 7


@pytest.mark.parametrize("low, high, shift", [(0.0, 0.0, 0.0), (-1e-6, 1e-6, 0.0), (-2.0 ** -125, 0.0, 0.7)])
def test_the_usual_fakequantize_is_not_the_sign(low, high, shift):
    """Why the export binarizes the signs, not the values (the module's docstring): each of
    these, measured in OpenVINO 2026.4, gives signs that are not those of training; were a
    release to make them right, this test would say so."""
    values = np.array([-1.0, -1e-6, 0.0, 1e-9, 1e-6, 0.25, 3.0], np.float32) - np.float32(shift)
    signs = fake_quantized_on_values(values, low, high, shift)
    assert not np.array_equal(signs, np.where(values + np.float32(shift) >= 0, 1, -1))


@pytest.mark.parametrize("channels, wrong", [(4, True), (12, True), (8, False), (24, False)])
def test_binary_convolution_needs_input_channels_a_multiple_of_8(channels, wrong):
    """Why layers whose input channels are not a multiple of 8 stay float: OpenVINO's
    BinaryConvolution sums them wrong (measured in 2026.4; were a release to fix it, this
    test would say so)."""
    weights = torch.randn(8, channels, 3, 3, generator=torch.Generator().manual_seed(channels)).sign()
    x = torch.randn(2, channels, 6, 6, generator=torch.Generator().manual_seed(0))
    param = ops.parameter(list(x.shape), np.float32)
    signs = ops.select(ops.greater_equal(param, np.float32(0)), np.float32(1), np.float32(-1))
    binary = ops.fake_quantize(signs, np.float32(-0.5), np.float32(0.5), np.float32(-1), np.float32(1), 2)
    conv = ops.convolution(binary, weights.numpy(), [1, 1], [1, 1], [1, 1], [1, 1])
    compiled = compile_openvino(ov.Model([conv], [param]), 2, 1)
    assert runtime_layer_types(compiled).count("BinaryConvolution") == 1
    got = compiled.create_infer_request().infer({0: x.numpy()})[0]
    want = torch.nn.functional.conv2d(export.compare_sign(x), weights, padding=1).numpy()
    assert np.array_equal(got, want) != wrong


def openvino_logits(folder, images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    compiled = compile_openvino(folder / "model.xml", len(images), 2)
    logits = compiled.create_infer_request().infer({0: images.numpy()})[0]
    return torch.from_numpy(logits.copy()), runtime_layer_types(compiled)


@pytest.mark.slow
def test_trained_model_on_real_digits(digits, tmp_path, capsys):  # noqa: F811
    """The command's IR against the very module that was trained, on the digits test set."""
    trained_module, ckpt = digits
    export.main([f"ckpt={ckpt}", f"out={tmp_path / 'm.bnn'}", f"openvino={tmp_path / 'ov'}"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'ov' / 'model.xml'}" in out and "16 of 16 binary layers" in out
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["model.bin", "model.xml"]
    worst, correct, total = 0.0, 0, 0
    for images, labels in digits_test_set(ckpt):  # batches of 64 and 40
        logits, kinds = openvino_logits(tmp_path / "ov", images)
        # All 16 binary convs run binary; the stem's conv and the three shortcuts' 1x1 convs in float.
        assert kinds.count("BinaryConvolution") == 16 and kinds.count("Convolution") == 4, kinds
        with torch.no_grad():
            want = trained_module(images)
        worst = max(worst, (logits - want).abs().max().item())
        assert torch.equal(logits.argmax(1), want.argmax(1))
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    assert total == 360
    assert 100.0 * correct / total == pytest.approx(load_checkpoint(ckpt)["metrics"]["top1"], abs=1e-9)
    # Float rounding: the stem and BN sum in another order than PyTorch's (measured 1.9e-6 at logits of 4 to 8).
    assert worst <= 8e-6, worst

    # The benchmark command times the IR beside bnntrain.infer's kernels.
    infer_main([f"model={tmp_path / 'm.bnn'}", "--bench", "batch=2", f"openvino={tmp_path / 'ov'}"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("batch   2:") and "OpenVINO" in line and "(16 BinaryConvolution)" in line, line


# The variants whose OpenVINO graphs differ (thresholds, grouped and narrow layers left float,
# a binary classifier, BN after the conv, parameter-free shortcuts, +1-padded signs, none
# binary); the full-width networks at 224 px are scripts/bench_infer.py's, whose JSON
# (BinaryConvolution counts, predictions) test_docs_figures checks.
OPENVINO_VARIANTS = {name: VARIANTS[name] for name in (
    "reactnet (thresholds, rprelu)", "squeeze-excitation, groups", "binary stem and classifier",
    "stage 1: real weights", "bi-real block (BN after the conv)", "reactnet-a (parameter-free shortcuts)")}
OPENVINO_VARIANTS["quicknet (signs padded with +1)"] = ["model=quicknet_small"]


@pytest.mark.parametrize("variant", OPENVINO_VARIANTS)
def test_every_variant_runs_binary_convolutions(variant, tmp_path):
    # 32 px: at 16 px an ImageNet stem leaves the last stage a 1x1 image, whose 2x2 ceil-mode
    # pooling PyTorch accepts and OpenVINO's shape inference refuses.
    export_variant(OPENVINO_VARIANTS[variant], tmp_path, image_size=32)
    layers = export_openvino(tmp_path / "m.bnn", tmp_path / "ov")
    deployed = export.load(tmp_path / "m.bnn")
    binary = [m for m in deployed.modules() if isinstance(m, export.InferenceBinaryLayer)
              and m.binary_weights and m.activations == "binary"]
    # Binary convs with one group and input channels a multiple of 8 run binary; a binary linear
    # layer (the binary classifier), grouped convs and the others stay float.
    convs = sum(m.conv is not None and m.conv["groups"] == 1 and m.weight.shape[1] % 8 == 0 for m in binary)
    assert layers["binary_layers"] == len(binary) and layers["binarized"] == convs
    assert sum(layers["left"].values()) == len(binary) - convs
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits, kinds = openvino_logits(tmp_path / "ov", images)
    assert kinds.count("BinaryConvolution") == convs
    with torch.no_grad():
        want = deployed(images)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, words", [
    (["openvino={tmp}/file.txt"], ["is a file"]),
    (["openvino={tmp}/no/such/ov"], ["does not exist"]),
    (["openvino={tmp}/full"], ["holds a model already"]),
    (["ckpt={tmp}/ckdir/model.bin", "openvino={tmp}/ckdir"], ["would write over ckpt="]),
])
def test_openvino_errors_are_one_line_and_write_nothing(args, words, trained, tmp_path, capsys):  # noqa: F811
    (tmp_path / "file.txt").write_text("keep")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.xml").write_text("keep")
    (tmp_path / "ckdir").mkdir()
    (tmp_path / "ckdir" / "model.bin").write_bytes(trained.read_bytes())  # a checkpoint named as the IR's weights
    args = [a.format(tmp=tmp_path) for a in args]
    ckpt = [] if any(a.startswith("ckpt=") for a in args) else [f"ckpt={trained}"]
    with pytest.raises(SystemExit) as exit_:
        export.main([*ckpt, f"out={tmp_path / 'm.bnn'}", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert all(word in err for word in words), err
    assert not (tmp_path / "m.bnn").exists()
    assert (tmp_path / "file.txt").read_text() == (tmp_path / "full" / "model.xml").read_text() == "keep"
    assert (tmp_path / "ckdir" / "model.bin").read_bytes() == trained.read_bytes()


def test_bench_openvino_errors_are_one_line(tmp_path, capsys):
    export_variant([], tmp_path)
    for args, words in ([f"openvino={tmp_path}"], "no model.xml there"), ([f"openvino={tmp_path}", f"images={tmp_path}"],
                                                                          "goes with --bench"):
        with pytest.raises(SystemExit) as exit_:
            infer_main([f"model={tmp_path / 'm.bnn'}", *args] + (["--bench"] if "images" not in args[-1] else []))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_without_openvino_one_line_names_the_extra(trained, tmp_path):  # noqa: F811
    """openvino hidden from the import system, as on a machine without the extra."""
    code = ("import sys; sys.modules['openvino'] = None; from bnntrain.tools.export import main; "
            f"main(['ckpt={trained}', 'out={tmp_path / 'm.bnn'}', 'openvino={tmp_path / 'ov'}'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: openvino= needs OpenVINO: pip install 'bnntrain[openvino]'"
    assert not (tmp_path / "m.bnn").exists()
