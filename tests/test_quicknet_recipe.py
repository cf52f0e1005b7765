"""larq-zoo's QuickNet training recipes (experiment=quicknet_small_paper, quicknet_paper,
quicknet_large_paper) value for value against its code, each value written here from larq/zoo
(file:line below): `larq_zoo/training/sota_experiments.py` (SOTA), `learning_schedules.py`
(SCHED), `train.py` (TRAIN), `data.py` (DATA), `larq_zoo/sota/quicknet.py` (QN); larq's
`larq/optimizers.py` (LARQ); and Keras's optimizer defaults. Also the two-optimizer
`optimizer=case` against torch's own optimizers, the lr of every optimizer step against
larq-zoo's schedule written out, and a resume in the middle of an epoch."""
import copy
import math
import signal

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnntrain.case_optimizer import CaseOptimizer
from bnntrain.engine.stage import train_stage
from bnntrain.engine.stopping import Stopped, StopSignals
from bnntrain.errors import ConfigError
from bnntrain.models import build_model
from bnntrain.nn import BinaryConv2d
from bnntrain.optim import build_optimizer, build_scheduler
from bnntrain.run.config import last_stage
from bnntrain.step_schedules import PerStepLR
from conftest import results, write_image_folder
from test_resume import assert_same

PRESETS = {"small": "quicknet_small_paper", "regular": "quicknet_paper", "large": "quicknet_large_paper"}
MODELS = {"small": "quicknet_small", "regular": "quicknet", "large": "quicknet_large"}  # SOTA:16, 45, 50
IMAGENET_TRAIN = 1281167  # the training images of tfds imagenet2012 (larq_zoo/training/datasets.py:5-9)
STEPS_PER_EPOCH = IMAGENET_TRAIN // 2048  # TRAIN:56-58: num_examples("train") // batch_size = 625
# Keras's defaults where SOTA:22-36 states none: Adam(beta_1=0.9, beta_2=0.999, epsilon=1e-7,
# amsgrad=False), SGD(nesterov=False).
ADAM = {"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-7}  # SOTA:22-28
SGD = {"name": "sgd", "momentum": 0.9, "nesterov": False}  # SOTA:29-36 (lr 0.1: optimizer.lr)


def compose(size, *extra):
    return last_stage([f"experiment={PRESETS[size]}", "data.root=/nonexistent", *extra])


def larq_zoo_lr(step, peak, steps_per_epoch=STEPS_PER_EPOCH, epochs=600, warmup_epochs=5):
    """SCHED:47-70, CosineDecayWithWarmup(peak, warmup_steps=steps_per_epoch x 5, decay_steps=
    steps_per_epoch x epochs) (SOTA:23-27), at Keras's `optimizer.iterations` before the step's
    update (each part of LARQ:74-192's CaseOptimizer counts its own, one a step): Keras's
    PolynomialDecay (power 1, cycle False) and CosineDecay (alpha 0) written out."""
    warmup_steps, decay_steps = steps_per_epoch * warmup_epochs, steps_per_epoch * epochs
    if step < warmup_steps:  # SCHED:66-68
        ramp = warmup_steps - 1  # PolynomialDecay(0.0, warmup_steps - 1, peak, power=1.0), SCHED:54-59
        p = min(step, ramp) / ramp
        return (0.0 - peak) * (1 - p) ** 1.0 + peak
    period = decay_steps - warmup_steps - 1  # CosineDecay(peak, decay_steps - warmup_steps - 1), SCHED:60-63
    t = min(step - warmup_steps, period)
    return peak * (0.5 * (1 + math.cos(math.pi * t / period)))


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_each_preset_is_larq_zoos_task(size):
    cfg = compose(size)
    assert (cfg.model.name, cfg.data.name, cfg.data.batch_size, cfg.schedule.epochs) == \
        (MODELS[size], "imagenet", 2048, 600)  # SOTA:16-18: epochs 600, batch_size 2048
    # One run, binary from its first step (TRAIN:81-137, one model.fit); no distillation.
    assert (cfg.stage.activations, cfg.stage.weights, cfg.stage.needs_init, cfg.get("distill")) == \
        ("binary", "binary", False, None)
    # CaseOptimizer((Bop.is_binary_variable, Adam), default_optimizer=SGD) (SOTA:37-40)
    opt = cfg.optimizer
    assert (opt.name, opt.lr, opt.weight_decay, opt.weight_decay_on) == ("case", 0.1, 0.0, "all")  # SOTA:31
    assert OmegaConf.to_container(opt.binary) == ADAM and OmegaConf.to_container(opt.rest) == SGD
    assert opt.weight_clip == 1.25 and not opt.gradient_centralization  # QN:69-71: WeightClip(clip_value=1.25)
    # CosineDecayWithWarmup, warmup_steps = steps_per_epoch x 5 (SOTA:25, 32), stepped per optimizer step
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs) == ("cosine_per_step", 5)
    assert cfg.loss.label_smoothing == 0.0  # TRAIN:54: sparse_categorical_crossentropy
    # No regulariser anywhere (QN: no kernel_regularizer), float32 (no mixed-precision policy), no clipping
    assert (cfg.trainer.amp, cfg.trainer.grad_clip, cfg.trainer.accumulate) == (None, None, 1)
    # DATA:13-17: IMAGE_SIZE 224, CROP_PADDING 32, MEAN_RGB / STDDEV_RGB = ImageNet's x 255
    # (on 0-255 values, as torchvision's ImageNet statistics on 0-1 ones)
    assert (list(cfg.data.mean), list(cfg.data.std)) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    # DATA:122-143: sample_distorted_bounding_box(min_object_covered=0.1, aspect_ratio_range=(3/4, 4/3),
    # area_range=(0.08, 1.0), max_attempts=10) with the whole image as the one box: crops under a
    # tenth of it are refused, so 10-100%; resize_bicubic to 224; DATA:220 random_flip_left_right
    assert OmegaConf.to_container(cfg.augment.train) == {
        "random_resized_crop": {"size": 224, "scale": [0.1, 1.0], "ratio": [3 / 4, 4 / 3], "interpolation": "bicubic"},
        "horizontal_flip": True}
    # DATA:146-167: the centre square of 224 / (224 + 32) of the shorter side, resize_bicubic to 224
    assert OmegaConf.to_container(cfg.augment.test) == {"resize": {"size": 224 + 32, "interpolation": "bicubic"},
                                                        "center_crop": 224}
    assert not cfg.augment.mixup and not cfg.augment.cutmix


