"""Cost accounting: BOPs, FLOPs, OPs and model size in the BNN literature's convention,
checked against numbers worked out by hand, and the `python -m bnntrain.tools.summary` tool."""
import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bnntrain.complexity import count_costs, precision
from bnntrain.engine import save_checkpoint
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, BinaryLinear
from bnntrain.tools.summary import main as summary_main
from test_config import make
from docs_pages import agrees, table_rows


def hand_built() -> nn.Sequential:
    """8x8 RGB in: every kind of layer once, a grouped binary conv among them."""
    return nn.Sequential(
        BinaryConv2d(3, 8, 3, padding=1, learnable_threshold=True),  # 8x8x8 out
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 16, 3, stride=2, padding=1, groups=4),       # 16x4x4 out, 2 inputs per filter
        nn.Conv2d(16, 4, 1),                                           # 4x4x4 out, real
        nn.Flatten(),
        BinaryLinear(64, 10),
        nn.Linear(10, 5),
    )


# Worked out by hand: MACs = output elements x inputs per output.
CONV1 = 8 * 8 * 8 * (3 * 3 * 3)      # 13,824
GROUPED = 16 * 4 * 4 * (2 * 3 * 3)   # 4,608: a dense conv would be 4x as many
POINTWISE = 4 * 4 * 4 * 16           # 1,024
BLINEAR, LINEAR = 10 * 64, 5 * 10    # 640, 50
BINARY_WEIGHTS = 8 * 3 * 9 + 16 * 2 * 9 + 10 * 64         # 1,144
REAL_PARAMS = 3 + 2 * 8 + (64 + 4) + 10 + (50 + 5)       # threshold, BN, 1x1 conv, linear biases: 152


def test_fully_binary_counts_by_hand():
    report = count_costs(hand_built(), (3, 8, 8))
    assert report.bops == CONV1 + GROUPED + BLINEAR == 19_072
    assert report.flops == POINTWISE + LINEAR == 1_074
    assert report.ops == 1_074 + 19_072 / 64
    assert (report.binary_params, report.real_params) == (BINARY_WEIGHTS, REAL_PARAMS)
    assert report.trained_bits == 32 * (1_144 + 152) == 41_472
    assert report.deployed_bits == 1_144 + 32 * 152 == 6_008
    assert report.compression == pytest.approx(41_472 / 6_008)
    rows = {layer.name: layer for layer in report.layers}
    assert list(rows) == ["0", "2", "3", "5", "6"]  # conv and linear layers only
    assert rows["2"].binary_macs == GROUPED and rows["2"].output_shape == (16, 4, 4)
    assert (rows["0"].binary_params, rows["0"].real_params) == (216, 3)  # the threshold is real
    assert (rows["3"].input_bits, rows["3"].weight_bits, rows["3"].real_macs) == (32, 32, POINTWISE)


@pytest.mark.parametrize("activations, weights", [("binary", "real"), ("real", "binary"), ("leaky_clip", "real")])
def test_one_real_operand_makes_a_layer_real(activations, weights):
    """Stage 1 (binary activations, real weights), its reverse, and stage 0: no BOPs at all."""
    model = hand_built()
    with precision(model, activations, weights):
        report = count_costs(model, (3, 8, 8))
    assert report.bops == 0 and report.flops == 19_072 + 1_074
    binary = BINARY_WEIGHTS if weights == "binary" else 0  # binary weights are stored in 1 bit all the same
    assert report.binary_params == binary and report.real_params == REAL_PARAMS + BINARY_WEIGHTS - binary
    assert [layer.activations for layer in (model[0], model[2], model[5])] == ["binary"] * 3  # restored


def test_real_valued_twin_counts_flops_only():
    model = build_model(make("model.binarize=false", "model.width=0.125").model, num_classes=10, in_channels=3)
    report = count_costs(model, (3, 16, 16))
    assert report.bops == 0 and report.binary_params == 0 and report.compression == 1.0


def test_every_mac_of_a_full_model_is_counted_once():
    """Binary plus real MACs equal what torch's own FLOP counter finds (2 FLOPs per MAC), with
    grouped convs, squeeze-excitation and the bottleneck block in play."""
    for overrides in (["model.widen=2", "model.groups=2", "model.attention=se"], ["model=resnet50"]):
        model = build_model(make(*overrides, "model.width=0.25").model, num_classes=10, in_channels=3)
        report = count_costs(model, (3, 16, 16))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, 16, 16))
        assert report.bops + report.flops == counter.get_total_flops() // 2
        assert report.bops > 0 and report.flops > 0
        assert report.binary_params + report.real_params == sum(p.numel() for p in model.parameters())


