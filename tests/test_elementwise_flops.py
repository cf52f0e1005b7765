"""FLOPs by pytorch-estimate-flops's rules (bnntrain.elementwise_flops): a small network worked out
by hand, Real-to-Binary Net at 224 px against its published FLOPs and OPs, and the report's line."""
import pytest
import torch
from torch import Tensor, nn

from bnntrain.complexity import count_costs, format_totals
from bnntrain.elementwise_flops import count_elementwise_flops
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, set_precision
from docs_pages import table_rows
from test_config import make


class Block(nn.Module):
    """A block's own arithmetic: a residual addition, a gate's mean, ReLU and product, a PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = BinaryConv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = nn.Linear(8, 8, bias=False)
        self.act = nn.PReLU(8)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        scale = self.gate(x.mean((2, 3)).relu()).sigmoid()[:, :, None, None]
        out = out * scale
        out += x
        return self.act(out)


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         Block(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


# Worked out by hand for a 3x8x8 input: the conv 8x8x8 out, then 4x4 after the max-pool.
STEM = 8 * 64 * 27 + 8 * 64          # MACs and a bias per output
BN = 2 * 8 * 64 + 2 * 8 * 16         # 2 per element, the stem's and the block's
RELU = 2 * 8 * 64 + 2 * 8            # the stem's, and the gate's on the 8 means
MAX_POOL = (4 - 1) * 8 * 16          # k - 1 per output
AVG_POOL = 8 * 16 + 4 * 8 * 4 + 8 * 4  # the gate's mean (one per input), 2x2 (k per output), global
MUL = ADD = 2 * 8 * 16               # elements x operands
LINEAR = 8 * 8 + 8 * 10 + 10         # the gate's, the classifier's with its bias


def test_a_small_network_by_hand():
    model = small_net()
    count = count_elementwise_flops(model, (3, 8, 8))
    assert dict(count.by_kind) == {"conv/linear": STEM + LINEAR, "batch_norm": BN, "relu": RELU,
                                   "max_pool": MAX_POOL, "avg_pool": AVG_POOL, "mul": MUL, "add": ADD}
    assert count.uncounted == {"sigmoid"}  # pthflops has no rule for it; PReLU's own arithmetic is its own
    binary = 8 * 16 * 8 * 9
    assert count_costs(model, (3, 8, 8)).bops == binary
    set_precision(model, "binary", "real")  # a real weight operand: the conv's MACs are FLOPs
    assert count_elementwise_flops(model, (3, 8, 8)).flops == count.flops + binary


# Real-to-Binary Net's published costs (Martinez et al., ICLR 2020; repeated in ReActNet's table).
R2B_FLOPS, R2B_OPS = 1.56e8, 1.83e8


def test_real_to_binary_at_224_is_within_3_percent_of_its_published_flops():
    with torch.device("meta"):
        model = build_model(make("model=real_to_binary", "data=imagenet").model, num_classes=1000, in_channels=3)
    count = count_elementwise_flops(model, (3, 224, 224))
    maps = [(64, 56), (128, 28), (256, 14), (512, 7)]                    # channels, side per stage
    outs = sum(4 * c * s * s for c, s in maps)                           # the 16 halves' outputs
    ins = outs + sum(c // 2 * (2 * s) ** 2 - c * s * s for c, s in maps[1:])  # each first half reads 2x the map
    shortcuts = sum(c * s * s for c, s in maps[1:])                       # avg-pool, 1x1 conv and BN outputs
    stem = 64 * 112 * 112
    assert count.by_kind["batch_norm"] == 2 * (stem + ins + shortcuts)   # the halves' BN is on their input
    assert count.by_kind["add"] == count.by_kind["mul"] == 2 * outs       # + shortcut; x gate
    assert count.by_kind["max_pool"] == 8 * stem // 4
    assert count.by_kind["avg_pool"] == ins + 2 * shortcuts + 512 * 49   # gates' means, 2x2 pools (k x c/2), global
    # Keras's PReLU, written out (relu(x) - slope x relu(-x)): its product is listed, not charged,
    # as torch.nn's PReLU would be free.
    assert count.uncounted == {"sigmoid", "KerasPReLU.mul"}
    report = count_costs(model, (3, 224, 224))
    assert count.by_kind["conv/linear"] == report.flops + 1000            # the classifier's bias too
    assert report.pthflops == count.flops
    # Measured: 1.531e8 FLOPs (1.9% under 1.56e8), 1.793e8 OPs (2.0% under 1.83e8); ours 1.381e8 is 11.5% under.
    assert count.flops == pytest.approx(R2B_FLOPS, rel=0.03)
    assert count.flops + report.bops / 64 == pytest.approx(R2B_OPS, rel=0.03)
    assert report.flops != pytest.approx(R2B_FLOPS, rel=0.03)


def test_the_networks_page_quotes_the_count():
    rows = table_rows("networks.md", "| preset | network (official code) | parameters (1000 classes) | BOPs / FLOPs / OPs at 224 px (ours)")
    published = next(row[4] for row in rows if row[0] == "`model=real_to_binary`")
    with torch.device("meta"):
        model = build_model(make("model=real_to_binary", "data=imagenet").model, num_classes=1000, in_channels=3)
    report = count_costs(model, (3, 224, 224))
    quoted = f"{report.pthflops / 1e8:.3f}e8 FLOPs / {(report.pthflops + report.bops / 64) / 1e8:.3f}e8 OPs"
    assert quoted in published, (quoted, published)
    assert format_totals(report)[-1].endswith(f"FLOPs {report.pthflops:.4g}  OPs {report.pthflops + report.bops / 64:.4g}")


class Doubling(nn.Module):
    """A layer of ours without submodules: its arithmetic is listed, not charged."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2 + 1


def test_a_leaf_of_ours_is_listed_and_pools_and_matmuls_follow_pthflops():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), Doubling(), nn.AdaptiveAvgPool2d(2))
    count = count_elementwise_flops(model, (3, 4, 4))
    assert count.uncounted == {"Doubling.mul", "Doubling.add"}
    # The 1x1 conv's MACs; the adaptive pool charges the input's H x W per output, as pthflops does.
    assert dict(count.by_kind) == {"conv/linear": 4 * 16 * 3, "avg_pool": 16 * 4 * 4}


class Attention(nn.Module):
    """A block of ours with a matmul in its code (q k^T over 4 positions of 3 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        q = self.proj(x.flatten(2).transpose(1, 2))  # (N, 4, 3)
        return q @ q.transpose(1, 2)                 # (N, 4, 4)


def test_a_matmul_in_a_block_counts_its_macs():
    count = count_elementwise_flops(Attention(), (3, 2, 2))
    assert dict(count.by_kind) == {"conv/linear": 4 * 3 * 3 + 4 * 3 * 4}  # the projection; 4x3 @ 3x4
