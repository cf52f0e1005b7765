"""Packed 1-bit export: the format; the round trip, checked against the module that was
trained (not one rebuilt from the checkpoint by the code the export shares) and the metrics
the stage saved; the sizes of the export table in the docs; the command line; ONNX."""
import json
import re
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnntrain.tools import export
from bnntrain.data import build_loaders
from bnntrain.engine import load_checkpoint, save_checkpoint
from bnntrain.errors import CheckpointError
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d, set_precision
from bnntrain.engine.stage import train_stage
from conftest import need
from test_config import make
from docs_pages import agrees, table_rows

TINY_STAGE = ["data=synthetic", "data.image_size=16", "data.train_size=64", "data.test_size=32",
              "data.batch_size=16", "model.width=0.125", "schedule.epochs=1", "trainer.progress=plain"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fully binary stage trained for an epoch by the real stage loop (for the command line's
    tests; the round trip uses `digits`, a model that has learned)."""
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
            for t in (m.weight, m.bias, m.running_mean):
                if t is not None:  # an unscaled BN (QuickNet's) has no weight
                    t.data.copy_(torch.randn(t.shape, generator=g) * 0.5)
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


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A fully binary 1/8-width ResNet-18 trained on the digits by the real stage loop for 8
    epochs (measured: 90.6% top-1, chance is 10%; about 6 s), and the very module that was
    trained, caught as the stage builds it: the reference the export is checked against is
    not rebuilt from the checkpoint by the code the export itself uses."""
    folder = tmp_path_factory.mktemp("digits")
    built = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bnntrain.engine.build.build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
        train_stage(make("stage='1'", "stage.weights=binary", "data=digits", "model.width=0.125", "schedule.epochs=8",
                         "trainer.device=cpu", "trainer.progress=plain"), folder / "stage1")
    (model,) = built
    return model.eval(), folder / "stage1" / "last.pt"


def digits_test_set(ckpt):
    cfg = OmegaConf.create(load_checkpoint(ckpt)["config"])
    return list(build_loaders(cfg.data, cfg.augment).test)


@pytest.mark.slow
def test_round_trip_gives_the_trained_models_outputs(digits, tmp_path):
    trained, ckpt = digits
    sizes = export.export_checkpoint(ckpt, tmp_path / "model.bnn")
    blob = torch.load(tmp_path / "model.bnn", weights_only=True)  # no code runs to read it
    config = json.loads(blob["config"])
    assert blob["format"] == "bnntrain-packed" and blob["version"] == 1
    assert len(config["packed"]) == 16 and config["folded"] == {f"stages.{i}.0.shortcut.0": f"stages.{i}.0.shortcut.1"
                                                                 for i in (1, 2, 3)} | {"stem.0": "stem.1"}
    assert all(blob["tensors"][f"{layer}.weight_bits"].dtype == torch.uint8 for layer in config["packed"])
    assert not any(key.startswith(("stem.1.", "stages.1.0.shortcut.1.")) for key in blob["tensors"])
    assert sizes["binary_fp32"] == 32 * sizes["binary_packed"]

    deployed = export.load(tmp_path / "model.bnn")
    worst, correct, same, total = 0.0, 0, 0, 0
    with torch.no_grad():
        for images, labels in digits_test_set(ckpt):
            want, got = trained(images), deployed(images)
            worst = max(worst, (want - got).abs().max().item())
            same += (want.argmax(1) == got.argmax(1)).sum().item()
            correct += (got.argmax(1) == labels).sum().item()
            total += len(labels)
    top1 = 100.0 * correct / total
    assert total == 360 and same == total  # the digits test split; every prediction the same
    # The export scores what the stage's own evaluation saved in the checkpoint, and the model
    # has learned: measured 90.56% (326 of 360), chance 10%.
    assert top1 == pytest.approx(load_checkpoint(ckpt)["metrics"]["top1"], abs=1e-9)
    assert top1 > 85, top1
    # Logits equal to float rounding (docs/export.md): measured 1.4e-6, three float32 steps at the
    # logits' size (4 to 8; the export sums +-1 x +-1 exactly and scales once, the trained
    # model sums +-scale terms); 2.4e-6 allows five.
    assert worst <= 2.4e-6, worst


VARIANTS = {
    "reactnet (thresholds, rprelu)": ["model=reactnet18"],
    "squeeze-excitation, groups": ["model.attention=se", "model.widen=2", "model.groups=2"],
    "binary stem and classifier": ["model.binary_stem=true", "model.binary_classifier=true"],
    "pooling before the stem's BN": ["model.stem=imagenet", "model.stem_pool_order=conv_pool_bn_act"],
    "bottleneck": ["model=resnet50"],
    "stage 1: real weights": ["stage='1'"],
    "no weight scale": ["model.weight_scale=false"],
    "bi-real block (BN after the conv)": ["model=birealnet18"],
    "reactnet-a (parameter-free shortcuts)": ["model=reactnet_a"],
}


def export_variant(extra, folder, image_size=16):
    """A 1/8-width model of a variant at 16 px (or `image_size`) with trained-looking BNs,
    exported to folder/m.bnn from a checkpoint; returns the model and its config."""
    cfg = make("stage='2'", "data=synthetic", f"data.image_size={image_size}", "model.width=0.125", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    randomize_batchnorms(model)
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1, "stage": cfg.stage.name,
                     "config": OmegaConf.to_container(cfg, resolve=True)}, folder / "c.pt")
    export.export_checkpoint(folder / "c.pt", folder / "m.bnn")
    return model, cfg


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_round_trips(variant, tmp_path):
    model, cfg = export_variant(VARIANTS[variant], tmp_path)
    x = torch.randn(8, 3, 16, 16)
    set_precision(model, cfg.stage.activations, cfg.stage.weights)  # the module itself, at its stage's precision
    with torch.no_grad():
        want = model.eval()(x)
        got = export.load(tmp_path / "m.bnn")(x)
    # Float rounding: measured at most 2.4e-7 (logits up to 1.5), and 2.4e-6 without weight
    # scales (logits up to 25, one float32 step at that size).
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))
    packed = json.loads(torch.load(tmp_path / "m.bnn", weights_only=True)["config"])["packed"]
    assert bool(packed) == (cfg.stage.weights == "binary")  # real weights stay real


