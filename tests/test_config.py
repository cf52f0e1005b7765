"""The config tree: every group option composes, and the stage presets hold the recipe."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from bnntrain.cli import one_line, quote_stage_choices, task_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "bnntrain" / "configs"


def make(*overrides: str):
    with initialize_config_module("bnntrain.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_stage1_imagenet_recipe():
    cfg = make("stage='1'", "data=imagenet")
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 1e-5
    assert list(cfg.schedule.milestones) == [40, 60, 70] and cfg.schedule.gamma == 0.1 and cfg.schedule.epochs == 75
    assert (cfg.stage.activations, cfg.stage.weights, cfg.stage.color_jitter) == ("binary", "real", True)
    assert cfg.augment.train.color_jitter.brightness == 0.4 and cfg.augment.train.color_jitter.hue == 0.1


def test_stage2_cifar100_recipe():
    cfg = make("stage='2'", "data=cifar100")
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.weight_decay == 0
    assert list(cfg.schedule.milestones) == [150, 250, 320] and cfg.schedule.gamma == 0.2
    assert cfg.schedule.epochs == 350
    assert (cfg.stage.activations, cfg.stage.weights, cfg.stage.color_jitter) == ("binary", "binary", False)
    assert cfg.stage.needs_init


def test_warmup_schedule_is_the_one_stage_recipe():
    cfg = make("stage='2'", "data=imagenet", "schedule=imagenet_warmup")
    assert cfg.optimizer.lr == 4e-3  # the schedule's lr wins over the stage's
    assert cfg.schedule.warmup_epochs == 5 and cfg.schedule.warmup_lr == 1e-3


def test_default_is_two_stage_on_digits():
    cfg = make()
    assert list(cfg.stage.run) == ["1", "2"] and cfg.data.name == "digits"
    for key in ("seed", "init", "resume"):
        assert key in cfg
    assert {"lr", "weight_decay"} <= set(cfg.optimizer) and "epochs" in cfg.schedule
    assert {"root", "batch_size", "num_workers"} <= set(cfg.data)


def test_the_model_stem_follows_the_data():
    assert make("data=imagenet").model.stem == "imagenet"
    assert make("data=cifar100").model.stem == "cifar"


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "schedule", "augment", "stage", "distill",
                                   "experiment"])
def test_every_option_of_every_group_composes(group):
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        choice = path.stem if not path.stem.isdigit() else f"'{path.stem}'"
        cfg = make(f"{group}={choice}")
        assert cfg is not None


def test_stage_choices_are_quoted_for_hydra():
    assert quote_stage_choices(["stage=1", "data=imagenet"]) == ["stage='1'", "data=imagenet"]
    assert quote_stage_choices(["stage=1,2"]) == ["stage='1','2'"]
    assert quote_stage_choices(["stage=two_stage", "stage.weights=binary"]) == ["stage=two_stage", "stage.weights=binary"]


def test_task_overrides_skip_flags_and_hydra_keys():
    assert task_overrides(["data=imagenet", "--cfg", "job", "hydra.run.dir=x"]) == ["data=imagenet"]
    assert task_overrides(["-m", "optimizer.lr=1e-3,2e-3"]) is None


def test_one_line_lists_the_available_options():
    msg = "In 'config': Could not find 'data/nope'\n\nAvailable options in 'data':\n\ta\n\tb\nConfig search path:\n\tx"
    assert one_line(msg) == "In 'config': Could not find 'data/nope' Available options in 'data': a, b"


def test_experiment_presets_encode_their_recipes():
    cifar = make("experiment=cifar100_two_stage")
    assert (cifar.data.name, cifar.schedule.epochs, cifar.augment.mixup) == ("cifar100", 350, 0.2)
    assert list(cifar.stage.run) == ["1", "2"] and cifar.model.quantizer == "ste_sign"
    inet = make("experiment=imagenet_two_stage")
    assert (inet.data.name, inet.schedule.epochs, inet.loss.label_smoothing) == ("imagenet", 75, 0.1)
    assert (inet.model.quantizer, inet.model.skip, inet.model.downsample) == ("approx_sign", "double", "v1")
    assert inet.augment.train.color_jitter.brightness == 0.4
    kd = make("experiment=imagenet_kd")
    assert kd.distill.kd_weight == 1.0 and kd.loss.label_smoothing == 0.1 and kd.data.name == "imagenet"
    one = make("experiment=imagenet_one_stage")
    assert (one.stage.weights, one.stage.needs_init, one.optimizer.lr, one.schedule.warmup_lr) == \
        ("binary", False, 4e-3, 1e-3)
    quick = make("experiment=cifar10_folder_quick")
    assert (quick.data.name, quick.data.train_limit, quick.model.width) == ("folder", 5000, 0.25)
    assert make().data.name == "digits" and make("data=imagenet").data.name == "imagenet"  # CLI beats the preset
