"""Bring your own network: `bnntrain.nn.binarize` on torchvision's ResNet-18 and MobileNetV2
(the layers it replaces, their weights and shapes, what stays real), the cost report and the
packed export of the result, and `model=torchvision` through the builder and the CLI."""
import copy

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from bnntrain.complexity import count_costs, precision
from bnntrain.engine import load_checkpoint, load_model_weights, save_checkpoint
from bnntrain.errors import ConfigError
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.nn import BinaryConv2d, BinaryLinear, binarize, binary_layers, set_precision
from bnntrain.nn.binarize import is_depthwise, stem_and_classifier
from bnntrain.tools import export
from conftest import results, run_cli
from test_config import make

ARCHS = ("resnet18", "mobilenet_v2")
STEMS = {"resnet18": "conv1", "mobilenet_v2": "features.0.0"}
CLASSIFIERS = {"resnet18": "fc", "mobilenet_v2": "classifier.1"}


def torchvision_net(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, num_classes=10)


def convs_and_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def dilated_net() -> nn.Sequential:
    """Every conv attribute binarize must carry over: dilation, stride, groups, a bias."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=True), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=True), nn.BatchNorm2d(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.PReLU(), nn.Linear(12, 10))


@pytest.mark.parametrize("arch", ARCHS)
def test_binarize_replaces_every_conv_but_the_stem_the_classifier_and_depthwise(arch):
    net = torchvision_net(arch)
    before = convs_and_linears(copy.deepcopy(net))
    assert binarize(net) is net  # in place
    assert stem_and_classifier(net) == (STEMS[arch], CLASSIFIERS[arch])
    after = convs_and_linears(net)
    assert list(after) == list(before)  # the same tree, layer for layer
    for name, old in before.items():
        new = after[name]
        real = name in (STEMS[arch], CLASSIFIERS[arch]) or is_depthwise(old)
        assert isinstance(new, (BinaryConv2d, BinaryLinear)) != real, name
        assert torch.equal(new.weight, old.weight) and (new.bias is None) == (old.bias is None), name
        if isinstance(old, nn.Conv2d):
            same = ("kernel_size", "stride", "padding", "dilation", "groups", "in_channels", "out_channels")
            assert all(getattr(new, key) == getattr(old, key) for key in same), name
    depthwise = [name for name, m in before.items() if is_depthwise(m)]
    assert len(depthwise) == (17 if arch == "mobilenet_v2" else 0)
    assert len(list(binary_layers(net))) == len(before) - 2 - len(depthwise)
    assert not any(type(m) in (nn.ReLU, nn.ReLU6) for m in net.modules())
    if arch == "resnet18":  # the block's one ReLU, called twice, is one PReLU in both places
        assert isinstance(net.layer1[0].relu, nn.PReLU)
        assert sum(isinstance(m, nn.PReLU) for m in net.modules()) == 1 + 8  # stem + one per block


def test_binarize_binarizes_stem_classifier_and_depthwise_when_asked_and_keeps_what_it_is_told():
    net = binarize(torchvision_net("mobilenet_v2"), binary_stem=True, binary_classifier=True, binary_depthwise=True,
                   keep_real=["features.1.*", "features.1?.conv.1.0"])
    layers = convs_and_linears(net)
    binary = {name for name, m in layers.items() if isinstance(m, (BinaryConv2d, BinaryLinear))}
    kept = ["features.1.conv.0.0", "features.1.conv.1", *(f"features.{i}.conv.1.0" for i in range(10, 18))]
    assert sorted(set(layers) - binary) == sorted(kept)  # block 1, and features.10 .. 17's depthwise convs
    assert layers["features.2.conv.1.0"].groups == 96 and "features.2.conv.1.0" in binary  # a binary depthwise conv
    assert {"features.0.0", "classifier.1"} <= binary


def test_a_conv_padded_otherwise_is_refused_and_a_relu_can_stay():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"keep_real=\['1'\]"):
        binarize(net)
    net = binarize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)), activation="relu")
    assert isinstance(net[1], nn.ReLU) and isinstance(net[2], BinaryConv2d)
    with pytest.raises(ValueError, match="model.activation 'rprelu'"):
        binarize(nn.Conv2d(3, 4, 3), activation="rprelu")


def calibrated(net: nn.Module) -> nn.Module:
    """`net` in eval mode with BN statistics of a few batches: at torchvision's initial ones
    (mean 0, variance 1) a deep network's outputs vanish (1e-10 for MobileNetV2)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the plain average over the batches
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 32, 32))
    return net.eval()