EXPORT_TABLE = {re.match(r"`([^`]*)`", row[0]).group(1): row[1:]
                for row in table_rows("export.md", "| model | export | fp32 weights | checkpoint |")}


def test_the_export_table_lists_the_models_it_should():
    assert list(EXPORT_TABLE) == ["resnet18 data=imagenet", "resnet18 data=cifar100", "reactnet18 data=imagenet",
                                  "resnet34 data=imagenet", "resnet18 data=imagenet model.attention=se",
                                  "resnet18 data=imagenet model.widen=2 model.groups=2", "resnet50 data=imagenet"]


@pytest.mark.slow
@pytest.mark.parametrize("row", EXPORT_TABLE)
def test_export_sizes_are_the_docs_table(row, tmp_path):
    """Each row of the export table (docs/export.md), to the precision printed there: a full-width stage-2
    checkpoint written by the real stage loop (one Adam step on two synthetic images of the
    preset's class count and stem), exported. Sizes depend on the tensors' shapes only."""
    name, *options = row.split()
    overrides = [f"model={name}", *options]
    preset = make("stage='2'", *overrides)
    model_options = [o for o in overrides if not o.startswith("data=")]
    train_stage(make("stage='2'", *model_options, "data=synthetic", f"data.num_classes={preset.data.num_classes}",
                     f"model.stem={preset.model.stem}", "data.train_size=2", "data.test_size=2", "data.batch_size=2",
                     "schedule.epochs=1", "trainer.device=cpu", "trainer.progress=plain"), tmp_path / "stage2")
    sizes = export.export_checkpoint(tmp_path / "stage2" / "last.pt", tmp_path / "m.bnn")
    export_cell, fp32, checkpoint = EXPORT_TABLE[row]
    (export_mb,) = re.fullmatch(r"([\d.]+) MB", export_cell).groups()
    fp32_mb, fp32_ratio = re.fullmatch(r"([\d.]+) MB \(([\d.]+)x\)", fp32).groups()
    ckpt_mb, ckpt_ratio = re.fullmatch(r"([\d.]+) MB \(([\d.]+)x\)", checkpoint).groups()
    file = sizes["file"]
    measured = {"export": (export_mb, file / 1e6), "fp32 weights": (fp32_mb, sizes["fp32_weights"] / 1e6),
                "fp32 ratio": (fp32_ratio, sizes["fp32_weights"] / file),
                "checkpoint": (ckpt_mb, sizes["checkpoint"] / 1e6), "checkpoint ratio": (ckpt_ratio, sizes["checkpoint"] / file)}
    wrong = {k: v for k, v in measured.items() if not agrees(*v)}
    assert not wrong, f"docs/export.md says, measured: {wrong}"
    assert sizes["binary_fp32"] == 32 * sizes["binary_packed"]  # "shrink exactly 32x in every case"
    if name in ("resnet18", "reactnet18") and "model.widen=2" not in options:
        assert sizes["binary_fp32"] == 4 * 10_985_472  # the 16 binary 3x3 convs' weights, as fp32 bytes


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
    (["ckpt={ckpt}", "out={ckpt}"], ["is also ckpt=", "write over it"]),
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


