"""Real-to-Binary Net's staged recipe (experiment=real_to_binary_paper) value for value against
larq-zoo's code (larq/zoo at 77c5853; the authors released none), each value written here with
its file:line: larq_zoo/training/multi_stage_experiments.py (MSE), learning_schedules.py (LS),
knowledge_distillation/knowledge_distillation.py (KD), knowledge_distillation/multi_stage_training.py
(MST), literature/real_to_bin_nets.py (R2B) and training/data.py (DATA). bnntrain's loss is larq-zoo's
times c (CE weighs 1 - kd_weight): the tests check that Adam with the preset's epsilon and weight
decay takes larq-zoo's steps all the same. Also the `tanh` precision mode, in float64."""
import logging
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch import nn

import forked_cli
from bnntrain.distill import build_teacher
from bnntrain.engine import load_checkpoint
from bnntrain.losses import FeatureTaps, Objective
from bnntrain.models.registry import build_model
from bnntrain.nn import binary_layers, set_precision
from bnntrain.nn.layers import BinaryConv2d
from bnntrain.optim import build_optimizer, build_scheduler
from bnntrain.run.config import plan
from conftest import cli_in_process, results, write_image_folder
from test_errors import assert_one_line_error

BLOCKS = [f"blocks.{i}" for i in range(8)]  # larq-zoo's block_2 ... block_9 (R2B:102-107)
RESNET = [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)]  # torchvision's blocks, the same map sizes
# stage: (activations, weights, lr, CE, KD, attention, Keras L2 factor, weight clip, teacher); larq-zoo's
# L2 penalty l * w^2 is the gradient 2 l w, which torch's coupled weight decay writes as 2 l.
LARQ = {
    # r2b_fp: tanh input quantizer, real kernels, l2(1e-5) (R2B:388-400); lr 1e-3, CE 1.0, attention 30,
    # KD 3.0 (MSE:101, 120-122); teacher a real ResNet-18 (MSE:116-117)
    "stage0": ("tanh", "real", 1e-3, 1.0, 3.0, 30.0, 1e-5, None, "torchvision"),
    # r2b_ban: ste_sign inputs, real kernels, l2(1e-5) (R2B:403-412); lr 1e-3 (MSE:132), the losses of
    # TrainR2BBFP; teacher r2b_fp (MSE:134-137)
    "stage1": ("binary", "real", 1e-3, 1.0, 3.0, 30.0, 1e-5, None, "init"),
    # r2b_bnn: ste_sign inputs and kernels, weight_clip, no regularizer (R2B:415-420, 25); lr 2e-4, CE 1.0,
    # no attention, KD 0.8 at T 1 (MSE:143-148); from and taught by r2b_ban (MSE:150-154)
    "stage2": ("binary", "binary", 2e-4, 1.0, 0.8, 0.0, 0.0, 1.0, "init"),
}
KERAS_EPS = 1e-7  # tf.keras.optimizers.Adam's default epsilon (MSE:107 leaves it)


def stages(tmp_path, *extra):
    return plan(["experiment=real_to_binary_paper", *extra], run_dir=tmp_path / "run")


