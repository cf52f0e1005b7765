"""The paper presets are the published networks: layer for layer against the official code's
networks (tests/official_nets.py), parameter counts, published costs, gradients, and
official checkpoints converted into bnntrain checkpoints."""
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import official_nets as official
from bnntrain.tools import export
from bnntrain.tools.convert import convert
from bnntrain.models import build_model, model_from_checkpoint
from bnntrain.nn.shortcuts import Repeat
from bnntrain.tools.summary import main as summary_main
from conftest import TINY, run_cli
from test_config import make
from test_errors import assert_one_line_error
import forked_cli

# Official parameter counts (1000 classes) and published BOPs / FLOPs / OPs at 224 px.
PUBLISHED = {
    "birealnet18": (11_689_512, 1.68e9, 1.39e8, 1.63e8),   # Bi-Real Net, Table 4
    "birealnet34": (21_797_672, 3.53e9, 1.39e8, 1.93e8),
    "reactnet18": (11_704_424, 1.68e9, 1.39e8, 1.63e8),    # ReActNet's Bi-Real-based network
    "reactnet_a": (29_343_592, 4.82e9, 0.12e8, 0.87e8),    # ReActNet, Table 5
}


def imagenet_model(name):
    return build_model(make(f"model={name}", "data=imagenet").model, num_classes=1000, in_channels=3)


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_equal_the_official_code(name):
    assert sum(p.numel() for p in imagenet_model(name).parameters()) == PUBLISHED[name][0]


@pytest.mark.parametrize("name", PUBLISHED)
def test_summary_gives_the_published_costs_within_3_percent(name, capsys):
    summary_main([f"model={name}", "data=imagenet"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("BOPs"))
    bops, flops, ops = (float(v) for v in re.findall(r"(?:BOPs|FLOPs|OPs) (\d[\d.e+]*)", line))
    for ours, published in zip((bops, flops, ops), PUBLISHED[name][1:]):
        assert abs(ours / published - 1) < 0.03, (name, line)


def test_bireal_block_stem_and_shortcut_are_the_papers():
    model = imagenet_model("birealnet18")
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.Identity, nn.MaxPool2d]  # no ReLU
    blocks = [b for stage in model.stages for b in stage]
    assert len(blocks) == 16 and all(len(b.convs) == 1 and isinstance(b.act, nn.Identity) for b in blocks)
    for b in blocks:  # sign -> conv -> BN of the conv's output channels
        assert not b.norm_first and b.norms[0].num_features == b.convs[0].out_channels
    down = model.stages[1][0].shortcut
    assert [type(m) for m in down] == [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d] and down[1].kernel_size == (1, 1)
    assert model.stages[0][0].convs[0].input_quantizer.config() == {"name": "approx_sign"}


def test_reactnet_a_layout():
    model = imagenet_model("reactnet_a")
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (2, 2) and len(model.stem) == 2
    assert len(model.stages) == 13
    widths, strides = [], []
    for block in model.stages:
        pointwise, spatial = block[1].convs[0], block[0].convs[0]
        assert spatial.kernel_size == (3, 3) and spatial.groups == 1 and pointwise.kernel_size == (1, 1)
        assert spatial.threshold is not None and type(block[0].act).__name__ == "RPReLU"
        widths.append(pointwise.out_channels)
        strides.append(spatial.stride[0])
        doubling = pointwise.out_channels == 2 * pointwise.in_channels
        assert isinstance(block[1].shortcut, Repeat) == doubling
        assert not any(p.numel() for m in (block[0].shortcut, block[1].shortcut) for p in m.parameters())
    assert widths == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


def away_from_zero(net):
    """Random weights and BN statistics; binary weights kept off exactly 0, where the official
    torch.sign gives 0 and bnntrain's binary sign +1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "binary" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.01, 1, generator=g) * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1))
            elif name.endswith("bias") and p.dim() == 4:
                p.normal_(0, 0.1, generator=g)
        official.randomize_batchnorms(net, g)
    return net


def save_official(net, path, wrapped=True):
    """As the official scripts save: DataParallel's `module.` keys inside a dict."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state, "best_top1_acc": torch.tensor(61.5), "optimizer": {}} if wrapped
               else state, path)