def needs_onnx():
    """onnxruntime, after onnx and onnxscript (the exporter's): skipped or, under CI, failed without them."""
    return need("onnx", "onnxscript", "onnxruntime", extra="export")


@pytest.mark.slow
def test_onnx_of_the_trained_model(digits, tmp_path, capsys):
    needs_onnx()
    import onnx
    import onnxruntime

    trained, ckpt = digits
    export.main([f"ckpt={ckpt}", f"out={tmp_path / 'm.bnn'}", f"onnx={tmp_path / 'm.onnx'}"])
    assert f"wrote {tmp_path / 'm.onnx'}" in capsys.readouterr().out
    nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
    assert {node.domain for node in nodes} <= {"", "ai.onnx"}  # standard operators only
    ops = Counter(node.op_type for node in nodes)
    made_by = {output: node for node in nodes for output in node.output}
    binary = sum(isinstance(m, BinaryConv2d) for m in trained.modules())
    assert binary == 16
    # The sign is GreaterOrEqual + Where, once per binary layer: a Where selecting on a comparison.
    assert ops["GreaterOrEqual"] == ops["Where"] == binary and "Sign" not in ops
    wheres = [node for node in nodes if node.op_type == "Where"]
    assert all(made_by[node.input[0]].op_type == "GreaterOrEqual" for node in wheres)
    # Each binary conv is a standard Conv fed by a sign: 16 of them, plus the stem's conv and
    # the three shortcuts' 1x1 convs (real-valued, their BN folded in).
    convs = [node for node in nodes if node.op_type == "Conv"]
    assert len(convs) == binary + 4
    assert sum(node.input[0] in made_by and made_by[node.input[0]].op_type == "Where" for node in convs) == binary

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    worst, correct, total, sizes = 0.0, 0, 0, set()
    for images, labels in digits_test_set(ckpt):  # batches of 64 and 40: the batch size is free
        (logits,) = session.run(None, {"images": images.numpy()})
        logits = torch.from_numpy(logits)
        with torch.no_grad():
            worst = max(worst, (logits - trained(images)).abs().max().item())
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
        sizes.add(len(labels))
    assert len(sizes) == 2
    assert 100.0 * correct / total == pytest.approx(load_checkpoint(ckpt)["metrics"]["top1"], abs=1e-9)
    # Measured 1.9e-6 (four float32 steps at logits of 4 to 8).
    assert worst <= 4e-6, worst


@pytest.mark.slow
def test_onnx_matches_pytorch_at_full_width(tmp_path):
    """docs/export.md: ONNX Runtime's logits match PyTorch's to about 1e-6 for a full-width ResNet-18 at
    224 px (measured 7.7e-7 against the module itself, logits up to 1.8)."""
    needs_onnx()
    import onnxruntime

    cfg = make("stage='2'", "model=resnet18", "data=imagenet")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=1000, in_channels=3)
    randomize_batchnorms(model)
    save_checkpoint({"model": model.state_dict(), "num_classes": 1000, "in_channels": 3, "epoch": 1, "stage": "stage2",
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "c.pt")
    export.export_checkpoint(tmp_path / "c.pt", tmp_path / "m.bnn")
    export.export_onnx(tmp_path / "m.bnn", tmp_path / "m.onnx")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    (logits,) = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = model.eval()(images)
    worst = (torch.from_numpy(logits) - want).abs().max().item()
    assert worst <= 2e-6, worst
    assert want.abs().max() > 1  # logits of a size where 1e-6 is float rounding, not a blur