@pytest.mark.parametrize("arch", [*ARCHS, "dilated"])
def test_at_real_precision_the_binarized_network_computes_what_the_original_did(arch):
    """Keeping the ReLUs and switched to real inputs and weights, a binarized network is the
    network it was made from: every shape, stride, dilation, group and weight carried over."""
    original = calibrated(dilated_net() if arch == "dilated" else torchvision_net(arch))
    binarized = binarize(copy.deepcopy(original), activation="relu", binary_stem=True, binary_classifier=True)
    assert len(list(binary_layers(binarized))) >= 4
    set_precision(binarized, "real", "real")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = original(x)
        assert want.abs().mean() > 0.1  # outputs that a wrong weight would change
        torch.testing.assert_close(binarized.eval()(x), want, rtol=1e-5, atol=1e-5)
        set_precision(binarized, "binary", "binary")
        assert not torch.allclose(binarized(x), original(x), rtol=1e-2, atol=1e-2)  # the switch did switch


@pytest.mark.parametrize("arch", ARCHS)
def test_the_binary_network_trains_and_counts_its_bops(arch):
    net = binarize(torchvision_net(arch))
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(4)).backward()
    for name, layer in binary_layers(net):
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), name
    assert any(layer.weight.grad.abs().sum() > 0 for _, layer in binary_layers(net))
    report = count_costs(net, (3, 32, 32))
    costs = {layer.name: layer for layer in report.layers}
    binary = {name for name, _ in binary_layers(net)}
    assert {name for name, c in costs.items() if c.binary_macs > 0} == binary  # every binary layer, and only they
    assert report.bops == sum(costs[name].binary_macs for name in binary) > 0
    for real in (STEMS[arch], CLASSIFIERS[arch]):
        assert costs[real].binary_macs == 0 and costs[real].real_macs > 0
    assert report.binary_params == sum(layer.weight.numel() for _, layer in binary_layers(net))
    with precision(net, "binary", "real"):  # stage 1: binary activations, real weights
        assert count_costs(net, (3, 32, 32)).bops == 0