LAYOUTS = {  # official network, our preset, step= where the file cannot tell
    "bi-real 18": (lambda: official.BiRealNet(), "birealnet18", None),
    "bi-real 34": (lambda: official.BiRealNet((6, 8, 12, 6)), "birealnet34", None),
    "reactnet-18 step 1": (lambda: official.BiRealNet(react=True, step=1), "reactnet18", "1"),
    "reactnet-18 step 2, flat weights": (lambda: official.BiRealNet(react=True), "reactnet18", None),
    "reactnet-18 step 2, 4-D weights": (lambda: official.BiRealNet(react=True, flat=False), "reactnet18", "2"),
    "reactnet-a step 1": (lambda: official.ReActNetA(step=1), "reactnet_a", "1"),
    "reactnet-a step 2": (lambda: official.ReActNetA(), "reactnet_a", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_converted_official_checkpoint_gives_the_official_logits(layout, tmp_path):
    make_net, preset, step = LAYOUTS[layout]
    torch.manual_seed(0)
    net = away_from_zero(make_net())
    save_official(net, tmp_path / "official.pth.tar", wrapped=layout != "bi-real 34")
    ckpt, zeros = convert(tmp_path / "official.pth.tar", tmp_path / "ours.pt", [f"model={preset}"], step)
    assert ckpt["stage"] == ("stage1" if step == "1" else "stage2") and ckpt["epoch"] == (0 if "34" in layout else 7)
    assert zeros == 0  # away_from_zero: every binary weight has the official sign
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = net.double().eval()(x)
        got = ours(x)
    # float64, so that no value at a sign's threshold rounds differently in the two.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def mapped_grads(net, ours, rules, x):
    """{our parameter: (the official gradient(s) behind it, joined in order, ours)}, paired
    through the converter's rules, after one backward pass of the same loss in both."""
    net.double().train()(x).square().mean().backward()
    ours.double().train()(x).square().mean().backward()
    theirs: dict[str, list] = {}
    for name, p in net.named_parameters():
        target = next(fn(m) for pattern, fn in rules if (m := re.fullmatch(pattern, name)))
        theirs.setdefault(target, []).append(p.grad.flatten())
    mine = dict(ours.named_parameters())
    return {key: (torch.cat(grads), mine[key].grad.flatten()) for key, grads in theirs.items()}


GRADIENT_CASES = {  # official network, our preset, the converter's rules, step=
    "bi-real 18": (lambda: official.BiRealNet(), "birealnet18", "resnet18", None),
    "reactnet-18 step 1": (lambda: official.BiRealNet(react=True, step=1), "reactnet18", "resnet18", "1"),
    "reactnet-18 step 2": (lambda: official.BiRealNet(react=True), "reactnet18", "resnet18", None),
    "reactnet-a step 1": (lambda: official.ReActNetA(step=1), "reactnet_a", "reactnet_a", "1"),
    "reactnet-a step 2": (lambda: official.ReActNetA(), "reactnet_a", "reactnet_a", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradients_are_the_official_codes(case, tmp_path):
    """Step 1 (binary activations, real weights) and step 2 (fully binary): every parameter's
    gradient is the official one."""
    from bnntrain.tools.convert import RULES

    make_net, preset, rules, step = GRADIENT_CASES[case]
    torch.manual_seed(0)
    net = away_from_zero(make_net())
    save_official(net, tmp_path / "official.pth.tar")
    ckpt, _ = convert(tmp_path / "official.pth.tar", tmp_path / "ours.pt", [f"model={preset}"], step)
    assert ckpt["stage"] == ("stage1" if step == "1" else "stage2")
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads = mapped_grads(net, ours, RULES[rules], x)
    assert len(grads) == len(list(ours.parameters()))
    for key, (theirs, mine) in grads.items():
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.slow
def test_the_scaled_estimator_is_not_the_official_one(tmp_path):
    """larq's magnitude-aware sign multiplies the weight gradient by the scale; the official
    code does not: the option changes the binary weights' gradients and nothing else."""
    torch.manual_seed(0)
    net = away_from_zero(official.BiRealNet())
    save_official(net, tmp_path / "official.pth.tar")
    convert(tmp_path / "official.pth.tar", tmp_path / "ours.pt", ["model=birealnet18", "model.weight_gradient=scaled"])
    ours = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    from bnntrain.tools.convert import RULES

    differs = {key for key, (theirs, mine) in mapped_grads(net, ours, RULES["resnet18"], x).items()
               if not torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12)}
    assert differs == {f"stages.{s}.{b}.convs.0.weight" for s in range(4) for b in range(4)}


def test_official_weight_and_activation_gradients_at_the_boundaries():
    from bnntrain.nn.quantizers import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS

    w = torch.tensor([[-1.0, -0.5, 0.25, 1.0, 1.5]], requires_grad=True)
    WEIGHT_QUANTIZERS.get("scaled_sign")(gradient="unscaled")(w).sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0]]  # clamp(w, -1, 1)'s gradient: 0 at |w| = 1
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], requires_grad=True)
    INPUT_QUANTIZERS.get("approx_sign")()(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 1.0, 0.0]  # the official polynomial's: 2 - 2|x| inside


