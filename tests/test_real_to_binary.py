"""larq-zoo's Real-to-Binary Net (model=real_to_binary) against the network written out below
from larq_zoo/literature/real_to_bin_nets.py (RealToBinNetBNNFactory, and RealToBinNetBANFactory
for stage 1) and larq's layers: logits and gradients in float64, parameter counts, costs,
Keras's initialisers; TensorFlow's "same" padding of the strided binary convs in training and
in the export."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bnntrain.complexity import count_costs
from bnntrain.engine import load_checkpoint
from bnntrain.infer.packed_conv import why_not_packed
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.models.real_to_binary import SameBinaryConv2d, same_conv
from bnntrain.nn import binary_layers, set_precision
from bnntrain.nn.gated_scaling import GatedScaling
from bnntrain.tools import export
from bnntrain.tools.export.inference import InferenceBinaryLayer
from official_nets import assert_trains_as_official, statistics
from conftest import assert_onnx_matches, need
from test_config import make

PARAMS = 11_986_920        # PyTorch's parameters with 1000 classes
KERAS_PARAMS = 11_995_624  # larq-zoo's table: the trainable ones and the 8,704 BN statistics
BOPS, FLOPS = 1_676_279_808, 138_087_936  # ours at 224 px; ReActNet lists 1.83e8 OPs for it


# ---- The official network: larq_zoo/literature/real_to_bin_nets.py with larq's ste_sign and
# QuantConv2D ("same" padding, zeros after the sign) and Keras's layers, in PyTorch.
def ste_sign(x, clip=1.0):  # larq.math.sign (+1 at 0), gradient dy where |x| <= clip_value
    inside = (x.abs() <= clip).to(x.dtype)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) + (x * inside - (x * inside).detach())


def tf_same(x, k, s, value=0.0):  # TensorFlow's "same": the smaller half before, on width then height
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max(((n + s - 1) // s - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def tf_avg_pool(x):  # AvgPool2D(2, 2, "same"): the padding is not counted
    return F.avg_pool2d(tf_same(x, 2, 2), 2) / F.avg_pool2d(tf_same(torch.ones_like(x[:1, :1]), 2, 2), 2)


def prelu(x, alpha):  # Keras's PReLU, shared_axes=[1, 2]: one slope per channel
    return F.relu(x) - alpha[:, None, None] * F.relu(-x)


class KerasBN(nn.Module):
    """Keras's BatchNormalization (fused): the moving variance takes the unbiased batch variance."""

    def __init__(self, c, momentum=0.99, eps=1e-3):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma, self.beta = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
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
        return y * self.gamma[:, None, None] + self.beta[:, None, None]


class Weight(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))


