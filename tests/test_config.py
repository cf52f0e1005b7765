"""The config tree: every group option composes, and the stage presets hold the recipe."""
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from bnntrain.run.config import compose, last_stage, normalize, one_line, plan, task_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "bnntrain" / "configs"


def make(*overrides: str):
    """The config of the (last) stage these overrides describe, as it trains. A stage that
    starts from a checkpoint gets this file as its init: composing loads nothing."""
    extra = [] if any(o.startswith("init=") for o in overrides) else [f"init={__file__}"]
    return last_stage([*overrides, *extra])


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
    cfg = make("experiment=imagenet_one_stage")
    assert cfg.optimizer.lr == 4e-3  # the one-stage recipe's lr, stated by the experiment
    assert cfg.schedule.warmup_epochs == 5 and cfg.schedule.warmup_lr == 1e-3


def test_default_is_two_stage_on_digits():
    assert list(compose([]).stage.run) == ["1", "2"]
    cfg = make()
    assert cfg.data.name == "digits"
    for key in ("seed", "init", "resume"):
        assert key in cfg
    assert {"lr", "weight_decay"} <= set(cfg.optimizer) and "epochs" in cfg.schedule
    assert {"root", "batch_size", "num_workers"} <= set(cfg.data)


def test_the_model_stem_follows_the_data():
    assert make("data=imagenet").model.stem == "imagenet"
    assert make("data=cifar100").model.stem == "cifar"


# What some options need before they describe a run: values no recipe states for them, a teacher.
NEEDS = {"optimizer=sgd": ["optimizer.lr=0.1", "optimizer.weight_decay=1e-4"],
         "optimizer=adamw": ["optimizer.lr=1e-3", "optimizer.weight_decay=1e-2"],
         # Bop trains binary weights: a fully binary stage (stage 1's are real, refused)
         "optimizer=bop": ["stage=2", "optimizer.lr=1e-2", "optimizer.weight_decay=0"],
         "distill": ["distill.teacher.torchvision=resnet18", f"distill.teacher.weights={__file__}"],
         "experiment=imagenet_kd": ["distill.teacher.torchvision=resnet34", f"distill.teacher.weights={__file__}"]}


@pytest.mark.slow  # every option of a group composed and checked: seconds per group
@pytest.mark.parametrize("group", ["model", "data", "optimizer", "schedule", "augment", "stage", "distill",
                                   "experiment"])
def test_every_option_of_every_group_composes(group):
    """Every option plans into stages whose every value is resolved and checked, with an lr
    and weight decay for the optimizer it trains with."""
    for path in sorted((CONFIGS / group).glob("[!_]*.yaml")):  # _base.yaml is no option
        choice = f"{group}={path.stem}"
        extra = NEEDS.get(choice, NEEDS.get(group, []) if group == "distill" else [])
        if group == "schedule" and path.stem == "imagenet_warmup":
            extra = ["optimizer.lr=4e-3"]  # the warm-up leads up to an lr above its own
        stages = plan([choice, *extra, f"init={__file__}"])
        for cfg in stages:
            assert "${" not in OmegaConf.to_yaml(cfg), choice
            assert cfg.optimizer.lr > 0 and cfg.optimizer.weight_decay >= 0, choice
            assert "recipe" not in cfg.stage and "stages" not in cfg, choice


def test_stage_choices_are_quoted_for_hydra():
    assert normalize(["stage=1", "data=imagenet"]) == ["stage='1'", "data=imagenet"]
    assert normalize(["stage=1,2"]) == ["stage='1','2'"]
    assert normalize(["stage=two_stage", "stage.weights=binary"]) == ["stage=two_stage", "stage.weights=binary"]
    assert normalize(["stages.stage2.optimizer.lr=1"]) == ["++stages.stage2.optimizer.lr=1"]