def test_each_stage_is_larq_zoos(tmp_path):
    cfgs = stages(tmp_path)
    assert [cfg.stage.name for cfg in cfgs] == list(LARQ)
    run = tmp_path / "run"
    assert [cfg.init for cfg in cfgs] == [None, str(run / "stage0" / "last.pt"), str(run / "stage1" / "last.pt")]
    for cfg in cfgs:
        activations, weights, lr, ce, kd, attention, l2, clip, teacher = LARQ[cfg.stage.name]
        opt, sch, dis = cfg.optimizer, cfg.schedule, cfg.distill
        assert (cfg.stage.activations, cfg.stage.weights, cfg.stage.get("switch")) == (activations, weights, None)
        assert (cfg.model.name, cfg.model.stem, cfg.data.name, cfg.data.batch_size) == \
            ("real_to_binary", "imagenet", "imagenet", 256)  # batch 256 (MSE:104)
        c = 1 - dis.kd_weight  # our loss is larq-zoo's times c: CE weighs 1.0 there
        assert dis.kd_weight / c == pytest.approx(kd / ce, rel=1e-12)
        assert dis.feature_weight / c == pytest.approx(attention / ce, rel=1e-12)
        assert (dis.temperature, dis.feature_loss, cfg.loss.label_smoothing) == (1.0, "attention", 0.0)  # MST:104
        assert (opt.name, opt.lr, list(opt.betas), opt.weight_decay_on, opt.weight_clip) == \
            ("adam", lr, [0.9, 0.999], "4d", clip)  # Keras's Adam betas (MSE:107)
        assert opt.eps / c == pytest.approx(KERAS_EPS, rel=1e-12)
        assert opt.weight_decay / c == pytest.approx(2 * l2, rel=1e-12, abs=0)
        # R2BStepSchedule: 5 warm-up epochs, x0.3 (MSE:102) at epochs 40, 60, 70 (LS:14-29); 75 epochs (MSE:103)
        assert (sch.name, sch.epochs, list(sch.milestones), sch.gamma, sch.warmup_epochs) == \
            ("multistep", 75, [40, 60, 70], 0.3, 5)
        assert sch.warmup_lr == lr / 2  # the per-epoch mean of LS:14-19's ramp from 0 to the lr
        source = "torchvision" if dis.teacher.torchvision else dis.teacher.checkpoint
        assert source == teacher and cfg.stage.name in dis.stages
        # attention at block_2_out ... block_9_out, in the student and the teacher (MSE:124-126)
        assert [list(p) for p in dis.feature_pairs] == \
            [[s, t] for s, t in zip(BLOCKS, RESNET if teacher == "torchvision" else BLOCKS)]
        # DATA:122-143, 207-228: Inception crop (area 0.08-1 covering 10% of the image: 0.1-1, ratio
        # 3/4-4/3) bicubic, flip; the centre 224 / (224 + 32) of the shorter side bicubic to 224
        # (DATA:146-166); ImageNet's mean and std (DATA:16-17)
        train, test = cfg.augment.train, cfg.augment.test
        assert dict(train.random_resized_crop) == {"size": 224, "scale": [0.1, 1.0], "ratio": [0.75, 4 / 3],
                                                   "interpolation": "bicubic"}
        assert train.horizontal_flip and train.color_jitter is None and train.lighting is None
        assert (dict(test.resize), test.center_crop) == ({"size": 256, "interpolation": "bicubic"}, 224)
        assert (list(cfg.data.mean), list(cfg.data.std)) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert cfgs[0].distill.teacher.weights == "IMAGENET1K_V1" and cfgs[0].distill.teacher.torchvision == "resnet18"


def test_the_lr_of_every_epoch(tmp_path):
    for cfg in stages(tmp_path):
        lr = cfg.optimizer.lr
        opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler, seen = build_scheduler(cfg.schedule, opt), []
        for _ in range(75):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        # LS:20-29: lr x 0.3^i after the i-th of epochs 40, 60, 70
        expected = [lr / 2] * 5 + [lr * 0.3 ** sum(e >= m for m in (40, 60, 70)) for e in range(5, 75)]
        assert seen == pytest.approx(expected, rel=1e-12), cfg.stage.name


def larq_attention_loss(students, teachers, weight):
    """AttentionMatchingLossLayer (KD:51-81, 149) on channels-last volumes, as TensorFlow has them."""
    def normalized_attention_vector(volume):
        vector = (volume ** 2).mean(-1).reshape(volume.shape[0], -1)
        return vector / vector.max(-1, keepdim=True).values

    layers = [((normalized_attention_vector(s) - normalized_attention_vector(t)) ** 2).mean(-1)
              for s, t in zip(students, teachers)]
    return weight * torch.stack(layers, -1).mean()


