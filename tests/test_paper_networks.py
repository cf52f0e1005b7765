"""The IR-Net, ReCU and AdaBin network presets are their official networks layer for layer.

Each official ResNet is written out here from its authors' code (htqin/IR-Net, z-hXu/ReCU,
huawei-noah/Efficient-Computing BinaryNetworks/AdaBin; the paths are in the model presets),
with plain convs where the official code has binary ones: at real precision a binary layer is
a plain conv, so the logits compare the networks' shapes (stems, block order, shortcuts,
activations, heads) in float64, with every weight and BN statistic copied across in the order
the forward pass uses them. The quantizers are checked against the same code in the
test_method_* files; here only that each preset puts the right ones in every binary layer.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnntrain.models.registry import build_model
from bnntrain.nn import binary_layers, set_precision
from bnntrain.run.config import last_stage


class OfficialMaxout(nn.Module):
    """AdaBin's Maxout (utils/binarylib.py): pos x relu(x) - neg x relu(-x), per channel."""

    def __init__(self, channels):
        super().__init__()
        self.pos = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.neg = nn.Parameter(torch.full((1, channels, 1, 1), 0.25))

    def forward(self, x):
        return self.pos * F.relu(x) - self.neg * F.relu(-x)


def activation(kind, channels):
    return OfficialMaxout(channels) if kind == "maxout" else nn.Hardtanh()


class OfficialHalves(nn.Module):
    """The official basic block of all six: bn1(conv1(x)) + shortcut(x) -> act -> x1;
    bn2(conv2(x1)) + x1 -> act."""

    def __init__(self, cin, planes, stride, shortcut, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = activation(act, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = activation(act, planes)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != planes:
            pad = planes // 4
            self.shortcut = {
                # IR-Net's and AdaBin's CIFAR option A: LambdaLayer(F.pad(x[:, :, ::2, ::2], ...))
                "option_a": lambda: LambdaPad(pad, subsample=True),
                # ReCU's CIFAR: nn.AvgPool2d((2, 2)) then the same zero channels
                "pool_pad": lambda: nn.Sequential(nn.AvgPool2d((2, 2)), LambdaPad(pad, subsample=False)),
                # IR-Net's and ReCU's ImageNet: a strided 1x1 conv and BN
                "conv": lambda: nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)),
                # AdaBin's ImageNet avg_down: AvgPool2d(stride, ceil_mode, no pad count), 1x1 conv, BN
                "avg_down": lambda: nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                                                  nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)),
            }[shortcut]()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)) + self.shortcut(x))
        return self.act2(self.bn2(self.conv2(out)) + out)


