"""Recipe tricks as units: transforms, batch mixing, distillation, centre loss, optimizer options."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchvision.transforms import v2

from bnntrain.run.config import compose
from bnntrain.data.transforms import BatchNormalize, Lighting, build_batch_mixing, build_transform
from bnntrain.distill import build_teacher
from bnntrain.engine import save_checkpoint
from bnntrain.errors import ConfigError
from bnntrain.losses import CenterLoss, Objective, build_objective, feature_loss, kd_loss
from bnntrain.models import build_model
from bnntrain.optim import build_optimizer
from test_config import make

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# AlexNet's ImageNet RGB principal components as fb.resnet.torch (datasets/imagenet.lua)
# publishes them and every Lighting transform copies them, written out here rather than read
# from the module under test.
PUBLISHED_EIGVAL = (0.2175, 0.0188, 0.0045)
PUBLISHED_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                    (-0.5808, -0.0045, -0.8140),
                    (-0.5836, -0.6948, 0.4203))


def test_lighting_follows_the_pca_formula():
    assert Lighting(0.1).eigval.tolist() == pytest.approx(PUBLISHED_EIGVAL, abs=1e-7)
    assert [row.tolist() for row in Lighting(0.1).eigvec] == [pytest.approx(r, abs=1e-7) for r in PUBLISHED_EIGVEC]
    image = torch.rand(3, 8, 8)
    torch.manual_seed(7)
    out = Lighting(0.1)(image)
    torch.manual_seed(7)
    alpha = (torch.randn(3) * 0.1).tolist()  # the same draw
    # fb.resnet.torch's arithmetic: channel c moves by sum_j eigvec[c][j] * alpha[j] * eigval[j].
    shift = torch.tensor([sum(PUBLISHED_EIGVEC[c][j] * alpha[j] * PUBLISHED_EIGVAL[j] for j in range(3))
                          for c in range(3)])
    assert torch.allclose(out - image, shift.view(3, 1, 1).expand(3, 8, 8), atol=1e-6)
    assert not torch.equal(out, image)
    uint8 = (image * 255).round().to(torch.uint8)
    assert Lighting(0.1)(uint8).dtype == torch.uint8
    assert torch.equal(Lighting(0.0)(image), image)


@pytest.mark.parametrize("preset, size_in, train_size, test_size", [
    ("imagenet", 300, 224, 224), ("imagenet_rescale", 300, 224, 224), ("cifar100", 32, 32, 32)])
def test_presets_give_normalised_images_of_the_right_size(preset, size_in, train_size, test_size):
    cfg = make(f"augment={preset}", "+augment.train.lighting.alphastd=0.1" if preset == "cifar100" else "seed=0")
    image = torch.randint(0, 256, (3, size_in, size_in + (20 if size_in > 32 else 0)), dtype=torch.uint8)
    train = build_transform(cfg.augment.train)(image)
    test = build_transform(cfg.augment.test)(image)
    assert train.shape == (3, train_size, train_size) and test.shape == (3, test_size, test_size)
    assert train.dtype == test.dtype == torch.uint8  # workers hand over bytes; the batch is normalised later
    batch = BatchNormalize(MEAN, STD)(torch.stack([train, test]))
    assert batch.dtype == torch.float32 and -2.2 < batch.min() and batch.max() < 2.7  # normalised [0, 1]


def test_batch_normalisation_matches_torchvision_per_image():
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    expected = torch.stack([reference(image) for image in images])
    assert torch.allclose(BatchNormalize(MEAN, STD)(images), expected, atol=1e-5)
    floats = torch.rand(4, 3, 5, 6)  # in-memory datasets hold floats in [0, 1]
    assert torch.allclose(BatchNormalize(MEAN, STD)(floats), reference(floats), atol=1e-6)


def test_image_scale_setting_resizes_before_cropping():
    cfg = make("augment=imagenet_rescale")
    names = [type(t).__name__ for t in build_transform(cfg.augment.train).transforms]
    assert names[:3] == ["Decode", "Resize", "RandomCrop"] and "RandomResizedCrop" not in names  # Decode: a file's path
    test = build_transform(cfg.augment.test).transforms
    assert list(test[1].size) == [302] and list(test[2].size) == [224, 224]  # int(224 * 1.35)


def test_autoaugment_is_one_override_away():
    cfg = make("augment=cifar100", "augment.train.autoaugment=cifar10")
    names = [type(t).__name__ for t in build_transform(cfg.augment.train).transforms]
    assert "AutoAugment" in names


@pytest.mark.parametrize("mixup, cutmix", [(0.2, None), (None, 1.0), (0.2, 1.0)])
def test_batch_mixing_gives_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    mix = build_batch_mixing(OmegaConf.create({"mixup": mixup, "cutmix": cutmix}), num_classes=5)
    images, targets = mix(torch.rand(6, 3, 8, 8), torch.arange(6) % 5)
    assert images.shape == (6, 3, 8, 8) and targets.shape == (6, 5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert F.cross_entropy(torch.randn(6, 5), targets).isfinite()


def test_kl_is_zero_when_the_teacher_is_the_student():
    torch.manual_seed(0)
    model = build_model(make("model.width=0.125").model, num_classes=10, in_channels=3).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(10, (4,))
    logits = model(x)
    assert kd_loss(logits, logits, 4.0).abs() < 1e-6
    assert kd_loss(logits, torch.randn_like(logits), 1.0) > 0
    # The objective with kd_weight 1 and the student as its own teacher is the KL alone: zero.
    objective = Objective(model, teacher=model, kd_weight=1.0)
    assert objective(model, x, y).abs() < 1e-6


class FixedLogits(nn.Module):
    """A 'network' that answers every batch with the same logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, images):
        return self.logits.clone()  # an op, as a real network's output is


