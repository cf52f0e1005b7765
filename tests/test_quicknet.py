"""larq-zoo's QuickNet family (model=quicknet_small | quicknet | quicknet_large) against the
official network written out below from larq_zoo/sota/quicknet.py and larq's layers: logits
and gradients in float64, parameter counts, costs, Keras's initialisers; the binary conv's
+1 padding (larq's pad_values) in training, the export and the packed runtime."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnntrain.complexity import count_costs
from bnntrain.engine import load_checkpoint
from bnntrain.infer.packed_conv import why_not_packed
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.nn import BinaryConv2d, binary_layers
from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, build_quantizer
from bnntrain.tools import export
from bnntrain.tools.export.inference import InferenceBinaryLayer
from official_nets import assert_trains_as_official, statistics
from conftest import assert_onnx_matches, need, results, run_cli
from test_config import make

# PyTorch parameters (1000 classes), larq-zoo's published count, blur weights, top-1, BOPs and
# FLOPs at 224 px (ours: larq-zoo publishes no costs).
SPEC = {"quicknet_small": (12_652_504, 12_655_688, 3_168, 59.4, "1.156e+09", "1.594e+07"),
        "quicknet": (13_230_024, 13_234_088, 4_032, 63.3, "1.850e+09", "2.965e+07"),
        "quicknet_large": (23_338_184, 23_342_248, 4_032, 66.9, "3.699e+09", "2.965e+07")}


# ---- The official network: larq_zoo/sota/quicknet.py (v1.0) with larq's SteSign, its "same"
# padding with pad_values (layers_base.py) and Keras's BatchNormalization, in PyTorch.
def ste_sign(x, clip=1.25):  # larq.math.sign (+1 at 0), gradient dy where |x| <= clip_value
    inside = (x.abs() <= clip).to(x.dtype)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) + (x * inside - (x * inside).detach())


def tf_same(x, k, s, value=0.0):  # larq's _compute_padding, on width then height
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max(((n + s - 1) // s - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class KerasBN(nn.Module):
    """Keras's BatchNormalization (fused): the moving variance takes the unbiased batch variance."""

    def __init__(self, c, momentum=0.99, eps=1e-3, affine=True):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma, self.beta = (nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))) if affine else (None, None)
        self.register_buffer("moving_mean", torch.zeros(c))
        self.register_buffer("moving_var", torch.ones(c))

    def forward(self, x):
        if self.training:
            mean, var, n = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.numel() / x.shape[1]
            with torch.no_grad():
                self.moving_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
                self.moving_var.mul_(self.momentum).add_((1 - self.momentum) * var * n / (n - 1))
        else:
            mean, var = self.moving_mean, self.moving_var
        y = (x - mean[:, None, None]) / torch.sqrt(var + self.eps)[:, None, None]
        return y if self.gamma is None else y * self.gamma[:, None, None] + self.beta[:, None, None]


class Kernel(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))


class OfficialQuickNet(nn.Module):
    def __init__(self, blocks, filters, num_classes=1000):
        super().__init__()
        s, c = filters[0] // 4, filters[0]
        self.stem = nn.ModuleList([Kernel(s, 3, 3, 3), KerasBN(s), Kernel(s, 1, 3, 3), KerasBN(s, affine=False),
                                   Kernel(c, s, 1, 1), KerasBN(c)])
        self.kinds, self.layers = [], nn.ModuleList()
        for n, f in zip(blocks, filters):
            for _ in range(n):
                if f != c:
                    self.kinds.append("transition")
                    self.layers.extend([Kernel(f, c, 1, 1), KerasBN(f, 0.9, 1e-5)])
                    c = f
                self.kinds.append("residual")
                self.layers.extend([Kernel(c, c, 3, 3), KerasBN(c, 0.9, 1e-5)])
        self.dense = nn.Linear(c, num_classes)

    def forward(self, x):
        conv, bn, dw, bn_dw, pw, bn_pw = self.stem
        x = F.relu(bn(F.conv2d(tf_same(x, 3, 2), conv.w, stride=2)))
        x = bn_dw(F.conv2d(tf_same(x, 3, 2), dw.w, stride=2, groups=x.shape[1]))
        x = bn_pw(F.conv2d(x, pw.w))
        row = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)  # blurpool_initializer's kernel, 3x3
        for kind, kernel, norm in zip(self.kinds, self.layers[::2], self.layers[1::2]):
            if kind == "transition":
                x = F.max_pool2d(F.relu(x), 2, 1)
                blur = (torch.outer(row, row) / 16).expand(x.shape[1], 1, 3, 3)
                x = norm(F.conv2d(F.conv2d(tf_same(x, 3, 2), blur, stride=2, groups=x.shape[1]), kernel.w))
            else:
                y = F.conv2d(tf_same(ste_sign(x), 3, 1, value=1.0), ste_sign(kernel.w))
                x = x + norm(F.relu(y))
        return self.dense(F.relu(x).mean((2, 3)))