class LambdaPad(nn.Module):
    def __init__(self, pad, subsample):
        super().__init__()
        self.pad, self.subsample = pad, subsample

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2] if self.subsample else x, (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class OfficialResNet(nn.Module):
    def __init__(self, depths, channels, stem, shortcut, act, num_classes):
        super().__init__()
        c0 = channels[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, c0, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, c0, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.act = activation(act, c0)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        layers, cin = [], c0
        for i, (depth, planes) in enumerate(zip(depths, channels)):
            for j in range(depth):
                layers.append(OfficialHalves(cin, planes, 2 if i and not j else 1, shortcut, act))
                cin = planes
        self.layers = nn.Sequential(*layers)
        self.bn2 = nn.BatchNorm1d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # F.avg_pool2d(out, out.size()[3]) / AvgPool2d(7)
        return self.fc(self.bn2(x))


RESNET20 = ((3, 3, 3), (16, 32, 64), "cifar", 10)
RESNET18 = ((2, 2, 2, 2), (64, 128, 256, 512), "imagenet", 1000)
# preset: (official shape, official shortcut, activation, input quantizer, weight quantizer and args)
PRESETS = {
    "irnet_resnet20": (RESNET20, "option_a", "hardtanh", "ede_sign", ("irnet_libra_pb", {"t_min": 1e-3})),
    "recu_resnet20": (RESNET20, "pool_pad", "hardtanh", "recu_sign", ("recu", {"tau_min": 0.85, "tau_max": 0.99})),
    "adabin_resnet20": (RESNET20, "option_a", "maxout", "adabin_sign", ("adabin", {"t_min": 1e-3})),
    "irnet_resnet18": (RESNET18, "conv", "hardtanh", "ede_sign", ("irnet_libra_pb", {})),
    "recu_resnet18": (RESNET18, "conv", "hardtanh", "recu_sign", ("recu", {"tau_min": 0.85})),
    "adabin_resnet18": (RESNET18, "avg_down", "maxout", "adabin_sign", ("adabin", {"t_min": 1e-3})),
}
# Parameters each binary conv adds in the official code: ReCU's alpha (one per output
# channel), AdaBin's activation alpha and beta (one each per conv).
EXTRA = {"recu": lambda conv: conv.out_channels, "adabin": lambda conv: 2}


def ours(preset, num_classes, **overrides):
    cfg = last_stage([f"model={preset}", "data=digits", "stage=2", "stage.needs_init=false", "model.width=1.0",
                      *[f"model.{k}={v}" for k, v in overrides.items()]])
    return cfg, build_model(cfg.model, num_classes=num_classes, in_channels=3)


LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear, OfficialMaxout)


def in_forward_order(model, x):
    """The modules holding weights or BN statistics, in the order the forward pass runs them."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m)) for m in model.modules()
             if isinstance(m, LEAVES) or type(m).__name__ == "Maxout"]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def own_tensors(module):
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_network_is_the_official_one_layer_for_layer(preset):
    (depths, channels, stem, num_classes), shortcut, act, input_q, (weight_q, args) = PRESETS[preset]
    torch.manual_seed(0)
    _, model = ours(preset, num_classes)
    official = OfficialResNet(depths, channels, stem, shortcut, act, num_classes)
    # Parameter count: the official network's, plus what its binary convs add.
    extra = sum(EXTRA.get(weight_q, lambda c: 0)(c) for c in official.modules()
                if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) and c is not official.conv1)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in official.parameters()) + extra
    # Every binary layer carries the paper's quantizers; the stem, shortcuts and classifier are real.
    layers = [layer for _, layer in binary_layers(model)]
    assert len(layers) == 2 * sum(depths)
    for layer in layers:
        assert layer.input_quantizer.name == input_q and layer.weight_quantizer.name == weight_q
        assert {k: layer.weight_quantizer.config()[k] for k in args} == args
    # The same weights and statistics, copied in forward order, give the same logits.
    size = 32 if stem == "cifar" else 64
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    model, official = model.double().eval(), official.double().eval()
    set_precision(model, "real", "real")
    ours_seq, theirs_seq = in_forward_order(model, x), in_forward_order(official, x)
    assert [type(m).__name__ for m in theirs_seq] == \
        [("OfficialMaxout" if type(m).__name__ == "Maxout" else "Conv2d" if isinstance(m, nn.Conv2d)
          else type(m).__name__) for m in ours_seq]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mine, theirs in zip(ours_seq, theirs_seq):
            for name, b in own_tensors(theirs).items():
                if b.is_floating_point():  # random values: nothing lines up by accident
                    b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + (0.5 if "var" in name else -0.5))
                mine_tensor = own_tensors(mine)[{"pos": "pos_scale", "neg": "neg_scale"}.get(name, name)
                                                if type(mine).__name__ == "Maxout" else name]
                mine_tensor.copy_(b.reshape(mine_tensor.shape))
    torch.testing.assert_close(model(x), official(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("preset, mode, linear, bn_weight", [
    ("irnet_resnet20", "fan_in", True, None), ("recu_resnet20", "fan_in", False, None),
    ("recu_resnet18", "fan_in", False, 1e-8), ("irnet_resnet18", "fan_out", False, None),
    ("adabin_resnet18", "fan_out", False, None)])
def test_the_weights_start_as_the_official_init_sets_them(preset, mode, linear, bn_weight):
    torch.manual_seed(0)
    cfg, model = ours(preset, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096]
    for conv in convs:  # He-normal: std sqrt(2 / fan); a uniform init would be far below
        k = conv.kernel_size[0] * conv.kernel_size[1]
        fan = (conv.in_channels if mode == "fan_in" else conv.out_channels) * k
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan), rel=0.1)
        assert conv.weight.mean().abs().item() < 0.2 * math.sqrt(2 / fan)
    fc = model.classifier
    he = math.sqrt(2 / fc.in_features)
    assert fc.weight.std().item() == pytest.approx(he if linear else he / math.sqrt(6), rel=0.15)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == (bn_weight if bn_weight else 1.0)) for m in norms)
    assert isinstance(model.head_norm, nn.BatchNorm1d) and torch.all(model.head_norm.weight == 1.0)


def test_the_networks_page_gives_each_presets_parameter_count():
    from docs_pages import table_rows

    rows = table_rows("networks.md", "| preset | network (official code) | parameters |")
    printed = {row[0].strip("`").removeprefix("model="): row[2] for row in rows}
    assert set(printed) == set(PRESETS)
    for preset, text in printed.items():
        count, classes = text.split(" (")
        _, model = ours(preset, int(classes.split()[0]))
        assert int(count.replace(",", "")) == sum(p.numel() for p in model.parameters()), preset