# Two classes, two samples, worked out by hand. Teacher logits [0, 0]: p_t = (1/2, 1/2) at any
# temperature. Student sample 1: [0, 2 ln 3], which at T = 2 is [0, ln 3]: p_s = (1/4, 3/4),
# and at T = 1 softmax (1/10, 9/10). Student sample 2: [0, 0], equal to the teacher (KL 0).
STUDENT = [[0.0, 2 * math.log(3)], [0.0, 0.0]]
TEACHER = [[0.0, 0.0], [0.0, 0.0]]
LABELS = [0, 1]
# KL(teacher || student) of sample 1 at T = 2: 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln(4/3).
KL_T2 = 0.5 * math.log(4 / 3)
# Averaged over the batch of two (sample 2 adds 0), times T^2 = 4: ln(4/3) = 0.2877.
KD_T2 = 4 * KL_T2 / 2
# Cross-entropy with the labels: sample 1 -ln(1/10), sample 2 -ln(1/2); their mean.
CE = (math.log(10) + math.log(2)) / 2


def test_kd_loss_worked_out_by_hand():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(KD_T2, rel=1e-6)
    # The other direction, KL(student || teacher) = 1/4 ln((1/4)/(1/2)) + 3/4 ln((3/4)/(1/2)), is
    # another number: the loss is not that one, nor the KL without T^2 or without the mean.
    reverse = 4 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    for wrong in (reverse, KL_T2 / 2, 4 * KL_T2):
        assert kd_loss(student, teacher, 2.0).item() != pytest.approx(wrong, rel=1e-3)
    # T = 1: p_s = (1/10, 9/10); KL = 1/2 ln(5) + 1/2 ln(5/9) = 1/2 ln(25/9), halved by the mean.
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(0.5 * math.log(25 / 9) / 2, rel=1e-6)


@pytest.mark.parametrize("kd_weight", [0.25, 1.0])
def test_objective_mixes_label_and_distillation_loss_by_hand(kd_weight):
    """(1 - kd_weight) x cross-entropy + kd_weight x T^2 KL(teacher || student), with kd_weight
    and temperature taken from `distill=kd` in the config."""
    cfg = make("distill=kd", f"distill.kd_weight={kd_weight}", "distill.temperature=2.0",
               "distill.teacher.torchvision=resnet18", f"distill.teacher.weights={__file__}")
    student, teacher = FixedLogits(STUDENT), FixedLogits(TEACHER)
    objective = build_objective(cfg, student, 2, teacher)
    loss = objective(student, torch.zeros(2, 1), torch.tensor(LABELS))
    assert loss.item() == pytest.approx((1 - kd_weight) * CE + kd_weight * KD_T2, rel=1e-6)
    loss.backward()
    assert student.logits.grad is not None and teacher.logits.grad is None  # the teacher is not trained
    # Without a teacher the objective is the cross-entropy alone.
    assert Objective(student)(student, torch.zeros(2, 1), torch.tensor(LABELS)).item() == pytest.approx(CE, rel=1e-6)


