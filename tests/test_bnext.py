"""BNext (model=bnext_tiny ... bnext_large) is the official network: against BNext as its code
defines it (hpi-xnor/BNext src/bnext.py, written out below from a reading of that code, with
its module names, shapes and arithmetic; `width` scales the channels as model.width does),
parameter counts, logits in float64 with the weights copied key for key, every gradient,
BOPs; then a two-stage run through the pipeline and the export."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from official_nets import LearnableBias, randomize_batchnorms

from bnntrain.complexity import count_costs
from bnntrain.engine import load_checkpoint, save_checkpoint
from bnntrain.errors import UserError
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.tools import export
from conftest import assert_onnx_matches, results, run_cli
from test_config import make
from test_method_bnext import OldClamp

SIZES = {  # the code's stage_out_channel_*
    "tiny": [32, 64] + [128] * 2 + [256] * 2 + [512] * 6 + [1024] * 2,
    "small": [48, 96] + [192] * 2 + [384] * 2 + [768] * 6 + [1536] * 2,
    "middle": [48, 96] + [192] * 4 + [384] * 4 + [768] * 8 + [1536] * 4,
    "large": [64, 128] + [256] * 4 + [512] * 4 + [1024] * 16 + [2048] * 4,
}
# Counted from the code's shapes (none published): all parameters, binary weights.
COUNTS = {"tiny": (30_862_236, 28_253_184), "small": (68_594_614, 63_569_664),
          "middle": (134_501_974, 126_238_464), "large": (326_546_640, 308_310_016)}


class HardSign(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, x):
        replace = OldClamp.apply(x, -1.5, 1.5)  # torch.clamp as it was (test_method_bnext.py)
        sign = x.div(self.temperature.clamp(min=1e-8)).clamp(-1, 1).sign()
        return (sign - replace).detach() + replace


class HardBinaryConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) * 0.001)
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, x):
        if self.training:
            self.weight.data.clamp_(-1.5, 1.5)
        w = self.weight
        binary = w.sign() if self.temperature < 1e-7 else (w / self.temperature.clamp(min=1e-8)).clamp(-1, 1)
        if self.training:
            binary = binary.detach() - w.detach() + w
        return F.conv2d(x, binary, stride=self.stride, padding=self.padding)



class SqueezeAndExpand(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(c, c // 8, 1), nn.ReLU(c // 8),
                                nn.Conv2d(c // 8, c, 1))
        self.attention = nn.Sigmoid()

    def forward(self, x):
        return self.attention(self.se(x))


class Unit(nn.Module):
    """The code's Attention, FFN_3x3 and FFN_1x1 (infor_recoupling on), by `kind`."""

    def __init__(self, kind, c, stride=1):
        super().__init__()
        self.kind, self.stride = kind, stride
        self.move, self.binary_activation = LearnableBias(c), HardSign()
        self.binary_conv = HardBinaryConv(c, c, 1 if kind == "FFN_1x1" else 3, stride)
        self.norm1, self.norm2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.activation1, self.activation2 = nn.PReLU(c), nn.PReLU(c)
        if stride == 2:
            self.pooling = nn.AvgPool2d(2, 2)
        self.se = SqueezeAndExpand(c)
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1) * 0.5)

    def forward(self, input):
        residual = self.activation1(input) if self.kind == "Attention" else input
        if self.stride == 2:
            residual = self.pooling(residual)
        x = self.activation2(self.norm1(self.binary_conv(self.binary_activation(self.move(input)))))
        if self.training or self.kind == "FFN_1x1":
            self.scale.data.clamp_(0, 1)
        if self.stride == 2:
            input = self.pooling(input)
        x = self.se(self.scale * input + (1 - self.scale) * x) * x
        if self.kind == "Attention":
            x = x * residual
        return self.norm2(x) + residual


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, mode):
        super().__init__()
        self.double = cin != cout
        self.Attention = Unit("Attention" if mode == "scale" else "FFN_3x3", cin, stride)
        if self.double:
            self.FFN_1, self.FFN_2 = Unit("FFN_1x1", cin), Unit("FFN_1x1", cin)
        else:
            self.FFN = Unit("FFN_1x1", cin)

    def forward(self, x):
        x = self.Attention(x)
        return torch.cat((self.FFN_1(x), self.FFN_2(x)), dim=1) if self.double else self.FFN(x)


