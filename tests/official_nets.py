"""Bi-Real Net's and ReActNet's networks as their official PyTorch code defines them, written
here from a reading of that code (liuzechun/Bi-Real-net `pytorch_implementation/BiReal18_34/
birealnet.py`; liuzechun/ReActNet `resnet/*/birealnet.py`, `mobilenet/*/reactnet.py`), with
their module names, parameter shapes and arithmetic: torch.sign (0 at 0), the piecewise
polynomial straight-through gradient, the `a.detach() - b.detach() + b` weight binarizer,
flat (N, 1) step-2 weights. The tests compare bnntrain's presets and converter against them.
`width` scales the channels as bnntrain's `model.width` does (the official code is width 1),
so that a test can run the same arithmetic on a network of a few thousand parameters.
"""
import torch
import torch.nn.functional as F
from torch import nn


class BinaryActivation(nn.Module):
    def forward(self, x):
        m1, m2, m3 = (x < -1).float(), (x < 0).float(), (x < 1).float()
        out1 = -1 * m1 + (x * x + 2 * x) * (1 - m1)
        out2 = out1 * m2 + (-x * x + 2 * x) * (1 - m2)
        out3 = out2 * m3 + 1 * (1 - m3)
        return torch.sign(x).detach() - out3.detach() + out3


class HardBinaryConv(nn.Module):
    """flat=True: step 2's (N, 1) `weights`; flat=False: ReActNet's later 4-D `weight`."""

    def __init__(self, cin, cout, kernel=3, stride=1, padding=1, flat=True):
        super().__init__()
        self.stride, self.padding, self.shape, self.flat = stride, padding, (cout, cin, kernel, kernel), flat
        init = torch.rand(self.shape) * 0.001
        if flat:
            self.weights = nn.Parameter(init.reshape(-1, 1))
        else:
            self.weight = nn.Parameter(init)

    def forward(self, x):
        w = self.weights.view(self.shape) if self.flat else self.weight
        scale = torch.mean(torch.mean(torch.mean(abs(w), dim=3, keepdim=True), dim=2, keepdim=True), dim=1,
                           keepdim=True).detach()
        binary_no_grad = scale * torch.sign(w)
        clipped = torch.clamp(w, -1.0, 1.0)
        binary = binary_no_grad.detach() - clipped.detach() + clipped
        return F.conv2d(x, binary, stride=self.stride, padding=self.padding)


class LearnableBias(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias.expand_as(x)


def binary_conv(cin, cout, kernel, stride, step, flat):
    if step == 1:  # step 1: a real conv behind the binary activation
        return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
    return HardBinaryConv(cin, cout, kernel, stride, kernel // 2, flat)


class BasicBlock(nn.Module):
    """Bi-Real's block; react=True adds ReActNet's move0 and move1 -> PReLU -> move2."""

    def __init__(self, cin, cout, stride, downsample, react, step, flat):
        super().__init__()
        self.react = react
        if react:
            self.move0 = LearnableBias(cin)
        self.binary_activation = BinaryActivation()
        self.binary_conv = binary_conv(cin, cout, 3, stride, step, flat)
        self.bn1 = nn.BatchNorm2d(cout)
        if react:
            self.move1, self.prelu, self.move2 = LearnableBias(cout), nn.PReLU(cout), LearnableBias(cout)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.move0(x) if self.react else x
        out = self.bn1(self.binary_conv(self.binary_activation(out)))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        if self.react:
            out = self.move2(self.prelu(self.move1(out)))
        return out


class BiRealNet(nn.Module):
    def __init__(self, layers=(4, 4, 4, 4), num_classes=1000, react=False, step=2, flat=True, width=1.0):
        super().__init__()
        channels = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, channels[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = channels[0]
        for i, (planes, n) in enumerate(zip(channels, layers)):
            blocks = []
            for b in range(n):
                stride = 2 if i > 0 and b == 0 else 1
                down = None
                if stride != 1 or cin != planes:
                    down = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(cin, planes, 1, bias=False),
                                         nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(cin, planes, stride, down, react, step, flat))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))


class ReActBlock(nn.Module):
    def __init__(self, cin, cout, stride, step):
        super().__init__()
        self.stride, self.double = stride, cout != cin
        self.move11 = LearnableBias(cin)
        self.binary_3x3 = binary_conv(cin, cin, 3, stride, step, True)
        self.bn1 = nn.BatchNorm2d(cin)
        self.move12, self.prelu1, self.move13 = LearnableBias(cin), nn.PReLU(cin), LearnableBias(cin)
        self.move21 = LearnableBias(cin)
        if self.double:
            self.binary_pw_down1 = binary_conv(cin, cin, 1, 1, step, True)
            self.binary_pw_down2 = binary_conv(cin, cin, 1, 1, step, True)
            self.bn2_1, self.bn2_2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cin)
        else:
            self.binary_pw = binary_conv(cin, cin, 1, 1, step, True)
            self.bn2 = nn.BatchNorm2d(cin)
        self.move22, self.prelu2, self.move23 = LearnableBias(cout), nn.PReLU(cout), LearnableBias(cout)
        self.binary_activation = BinaryActivation()
        if self.double:
            self.pooling = nn.AvgPool2d(2, 2)

    def forward(self, x):
        out1 = self.bn1(self.binary_3x3(self.binary_activation(self.move11(x))))
        if self.stride == 2:
            x = self.pooling(x)
        out1 = self.move13(self.prelu1(self.move12(x + out1)))
        out2 = self.binary_activation(self.move21(out1))
        if self.double:
            out2 = torch.cat([self.bn2_1(self.binary_pw_down1(out2)) + out1,
                              self.bn2_2(self.binary_pw_down2(out2)) + out1], dim=1)
        else:
            out2 = self.bn2(self.binary_pw(out2)) + out1
        return self.move23(self.prelu2(self.move22(out2)))


class FirstConv(nn.Module):
    def __init__(self, channels=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn1(self.conv1(x))


class ReActNetA(nn.Module):
    CHANNELS = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]

    def __init__(self, num_classes=1000, step=2, width=1.0):
        super().__init__()
        unit = max(1, round(32 * width))
        c = [n // 32 * unit for n in self.CHANNELS]
        self.feature = nn.ModuleList([FirstConv(c[0])])
        for i in range(1, len(c)):
            stride = 2 if c[i - 1] != c[i] and c[i] != 2 * unit else 1  # 2 * unit: the official 64, scaled
            self.feature.append(ReActBlock(c[i - 1], c[i], stride, step))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[-1], num_classes)

    def forward(self, x):
        for block in self.feature:
            x = block(x)
        return self.fc(self.pool1(x).flatten(1))


@torch.no_grad()
def randomize_batchnorms(net, g):
    """Every BN's statistics, scale and shift drawn at random: nothing lines up by accident."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0, 0.1, generator=g)


def statistics(model):
    """A network's BN running statistics (ours, and the Keras-style ones written out in tests)."""
    return [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var", "moving_mean",
                                                                     "moving_var"))]


def assert_trains_as_official(ours, official, x):
    """One training-mode backward pass of the same loss in both: equal input and parameter
    gradients, and equal BN statistics after it (float64)."""
    grad = torch.randn(x.shape[0], 1000, dtype=torch.float64)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for model, xi in zip((ours, official), inputs):
        (model(xi) * grad).sum().backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(ours.parameters(), official.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(statistics(ours), statistics(official)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
