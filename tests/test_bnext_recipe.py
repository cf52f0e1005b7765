"""BNext's training recipes (experiment=bnext_{tiny,small,middle,large}_paper) value for value
against the authors' code, each value written here from hpi-xnor/BNext (file:line below):
`src/train_assistant_group_amp.py` (TRAIN), the four run scripts `src/script/BNext-*/run_*.sh`,
`utils/KD_loss.py`; and timm 0.6.11, which the code pins (`src/requirements.txt`). Also the
attention-matching kind of feature distillation, against larq-zoo's code written out."""
import math
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bnntrain.data.transforms import build_transform
from bnntrain.distill_losses import assistant_index, multi_teacher_loss
from bnntrain.engine.hooks import TeacherSchedule
from bnntrain.errors import CheckpointError, ConfigError
from bnntrain.losses import Objective, build_objective
from bnntrain.models.registry import build_model
from bnntrain.optim import build_optimizer, build_scheduler
from bnntrain.run.config import last_stage
from conftest import cli_in_process, need, results, write_image_folder
from test_errors import assert_one_line_error

timm = need("timm", extra="timm")

B0, B2, B4, CONVNEXT = "efficientnet_b0.ra_in1k", "efficientnet_b2.ra_in1k", "efficientnet_b4.ra2_in1k", \
    "convnext_tiny.fb_in1k"
# size: (global batch, main teacher, assistants in order); the scripts' --batch_size and
# --assistant_teacher_num, the teachers from TRAIN:267-319 (models.efficientnet_b0(pretrained=True) ...).
SIZES = {
    "tiny": (512, B2, [B0]),                # BNext-Tiny/run_...num_1_aa.sh: --batch_size 512, 1 assistant
    "small": (512, B2, [B0]),               # BNext-Small/run_...num_1_aa.sh
    "middle": (512, B4, [B0, B2]),          # BNext-Middle/run_...num_2_aa.sh: TRAIN:280 b2, TRAIN:306 main b4
    # BNext-Large/run_...num_3_aa.sh: --batch_size 128; TRAIN:277, 285, 302
    "large": (128, CONVNEXT, [B0, B4, CONVNEXT]),
}
# timm 0.6.11's default pretrained files of the names the code calls (timm/models/efficientnet.py:110,
# 115, 121; convnext.py:72): the tags above must name the same files in today's timm.
RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
TIMM_0611_URLS = {
    B0: RELEASES + "efficientnet_b0_ra-3dd342df.pth",
    B2: RELEASES + "efficientnet_b2_ra-bcdf34b7.pth",
    B4: RELEASES + "efficientnet_b4_ra2_320-7eb33cd5.pth",
    CONVNEXT: "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
}


def compose(size, *extra):
    return last_stage([f"experiment=bnext_{size}_paper", "data.root=/nonexistent", *extra])


