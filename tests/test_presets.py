"""Each named preset (experiment/) composes, through the real Hydra compose, into the recipe its
source states: label smoothing, lr, weight decay, epochs and schedule of every stage. The values
are written here, each with its source, rather than read from the preset under test."""
import pytest

from bnntrain.run.config import plan

TEACHER = ["distill.teacher.torchvision=resnet34", "distill.teacher.weights=IMAGENET1K_V1"]

# The training-tricks collection: Adam at 1e-3 / 2e-4 (tricks 7, 8), weight decay 1e-5 / 0 (trick 6).
TRICKS_STAGES = {"stage1": (1e-3, 1e-5), "stage2": (2e-4, 0.0)}
IMAGENET_STEPS = {"name": "multistep", "epochs": 75, "milestones": [40, 60, 70], "gamma": 0.1}  # trick 8
CIFAR100_STEPS = {"name": "multistep", "epochs": 350, "milestones": [150, 250, 320], "gamma": 0.2}  # trick 8
# ReActNet's run.sh (resnet/1_step1, 2_step2): lr 2.5e-3 both steps, weight decay 1e-5 then 0, 128 epochs.
REACTNET_SCHEDULE = {"name": "linear", "epochs": 128}

# preset: (extra overrides, label smoothing, {stage: (lr, weight decay)}, schedule)
PRESETS = {
    # The default run: the collection's stage recipes, ten cosine epochs on the digits.
    "digits_quick": ([], 0.0, TRICKS_STAGES, {"name": "cosine", "epochs": 10}),
    # The collection's CIFAR-100 recipe: no label smoothing, 350 epochs, x0.2 at 150/250/320.
    "cifar100_two_stage": ([], 0.0, TRICKS_STAGES, CIFAR100_STEPS),
    "cifar10_folder_quick": ([], 0.0, TRICKS_STAGES, {"name": "cosine", "epochs": 4}),
    # The collection's two-stage ImageNet recipe: label smoothing 0.1 (trick 14), 75 epochs.
    "imagenet_two_stage": ([], 0.1, TRICKS_STAGES, IMAGENET_STEPS),
    "imagenet_kd": (TEACHER, 0.1, TRICKS_STAGES, IMAGENET_STEPS),
    # The collection's one-stage recipe (trick 8): Adam 4e-3 after 5 warm-up epochs at 1e-3, no
    # weight decay, label smoothing 0.1 (trick 14).
    "imagenet_one_stage": ([], 0.1, {"stage2": (4e-3, 0.0)},
                           {**IMAGENET_STEPS, "warmup_epochs": 5, "warmup_lr": 1e-3}),
    # Bi-Real Net's PyTorch train.py/run.sh: Adam 1e-3, weight decay 0, label smoothing 0.1,
    # linear decay over 256 epochs.
    "birealnet18_paper": ([], 0.1, {"stage2": (1e-3, 0.0)}, {"name": "linear", "epochs": 256}),
    # ReActNet: the distribution loss alone, no label smoothing.
    "reactnet18_paper": ([], 0.0, {"stage1": (2.5e-3, 1e-5), "stage2": (2.5e-3, 0.0)}, REACTNET_SCHEDULE),
    # ReActNet's mobilenet/ run.sh: lr 1.25e-3.
    "reactnet_a_paper": ([], 0.0, {"stage1": (1.25e-3, 1e-5), "stage2": (1.25e-3, 0.0)}, REACTNET_SCHEDULE),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_trains_with_the_recipe_its_source_states(preset):
    extra, label_smoothing, optimizer, schedule = PRESETS[preset]
    stages = plan([f"experiment={preset}", *extra], check_init=False)
    assert [cfg.stage.name for cfg in stages] == list(optimizer)
    for cfg in stages:
        assert cfg.loss.label_smoothing == label_smoothing, cfg.stage.name
        assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == \
            ("adam", *optimizer[cfg.stage.name]), cfg.stage.name
        assert {key: cfg.schedule.get(key) for key in schedule} == schedule, cfg.stage.name


def test_every_named_preset_is_pinned():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bnntrain" / "configs" / "experiment"
    named = {path.stem for path in folder.glob("*.yaml")} - {"ablation"}  # ablation is a sweep over the default
    assert named == set(PRESETS)