def resnet18_by_hand(image: int, imagenet_stem: bool, classes: int, shortcut_at_input_resolution: bool = True,
                     width: float = 1.0) -> dict[str, int]:
    """The collection's ResNet-18 (double skip: each basic block two binary 3x3 convs, each
    with its own shortcut; PReLU; a 1x1 conv + BN shortcut where the shape changes) worked out
    from its layer shapes: BOPs, FLOPs (MACs of the real-valued layers) and parameters."""
    channels = [round(base * width) for base in (64, 128, 256, 512)]
    kernel = 7 if imagenet_stem else 3
    size = image // 2 if imagenet_stem else image  # the stem conv's output (7x7 stride 2, or 3x3)
    flops = channels[0] * size * size * 3 * kernel ** 2
    real = 3 * channels[0] * kernel ** 2 + 2 * channels[0]  # stem conv, BN
    size = size // 2 if imagenet_stem else size  # the max-pool
    bops = binary = 0
    cin = channels[0]
    for i, planes in enumerate(channels):
        if i > 0:
            size //= 2  # the first conv of stages 1-3 has stride 2
        for j in range(4):  # four binary convs per stage
            c_in = cin if j == 0 else planes
            bops += c_in * planes * 9 * size * size
            binary += c_in * planes * 9
            real += 2 * c_in + planes  # the BN in front of the sign, the PReLU after the addition
        if cin != planes:  # v1 convolves before the 2x2 pooling, at 4x the positions; v2 after it
            at = 2 * size if shortcut_at_input_resolution else size
            flops += cin * planes * at * at
            real += cin * planes + 2 * planes
        cin = planes
    flops += cin * classes
    real += cin * classes + classes
    return {"bops": bops, "flops": flops, "binary_params": binary, "real_params": real}


# Bi-Real Net 18's published cost (Liu et al., ECCV 2018; repeated by Real-to-Binary and ReActNet).
BIREAL_BOPS, BIREAL_FLOPS, BIREAL_OPS = 1.68e9, 1.39e8, 1.63e8


@pytest.mark.parametrize("downsample", ["v1", "v2"])
def test_resnet18_at_224_matches_the_published_counts(downsample):
    """Bi-Real Net 18 reports 1.68e9 BOPs, 1.39e8 FLOPs and 1.63e8 OPs; its shortcut pools
    first, then convolves (v2). v1 runs the shortcut conv before the pooling, at 4x its FLOPs."""
    cfg = make("model=resnet18", "data=imagenet", f"model.downsample={downsample}")
    report = count_costs(build_model(cfg.model, num_classes=1000, in_channels=3), (3, 224, 224))
    hand = resnet18_by_hand(224, imagenet_stem=True, classes=1000, shortcut_at_input_resolution=downsample == "v1")
    assert (report.bops, report.flops) == (hand["bops"], hand["flops"])
    assert (report.binary_params, report.real_params) == (hand["binary_params"], hand["real_params"])
    # Measured: BOPs 1.676e9 (0.2% under the paper), FLOPs 1.378e8 (0.9% under), OPs 1.640e8 (0.6% over).
    published = (report.bops, report.flops, report.ops) == pytest.approx((BIREAL_BOPS, BIREAL_FLOPS, BIREAL_OPS),
                                                                         rel=0.03)
    assert published == (downsample == "v2")  # v1 (FLOPs 1.956e8) is not Bi-Real's shortcut
    assert report.bops == pytest.approx(BIREAL_BOPS, rel=0.03)  # the binary convs are the same in both


COST_TABLE = table_rows("export.md", "| model (default `downsample=v1` unless said) | input | BOPs | FLOPs | OPs | deployed size |")