class OfficialHalf(nn.Module):
    """`half_binary_block` with RealToBinNetFactory's `_scale_binary_conv_output`, its layers in
    the order the factory makes them."""

    def __init__(self, cin, downsample):
        super().__init__()
        cout, self.stride = 2 * cin if downsample else cin, 2 if downsample else 1
        self.shortcut = nn.ModuleList([Weight(cout, cin, 1, 1), KerasBN(cout)]) if downsample else None
        self.bn, self.conv = KerasBN(cin), Weight(cout, cin, 3, 3)
        self.reduce, self.expand, self.alpha = Weight(cin // 8, cin), Weight(cout, cin // 8), Weight(cout)

    def forward(self, x, binary_kernels):
        shortcut = x if self.shortcut is None else self.shortcut[1](F.conv2d(tf_avg_pool(x), self.shortcut[0].w))
        real = self.bn(x)
        kernel = ste_sign(self.conv.w) if binary_kernels else self.conv.w
        out = F.conv2d(tf_same(ste_sign(real), 3, self.stride), kernel, stride=self.stride)
        scales = torch.sigmoid(F.relu(real.mean((2, 3)) @ self.reduce.w.T) @ self.expand.w.T)
        return prelu(out * scales[:, :, None, None], self.alpha.w) + shortcut


class OfficialRealToBinNet(nn.Module):
    def __init__(self, channels=64, num_classes=1000):
        super().__init__()
        self.stem = nn.ModuleList([Weight(channels, 3, 7, 7), KerasBN(channels), Weight(channels)])
        self.halves = nn.ModuleList()
        for block in range(2, 10):  # larq-zoo's loop
            self.halves.append(OfficialHalf(channels, downsample=block % 2 == 0 and block > 3))
            channels = self.halves[-1].conv.w.shape[0]
            self.halves.append(OfficialHalf(channels, downsample=False))
        self.dense = nn.Linear(channels, num_classes)
        self.binary_kernels = True  # False: RealToBinNetBANFactory (ste_sign inputs, real kernels)

    def forward(self, x):
        conv, bn, alpha = self.stem
        x = prelu(bn(F.conv2d(tf_same(x, 7, 2), conv.w, stride=2)), alpha.w)
        x = F.max_pool2d(tf_same(x, 3, 2, value=-math.inf), 3, 2)
        for half in self.halves:
            x = half(x, self.binary_kernels)
        return self.dense(x.mean((2, 3)))



def twins(width=0.5):
    """The preset's network at `width`, random weights, slopes and BN statistics, and the
    official network with the same values, both float64."""
    torch.manual_seed(0)
    cfg = make("model=real_to_binary", "data=imagenet", f"model.width={width}").model
    ours = build_model(cfg, num_classes=1000, in_channels=3).double()
    with torch.no_grad():
        for bn in (m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
        for prelu_layer in (m for m in ours.modules() if isinstance(m, nn.PReLU)):
            prelu_layer.weight.uniform_(-0.5, 0.5)  # Keras starts them at 0: a ReLU would hide them
        ours.blocks[2].a.conv.weight.view(-1)[:3] = torch.tensor([1.0, -1.1, 2.0])  # at and past the clip
    official = OfficialRealToBinNet(round(64 * width)).double()
    pairs = [*zip(ours.parameters(), official.parameters()), *zip(statistics(ours), statistics(official))]
    assert len(pairs) == len(list(official.parameters())) + len(statistics(official))
    with torch.no_grad():
        for mine, theirs in pairs:
            assert mine.shape == theirs.shape
            theirs.copy_(mine)
    return ours, official


# 64: every strided map even (TensorFlow pads after only); 57 and 72: odd maps along the way.
@pytest.mark.parametrize("size", [64, 57, 72])
@pytest.mark.parametrize("weights", ["binary", "real"])  # stage 2 (r2b_bnn), stage 1 (r2b_ban)
def test_logits_are_the_official_networks_in_float64(size, weights):
    ours, official = (m.eval() for m in twins())
    set_precision(ours, "binary", weights)
    official.binary_kernels = weights == "binary"
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-10, atol=1e-10)


def test_gradients_and_bn_statistics_are_the_official_networks_in_training():
    ours, official = twins()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_trains_as_official(ours, official, x)  # Keras's BN momentum too
    assert ours.blocks[2].a.conv.weight.grad.view(-1)[:3].tolist()[1:] == [0.0, 0.0]  # |w| > 1


def test_parameter_counts_and_costs():
    with torch.device("meta"):  # shapes only: the costs need no arithmetic
        model = build_model(make("model=real_to_binary", "data=imagenet").model, num_classes=1000, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert PARAMS + sum(b.numel() for b in statistics(model)) == KERAS_PARAMS
    cost = count_costs(model, (3, 224, 224))
    assert (cost.bops, cost.flops) == (BOPS, FLOPS)
    # The binary 3x3 convs are ResNet-18's (Bi-Real Net's 1.68e9): 4 per stage, the first
    # strided one at half the map; the gates' linear layers are FLOPs.
    convs = sum(9 * (56 >> i) ** 2 * c * c * 4 for i, c in enumerate((64, 128, 256, 512)))
    assert cost.bops == convs - sum(9 * (56 >> i) ** 2 * c * c // 2 for i, c in enumerate((128, 256, 512), 1))
    gates = sum(m.reduce.weight.numel() + m.expand.weight.numel() for m in model.modules()
                if isinstance(m, GatedScaling))
    stem, shortcuts = 112 ** 2 * 64 * 147, 3 * 28 ** 2 * 64 * 128
    assert cost.flops == stem + shortcuts + gates + 512 * 1000
    assert len(list(binary_layers(model))) == 16


def test_layers_are_initialised_and_normalised_as_keras_does():
    model = build_model(make("model=real_to_binary", "data=imagenet").model, num_classes=1000, in_channels=3)
    w = model.blocks[7].b.conv.weight  # glorot_normal: variance 2 / (fan_in + fan_out), truncated at 2 sigma
    std = math.sqrt(1 / 4608)
    assert abs(w.std().item() / std - 1) < 0.02 and w.abs().max() <= 2 * std / 0.87962566
    gate = model.blocks[7].b.scale.reduce.weight  # he_normal: variance 2 / fan_in
    assert gate.shape == (64, 512) and gate.abs().max() <= 2 * math.sqrt(2 / 512) / 0.87962566
    assert abs(gate.std().item() / math.sqrt(2 / 512) - 1) < 0.05
    assert model.classifier.weight.abs().max() <= math.sqrt(6 / 1512) and not model.classifier.bias.any()
    assert all(not m.weight.any() for m in model.modules() if isinstance(m, nn.PReLU))  # slopes from 0
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 16 + 3 and all((bn.momentum, bn.eps) == (0.01, 1e-3) for bn in norms)
    assert [layer.input_quantizer.config() for _, layer in binary_layers(model)][0] == \
        {"name": "ste_sign", "clip_value": 1.0}


@pytest.mark.parametrize("size", [8, 7])  # TensorFlow pads an even map after only, an odd one on both sides
def test_the_exported_strided_conv_keeps_tensorflows_padding(size):
    torch.manual_seed(0)
    conv = SameBinaryConv2d(4, 6, 3, 2, input_quantizer={"name": "ste_sign", "clip_value": 1.0},
                            weight_quantizer="sign").double()
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    want = F.conv2d(tf_same(ste_sign(x), 3, 2), ste_sign(conv.weight), stride=2)
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(same_conv(InferenceBinaryLayer(conv), x, 3, 2), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="scales the output"):
        SameBinaryConv2d(4, 6, 3, 2, input_quantizer={"name": "xnor_sign", "scale": "box"})


def test_the_cifar_stem_and_the_refused_options():
    model = build_model(make("model=real_to_binary", "data=cifar100", "model.width=0.25").model,
                        num_classes=100, in_channels=3)
    assert [type(m).__name__ for m in model.stem] == ["SamePad2d", "Conv2d", "BatchNorm2d", "KerasPReLU"]
    assert model.stem.conv.kernel_size == (3, 3) and model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    preset = OmegaConf.to_container(make("model=real_to_binary").model, resolve=True)
    for key, value, shown in (("activation", "relu", "relu"), ("groups", 2, "2"), ("binary_classifier", True, "true")):
        with pytest.raises(ValueError, match=f"model.{key}={shown}"):
            build_model({**preset, key: value}, num_classes=10, in_channels=1)


@pytest.mark.slow
def test_two_stages_on_the_digits_clip_and_export(tmp_path):
    from bnntrain.run.pipeline import run

    overrides = ["model=real_to_binary", "data=digits", "model.width=0.125", "data.train_limit=256",
                 "schedule.epochs=1", "optimizer.weight_clip=1.0", "trainer.device=cpu", "trainer.progress=plain"]
    assert list(run(overrides, tmp_path / "run")) == ["stage1", "stage2"]
    last = tmp_path / "run" / "stage2" / "last.pt"
    trained = model_from_checkpoint(load_checkpoint(last)).eval()
    latent = [layer.weight for _, layer in binary_layers(trained)]
    assert len(latent) == 16 and max(w.abs().max().item() for w in latent) <= 1.0
    export.export_checkpoint(last, tmp_path / "model.bnn")
    inference = export.load(tmp_path / "model.bnn")
    layers = [m for m in inference.modules() if isinstance(m, InferenceBinaryLayer)]
    assert len(layers) == 16 and all(why_not_packed(m) is None for m in layers)
    x = torch.randn(4, 1, 8, 8)  # 8, 4, 2: every strided binary conv pads after only
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x), rtol=1e-4, atol=1e-4)
        need("numba", extra="infer")
        from bnntrain import infer

        torch.testing.assert_close(infer.load(tmp_path / "model.bnn")(x), inference(x), rtol=1e-5, atol=1e-5)
        assert_onnx_matches(tmp_path / "model.bnn", x, inference(x))  # the shifted pads, in ONNX too