def twins():
    """QuickNetSmall as the preset builds it, random weights and BN statistics, and the
    official network with the same values, both float64."""
    torch.manual_seed(0)
    ours = build_model(make("model=quicknet_small", "data=imagenet").model, num_classes=1000, in_channels=3).double()
    with torch.no_grad():
        for bn in (m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
        ours.stages[1][1].conv.weight.view(-1)[:3] = torch.tensor([1.25, -1.3, 2.0])  # at and past the clip
    official = OfficialQuickNet((4, 4, 4, 4), (32, 64, 256, 512)).double()
    pairs = [*zip(ours.parameters(), official.parameters()), *zip(statistics(ours), statistics(official))]
    assert len(pairs) == len(list(official.parameters())) + len(statistics(official))
    with torch.no_grad():
        for mine, theirs in pairs:
            assert mine.shape == theirs.shape
            theirs.copy_(mine)
    return ours, official


@pytest.mark.parametrize("size", [72, 57])  # an even map into a blur pool at 72; an odd stem input at 57
def test_logits_are_the_official_networks_in_float64(size):
    ours, official = (m.eval() for m in twins())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-10, atol=1e-10)


def test_gradients_and_bn_statistics_are_the_official_networks_in_training():
    ours, official = twins()
    x = torch.randn(2, 3, 72, 72, dtype=torch.float64)
    assert_trains_as_official(ours, official, x)  # Keras's BN momentum too
    assert ours.stages[1][1].conv.weight.grad.view(-1)[:3].tolist()[1:] == [0.0, 0.0]  # |w| > 1.25


@pytest.mark.parametrize("name", SPEC)
def test_parameter_counts_and_costs_are_the_spec(name):
    params, published, blur, _, bops, flops = SPEC[name]
    with torch.device("meta"):  # shapes only: the costs need no arithmetic
        model = build_model(make(f"model={name}", "data=imagenet").model, num_classes=1000, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == params
    quarter = model.stem[1].out_channels  # the BN without scale or shift: 2 x quarter statistics
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("kernel")) == blur
    assert params + blur + 2 * quarter == published
    cost = count_costs(model, (3, 224, 224))
    assert (f"{cost.bops:.3e}", f"{cost.flops:.3e}") == (bops, flops)
    if name == "quicknet_small":  # 4 blocks a section, 9 c^2 MACs a pixel
        assert cost.bops == sum(4 * 9 * (56 >> i) ** 2 * c * c for i, c in enumerate((32, 64, 256, 512)))


def test_layers_are_initialised_and_normalised_as_keras_does():
    model = build_model(make("model=quicknet_small", "data=imagenet").model, num_classes=1000, in_channels=3)
    w = model.stages[3][3].conv.weight  # glorot_normal: variance 2 / (fan_in + fan_out), truncated at 2 sigma
    std = math.sqrt(1 / 4608)
    assert abs(w.std().item() / std - 1) < 0.02 and w.abs().max() <= 2 * std / 0.87962566
    assert model.stem[1].weight.abs().max() <= 2 * math.sqrt(2 / 27) / 0.87962566  # he_normal
    assert model.stem[5].weight.abs().max() <= math.sqrt(6 / (9 * 8 + 9))  # depthwise glorot_uniform
    assert not model.classifier.bias.any()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(bn.momentum, bn.eps, bn.affine) for bn in norms[:3]] == [(0.01, 1e-3, True), (0.01, 1e-3, False),
                                                                       (0.01, 1e-3, True)]
    assert all((bn.momentum, bn.eps) == (0.1, 1e-5) for bn in norms[3:]) and len(norms) == 3 + 16 + 3
    blur = model.stages[1][0][2].kernel
    assert torch.equal(blur[5, 0] * 16, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))
    assert "kernel" not in "".join(model.state_dict())  # the architecture's, not saved


def test_larqs_ste_sign_with_its_clip_value():
    x = torch.tensor([-2.0, -1.25, -1.0, 0.0, 1.2, 1.3]).requires_grad_()
    for registry, name in ((INPUT_QUANTIZERS, "ste_sign"), (WEIGHT_QUANTIZERS, "sign")):
        q = build_quantizer(registry, {"name": name, "clip_value": 1.25})
        (grad,) = torch.autograd.grad(q(x).sum(), x)
        assert grad.tolist() == [0, 1, 1, 1, 1, 0] and q.config() == {"name": name, "clip_value": 1.25}
    (grad,) = torch.autograd.grad(build_quantizer(INPUT_QUANTIZERS, "ste_sign")(x).sum(), x)
    assert grad.tolist() == [0, 0, 0, 1, 0, 0]  # the collection's |x| < 1, unchanged