@pytest.mark.parametrize("size", sorted(SIZES))
def test_each_preset_is_the_authors_code(size):
    batch, teacher, assistants = SIZES[size]
    cfg = compose(size)
    assert (cfg.model.name, cfg.model.size, cfg.data.name, cfg.data.batch_size) == ("bnext", size, "imagenet", batch)
    assert (cfg.stage.activations, cfg.stage.weights, cfg.stage.needs_init) == ("binary", "binary", False)
    # timm's IMAGENET_DEFAULT_MEAN/STD (TRAIN:501-503)
    assert (list(cfg.data.mean), list(cfg.data.std)) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    # the weights' curriculum: every HardBinaryConv's temperature x 0.9 after each epoch (TRAIN:181-185, 666)
    assert (cfg.model.weight_quantizer.name, cfg.model.weight_quantizer.decay) == ("bnext_weight", 0.9)
    # AdamW, torch's default betas and eps, lr 1e-3 (scripts: --learning_rate=1e-3); 1e-8 on
    # `ndimension() == 4 or 'binary_conv' in pname`, 1e-3 on the rest (TRAIN:411-430)
    opt = cfg.optimizer
    assert (opt.name, opt.lr, list(opt.betas), opt.eps) == ("adamw", 1e-3, [0.9, 0.999], 1e-8)
    assert (opt.weight_decay_on, opt.weight_decay, opt.weight_decay_rest) == ("4d", 1e-8, 1e-3)
    assert not opt.gradient_centralization and opt.weight_clip is None
    # CosineLRScheduler(t_initial=epochs, warmup_t=5, lr_min=1e-7, warmup_lr_init=1e-5, warmup_prefix=True)
    # (TRAIN:439), --epochs=512 (scripts)
    sch = cfg.schedule
    assert (sch.name, sch.epochs, sch.warmup_epochs, sch.warmup_lr, sch.min_lr, sch.period) == \
        ("timm_cosine", 512, 5, 1e-5, 1e-7, None)
    # timm's create_loader (TRAIN:528-573): scale/ratio/hflip/aa/interpolation (TRAIN:124-134, 164),
    # translate_const int(224 x 0.45) and img_mean (timm 0.6.11 transforms_factory.py:85-90); no jitter
    # (TRAIN:132), no erasing (TRAIN:140), no mixup/cutmix (scripts); test crop_pct 0.95 (TRAIN:571):
    # Resize(floor(224 / 0.95) = 235, bicubic), CenterCrop(224) (transforms_factory.py:143-151)
    assert OmegaConf.to_container(cfg.augment.train) == {
        "random_resized_crop": {"size": 224, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "interpolation": "bicubic"},
        "horizontal_flip": True,
        "rand_augment": {"config": "rand-m7-mstd0.5-inc1", "translate_const": int(224 * 0.45),
                         "img_mean": [round(255 * m) for m in cfg.data.mean], "interpolation": "bicubic"}}
    assert OmegaConf.to_container(cfg.augment.test) == {"resize": {"size": math.floor(224 / 0.95), "interpolation":
                                                                   "bicubic"}, "center_crop": 224}
    assert not cfg.augment.mixup and not cfg.augment.cutmix
    # The teachers' loss alone (TRAIN:754-781: no label term), T = 1 (KD_loss.py:22-29), no smoothing
    d = cfg.distill
    assert (d.kd_weight, d.temperature, d.weighting, list(d.stages), cfg.loss.label_smoothing) == \
        (1.0, 1.0, "cross_entropy", ["stage2"], 0.0)
    assert (d.teacher.timm, [a.timm for a in d.assistants]) == (teacher, assistants)
    assert d.teacher.weights is None and all(a.weights is None for a in d.assistants)  # timm's pretrained
    assert not d.feature_weight
    # clip_grad_norm_(model_student.parameters(), 5) (TRAIN:811); the student in float32 (only the
    # teachers run under autocast, TRAIN:759)
    assert (cfg.trainer.grad_clip, cfg.trainer.amp, cfg.trainer.accumulate) == (5.0, None, 1)


def test_the_teacher_tags_are_the_files_timm_0_6_11_loaded():
    for tag, url in TIMM_0611_URLS.items():
        assert timm.models.get_pretrained_cfg(tag).url == url, tag
    # The plain name now means other weights: ConvNeXt-Tiny pretrained on ImageNet-12k.
    assert timm.models.get_pretrained_cfg("convnext_tiny").url != TIMM_0611_URLS[CONVNEXT]


def code_loss(student, teachers):
    """TRAIN:752-781 with KD_loss.py:22-42 (hard_knowledge True: two teachers, TRAIN:328-329;
    `hard_knowledge_grains` "Instance": the KD loss reduced (TRAIN:764 compares with "instance"),
    the alpha cross-entropy per sample (TRAIN:768))."""
    loss_entropy = []
    for t in teachers:
        soft = F.softmax(t, dim=1).detach().unsqueeze(1)
        log_prob = F.log_softmax(student, dim=1).unsqueeze(2)
        loss_entropy.append((-torch.bmm(soft, log_prob)).mean())
    alpha = [nn.CrossEntropyLoss(reduction="none")(student, torch.softmax(t, dim=-1)).unsqueeze(-1) for t in teachers]
    alpha = torch.softmax(torch.cat(alpha, dim=-1), dim=-1).detach()
    loss = [loss_entropy[i] * alpha[:, i] for i in range(len(teachers))]
    return torch.mean(sum(loss) / len(loss))


