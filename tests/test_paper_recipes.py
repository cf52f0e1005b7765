"""The IR-Net, ReCU and AdaBin recipes (experiment=<method>_<network>_<data>) value for value:
the optimizer, its weight-decay rule, the schedule with ReCU's warm-up, the data and its
augmentation, each written here from the authors' scripts (paths in the presets)."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.models.registry import build_model
from bnntrain.optim import build_optimizer, build_scheduler
from bnntrain.run.config import last_stage
from conftest import results, run_cli, write_cifar10, write_image_folder

IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

# preset: model, data, batch, (lr, momentum, weight decay, decay rule), (epochs, warm-up), train augmentation
RECIPES = {
    # htqin/IR-Net CIFAR-10/ResNet20/1w1a/trainer.py
    "irnet_resnet20_cifar10": ("irnet_resnet20", "cifar10", 128, (0.1, 0.9, 1e-4, "all"), (400, 0),
                               {"random_crop": {"size": 32, "padding": 4}, "horizontal_flip": True}),
    # z-hXu/ReCU cifar/run.sh and main.py
    "recu_resnet20_cifar10": ("recu_resnet20", "cifar10", 256, (0.1, 0.9, 5e-4, "all"), (600, 5),
                              {"random_crop": {"size": 32, "padding": 4}, "horizontal_flip": True}),
    # z-hXu/ReCU imagenet/run.sh, main.py and dataset/imagenet.py (get_imagenet_iter_torch)
    "recu_resnet18_imagenet": ("recu_resnet18", "imagenet", 512, (0.1, 0.9, 1e-4, "convs_and_classifier"), (200, 5),
                               {"random_resized_crop": {"size": 224, "scale": [0.08, 1.25]},
                                "lighting": {"alphastd": pytest.approx(0.1 / 255)}, "horizontal_flip": True}),
    # Efficient-Computing BinaryNetworks/AdaBin/cifar10/main.py and train.sh
    "adabin_resnet20_cifar10": ("adabin_resnet20", "cifar10", 128, (0.1, 0.9, 1e-4, "all"), (400, 0),
                                {"random_crop": {"size": 32, "padding": 4}, "horizontal_flip": True}),
    # Efficient-Computing BinaryNetworks/AdaBin/imagenet/main.py and train.sh
    "adabin_resnet18_imagenet": ("adabin_resnet18", "imagenet", 256, (0.1, 0.9, 1e-5, "all"), (120, 0),
                                 {"random_resized_crop": {"size": 224, "scale": [0.08, 1.0]}, "horizontal_flip": True}),
}


def compose(preset, *extra):
    return last_stage([f"experiment={preset}", "data.root=/nonexistent", *extra])


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_each_recipe_is_its_authors_script(preset):
    model, data, batch, (lr, momentum, wd, rule), (epochs, warmup), train = RECIPES[preset]
    cfg = compose(preset)
    assert cfg.model.name in ("resnet20", "resnet18") and cfg.data.name == data
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(last_stage([f"model={model}"]).model) | \
        {"stem": cfg.data.stem, "width": 1.0}
    assert (cfg.stage.activations, cfg.stage.weights) == ("binary", "binary")  # one fully binary stage
    assert cfg.data.batch_size == batch and [list(cfg.data.mean), list(cfg.data.std)] == list(IMAGENET_MEAN_STD)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay,
            cfg.optimizer.weight_decay_on) == ("sgd", lr, momentum, wd, rule)
    assert not cfg.optimizer.get("nesterov") and cfg.loss.label_smoothing == 0.0
    assert (cfg.schedule.name, cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.min_lr) == \
        ("cosine", epochs, warmup, 0.0)
    assert {k: v for k, v in OmegaConf.to_container(cfg.augment.train).items() if v is not None} == train
    assert not cfg.augment.mixup and not cfg.augment.cutmix


def recu_official_lrs(lr, epochs, warm_up=True):
    """ReCU's main.py, its lr per epoch: a manual warm-up over epochs 0-4 and a
    CosineAnnealingLR(T_max = epochs - 4) stepped after each epoch from epoch 4 on."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "initial_lr": lr}], lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs - warm_up * 4, eta_min=0, last_epoch=-1)
    seen = []
    for epoch in range(epochs):
        if warm_up and epoch < 5:
            for group in optimizer.param_groups:
                group["lr"] = lr * (epoch + 1) / 5
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if epoch >= 4 * warm_up:
            scheduler.step()
    return seen