def larq_loss(student_logits, teacher_logits, labels, student_maps, teacher_maps, ce, kd, attention):
    """larq-zoo's loss of one batch: WeightedCrossEntropyLoss on the softmax (KD:251-259), the output
    matching layer (KD:229-236, Keras's KL clips both distributions to [1e-7, 1]) at T 1, the
    attention matching layer (KD:51-81, 149)."""
    probs = student_logits.softmax(1)
    cross_entropy = -probs.gather(1, labels[:, None]).clamp(1e-7, 1 - 1e-7).log().mean()
    p_t, p_s = teacher_logits.softmax(1).clamp(1e-7, 1), probs.clamp(1e-7, 1)
    kl = (p_t * (p_t / p_s).log()).sum(1).mean()
    nhwc = lambda maps: [m.permute(0, 2, 3, 1) for m in maps]  # noqa: E731
    matched = larq_attention_loss(nhwc(student_maps), nhwc(teacher_maps), attention) if attention else 0.0
    return ce * cross_entropy + kd * kl + matched


def tapped(model, names, x):
    taps = FeatureTaps(model, names)
    logits = model(x)
    return logits, [taps.outputs[n] for n in names]


@pytest.mark.parametrize("stage", [0, 2])
def test_the_loss_is_larq_zoos_times_c_in_float64(tmp_path, stage):
    cfg = stages(tmp_path)[stage]
    _, _, _, ce, kd, attention, _, _, _ = LARQ[cfg.stage.name]
    torch.manual_seed(0)
    student = build_model({**cfg.model, "width": 0.25}, num_classes=5, in_channels=3).double()
    set_precision(student, cfg.stage.activations, cfg.stage.weights)
    teacher = torchvision.models.resnet18(num_classes=5).double().eval()
    pairs = [list(p) for p in cfg.distill.feature_pairs]
    if stage:  # stage 2's teacher is a Real-to-Binary Net too
        teacher = build_model({**cfg.model, "width": 0.5}, num_classes=5, in_channels=3).double().eval()
        pairs = [[s, s] for s, _ in pairs]
    with torch.no_grad():  # untrained binary nets' logits run to hundreds: kept where Keras's clipping
        for net in (student, teacher):  # of the probabilities at 1e-7 changes nothing
            getattr(net, "classifier", getattr(net, "fc", None)).weight.mul_(0.01)
    x, labels = torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 3, 4])
    objective = Objective(student, teacher=teacher, kd_weight=cfg.distill.kd_weight,
                          temperature=cfg.distill.temperature, feature_weight=cfg.distill.feature_weight,
                          feature_pairs=pairs, feature_loss=cfg.distill.feature_loss)
    ours = objective(student, x, labels)
    s_logits, s_maps = tapped(student, [s for s, _ in pairs], x)
    with torch.no_grad():
        t_logits, t_maps = tapped(teacher, [t for _, t in pairs], x)
    theirs = larq_loss(s_logits, t_logits, labels, s_maps, t_maps, ce, kd, attention)
    assert ours.item() == pytest.approx((1 - cfg.distill.kd_weight) * theirs.item(), rel=1e-12)
    assert attention == 0 or larq_attention_loss([m.permute(0, 2, 3, 1) for m in s_maps],
                                                 [m.permute(0, 2, 3, 1) for m in t_maps], 1.0) > 1e-3


