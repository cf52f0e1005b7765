"""Cost accounting: BOPs, FLOPs, OPs and model size in the BNN literature's convention,
checked against numbers worked out by hand, and the `python -m bnntrain.summary` tool."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bnntrain.complexity import count_costs, precision
from bnntrain.engine import save_checkpoint
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, BinaryLinear
from bnntrain.summary import main as summary_main
from test_config import make


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


def resnet18_imagenet_macs(shortcut_at_input_resolution: bool) -> tuple[int, int]:
    """ResNet-18 at 224 px, each basic block two binary blocks: (BOPs, FLOPs)."""
    bops, cin = 0, 64
    for planes, size in ((64, 56), (128, 28), (256, 14), (512, 7)):
        bops += cin * planes * 9 * size * size + 3 * planes * planes * 9 * size * size
        cin = planes
    stem = 64 * 112 * 112 * 3 * 49
    shortcuts = sum(cin * cout * (size * (2 if shortcut_at_input_resolution else 1)) ** 2
                    for cin, cout, size in ((64, 128, 28), (128, 256, 14), (256, 512, 7)))
    return bops, stem + shortcuts + 512 * 1000


@pytest.mark.parametrize("downsample", ["v1", "v2"])
def test_resnet18_at_224_matches_the_published_counts(downsample):
    """Bi-Real Net 18 reports 1.68e9 BOPs and 1.39e8 FLOPs (pool, then the 1x1 shortcut: v2);
    v1 runs the shortcut conv before the pooling, at 4x the FLOPs."""
    cfg = make("model=resnet18", "data=imagenet", f"model.downsample={downsample}")
    report = count_costs(build_model(cfg.model, num_classes=1000, in_channels=3), (3, 224, 224))
    bops, flops = resnet18_imagenet_macs(shortcut_at_input_resolution=downsample == "v1")
    assert (report.bops, report.flops) == (bops, flops)
    assert bops == 1_676_279_808 and round(report.bops / 1e9, 2) == 1.68
    if downsample == "v2":
        assert flops == 137_793_536 and round(report.ops / 1e8, 2) == 1.64


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
    with precision(model, "binary", "binary"):
        expected = count_costs(model, (3, 16, 16))
    assert "stage2; binary activations, binary weights; input 3x16x16" in out
    classifier = next(line for line in out.splitlines() if line.startswith("classifier"))
    assert classifier.split()[1:5] == ["Linear", "32", "32", "7"]  # the class count of the weights
    assert f"BOPs {expected.bops:.4g}  FLOPs {expected.flops:.4g}" in out and expected.bops > 0


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