def test_latent_weight_clipping(tmp_path):
    from bnntrain.optim import build_optimizer

    cfg = make("model.width=0.125", "optimizer.weight_clip=1.0")
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50)
    opt = build_optimizer(cfg.optimizer, model)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    binary = [m.weight for m in model.modules() if hasattr(m, "weight_quantizer")]
    assert all(w.abs().max() <= 1 for w in binary) and model.classifier.weight.abs().max() > 1


def test_a_foreign_file_is_one_line_naming_keys(tmp_path):
    torch.manual_seed(0)
    save_official(official.BiRealNet(), tmp_path / "bireal.pth.tar")
    out = forked_cli.run(["-m", "bnntrain.tools.convert", f"src={tmp_path / 'bireal.pth.tar'}",
                          f"out={tmp_path / 'x.pt'}", "model=reactnet_a"])
    assert_one_line_error(out, "no rule maps 120 official key(s)", "conv1.weight, bn1.weight")
    state = official.BiRealNet(react=True, flat=False).state_dict()
    torch.save(state, tmp_path / "ambiguous.pth")
    with pytest.raises(Exception, match="give step=1 or step=2"):
        convert(tmp_path / "ambiguous.pth", tmp_path / "y.pt", ["model=reactnet18"])
    state["fc.weight"] = state["fc.weight"][:, :100]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(Exception, match=r"fc.weight has shape \(1000, 100\), where classifier.weight takes"):
        convert(tmp_path / "short.pth", tmp_path / "z.pt", ["model=reactnet18"], "2")


@pytest.mark.slow
def test_a_converted_checkpoint_works_with_summary_export_and_evaluate(tmp_path, capsys):
    from bnntrain.tools.evaluate import evaluate

    torch.manual_seed(0)
    save_official(away_from_zero(official.BiRealNet()), tmp_path / "official.pth.tar")
    convert(tmp_path / "official.pth.tar", tmp_path / "ours.pt", ["model=birealnet18"])
    summary_main([f"ckpt={tmp_path / 'ours.pt'}"])
    assert "BOPs 1.676e+09" in capsys.readouterr().out
    sizes = export.export_checkpoint(tmp_path / "ours.pt", tmp_path / "ours.bnn")
    assert sizes["binary_packed"] == 10_985_472 // 8
    data = ["data=synthetic", "data.num_classes=1000", "data.image_size=32", "data.test_size=8"]
    result = evaluate(tmp_path / "ours.pt", [*data, "trainer.progress=plain"])
    converted = model_from_checkpoint(torch.load(tmp_path / "ours.pt", weights_only=True)).eval()
    images, labels = by_hand_test_set(make(*data))
    with torch.no_grad():
        logits = converted(images)
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item() * 100
    assert result["images"] == 8 and result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item() * 100)
    assert result["top5"] == pytest.approx(top5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = export.load(tmp_path / "ours.bnn")(x), converted(x)
    # docs/export.md (The packed file): logits up to 60 here, equal to 3.6e-5 at most, eight to ten float32
    # steps at that size; twice that is allowed. (An image with a pre-sign value within rounding of
    # zero may flip a sign: this input has none.)
    assert want.abs().max() > 40 and torch.equal(got.argmax(1), want.argmax(1))
    torch.testing.assert_close(got, want, rtol=0, atol=7.2e-5)


def by_hand_test_set(cfg):
    """The synthetic test split the evaluation reads, normalised, as one batch."""
    from bnntrain.data import build_loaders

    loaders = build_loaders(cfg.data, cfg.augment)
    batches = list(loaders.test)
    return torch.cat([x for x, _ in batches]).float(), torch.cat([y for _, y in batches])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tricks_resnet18", "birealnet18", "birealnet34", "reactnet18", "reactnet_a",
                                    "bnext_tiny", "quicknet_small", "real_to_binary"])
def test_stage2_starts_from_every_stage1_tensor(preset, tmp_path):
    """Stage 2 runs with an lr of 1e-30, below float32's resolution at these weights, so that
    its parameters at the end are those it started from; BN statistics move with each batch,
    and their batch counter shows they were carried over."""
    run = tmp_path / "run"
    extra = ["model.stem=imagenet"] if preset == "reactnet_a" else []
    out = run_cli(TINY + [f"model={preset}", "stages.stage2.optimizer.lr=1e-30", *extra], run)
    assert out.returncode == 0, out.stderr
    s1 = torch.load(run / "stage1/last.pt", weights_only=True)["model"]
    s2 = torch.load(run / "stage2/last.pt", weights_only=True)["model"]
    assert s1.keys() == s2.keys()
    for key, value in s1.items():
        if key.endswith("num_batches_tracked"):
            assert s2[key] == value + 4, key  # 64 images in batches of 16: stage 2 went on counting
        elif "running_" not in key:
            torch.testing.assert_close(s2[key], value, rtol=0, atol=1e-20, msg=key)


