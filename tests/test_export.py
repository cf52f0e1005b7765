"""Packed 1-bit export: the format, the round trip to the checkpoint's outputs, the sizes,
the command line and ONNX."""
import importlib.util
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnntrain import export
from bnntrain.data import build_loaders
from bnntrain.engine import load_checkpoint, save_checkpoint
from bnntrain.errors import CheckpointError
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.nn import BinaryConv2d
from bnntrain.stage import train_stage
from test_config import make

TINY_STAGE = ["data=synthetic", "data.image_size=16", "data.train_size=64", "data.test_size=32",
              "data.batch_size=16", "model.width=0.125", "schedule.epochs=1", "trainer.progress=plain"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fully binary stage trained for an epoch by the real stage loop."""
    folder = tmp_path_factory.mktemp("trained")
    train_stage(make("stage='1'", "stage.weights=binary", *TINY_STAGE), folder / "stage1")
    return folder / "stage1" / "last.pt"


def test_signs_pack_eight_per_byte_most_significant_bit_first():
    weight = torch.tensor([0.3, -1.0, -0.2, 0.0, 5.0, 1.0, 2.0, 3.0, -4.0]).view(1, 9)
    packed = export.pack_signs(weight)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10011111, 0b00000000]
    assert export.unpack_signs(packed, [1, 9]).tolist() == [[1, -1, -1, 1, 1, 1, 1, 1, -1]]
    big = torch.randn(64, 3, 3, 3)
    assert torch.equal(export.unpack_signs(export.pack_signs(big), list(big.shape)), torch.where(big >= 0, 1.0, -1.0))


def randomize_batchnorms(model):
    """Trained-looking BN statistics, so that folding them is not a no-op."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_batchnorm_folds_only_where_it_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(8, 8, 1), nn.MaxPool2d(2), nn.BatchNorm2d(8)),  # pool between
                          nn.Sequential(BinaryConv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)))     # a binary conv
    randomize_batchnorms(model)
    x = torch.randn(4, 3, 8, 8)
    expected = model.eval()(x)
    assert export.fold_batchnorms(model) == {"0.0": "0.1"}
    assert isinstance(model[0][1], nn.Identity) and isinstance(model[1][2], nn.BatchNorm2d)
    assert isinstance(model[2][1], nn.BatchNorm2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_round_trip_gives_the_checkpoints_test_outputs(trained, tmp_path):
    sizes = export.export_checkpoint(trained, tmp_path / "model.bnn")
    blob = torch.load(tmp_path / "model.bnn", weights_only=True)  # no code runs to read it
    config = json.loads(blob["config"])
    assert blob["format"] == "bnntrain-packed" and blob["version"] == 1
    assert len(config["packed"]) == 16 and config["folded"] == {f"stages.{i}.0.shortcut.0": f"stages.{i}.0.shortcut.1"
                                                                 for i in (1, 2, 3)} | {"stem.0": "stem.1"}
    assert all(blob["tensors"][f"{layer}.weight_bits"].dtype == torch.uint8 for layer in config["packed"])
    assert not any(key.startswith(("stem.1.", "stages.1.0.shortcut.1.")) for key in blob["tensors"])
    assert sizes["binary_fp32"] == 32 * sizes["binary_packed"]

    state = load_checkpoint(trained)
    reference = model_from_checkpoint(state, str(trained)).eval()
    deployed = export.load(tmp_path / "model.bnn")
    cfg = OmegaConf.create(state["config"])
    worst = 0.0
    with torch.no_grad():
        for images, _ in build_loaders(cfg.data, cfg.augment).test:
            want, got = reference(images), deployed(images)
            assert torch.equal(want.argmax(1), got.argmax(1))
            worst = max(worst, (want - got).abs().max().item())
    assert worst < 1e-4, worst


VARIANTS = {
    "reactnet (thresholds, rprelu)": ["model=reactnet18"],
    "squeeze-excitation, groups": ["model.attention=se", "model.widen=2", "model.groups=2"],
    "binary stem and classifier": ["model.binary_stem=true", "model.binary_classifier=true"],
    "pooling before the stem's BN": ["model.stem=imagenet", "model.stem_pool_order=conv_pool_bn_act"],
    "bottleneck": ["model=resnet50"],
    "stage 1: real weights": ["stage='1'"],
    "no weight scale": ["model.weight_scale=false"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_round_trips(variant, tmp_path):
    cfg = make("stage='2'", "data=synthetic", "data.image_size=16", "model.width=0.125", *VARIANTS[variant])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    randomize_batchnorms(model)
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1, "stage": cfg.stage.name,
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "c.pt")
    export.export_checkpoint(tmp_path / "c.pt", tmp_path / "m.bnn")
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt")).eval()(x)
        got = export.load(tmp_path / "m.bnn")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    packed = json.loads(torch.load(tmp_path / "m.bnn", weights_only=True)["config"])["packed"]
    assert bool(packed) == (cfg.stage.weights == "binary")  # real weights stay real


@pytest.mark.parametrize("data, at_least", [("imagenet", 10), ("cifar100", 18)])
def test_full_resnet18_shrinks_tenfold(data, at_least, tmp_path):
    """The binary convs shrink 32x; the stem, 1x1 shortcuts and classifier stay fp32."""
    cfg = make("stage='2'", "model=resnet18", f"data={data}")
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, in_channels=3)
    save_checkpoint({"model": model.state_dict(), "num_classes": cfg.data.num_classes, "in_channels": 3, "epoch": 1,
                     "stage": "stage2",
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "c.pt")
    sizes = export.export_checkpoint(tmp_path / "c.pt", tmp_path / "m.bnn")
    assert sizes["binary_fp32"] == 43_941_888 and sizes["binary_packed"] == 43_941_888 // 32
    assert sizes["fp32_weights"] / sizes["file"] >= at_least, sizes


def test_export_command_prints_the_sizes(trained, tmp_path, capsys):
    export.main([f"ckpt={trained}", f"out={tmp_path / 'm.bnn'}"])
    out = capsys.readouterr().out
    file_mb = (tmp_path / "m.bnn").stat().st_size / 1e6
    assert out.startswith(f"wrote {tmp_path / 'm.bnn'}: {file_mb:.3f} MB") and "packed (32.0x)" in out
    assert "x the export (it also holds the optimizer state)" in out and "fp32 model weights" in out


@pytest.mark.parametrize("args, words", [
    (["ckpt={tmp}/nope.pt", "out={tmp}/m.bnn"], ["does not exist"]),
    (["ckpt={tmp}/junk.pt", "out={tmp}/m.bnn"], ["not a readable checkpoint"]),
    (["ckpt={ckpt}", "out={tmp}/no/such/folder/m.bnn"], ["does not exist"]),
    (["ckpt={ckpt}", "out={tmp}"], ["is a folder"]),
    (["ckpt={ckpt}", "out={ckpt}"], ["would overwrite the checkpoint"]),
    (["ckpt={ckpt}"], ["ckpt=PATH out=FILE"]),
    (["ckpt={ckpt}", "out={tmp}/m.bnn", "model=resnet18"], ["unknown argument", "model=resnet18"]),
])
def test_export_errors_are_one_line(args, words, trained, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        export.main([a.format(tmp=tmp_path, ckpt=trained) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert all(word in err for word in words), err
    assert not (tmp_path / "m.bnn").exists()


def test_load_refuses_what_is_not_an_export(trained):
    with pytest.raises(CheckpointError, match="not a bnntrain-packed file"):
        export.load(trained)


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="ONNX export needs the optional packages: pip install 'bnntrain[export]'")
def test_onnx_of_the_inference_model(trained, tmp_path, capsys):
    import onnx
    import onnxruntime

    export.main([f"ckpt={trained}", f"out={tmp_path / 'm.bnn'}", f"onnx={tmp_path / 'm.onnx'}"])
    assert f"wrote {tmp_path / 'm.onnx'}" in capsys.readouterr().out
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert "Conv" in {node.op_type for node in graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    deployed = export.load(tmp_path / "m.bnn")
    for batch in (5, 16):  # the batch size is free
        images = torch.randn(batch, 3, 16, 16)
        (logits,) = session.run(None, {"images": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), deployed(images).detach(), rtol=1e-4, atol=1e-4)