def randomize_batchnorms(model: nn.Module) -> None:
    """Trained-looking BN statistics, so that folding them into the export is not a no-op."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


WIDTHS = {"resnet18": 1, "mobilenet_v2": 0.25}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_packed_export_gives_the_models_outputs(arch, tmp_path):
    cfg = make("stage='2'", "data=synthetic", "data.image_size=16", "model=torchvision", f"model.arch={arch}",
               f"model.width={WIDTHS[arch]}")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    randomize_batchnorms(model)
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1,
                     "stage": cfg.stage.name, "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "c.pt")
    export.export_checkpoint(tmp_path / "c.pt", tmp_path / "m.bnn")
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want = model.eval()(x)
        deployed = export.load(tmp_path / "m.bnn")
        got = deployed(x)
    assert want.abs().mean() > 0.05  # logits of a size that a wrong layer would change
    # Float rounding, as tests/test_export.py allows it.
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert len(deployed.export_config["packed"]) == len(list(binary_layers(model)))
    if arch == "mobilenet_v2":  # the real convs' BNs, in torchvision's conv-BN-ReLU6 blocks, fold
        assert deployed.export_config["folded"]["features.0.0"] == "features.0.1"


def test_the_builder_reads_the_model_group():
    digits = make("model=torchvision", "model.arch=resnet18", "model.width=1")  # 8x8, 1 channel: the small stem
    net = build_model(digits.model, num_classes=10, in_channels=1)
    assert net.conv1.in_channels == 1 and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    assert type(net.layer2[0].downsample[0]) is nn.Conv2d  # keep_real: the shortcut convs stay real
    assert all(m.momentum == digits.model.bn_momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    imagenet = build_model(make("model=torchvision", "data=imagenet", "model.arch=resnet18").model, num_classes=5,
                           in_channels=3)
    assert imagenet.conv1.stride == (2, 2) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    narrow = build_model(make("model=torchvision", "model.width=0.25").model, num_classes=10, in_channels=1)
    assert narrow.features[0][0].out_channels == 8  # mobilenet_v2's 32 stem channels x 0.25
    twin = build_model(make("model=torchvision", "model.binarize=false").model, num_classes=10, in_channels=1)
    set_precision(twin, "binary", "binary")
    assert all(layer.activations == layer.weights == "real" for _, layer in binary_layers(twin))


REFUSED = {
    "model.downsample=v2 does not apply": {"downsample": "v2"},
    "model.groups=2 does not apply": {"groups": 2},
    "unknown model.arch 'resnet19'": {"arch": "resnet19", "width": 1},
    "unknown model.stem 'tiny'": {"stem": "tiny"},
}


@pytest.mark.parametrize("words", REFUSED)
def test_what_a_torchvision_network_cannot_take_is_refused_in_one_line(words):
    options = {**OmegaConf.to_container(make("model=torchvision").model), **REFUSED[words]}
    with pytest.raises(ValueError, match=words) as err:
        build_model(options, num_classes=10, in_channels=1)
    assert "\n" not in str(err.value)


def test_a_width_torchvision_cannot_build_stops_the_run_before_it_starts():
    with pytest.raises(ConfigError, match=r"model.arch=resnet18 has no width multiplier .* give model.width=1"):
        make("model=torchvision", "model.arch=resnet18")  # data=digits sets model.width=0.5


@pytest.mark.slow
def test_torchvision_networks_train_both_stages_through_the_cli(tmp_path):
    """resnet18 through the command line, mobilenet_v2 through the pipeline it runs, in this
    process (the command line's own part is the same for both)."""
    from bnntrain.run.pipeline import run as run_pipeline

    tiny = ["model=torchvision", "schedule.epochs=1", "data.train_limit=64", "data.test_limit=32",
            "trainer.progress=plain"]
    for arch, width in WIDTHS.items():
        run = tmp_path / arch
        overrides = [*tiny, f"model.arch={arch}", f"model.width={width}"]
        if arch == "resnet18":
            out = run_cli(overrides, run)
            assert out.returncode == 0, out.stderr
            assert f"stage2: weights initialised from {run / 'stage1/last.pt'}" in out.stdout + out.stderr
        else:
            run_pipeline([*overrides, "trainer.device=cpu"], run)
        assert list(results(run)) == ["stage1", "stage2"]
        first, second = load_checkpoint(run / "stage1/last.pt"), load_checkpoint(run / "stage2/last.pt")
        model = model_from_checkpoint(second)
        assert {(layer.activations, layer.weights) for _, layer in binary_layers(model)} == {("binary", "binary")}
        # The hand-over is strict: the stage-1 weights fit the stage-2 model key for key.
        load_model_weights(model, first["model"], "stage1")
        assert {(layer.activations, layer.weights) for _, layer in binary_layers(model_from_checkpoint(first))} == {
            ("binary", "real")}
        stem, _ = stem_and_classifier(model)
        assert model.get_submodule(stem).in_channels == 1  # the digits' one channel: the first conv rebuilt
        bops = [OmegaConf.load(run / stage / "cost.json").totals.bops for stage in ("stage1", "stage2")]
        assert bops[0] == 0 < bops[1]  # stage 1's weights are real; stage 2 counts BOPs