def test_the_teacher_weighted_loss_is_the_codes_in_float64():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    teachers = [3 * torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    ours = multi_teacher_loss(student, teachers)
    theirs = code_loss(student, teachers)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-13)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_theirs,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-15)
    # Not the mirror rule (the nearer teacher weighted more), nor a plain mean.
    ce = torch.stack([-(F.softmax(t, 1) * F.log_softmax(student, 1)).sum(1) for t in teachers], 1)
    mirrored = (ce.mean(0) * torch.softmax(-ce, 1).mean(0)).sum() / 2
    plain = ce.mean(0).sum() / 2
    assert ours.item() != pytest.approx(mirrored.item(), rel=1e-6) and ours.item() != pytest.approx(plain.item() / 2)
    # `equal`: the code without hard_knowledge, alpha = 0.5 (TRAIN:772-773)
    assert multi_teacher_loss(student, teachers, weighting="equal").item() == pytest.approx(plain.item() / 2, rel=1e-13)


class Fixed(nn.Module):
    """A network whose logits are given, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits


def test_the_objective_uses_the_assistant_of_the_epoch_and_no_label_loss():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    student, first, second, main = (Fixed(x) for x in logits)
    cfg = compose("middle")
    objective = build_objective(cfg, student, 5, main, [first, second])
    hook, run = TeacherSchedule(), type("Run", (), {"parts": type("P", (), {"objective": objective}), "epochs": 512})
    labels = torch.tensor([0, 1, 2, 3])
    for epoch, assistant in ((0, first), (255, first), (256, second), (511, second)):
        hook.before_epoch(run, epoch)
        assert objective.teachers() == [assistant, main]
        expected = code_loss(student.logits, [assistant.logits, main.logits])
        assert objective(student, torch.zeros(4), labels).item() == pytest.approx(expected.item(), rel=1e-12)


def code_assistant(epoch, epochs, n):
    """TRAIN:724-732: the index into the assistants' Sequential."""
    if epoch / (epochs / n) < 1 and n > 0:
        return 0
    if epoch / (epochs / n) < 2 and n > 1:
        return 1
    if epoch / (epochs / n) < 3 and n > 2:
        return 2
    return n - 1  # model_teacher[0][-1]


def test_the_assistants_switch_at_the_codes_epochs():
    for n in (1, 2, 3):
        assert [assistant_index(e, 512, n) for e in range(512)] == [code_assistant(e, 512, n) for e in range(512)]

    def switches(n):
        return [e for e in range(1, 512) if assistant_index(e, 512, n) != assistant_index(e - 1, 512, n)]
    assert (switches(1), switches(2), switches(3)) == ([], [256], [171, 342])