@pytest.mark.parametrize("row", COST_TABLE, ids=[row[0] for row in COST_TABLE])
def test_cost_table_of_the_docs(row):
    """The cost table (docs/export.md), row by row: the counts worked out by hand from the layer shapes,
    and the report's, at the printed precision; the deployed size (binary weights at 1 bit,
    every other parameter at 32) and its ratio to the 32-bit model."""
    model, image, bops, flops, ops, deployed = row
    data = "imagenet" if "1000 classes" in model else "cifar100"
    assert ("100 classes" in model) == (data == "cifar100")
    downsample = "v2" if "model.downsample=v2" in model else "v1"
    cfg = make("model=resnet18", f"data={data}", f"model.downsample={downsample}")
    assert int(image) == cfg.data.image_size
    report = count_costs(build_model(cfg.model, num_classes=cfg.data.num_classes, in_channels=3),
                         (3, cfg.data.image_size, cfg.data.image_size))
    hand = resnet18_by_hand(cfg.data.image_size, imagenet_stem=data == "imagenet", classes=cfg.data.num_classes,
                            shortcut_at_input_resolution=downsample == "v1")
    assert (report.bops, report.flops, report.binary_params, report.real_params) == tuple(hand.values())
    deployed_bits = hand["binary_params"] + 32 * hand["real_params"]
    ratio = 32 * (hand["binary_params"] + hand["real_params"]) / deployed_bits
    size_mb, size_ratio = re.fullmatch(r"([\d.]+) MB \(([\d.]+)x\)", deployed).groups()
    assert agrees(size_mb, deployed_bits / 8 / 1e6) and agrees(size_ratio, ratio), (deployed, deployed_bits, ratio)
    assert report.totals()["deployed_bytes"] == deployed_bits / 8 and report.compression == pytest.approx(ratio)
    for printed, value in ((bops, hand["bops"]), (flops, hand["flops"]), (ops, hand["flops"] + hand["bops"] / 64)):
        assert printed == f"{value:.3e}".replace("e+0", "e"), (printed, value)


def test_summary_of_a_config(capsys):
    summary_main(["model=resnet18", "data=imagenet", "model.downsample=v2"])
    out = capsys.readouterr().out
    assert "binary activations, binary weights (the last stage of the pipeline)" in out
    assert "1,676,279,808" in out and "137,793,536" in out and "input 3x224x224" in out
    assert "stages.3.3.convs.0" in out and "BOPs 1.676e+09  FLOPs 1.378e+08  OPs 1.64e+08" in out
    summary_main(["stage=1", "model.width=0.125", "data=synthetic"])
    out = capsys.readouterr().out
    assert "binary activations, real weights (stage1)" in out and "BOPs 0  " in out


def test_summary_of_a_checkpoint(tmp_path, capsys):
    cfg = make("stage='2'", "data=synthetic", "data.image_size=16", "model.width=0.125")
    model = build_model(cfg.model, num_classes=7, in_channels=3)
    save_checkpoint({"model": model.state_dict(), "num_classes": 7, "in_channels": 3, "epoch": 1, "stage": "stage2",
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "last.pt")
    summary_main([f"ckpt={tmp_path / 'last.pt'}"])
    out = capsys.readouterr().out
    hand = resnet18_by_hand(16, imagenet_stem=False, classes=7, width=0.125)
    # Worked out above from the layer shapes: at 1/8 width on 16x16 images, 1/64 of the full
    # model's binary weights; BOPs of four stages at 16, 8, 4 and 2 px; FLOPs of the stem, the
    # v1 shortcuts and a 64-in, 7-out classifier.
    assert hand == {"bops": 2_138_112, "flops": 154_048, "binary_params": 10_985_472 // 64, "real_params": 4_927}
    assert "stage2; binary activations, binary weights; input 3x16x16" in out
    classifier = next(line for line in out.splitlines() if line.startswith("classifier"))
    assert classifier.split()[1:5] == ["Linear", "32", "32", "7"]  # the class count of the weights
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split() == ["total", "171,648", "4,927", "2,138,112", "154,048"]
    assert "BOPs 2.138e+06  FLOPs 1.54e+05  OPs 1.875e+05" in out  # 154,048 + 2,138,112 / 64 = 187,456


@pytest.mark.parametrize("args, words", [
    (["ckpt={tmp}/nope.pt"], ["does not exist"]),
    (["ckpt={tmp}/junk.pt"], ["not a readable checkpoint"]),
    (["ckpt={tmp}/junk.pt", "model=resnet18"], ["takes no overrides"]),
    (["data=nope"], ["data/nope"]),
    (["data=folder"], ["data.num_classes=N"]),
    (["ckpt="], ["ckpt= needs a value"]),
])
def test_summary_errors_are_one_line(args, words, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        summary_main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert all(word in err for word in words), err


def test_report_as_json_is_complete():
    report = count_costs(hand_built(), (3, 8, 8)).to_dict()
    text = json.loads(json.dumps(report))
    assert text["totals"]["bops"] == 19_072 and text["totals"]["deployed_bytes"] == 751
    assert [layer["name"] for layer in text["layers"]] == ["0", "2", "3", "5", "6"]