@pytest.mark.parametrize("epochs", [12, 200, 600])
def test_the_warm_up_cosine_trains_each_epoch_at_recus_lr(epochs):
    cfg = OmegaConf.create({"name": "cosine", "epochs": epochs, "min_lr": 0.0, "warmup_epochs": 5})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = build_scheduler(cfg, optimizer)
    ours = []
    for _ in range(epochs):
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    official = recu_official_lrs(0.1, epochs)
    assert ours == pytest.approx(official, rel=1e-9, abs=1e-15)
    assert ours[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert ours[5] == pytest.approx(0.05 * (1 + math.cos(math.pi / (epochs - 4))))


def test_without_warm_up_the_cosine_is_torchs():
    cfg = OmegaConf.create({"name": "cosine", "epochs": 400, "min_lr": 0.0, "warmup_epochs": 0})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert type(build_scheduler(cfg, optimizer)).__name__ == "CosineAnnealingLR"


def test_recus_weight_decay_takes_the_convs_and_fc_but_not_the_shortcuts_or_bn():
    cfg = compose("recu_resnet18_imagenet", "model.width=0.125")
    model = build_model(cfg.model, num_classes=10, in_channels=3)
    optimizer = build_optimizer(cfg.optimizer, model)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    # What ReCU's `'fc' in name or 'conv' in name` picks out of its own network, in ours.
    expected = {name for name, _ in model.named_parameters()
                if name == "stem.0.weight" or ".convs." in name or name.startswith("classifier.")}
    assert names == expected
    assert any(name.endswith("alpha") for name in names)  # ReCU's alpha is named conv*.alpha there
    assert not any(".shortcut." in name or "norm" in name for name in names)
    assert len(decayed) < len(list(model.parameters()))


def test_a_warm_up_as_long_as_the_stage_is_refused():
    from bnntrain.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule.warmup_epochs"):
        compose("recu_resnet20_cifar10", "schedule.epochs=5")


def tiny_data(preset, tmp_path):
    """The preset's data in its real on-disk format, small: CIFAR-10 pickles or an ImageNet-style
    class folder, with the ImageNet crops shrunk to 32 px."""
    if preset.endswith("cifar10"):
        return [f"data.root={write_cifar10(tmp_path / 'cifar', 40, 20)}"]
    root = write_image_folder(tmp_path / "imagenet", per_class=8, size=40, test_split="val")
    return [f"data.root={root}", "data.image_size=32", "augment.train.random_resized_crop.size=32",
            "augment.test.resize=36", "augment.test.center_crop=32"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_each_recipe_trains_and_exports_or_is_refused(preset, tmp_path):
    """Each recipe on tiny data, in process; IR-Net's through the real command line."""
    from bnntrain.engine import load_checkpoint
    from bnntrain.errors import UserError
    from bnntrain.models import model_from_checkpoint
    from bnntrain.run.pipeline import run
    from bnntrain.tools import export

    run_dir = tmp_path / "run"
    overrides = [f"experiment={preset}", *tiny_data(preset, tmp_path), "data.batch_size=8", "data.num_workers=0",
                 "model.width=0.25", "schedule.epochs=2", "schedule.warmup_epochs=1", "trainer.device=cpu",
                 "trainer.progress=plain"]
    if preset == "irnet_resnet20_cifar10":
        done = run_cli(overrides, run_dir)
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        run(overrides, run_dir)
    assert list(results(run_dir)) == ["stage2"]  # one fully binary stage from scratch
    last = run_dir / "stage2" / "last.pt"
    out = tmp_path / "model.bnn"
    if preset.startswith("adabin"):  # its affine activation sets do not pack into +-1 x +-1
        with pytest.raises(UserError, match="cannot run it as trained$"):
            export.export_checkpoint(last, out)
        return
    export.export_checkpoint(last, out)
    trained = model_from_checkpoint(load_checkpoint(last)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(export.load(out)(x), trained(x), rtol=1e-4, atol=1e-4)