class FirstConv(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.conv1, self.bn1, self.prelu = nn.Conv2d(3, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c, c)

    def forward(self, x):
        return self.bn1(self.conv1(x))


class OfficialBNext(nn.Module):
    def __init__(self, num_classes=1000, size="tiny", width=1.0):
        super().__init__()
        unit = round(SIZES[size][0] * width)
        ch = [c * unit // SIZES[size][0] for c in SIZES[size]]
        self.feature = nn.ModuleList([FirstConv(ch[0], 1 if num_classes != 1000 else 2)])
        for i in range(1, len(ch)):
            stride = 2 if i > 1 and ch[i - 1] != ch[i] and ch[i] != ch[1] else 1
            mode = "bias" if i == 1 else ("scale" if i % 2 == 0 else "bias")
            self.feature.append(BasicBlock(ch[i - 1], ch[i], stride, mode))
        self.prelu, self.pool1, self.fc = nn.PReLU(ch[-1]), nn.AdaptiveAvgPool2d(1), nn.Linear(ch[-1], num_classes)

    def forward(self, x):
        for block in self.feature:
            x = block(x)
        return self.fc(self.pool1(self.prelu(x)).flatten(1))


RULES = [  # official key -> ours: one to one, but the HardSign temperatures (no effect)
    (r"feature\.0\.conv1\.(.*)", r"stem.0.\1"), (r"feature\.0\.bn1\.(.*)", r"stem.1.\1"),
    (r"feature\.0\.prelu\.(.*)", r"stem_prelu.\1"), (r"prelu\.(.*)", r"head_prelu.\1"), (r"fc\.(.*)", r"classifier.\1"),
    (r"feature\.(\d+)\.(Attention|FFN|FFN_1|FFN_2)\.(.*)", None),
]
UNITS = {"Attention": "attention", "FFN": "ffn.0", "FFN_1": "ffn.0", "FFN_2": "ffn.1"}
LEAVES = {"move.bias": "binary_conv.threshold", "binary_conv.temperature": "binary_conv.weight_quantizer.temperature"}


def our_key(key):
    for pattern, target in RULES:
        if m := re.fullmatch(pattern, key):
            if target is not None:
                return m.expand(target)
            leaf = m[3]
            if leaf == "binary_activation.temperature":
                return None
            leaf = LEAVES.get(leaf, re.sub(r"^se\.se\.", "se.", leaf))
            return f"blocks.{int(m[1]) - 1}.{UNITS[m[2]]}.{leaf}"
    raise KeyError(key)


def randomized(net, temperature):
    """Trained-looking weights, BN statistics and scales (a few outside [0, 1], as a converted
    checkpoint may hold), binary weights within the clamp and off 0, every temperature set."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("binary_conv.weight"):
                signs = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
                p.copy_(torch.empty(p.shape).uniform_(0.01, 1.4, generator=g) * signs)
            elif name.endswith("scale"):
                p.copy_(torch.empty(p.shape).uniform_(-0.2, 1.2, generator=g))
            elif name.endswith("move.bias") or name.endswith("prelu.weight") or "activation" in name:
                p.normal_(0, 0.2, generator=g)
        randomize_batchnorms(net, g)
        for name, b in net.named_buffers():
            if name.endswith("temperature"):
                b.fill_(temperature)
    return net


def twins(size="tiny", width=1.0, temperature=0.9 ** 5, num_classes=1000):
    """The official network, randomized, and ours with its weights copied key for key (float64)."""
    torch.manual_seed(0)
    net = randomized(OfficialBNext(num_classes, size, width), temperature).double()
    stem = "imagenet" if num_classes == 1000 else "cifar"
    ours = build_model(make("model=bnext_tiny", f"model.size={size}", f"model.width={width}",
                            f"model.stem={stem}").model, num_classes=num_classes, in_channels=3).double()
    state = {our_key(k): v for k, v in net.state_dict().items() if our_key(k) is not None}
    ours.load_state_dict(state, strict=True)
    return net, ours


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_are_the_codes(size):
    with torch.device("meta"):  # 326M parameters for large: shapes only
        ours = build_model(make(f"model=bnext_{size}", "data=imagenet").model, num_classes=1000, in_channels=3)
        net = OfficialBNext(1000, size)
    binary = sum(m.weight.numel() for m in ours.modules() if hasattr(m, "weight_quantizer"))
    assert (sum(p.numel() for p in ours.parameters()), binary) == COUNTS[size]
    assert sum(p.numel() for p in net.parameters()) == COUNTS[size][0]
    theirs = {our_key(k): v.shape for k, v in net.state_dict().items() if our_key(k) is not None}
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}  # every key and shape, one to one


def test_bops_at_224_px_are_the_codes_binary_macs():
    with torch.device("meta"):
        model = build_model(make("model=bnext_tiny", "data=imagenet").model, num_classes=1000, in_channels=3)
    bops = count_costs(model, (3, 224, 224)).totals()["bops"]
    assert abs(bops / 4.8169e9 - 1) < 0.03, bops


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.9 ** 5, 1e-8])
def test_full_width_tiny_gives_the_official_logits(temperature):
    net, ours = twins(temperature=temperature)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = net.eval()(x)  # (the code's FFN_1x1 clamps its scales in place here)
        got = ours.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert want.abs().max() > 1e-3  # not a network that outputs its biases


@pytest.mark.parametrize("temperature, classes", [(0.9 ** 5, 1000), (1e-8, 1000), (0.9 ** 100, 10)])
def test_every_gradient_is_the_official_one(temperature, classes):
    net, ours = twins(width=0.25, temperature=temperature, num_classes=classes)
    size = 64 if classes == 1000 else 32  # the ImageNet stem halves it; the small-image one keeps it
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        eval_want, eval_got = net.eval()(x), ours.eval()(x)
    torch.testing.assert_close(eval_got, eval_want, rtol=1e-9, atol=1e-10)
    net.train()(x).square().mean().backward()
    ours.train()(x).square().mean().backward()
    mine = dict(ours.named_parameters())
    checked = 0
    for name, p in net.named_parameters():
        q = mine[our_key(name)]
        if p.grad is None:  # the stem's PReLU and the FFN units' activation1: never used
            assert q.grad is None and not q.requires_grad, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)  # the in-place clamps, the same
        checked += 1
    assert checked == sum(p.requires_grad for p in ours.parameters())


DIGITS = ["model=bnext_tiny", "model.width=0.125", "schedule.epochs=2", "data.train_limit=256", "data.test_limit=64",
          "trainer.device=cpu", "trainer.progress=plain"]


@pytest.mark.slow
def test_two_stages_on_the_digits_then_the_export(tmp_path):
    """Stage 1 (binary activations, real weights) hands its weights to stage 2 (soft, then
    hard binary weights); the temperature follows the epochs; the export refuses the soft
    phase in one line and packs sign(w) once T < 1e-7, with the network's outputs."""
    out = run_cli(DIGITS, tmp_path / "run")  # the command line
    assert out.returncode == 0, out.stderr
    assert list(results(tmp_path / "run")) == ["stage1", "stage2"]
    last = tmp_path / "run" / "stage2" / "last.pt"
    state = load_checkpoint(last)
    assert state["init_from"] == str(tmp_path / "run" / "stage1" / "last.pt")
    temperatures = {k: v.item() for k, v in state["model"].items() if k.endswith("temperature")}
    assert len(temperatures) == 31 and set(temperatures.values()) == {torch.tensor(0.9).item()}  # epoch 1 of 2
    binary = [k for k, v in state["model"].items() if k.endswith("binary_conv.weight")]
    assert all(state["model"][k].abs().max() <= 1.5 for k in binary)  # projected
    cost = json.loads((tmp_path / "run" / "stage2" / "cost.json").read_text())
    assert cost["totals"]["bops"] > 0
    with pytest.raises(UserError, match=r"^blocks\.0\.attention\.binary_conv binarizes its weight with bnext_weight, "
                                        r"whose values are not \+-1.*cannot run it as trained$"):
        export.export_checkpoint(last, tmp_path / "soft.bnn")
    assert not (tmp_path / "soft.bnn").exists()

    model = hardened(model_from_checkpoint(state))
    state["model"] = model.state_dict()
    save_checkpoint(state, tmp_path / "hard.pt")
    export.export_checkpoint(tmp_path / "hard.pt", tmp_path / "hard.bnn")
    blob = torch.load(tmp_path / "hard.bnn", weights_only=True)
    packed = json.loads(blob["config"])["packed"]
    assert len(packed) == 31
    for layer in packed:
        w = model.get_submodule(layer).weight.detach()
        assert torch.equal(blob["tensors"][f"{layer}.weight_bits"], export.pack_signs(w))
    # export.load builds a fresh model (temperature 1, soft) and reads the file into it: the
    # file was checked when written, so the fresh model's state does not refuse it.
    loaded = export.load(tmp_path / "hard.bnn")
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        want = model.eval()(x)
        tol = {"rtol": 1e-4, "atol": 1e-6 * want.abs().max().item()}  # float32 rounding (stem BN folded)
        torch.testing.assert_close(loaded(x), want, **tol)
        assert torch.equal(loaded(x).argmax(1), want.argmax(1))
        assert_onnx_matches(tmp_path / "hard.bnn", x, loaded(x))


def hardened(model):
    for m in model.modules():
        if hasattr(m, "set_epoch"):
            m.set_epoch(153)  # as the curriculum leaves it from epoch 153 on
    return model