@pytest.mark.parametrize("stage", [0, 2])
def test_adam_with_the_presets_values_takes_larq_zoos_steps(tmp_path, stage):
    """Adam on c x larq-zoo's loss, with the preset's epsilon and weight decay, against Adam on larq-zoo's
    loss with Keras's epsilon and the L2 gradient (in torch's placement of epsilon, which Keras adds
    before the bias correction: the same once 1 - 0.999^t is near 1)."""
    cfg = stages(tmp_path)[stage]
    l2, clip = LARQ[cfg.stage.name][6:8]
    c = 1 - cfg.distill.kd_weight
    torch.manual_seed(0)
    ours = build_model({**cfg.model, "width": 0.125}, num_classes=4, in_channels=3).double()
    theirs = build_model({**cfg.model, "width": 0.125}, num_classes=4, in_channels=3).double()
    theirs.load_state_dict(ours.state_dict())
    for net in (ours, theirs):  # smooth, so that rounding cannot flip a sign: the optimizers are compared
        set_precision(net, "tanh", "real")
    latent = [m.weight for m in theirs.modules() if isinstance(m, BinaryConv2d)]
    ours_opt = build_optimizer(cfg.optimizer, ours)
    decayed = {id(p) for p in theirs.parameters() if p.dim() == 4}
    groups = [{"params": [p for p in theirs.parameters() if id(p) in decayed], "weight_decay": 2 * l2},
              {"params": [p for p in theirs.parameters() if id(p) not in decayed], "weight_decay": 0.0}]
    theirs_opt = torch.optim.Adam(groups, lr=cfg.optimizer.lr, betas=(0.9, 0.999), eps=KERAS_EPS)
    x, labels = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for _ in range(5):
        for model, opt, scale in ((ours, ours_opt, c), (theirs, theirs_opt, 1.0)):
            opt.zero_grad()
            (scale * F.cross_entropy(model(x), labels)).backward()
            opt.step()
        with torch.no_grad():  # larq's WeightClip, a constraint after each step (ours: the optimizer's hook)
            for w in latent if clip else []:
                w.clamp_(-clip, clip)
    # Equal to a millionth of one step: rounding leaves gradients of ~1e-15 where the exact one is 0,
    # which Adam turns into steps of lr x 1e-15 / epsilon.
    for (name, mine), other in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(mine, other, rtol=0, atol=1e-6 * cfg.optimizer.lr, msg=name)
    # larq-zoo's kernel_regularizer covers the convs (R2B:37, 86, 239-241) and the gates' dense layers
    # (R2B:287, 295); weight_decay_on=4d takes the convs only (the gates' 294,400 weights go undecayed).
    kinds = {name.rsplit(".", 2)[-2] for name, p in ours.named_parameters() if p.dim() == 4}
    assert kinds == {"conv", "1"}  # the stem's and the halves' convs; the shortcuts' (halve, conv, BN)


def test_the_tanh_mode_forward_and_backward_in_float64():
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1).double()
    layer.set_precision("tanh", "real")
    x = (3 * torch.randn(2, 3, 5, 5, dtype=torch.float64)).requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, F.conv2d(torch.tanh(x), layer.weight, padding=1), rtol=0, atol=1e-14)
    grad = torch.randn_like(out)
    out.backward(grad)
    # d tanh(x) / dx = 1 - tanh(x)^2, behind the conv's input gradient
    expected = F.conv_transpose2d(grad, layer.weight, padding=1) * (1 - torch.tanh(x.detach()) ** 2)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x.detach().clone().requires_grad_(),))
    assert (layer.input_bits, layer.weight_bits) == (32, 32)
    # any network's real-valued stage 0 can take it
    assert plan(["stage=0", "stage.activations=tanh", "stage.switch=null"])[0].stage.activations == "tanh"


def test_the_paired_blocks_have_the_same_map_sizes_at_224(tmp_path):
    cfg = stages(tmp_path)[0]
    with torch.device("meta"):
        student = build_model(cfg.model, num_classes=1000, in_channels=3)
        set_precision(student, cfg.stage.activations, cfg.stage.weights)
        teacher = torchvision.models.resnet18()
        x = torch.empty(2, 3, 224, 224)
        _, s_maps = tapped(student, [s for s, _ in cfg.distill.feature_pairs], x)
        _, t_maps = tapped(teacher, [t for _, t in cfg.distill.feature_pairs], x)
    sizes = [(m.shape[1], *m.shape[2:]) for m in s_maps]
    assert sizes == [(64, 56, 56)] * 2 + [(128, 28, 28)] * 2 + [(256, 14, 14)] * 2 + [(512, 7, 7)] * 2
    assert sizes == [(m.shape[1], *m.shape[2:]) for m in t_maps]