def test_task_overrides_skip_flags_and_hydra_keys():
    assert task_overrides(["data=imagenet", "--cfg", "job", "hydra.run.dir=x"]) == ["data=imagenet"]
    assert task_overrides(["-m", "optimizer.lr=1e-3,2e-3"]) is None


def test_one_line_lists_the_available_options():
    msg = "In 'config': Could not find 'data/nope'\n\nAvailable options in 'data':\n\ta\n\tb\nConfig search path:\n\tx"
    assert one_line(msg) == "In 'config': Could not find 'data/nope' Available options in 'data': a, b"
    assert one_line(msg.replace("\ta\n", "\t_base\n\ta\n")).endswith("'data': a, b")  # a base is no option


@pytest.mark.slow
def test_experiment_presets_encode_their_recipes():
    cifar = make("experiment=cifar100_two_stage")
    assert (cifar.data.name, cifar.schedule.epochs, cifar.augment.mixup) == ("cifar100", 350, 0.2)
    assert list(compose(["experiment=cifar100_two_stage"]).stage.run) == ["1", "2"]
    assert cifar.model.input_quantizer.name == "ste_sign"
    inet1, inet = plan(["experiment=imagenet_two_stage"])
    assert (inet.data.name, inet.schedule.epochs, inet.loss.label_smoothing) == ("imagenet", 75, 0.1)
    assert (inet.model.input_quantizer.name, inet.model.skip, inet.model.downsample) == ("approx_sign", "double", "v1")
    assert inet1.augment.train.color_jitter.brightness == 0.4
    assert inet.augment.train.color_jitter is None  # stage 2 trains without it, and its config says so
    kd = make("experiment=imagenet_kd", *NEEDS["experiment=imagenet_kd"])
    assert kd.distill.kd_weight == 1.0 and kd.loss.label_smoothing == 0.1 and kd.data.name == "imagenet"
    one = make("experiment=imagenet_one_stage")
    assert (one.stage.weights, one.stage.needs_init, one.optimizer.lr, one.schedule.warmup_lr) == \
        ("binary", False, 4e-3, 1e-3)
    quick = make("experiment=cifar10_folder_quick")
    assert (quick.data.name, quick.data.train_limit, quick.model.width) == ("folder", 5000, 0.25)
    assert make().data.name == "digits" and make("data=imagenet").data.name == "imagenet"  # CLI beats the preset


def flat(node, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty mapping stays a value."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ABLATIONS = sorted(path.stem for path in (CONFIGS / "ablation").glob("*.yaml"))


def test_the_ablation_sweep_lists_every_toggle():
    preset = yaml.safe_load((CONFIGS / "experiment" / "ablation.yaml").read_text())
    listed = preset["hydra"]["sweeper"]["params"]["+ablation"].split(",")
    assert listed[0] == "baseline" and sorted(listed) == ABLATIONS and len(ABLATIONS) == 13


@pytest.fixture(scope="module")
def baseline_stages():
    stages = [flat(OmegaConf.to_container(cfg)) for cfg in plan(["+ablation=baseline", f"init={__file__}"])]
    plain = [flat(OmegaConf.to_container(cfg)) for cfg in plan([f"init={__file__}"])]
    assert stages == plain  # the baseline is the preset as it is
    return stages


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_toggle_changes_exactly_what_its_file_says(name, baseline_stages):
    says = flat(yaml.safe_load((CONFIGS / "ablation" / f"{name}.yaml").read_text()) or {})
    assert bool(says) == (name != "baseline")
    toggled = [flat(OmegaConf.to_container(cfg)) for cfg in plan([f"+ablation={name}", f"init={__file__}"])]
    assert [cfg["stage.name"] for cfg in toggled] == ["stage1", "stage2"]
    for base, cfg in zip(baseline_stages, toggled):
        assert set(cfg) == set(base), name
        changed = {key: cfg[key] for key in cfg if cfg[key] != base[key]}
        assert changed == says, name  # in every stage of the pipeline, and nothing else