def test_feature_matching():
    a = torch.randn(4, 8, 5, 5)
    assert feature_loss(a, a) < 1e-10
    assert feature_loss(a, 3 * a) < 1e-10  # scale-free after L2 normalisation
    assert feature_loss(a, torch.randn_like(a)) > 0.5
    student = build_model(make("model.width=0.125").model, num_classes=10, in_channels=3)
    teacher = build_model(make("model.width=0.25").model, num_classes=10, in_channels=3)
    objective = Objective(student, teacher=teacher, feature_weight=1.0, feature_pairs=[["stages.0", "stages.0"]])
    with pytest.raises(ConfigError, match="student 'stages.0' gives .* but teacher 'stages.0' gives"):
        objective(student, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        Objective(student, teacher=teacher, feature_weight=1.0, feature_pairs=[["nope", "stages.0"]])


def test_teacher_of_another_architecture_loads_from_its_checkpoint(tmp_path):
    cfg = make("model=resnet34", "model.width=0.125", "model.binarize=false", "stage='1'")
    real34 = build_model(cfg.model, num_classes=10, in_channels=3)
    save_checkpoint({"model": real34.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1, "stage": "stage1", "init_from": None,
                     "config": OmegaConf.to_container(cfg, resolve=True)}, tmp_path / "teacher.pt")
    kd = compose(["distill=kd"]).distill  # the kd preset, whose teacher is set below
    teacher = build_teacher(OmegaConf.merge(kd, {"teacher": {"checkpoint": str(tmp_path / "teacher.pt")}}), None, 10)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(teacher(x), real34.eval()(x), atol=1e-5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert sum(1 for _ in teacher.stages.modules()) > sum(1 for _ in build_model(
        make("model.width=0.125").model, num_classes=10, in_channels=3).stages.modules())  # a deeper net
    import torchvision
    tv = torchvision.models.resnet18(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    loaded = build_teacher(OmegaConf.merge(kd, {"teacher": {"torchvision": "resnet18", "weights": str(tmp_path / "tv.pt")}}),
                           None, 10)
    assert torch.allclose(loaded(x), tv.eval()(x), atol=1e-5)


def test_center_loss_pulls_features_to_their_class_centre():
    loss = CenterLoss(3, 4)
    with torch.no_grad():
        loss.centers.copy_(torch.eye(3, 4))
    features = torch.eye(3, 4)
    assert loss(features, torch.tensor([0, 1, 2])) == 0
    assert loss(features, torch.tensor([1, 1, 2])).item() == pytest.approx(0.5 * 2 / 3)
    soft = torch.tensor([[0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    assert loss(features, soft) == 0  # mixed targets count for their main class


def test_gradient_centralization_zero_mean_per_output_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(2, 3, 6, 6))
    sgd = OmegaConf.merge(compose(["optimizer=sgd"]).optimizer, {"lr": 0.0, "weight_decay": 0.0,
                                                                 "gradient_centralization": True})
    opt = build_optimizer(sgd, model)
    model(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    bn_grad = model[1].weight.grad.clone()
    opt.step()
    for w in (model[0].weight, model[3].weight):
        assert w.grad.mean(dim=tuple(range(1, w.dim()))).abs().max() < 1e-6
    assert torch.equal(model[1].weight.grad, bn_grad)  # BN is left alone


def test_weight_decay_exemption():
    model = build_model(make("model.width=0.125", "model=reactnet18").model, num_classes=10, in_channels=3)
    cfg = OmegaConf.merge(compose([]).optimizer, {"lr": 1e-3, "weight_decay": 1e-5})  # the adam preset
    assert len(build_optimizer(cfg, model).param_groups) == 1
    decayed, exempt = build_optimizer(OmegaConf.merge(cfg, {"weight_decay_on": "weights"}), model).param_groups
    assert decayed["weight_decay"] == 1e-5 and exempt["weight_decay"] == 0.0
    conv_linear = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in decayed["params"]} == conv_linear
    names = {id(p): n for n, p in model.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert any("prelu" in n for n in exempt_names) and any("threshold" in n for n in exempt_names)
    assert "classifier.bias" in exempt_names and any(n.endswith("norms.0.weight") for n in exempt_names)