def test_a_missing_teacher_file_is_one_line(tmp_path):
    missing = tmp_path / "resnet18.pth"
    out = cli_in_process(["experiment=real_to_binary_paper", f"data.root={tmp_path}",
                          f"stages.stage0.distill.teacher.weights={missing}"], tmp_path / "run")
    assert_one_line_error(out, f"distill.teacher.weights={missing} does not exist", "the teacher resnet18",
                          "distill.teacher.weights=PATH", "IMAGENET1K_V1")


@pytest.mark.slow
def test_a_failed_download_of_the_teacher_is_one_line(tmp_path):
    """torchvision's weights where none can be downloaded (an empty cache, a proxy that refuses)."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("no_proxy", None), env.pop("NO_PROXY", None)
    out = forked_cli.run(["-m", "bnntrain", "experiment=real_to_binary_paper", "data=synthetic",
                          "data.num_classes=1000", "data.train_size=8", "data.test_size=8", "data.batch_size=8",
                          "model.width=0.125", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], env=env)
    assert_one_line_error(out, "the teacher resnet18: torchvision's IMAGENET1K_V1 weights could not be loaded",
                          "distill.teacher.weights=PATH")


@pytest.mark.slow
def test_the_whole_recipe_trains_on_tiny_data(tmp_path, caplog):
    from bnntrain.run.pipeline import run

    root = write_image_folder(tmp_path / "imagenet", per_class=8, size=40, test_split="val")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    caplog.set_level(logging.INFO)
    run(["experiment=real_to_binary_paper", f"data.root={root}", "data.image_size=32",
         "augment.train.random_resized_crop.size=32", "augment.test.resize.size=36", "augment.test.center_crop=32",
         "data.batch_size=8", "data.num_workers=0", "model.width=0.125", "schedule.epochs=1",
         "schedule.warmup_epochs=0", "schedule.milestones=[]", "trainer.device=cpu", "trainer.progress=plain",
         f"stages.stage0.distill.teacher.weights={weights}"], tmp_path / "run")
    assert list(results(tmp_path / "run")) == ["stage0", "stage1", "stage2"]
    saved = {name: load_checkpoint(tmp_path / "run" / name / "last.pt") for name in LARQ}
    assert [saved[n]["precision"] for n in LARQ] == [{"activations": a, "weights": w} for a, w, *_ in LARQ.values()]
    assert saved["stage0"]["config"]["distill"]["teacher"]["weights"] == str(weights)
    for name in ("stage1", "stage2"):  # taught by the stage before, which it starts from
        config = saved[name]["config"]
        assert config["distill"]["teacher"]["checkpoint"] == "init"
        assert config["init"] == str(tmp_path / "run" / ("stage0" if name == "stage1" else "stage1") / "last.pt")
    assert [saved[n]["config"]["stage"]["hand_over"] for n in LARQ] == ["all", "none", "all"]
    log = caplog.text
    assert "stage1: starts from its own initial weights (stage.hand_over: none)" in log  # larq-zoo's fresh r2b_ban
    assert "stage2: weights initialised from" in log
    stage1 = saved["stage1"]["config"]
    teacher = build_teacher(OmegaConf.create(stage1["distill"]), stage1["init"], 3)  # stage0's net, in tanh mode
    assert {(layer.activations, layer.weights) for _, layer in binary_layers(teacher)} == {("tanh", "real")}
    latent = [v for k, v in saved["stage2"]["model"].items() if k.endswith("conv.weight") and "blocks" in k]
    assert latent and max(v.abs().max().item() for v in latent) <= 1.0  # larq's WeightClip(1.0)
    eps = {g["eps"] for g in saved["stage2"]["optimizer"]["param_groups"]}
    assert len(eps) == 1 and eps.pop() == pytest.approx(KERAS_EPS / 1.8, rel=1e-12)