def test_the_sizes_differ_in_the_model_alone():
    """SOTA:43-50: TrainQuickNetSmall and TrainQuickNetLarge are TrainQuickNet with another model."""
    def without_model(cfg):
        values = OmegaConf.to_container(cfg)
        values.pop("model")
        return values
    regular = without_model(compose("regular"))
    assert without_model(compose("small")) == regular and without_model(compose("large")) == regular


@pytest.mark.filterwarnings("ignore:Detected call of")  # no training here: no optimizer step
def test_each_optimizer_follows_cosine_decay_with_warmup_per_step():
    cfg = compose("small", "model.width=0.125")
    model = build_model(cfg.model, num_classes=1000, in_channels=3)
    optimizer = build_optimizer(cfg.optimizer, model)
    schedule = build_scheduler(cfg.schedule, optimizer, STEPS_PER_EPOCH)
    peaks = [0.1, 1e-2]  # the rest's groups (SGD, SOTA:31) first, then the binary kernels' (Adam, SOTA:24)
    assert schedule.per_step and len(optimizer.param_groups) == 2

    def check(step):
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([larq_zoo_lr(step, peak) for peak in peaks], rel=1e-12, abs=1e-18), step
        assert lrs == [g["lr"] for g in optimizer.rest.param_groups + optimizer.binary.param_groups]

    for step in range(40):  # 0 at the first step, then up by peak / 3124 a step
        check(step)
        schedule.step()
    warmup = 5 * STEPS_PER_EPOCH
    # mid warm-up, its last step (at the peak), the cosine's first (the peak again), the middle,
    # the 600th epoch's last step (0), and fit's extra step of each epoch (TRAIN:130 ceil: 626 an
    # epoch), which larq-zoo trains at 0 past decay_steps
    for step in (1000, warmup - 1, warmup, warmup + 1, 187500, 600 * STEPS_PER_EPOCH - 1, 600 * 626 - 1):
        schedule.advance_to(step)
        check(step)
    assert larq_zoo_lr(warmup - 1, 1.0) == 1.0 and larq_zoo_lr(600 * STEPS_PER_EPOCH - 1, 1.0) == 0.0