@pytest.mark.parametrize("quantizer", ["ste_sign", "approx_sign", "adabin_sign"])  # mask, input, unfused
@pytest.mark.parametrize("activations", ["binary", "real"])
def test_one_padding_pads_the_quantized_input_with_plus_one(quantizer, activations):
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 4, 3, 2, padding=1, learnable_threshold=True, input_quantizer=quantizer,
                        weight_quantizer="sign", pad_value=1.0).double()
    conv.set_precision(activations, "binary")
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    got = []
    for fused in (True, False):
        conv.fused_sign, xi = fused, x.clone().requires_grad_()
        conv.zero_grad()
        out = conv(xi)
        out.sum().backward()
        got.append((out, xi.grad, conv.weight.grad.clone(), conv.threshold.grad.clone()))
    xi = x.clone().requires_grad_()
    conv.zero_grad()
    signs = conv.quantize_input(xi)  # the quantizer, or the precision mode, alone
    want = F.conv2d(F.pad(signs, (1, 1, 1, 1), value=1.0), conv.quantized_weight(), None, 2)
    want.sum().backward()
    for result in got:
        torch.testing.assert_close(result, (want, xi.grad, conv.weight.grad, conv.threshold.grad))


def test_the_border_is_plus_one_not_zero():
    conv = BinaryConv2d(1, 1, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="sign", pad_value=1.0)
    with torch.no_grad():
        conv.weight.fill_(0.5)
        out = conv(-torch.ones(1, 1, 3, 3))  # signs -1 inside, +1 on the border
    assert out[0, 0].tolist() == [[1, -3, 1], [-3, -9, -3], [1, -3, 1]]  # zero padding: -4 in the corners
    with pytest.raises(ValueError, match="pad_value=1.0 with a quantizer that scales the output"):
        BinaryConv2d(1, 1, 3, padding=1, input_quantizer={"name": "xnor_sign", "scale": "box"}, pad_value=1.0)


@pytest.mark.slow
def test_two_stages_on_the_digits_clip_and_export_with_plus_one_padding(tmp_path):
    overrides = ["model=quicknet_small", "data=digits", "model.width=0.125", "data.train_limit=256",
                 "schedule.epochs=1", "optimizer.weight_clip=1.25", "trainer.device=cpu", "trainer.progress=plain"]
    out = run_cli(overrides, tmp_path / "run")  # the command line
    assert out.returncode == 0, out.stderr
    assert list(results(tmp_path / "run")) == ["stage1", "stage2"]
    last = tmp_path / "run" / "stage2" / "last.pt"
    trained = model_from_checkpoint(load_checkpoint(last)).eval()
    latent = [layer.weight for _, layer in binary_layers(trained)]
    assert len(latent) == 16 and max(w.abs().max().item() for w in latent) <= 1.25
    export.export_checkpoint(last, tmp_path / "model.bnn")
    inference = export.load(tmp_path / "model.bnn")
    layers = [m for m in inference.modules() if isinstance(m, InferenceBinaryLayer)]
    assert all(m.pad_value == 1.0 and why_not_packed(m) is None for m in layers)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x), rtol=1e-4, atol=1e-4)
        need("numba", extra="infer")
        from bnntrain import infer

        for channels_last in (False, True):  # the kernels pad with nothing; the input with +inf
            torch.testing.assert_close(infer.load(tmp_path / "model.bnn", channels_last=channels_last)(x),
                                       inference(x), rtol=1e-5, atol=1e-5)
        assert_onnx_matches(tmp_path / "model.bnn", x, inference(x))  # +1 padding in ONNX too
    layers[0].pad_value = 0.5
    assert why_not_packed(layers[0]) == "pad_value=0.5 (the kernels pad with zeros or with signs)"


def test_the_networks_page_gives_each_record_networks_counts():
    """The record-network table's parameters and BOPs / FLOPs / OPs are the models' own,
    counted at 224 px on the meta device (shapes only)."""
    from bnntrain.complexity import count_costs
    from bnntrain.run.config import last_stage
    from docs_pages import agrees, table_rows

    rows = table_rows("networks.md", "| preset | network (official code) | parameters (1000 classes) | BOPs / FLOPs / OPs at 224 px (ours)")
    assert len(rows) == 8
    for row in rows:
        name = row[0].strip("`").removeprefix("model=")
        cfg = last_stage([f"model={name}", "data=imagenet", "data.root=/nonexistent", "stage=2",
                          "stage.needs_init=false"])
        with torch.device("meta"):
            model = build_model(cfg.model, num_classes=1000, in_channels=3)
        assert int(row[2].replace(",", "")) == sum(p.numel() for p in model.parameters()), name
        report = count_costs(model, (3, 224, 224))
        for printed, counted in zip(row[3].split(" / "), (report.bops, report.flops, report.ops)):
            mantissa, exponent = printed.split("e")
            assert agrees(mantissa, counted / 10 ** int(exponent)), (name, printed, counted)