def timm_lrs(epochs):
    """TRAIN:439 and 705: timm's own CosineLRScheduler, stepped with the epoch at its start."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 1e-3},
                                   {"params": params[1:], "weight_decay": 1e-8}], lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, warmup_t=5, lr_min=1e-7, warmup_lr_init=1e-5,
                                  warmup_prefix=True)
    seen = []
    for epoch in range(epochs):
        scheduler.step(epoch=epoch)
        seen.append([group["lr"] for group in optimizer.param_groups])
    return seen


def test_the_lr_of_every_epoch_is_timms():
    cfg = compose("tiny", "model.width=0.125")
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.schedule, optimizer)
    ours = []
    for _ in range(512):
        ours.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()
    assert ours == timm_lrs(512)  # the same arithmetic: equal to the last bit
    lr = [pair[0] for pair in ours]
    assert lr[:6] == pytest.approx([1e-5 + e * (1e-3 - 1e-5) / 5 for e in range(5)] + [1e-3], rel=1e-12)
    assert lr[511] == pytest.approx(1e-7 + 0.5 * (1e-3 - 1e-7) * (1 + math.cos(math.pi * 506 / 512)), rel=1e-12)


def test_the_two_weight_decay_groups_on_bnext_tiny():
    cfg = compose("tiny", "model.width=0.25")
    model = build_model(cfg.model, num_classes=1000, in_channels=3)
    optimizer = build_optimizer(cfg.optimizer, model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    # The units' unused PReLU (`activation1` outside the element attention) has no gradient and is
    # left out; the code lists it in the 1e-3 group, where AdamW skips it for want of a gradient.
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert sorted(groups) == [1e-8, 1e-3] and all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    # TRAIN:412 on the code's names, which ours follow (its `move.bias` is our `binary_conv.threshold`)
    code_rule = {n for n, p in model.named_parameters() if p.ndimension() == 4 or "binary_conv" in n}
    assert groups[1e-8] == code_rule and groups[1e-3] == set(names.values()) - code_rule
    assert all(n == "stem.0.weight" or n.endswith(("binary_conv.weight", "binary_conv.threshold", ".scale",
                                                   "se.1.weight", "se.3.weight")) for n in groups[1e-8])
    assert all(n.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "activation1.weight",
                           "activation2.weight", "se.1.bias", "se.3.bias")) or n in
               ("stem.1.weight", "stem.1.bias", "stem_prelu.weight", "head_prelu.weight", "classifier.weight",
                "classifier.bias") for n in groups[1e-3])


def test_a_missing_teacher_file_or_timm_is_one_line(tmp_path, monkeypatch):
    out = cli_in_process(["experiment=bnext_tiny_paper", f"data.root={tmp_path}",
                          f"distill.assistants.0.weights={tmp_path}/b0.pth"], tmp_path / "run")
    assert_one_line_error(out, f"distill.assistants.0.weights={tmp_path}/b0.pth does not exist", B0,
                          "distill.assistants.0.weights=PATH", "null for timm's pretrained download")
    with pytest.raises(ConfigError, match="timm has no such model"):
        compose("tiny", "distill.teacher.timm=efficientnet_b99")
    augment = compose("tiny").augment.train
    monkeypatch.setitem(sys.modules, "timm", None)  # as where the extra is not installed
    with pytest.raises(ConfigError, match=rf"^distill.teacher.timm={B2} needs timm: pip install -e '\.\[timm\]'"):
        compose("tiny")
    with pytest.raises(ConfigError, match=r"^augment rand_augment=rand-m7-mstd0.5-inc1 needs timm: "
                                          r"pip install -e '\.\[timm\]'"):
        build_transform(augment)


def test_a_weights_file_for_other_classes_is_refused(tmp_path):
    from bnntrain.distill import build_assistants, build_teacher

    torch.save(timm.create_model(B0, pretrained=False, num_classes=3).state_dict(), tmp_path / "b0.pth")
    b0 = {"timm": B0, "weights": str(tmp_path / "b0.pth")}
    spec = OmegaConf.create({"teacher": b0, "assistants": [{"torchvision": None, **b0}, b0]})
    teacher = build_teacher(spec, None, 3)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert build_assistants(spec, teacher, None, 3) == [teacher, teacher]  # the same teacher is one module
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/b0.pth does not hold timm {B0} weights for 4 classes"):
        build_teacher(spec, None, 4)


@pytest.mark.slow
def test_bnext_tiny_paper_trains_on_tiny_data(tmp_path):
    from bnntrain.engine import load_checkpoint
    from bnntrain.run.pipeline import run

    root = write_image_folder(tmp_path / "imagenet", per_class=8, size=40, test_split="val")
    files = []
    for seed in (0, 1):  # two different EfficientNet-B0s: the main teacher and the assistant
        torch.manual_seed(seed)
        files.append(tmp_path / f"b0_{seed}.pth")
        torch.save(timm.create_model(B0, pretrained=False, num_classes=3).state_dict(), files[-1])
    run(["experiment=bnext_tiny_paper", f"data.root={root}", "data.image_size=32",
         "augment.train.random_resized_crop.size=32", "augment.train.rand_augment.translate_const=14",
         "augment.test.resize.size=33", "augment.test.center_crop=32", "data.batch_size=8", "data.num_workers=0",
         "model.width=0.125", "schedule.epochs=2", "schedule.warmup_epochs=1", "trainer.device=cpu",
         "trainer.progress=plain", f"distill.teacher.timm={B0}", f"distill.teacher.weights={files[0]}",
         f"distill.assistants.0.weights={files[1]}"], tmp_path / "run")
    assert list(results(tmp_path / "run")) == ["stage2"]
    saved = load_checkpoint(tmp_path / "run" / "stage2" / "last.pt")
    assert sorted(g["weight_decay"] for g in saved["optimizer"]["param_groups"]) == [1e-8, 1e-3]
    assert saved["config"]["distill"]["assistants"][0]["weights"] == str(files[1])
    temperatures = {v.item() for k, v in saved["model"].items() if k.endswith("weight_quantizer.temperature")}
    assert len(temperatures) == 1 and temperatures.pop() == pytest.approx(0.9)  # epoch 1 of the curriculum


@pytest.mark.slow
def test_a_failed_download_of_a_teacher_is_one_line(tmp_path):
    """The main teacher left to timm's download, where none can happen (offline, an empty cache):
    the command line's one line names the teacher and the key that takes its file."""
    weights = tmp_path / "b0.pth"
    torch.save(timm.create_model(B0, pretrained=False).state_dict(), weights)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    out = subprocess.run([sys.executable, "-m", "bnntrain", "experiment=bnext_tiny_paper", "data=synthetic",
                          "data.num_classes=1000", "data.train_size=8", "data.test_size=8", "data.batch_size=8",
                          "model.width=0.125", "trainer.device=cpu", f"distill.assistants.0.weights={weights}",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(out, f"the teacher {B2}: timm's pretrained weights could not be loaded",
                          "distill.teacher.weights=PATH")


def larq_attention_loss(students, teachers, weight):
    """larq-zoo's AttentionMatchingLossLayer (larq_zoo/training/knowledge_distillation/
    knowledge_distillation.py:51-81, 149) on channels-last (NHWC) volumes, as TensorFlow has them."""
    def normalized_attention_vector(volume):
        area = (volume ** 2).mean(-1)
        vector = area.reshape(volume.shape[0], -1)
        return vector / vector.max(-1, keepdim=True).values

    layers = [((normalized_attention_vector(s) - normalized_attention_vector(t)) ** 2).mean(-1)
              for s, t in zip(students, teachers)]
    return weight * torch.stack(layers, -1).mean()


def tiny_net(widths):
    layers = OrderedDict(a=nn.Conv2d(3, widths[0], 3, padding=1), b=nn.Conv2d(widths[0], widths[1], 3, 2, 1),
                         pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(widths[1], 3))
    return nn.Sequential(layers).double()


def test_attention_matching_is_larq_zoos_in_float64():
    torch.manual_seed(0)
    student, teacher = tiny_net((4, 5)), tiny_net((6, 7))  # other channels, the same positions
    x, labels = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    objective = Objective(student, teacher=teacher, kd_weight=0.0, feature_weight=30.0,
                          feature_pairs=[["a", "a"], ["b", "b"]], feature_loss="attention")
    ours = objective(student, x, labels) - F.cross_entropy(student(x), labels)
    nhwc = lambda net: [net.a(x).permute(0, 2, 3, 1), net.b(net.a(x)).permute(0, 2, 3, 1)]  # noqa: E731
    theirs = larq_attention_loss(nhwc(student), nhwc(teacher), 30.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12) and theirs.item() > 1e-3
    plain = Objective(student, teacher=teacher, kd_weight=0.0, feature_weight=30.0, feature_pairs=[["a", "a"]])
    assert plain.feature_kind == "l2_normalized"  # the default stays the L2-normalised feature maps
    with pytest.raises(ConfigError, match="same batch and spatial size"):
        Objective(student, teacher=teacher, feature_weight=1.0, feature_pairs=[["a", "b"]],
                  feature_loss="attention")(student, x, labels)
    with pytest.raises(ConfigError, match="same shape"):
        plain(student, x, labels)  # 4 channels against 6


def test_the_feature_loss_kind_is_a_config_choice():
    cfg = last_stage(["stage=1", "distill=features", "distill.teacher.torchvision=resnet18",
                      f"distill.teacher.weights={__file__}", "distill.feature_loss=attention"])
    assert cfg.distill.feature_loss == "attention"
    assert last_stage(["stage=1", "distill=features", "distill.teacher.torchvision=resnet18",
                       f"distill.teacher.weights={__file__}"]).distill.feature_loss == "l2_normalized"
    with pytest.raises(ConfigError, match="unknown distill.feature_loss 'gram'; expected one of: l2_normalized, "
                                          "attention"):
        last_stage(["stage=1", "distill=features", "distill.teacher.torchvision=resnet18",
                    f"distill.teacher.weights={__file__}", "distill.feature_loss=gram"])