def test_adam_trains_the_binary_kernels_and_sgd_the_rest_of_quicknet_small():
    cfg = compose("small")
    model = build_model(cfg.model, num_classes=1000, in_channels=3)
    optimizer = build_optimizer(cfg.optimizer, model)
    assert type(optimizer.binary) is torch.optim.Adam and type(optimizer.rest) is torch.optim.SGD
    names = {id(p): n for n, p in model.named_parameters()}
    adam = [p for g in optimizer.binary.param_groups for p in g["params"]]
    sgd = [p for g in optimizer.rest.param_groups for p in g["params"]]
    assert {names[id(p)] for p in adam} | {names[id(p)] for p in sgd} == set(names.values())
    assert not {id(p) for p in adam} & {id(p) for p in sgd}
    # LARQ:357-366 is_binary_variable: precision 1, the residual blocks' kernels alone (QN:107-125,
    # SteSign kernel quantizer): one 3x3 c -> c kernel per block, 4 + 4 + 4 + 4 (QN:40) of 32, 64,
    # 256, 512 channels (QN:192)
    assert sorted(tuple(p.shape) for p in adam) == sorted((c, c, 3, 3) for c in (32, 64, 256, 512) for _ in range(4))
    assert sum(p.numel() for p in adam) == 9 * 4 * (32 ** 2 + 64 ** 2 + 256 ** 2 + 512 ** 2) == 11_980_800
    # The rest by SGD: the stem's three convs and BNs (QN:80-105), the transitions' 1x1 convs and
    # BNs (QN:146-152), the blocks' BNs (QN:124), the classifier (QN:168-171); the blur kernels are
    # not trained (QN:142 trainable=False). 12,652,504 parameters in all (test_quicknet.py).
    assert sum(p.numel() for p in sgd) == 12_652_504 - 11_980_800
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    assert {id(classifier.weight), id(classifier.bias)} <= {id(p) for p in sgd}


def test_the_weight_clip_holds_the_binary_kernels_alone():
    """QN:69-71, 114: WeightClip on the residual convs' kernels only, after every step (Keras
    applies a variable's constraint right after its update)."""
    cfg = compose("small", "model.width=0.125", "optimizer.weight_clip=0.001")
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    optimizer = build_optimizer(cfg.optimizer, model)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    binary = {id(p) for g in optimizer.binary.param_groups for p in g["params"]}
    assert all(p.abs().max().item() == pytest.approx(0.001) for g in optimizer.binary.param_groups for p in g["params"])
    assert all(p.abs().max().item() > 0.01 for p in model.parameters() if p.dim() == 4 and id(p) not in binary)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                         BinaryConv2d(4, 6, 3, padding=1, weight_quantizer="sign"), nn.Flatten(),
                         nn.Linear(6 * 25, 3)).double()