def test_paper_presets_state_their_values(tmp_path):
    out = run_cli(["experiment=reactnet18_paper", "--cfg", "job"], cwd=tmp_path)
    stages = yaml.safe_load(out.stdout)
    s1, s2 = stages["stage1"], stages["stage2"]
    assert (s1["optimizer"]["lr"], s1["optimizer"]["weight_decay"], s2["optimizer"]["weight_decay"]) == (2.5e-3, 1e-5, 0)
    assert (s1["data"]["batch_size"], s1["schedule"], s2["schedule"]) == (512, {"name": "linear", "epochs": 128},
                                                                         {"name": "linear", "epochs": 128})
    assert s1["distill"]["teacher"] == {"checkpoint": None, "torchvision": "resnet34", "timm": None,
                                           "weights": "IMAGENET1K_V1"}
    assert (s1["distill"]["kd_weight"], s1["distill"]["temperature"], s1["loss"]["label_smoothing"]) == (1, 1, 0)
    assert list(s1["augment"]["train"]) == ["random_resized_crop", "lighting", "horizontal_flip"]
    assert s1["model"]["learnable_threshold"] and s1["model"]["activation"] == "rprelu"
    a = yaml.safe_load(run_cli(["experiment=reactnet_a_paper", "--cfg", "job"], cwd=tmp_path).stdout)
    assert (a["stage1"]["model"]["name"], a["stage1"]["data"]["batch_size"], a["stage2"]["optimizer"]["lr"]) == \
        ("reactnet_a", 256, 1.25e-3)
    b = yaml.safe_load(run_cli(["experiment=birealnet18_paper", "--cfg", "job"], cwd=tmp_path).stdout)
    assert (b["stage"]["weights"], b["optimizer"]["lr"], b["optimizer"]["weight_decay"], b["schedule"]["epochs"],
            b["loss"]["label_smoothing"], b["data"]["batch_size"]) == ("binary", 1e-3, 0, 256, 0.1, 512)


def test_the_linear_schedule_is_the_official_one():
    from bnntrain.optim import build_scheduler

    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(make("schedule=linear", "schedule.epochs=4").schedule, opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([0.75, 0.5, 0.25, 0.0])  # lr x (1 - (e + 1) / E): the last epoch at 0


@pytest.mark.slow
def test_evaluate_through_the_cli(tmp_path):
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class=8)
    run = tmp_path / "run"
    assert run_cli(["stage=1", "data=folder", f"data.root={root}", "data.num_workers=0", "data.batch_size=6",
                    "data.image_size=16", "model.width=0.125", "schedule.epochs=2"], run).returncode == 0
    env_run, py = subprocess.run, sys.executable
    out = forked_cli.run(["-m", "bnntrain.tools.evaluate", f"ckpt={run / 'stage1/last.pt'}", f"out={tmp_path / 'e.json'}"])
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    saved = torch.load(run / "stage1/last.pt", weights_only=True)["metrics"]
    assert result["top1"] == pytest.approx(saved["top1"]) and result["loss"] == pytest.approx(saved["loss"], rel=1e-5)
    assert result["images"] == 24 and "top1" in out.stdout
    other = write_image_folder(tmp_path / "two", classes=("a", "b"), per_class=2)
    bad = forked_cli.run(["-m", "bnntrain.tools.evaluate", f"ckpt={run / 'stage1/last.pt'}", f"data.root={other}"])
    assert_one_line_error(bad, "predicts 3 classes", "has 2")
    torchrun = env_run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "bnntrain.tools.evaluate", f"ckpt={run / 'stage1/last.pt'}", f"out={tmp_path / 'ddp.json'}",
                        "trainer.device=cpu"], capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    assert json.loads((tmp_path / "ddp.json").read_text())["top1"] == pytest.approx(result["top1"])


def test_reactnets_weight_decay_takes_the_4d_tensors():
    """ReActNet's code decays `p.ndimension() == 4`: convs and the learnable shifts, not BN,
    PReLU or the classifier."""
    from bnntrain.optim import build_optimizer

    cfg = make("experiment=reactnet18_paper", "model.width=0.125", "stage=1")
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    decayed, exempt = build_optimizer(cfg.optimizer, model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 1e-5 and exempt["weight_decay"] == 0
    assert {names[id(p)].rsplit(".", 1)[-1] for p in decayed["params"]} == {"weight", "threshold", "shift_in",
                                                                           "shift_out"}
    assert all(p.dim() == 4 for p in decayed["params"]) and all(p.dim() < 4 for p in exempt["params"])
    assert any(names[id(p)] == "classifier.weight" for p in exempt["params"])
