"""The flip ratio, and what a training stage writes of it and of its cost report."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnntrain.engine import save_checkpoint
from bnntrain.engine.flips import FlipTracker
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, BinaryLinear, binary_layers
from bnntrain.engine.stage import train_stage
from test_config import make


@pytest.mark.parametrize("quantizer", [{"name": "irnet_libra_pb"}, {"name": "recu"}, {"name": "adabin"}])
def test_flips_are_the_quantizers_own_choices_not_the_latent_signs(quantizer):
    """IR-Net, ReCU and AdaBin binarize w minus its channel mean: moving the mean across a
    weight flips its bit though the weight keeps its sign, and the tracker counts that."""
    layer = BinaryLinear(8, 2, weight_quantizer=quantizer)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]] * 2))  # mean 4.5
        if quantizer["name"] == "recu":
            layer.weight_quantizer.alpha.fill_(1.0)
    tracker = FlipTracker(layer)
    with torch.no_grad():
        layer.weight[:, 7] = 16.0  # every sign of w the same; the mean is now 5.5: 5 now below it
    assert tracker.update()["train/flip_ratio"] == pytest.approx(2 / 16)  # w = 5 crossed, per row
    before = FlipTracker(BinaryLinear(8, 2, weight_quantizer={"name": "sign"}))
    assert before.update()["train/flip_ratio"] == 0.0


def test_a_training_only_branch_does_not_flip_bits():
    layer = BinaryLinear(64, 16, weight_quantizer={"name": "fda", "noise": True, "reduction": 4}).train()
    layer.weight_quantizer.set_progress(0.0)  # the noise at its largest
    tracker = FlipTracker(layer)
    assert tracker.update()["train/flip_ratio"] == 0.0 and layer.weight_quantizer.training


def test_flip_ratio_counts_sign_changes_exactly():
    model = nn.Sequential(BinaryConv2d(3, 8, 3), BinaryLinear(4, 2, binarize=False), BinaryLinear(10, 5))
    with torch.no_grad():
        model[0].weight.fill_(0.5)   # 216 weights
        model[2].weight.fill_(-0.5)  # 50 weights
    tracker = FlipTracker(model)
    with torch.no_grad():
        model[0].weight.view(-1)[:27] *= -1     # 27 flips
        model[0].weight.view(-1)[27:54] *= 0.1  # moved, same sign
        model[2].weight.view(-1)[:5] = 0.0      # sign(0) = +1: 5 flips
        model[1].weight.neg_()                  # the real-valued twin's layer is not watched
    assert tracker.update() == {"train/flip_ratio": 32 / 266, "flip_ratio/0": 27 / 216, "flip_ratio/2": 5 / 50}
    assert tracker.update()["train/flip_ratio"] == 0.0  # against the previous call, not the start
    with torch.no_grad():
        model[0].weight.view(-1)[:27] *= -1
    assert tracker.update()["flip_ratio/0"] == 27 / 216


def test_no_binary_layers_nothing_to_report():
    assert FlipTracker(nn.Linear(3, 2)).update() == {}


def stage_config(*overrides):
    return make("stage='1'", "data=synthetic", "data.image_size=16", "data.train_size=64", "data.test_size=32",
                "data.batch_size=16", "model.width=0.125", "trainer.progress=plain", *overrides)


def scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_binary_weight_stage_logs_flip_ratio_and_writes_cost_report(tmp_path):
    train_stage(stage_config("stage.weights=binary", "schedule.epochs=2"), tmp_path / "stage1")
    events, tags = scalars(tmp_path / "stage1")
    overall = tags["train/flip_ratio"]
    assert [step for step, _ in overall] == [1, 2] and all(0 < ratio <= 1 for _, ratio in overall)
    layers = {tag: values for tag, values in tags.items() if tag.startswith("flip_ratio/")}
    assert len(layers) == 16 and "flip_ratio/stages.3.3.convs.0" in layers  # one per binary conv
    cost = json.loads((tmp_path / "stage1" / "cost.json").read_text())
    sizes = {layer["name"]: layer["binary_params"] for layer in cost["layers"]}
    for epoch in range(2):  # the overall ratio is the per-layer ratios weighted by layer size
        flipped = sum(values[epoch][1] * sizes[tag.split("/", 1)[1]] for tag, values in layers.items())
        assert flipped / cost["totals"]["binary_params"] == pytest.approx(overall[epoch][1], rel=1e-5)
    assert cost["totals"]["bops"] > 0 and cost["input_shape"] == [3, 16, 16]
    assert "BOPs" in (tmp_path / "stage1" / "cost.txt").read_text()
    assert "cost/text_summary" in events.Tags()["tensors"]


def test_real_weight_stage_logs_no_flip_ratio_and_counts_no_bops(tmp_path):
    train_stage(stage_config("schedule.epochs=1"), tmp_path / "stage1")
    _, tags = scalars(tmp_path / "stage1")
    assert "val/top1" in tags and not any("flip_ratio" in tag for tag in tags)
    cost = json.loads((tmp_path / "stage1" / "cost.json").read_text())["totals"]
    assert cost["bops"] == 0 and cost["flops"] > 0 and cost["binary_params"] == 0  # binary inputs, real weights


def test_logged_flip_ratio_is_the_sign_changes_between_the_start_and_the_checkpoint(tmp_path):
    """Counted here from the weights the stage started from and the weights it saved."""
    cfg = stage_config("stage.weights=binary", "schedule.epochs=1", "optimizer.lr=0.01")
    start = build_model(cfg.model, num_classes=10, in_channels=3)
    init = tmp_path / "init.pt"
    save_checkpoint({"model": start.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1, "stage": "stage1",
                     "config": {}, "init_from": None}, init)
    train_stage(cfg, tmp_path / "stage1", init=str(init))
    _, tags = scalars(tmp_path / "stage1")
    saved = torch.load(tmp_path / "stage1/last.pt", weights_only=True)["model"]
    flipped = total = 0
    for name, layer in binary_layers(start):
        before, after = layer.weight.detach(), saved[f"{name}.weight"]
        n = (torch.signbit(before) != torch.signbit(after)).sum().item()
        assert tags[f"flip_ratio/{name}"] == [(1, pytest.approx(n / before.numel(), abs=1e-7))]
        flipped, total = flipped + n, total + before.numel()
    assert flipped > 0  # lr 0.01 for 4 steps flips some signs
    assert tags["train/flip_ratio"] == [(1, pytest.approx(flipped / total, rel=1e-6))]