def test_each_part_steps_as_its_own_torch_optimizer_and_resumes_exactly():
    """LARQ:150-192: each optimizer applies its own variables' gradients; a saved state goes on
    with the same steps."""
    model, twin = small_model(), small_model()
    case = CaseOptimizer([{"params": list(model.parameters())}], model, lr=0.1,
                         binary=ADAM, rest={"name": "sgd", "momentum": 0.9})
    adam = torch.optim.Adam([twin[2].weight], lr=1e-2, eps=1e-7)
    sgd = torch.optim.SGD([p for n, p in twin.named_parameters() if n != "2.weight"], lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)

    def steps(net, optimizers, n):
        for _ in range(n):
            for opt in optimizers:
                opt.zero_grad()
            net(x).square().mean().backward()
            for opt in optimizers:
                opt.step()

    steps(model, [case], 2)
    steps(twin, [adam, sgd], 2)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": case.state_dict()})
    steps(model, [case], 2)
    steps(twin, [adam, sgd], 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    again = small_model()
    again.load_state_dict(saved["model"])
    resumed = CaseOptimizer([{"params": list(again.parameters())}], again, lr=0.1, binary=ADAM,
                            rest={"name": "sgd", "momentum": 0.9})
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0] is resumed.rest.param_groups[0]  # a schedule still reaches the parts
    steps(again, [resumed], 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("override, message", [
    ("+optimizer.rest.lr=0.5", r"optimizer.rest \(sgd\): .*lr"),  # the rest's lr is optimizer.lr
    ("optimizer.binary.name=bop", r"unknown optimizer.binary.name 'bop'; expected one of: adam, adamw, sgd"),
])
def test_a_part_it_cannot_build_is_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("small", override)


TINY = ["experiment=quicknet_small_paper", "data=synthetic", "augment=synthetic", "data.train_size=48",
        "data.test_size=8", "data.batch_size=8", "model.width=0.125", "schedule.epochs=2",
        "schedule.warmup_epochs=1", "trainer.device=cpu", "trainer.progress=plain"]


def test_a_resume_in_the_middle_of_an_epoch_is_exact(tmp_path, monkeypatch):
    """Stopped after step 9 of 12 (3 of epoch 2's 6 batches) and resumed, the stage ends as one
    never stopped: weights, both optimizers' states, and the lr of every step."""
    lrs, stop = [], {"after": None, "signals": None}
    step = PerStepLR.step

    def recorded(self, *args):
        step(self, *args)
        parts = self.optimizer.rest.param_groups + self.optimizer.binary.param_groups
        lrs.append([g["lr"] for g in parts])  # as the two optimizers read them
        if self.last_epoch == stop["after"]:
            stop["signals"].received = signal.SIGTERM

    monkeypatch.setattr(PerStepLR, "step", recorded)
    cfg = last_stage(TINY)
    lrs.clear()  # composing built the schedule once, to check it
    train_stage(cfg, tmp_path / "a" / "stage2")
    # 6 steps an epoch: warm-up over steps 0-5, cosine over 6-11 (the 13th entry: after the last step)
    assert lrs == [pytest.approx([larq_zoo_lr(k, peak, 6, 2, 1) for peak in (0.1, 1e-2)], abs=1e-15) for k in range(13)]
    straight_lrs, lrs[:] = list(lrs), []
    stop.update(after=9, signals=StopSignals())
    with pytest.raises(Stopped):
        train_stage(cfg, tmp_path / "b" / "stage2", signals=stop["signals"])
    last = tmp_path / "b" / "stage2" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["position"]["batches"], saved["trainer"]["step"]) == (1, 3, 9)
    assert set(saved["optimizer"]) == {"binary", "rest"}
    lrs[:] = []
    train_stage(cfg, tmp_path / "b" / "stage2", resume=last)
    assert lrs == [straight_lrs[0], *straight_lrs[10:]]  # built (at step 0), moved to 9; then steps 10-12
    a, b = (torch.load(p / "stage2" / "last.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    for key in ("model", "optimizer", "trainer", "metrics", "epoch", "best_top1"):
        assert_same(a[key], b[key], key)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12


@pytest.mark.slow
def test_quicknet_small_paper_trains_on_tiny_images(tmp_path):
    from bnntrain.run.pipeline import run

    root = write_image_folder(tmp_path / "imagenet", per_class=8, size=40, test_split="val")
    run(["experiment=quicknet_small_paper", f"data.root={root}", "data.image_size=32", "data.batch_size=8",
         "data.num_workers=0", "augment.train.random_resized_crop.size=32", "augment.test.resize.size=36",
         "augment.test.center_crop=32", "model.width=0.125", "schedule.epochs=2", "schedule.warmup_epochs=1",
         "trainer.device=cpu", "trainer.progress=plain"], tmp_path / "run")
    assert list(results(tmp_path / "run")) == ["stage2"]
    saved = torch.load(tmp_path / "run" / "stage2" / "last.pt", weights_only=True)
    binary, rest = saved["optimizer"]["binary"], saved["optimizer"]["rest"]
    assert len(binary["state"]) == 16 and all(s["step"].item() == 6 for s in binary["state"].values())  # 3 steps x 2
    assert rest["state"] and all("momentum_buffer" in s for s in rest["state"].values())
