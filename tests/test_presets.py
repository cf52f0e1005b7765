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
BNEXT_SCHEDULE = {"name": "timm_cosine", "epochs": 512, "warmup_epochs": 5, "warmup_lr": 1e-5, "min_lr": 1e-7}

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
    # AdamBNN's step1/ and step2/ run.sh: lr 1.25e-3, weight decay 5e-6 then 0, 256 epochs each.
    "adambnn_reactnet_a": ([], 0.0, {"stage1": (1.25e-3, 5e-6), "stage2": (1.25e-3, 0.0)},
                           {"name": "linear", "epochs": 256}),
    # The method papers' recipes: SGD, one stage (every value in test_paper_recipes.py).
    # IR-Net's trainer.py: lr 0.1, weight decay 1e-4, cosine over 400 epochs.
    "irnet_resnet20_cifar10": ([], 0.0, {"stage2": ("sgd", 0.1, 1e-4)}, {"name": "cosine", "epochs": 400}),
    # ReCU's cifar/run.sh: lr 0.1, weight decay 5e-4, 600 epochs, 5 warm-up; imagenet/run.sh: 1e-4, 200.
    "recu_resnet20_cifar10": ([], 0.0, {"stage2": ("sgd", 0.1, 5e-4)},
                              {"name": "cosine", "epochs": 600, "warmup_epochs": 5}),
    "recu_resnet18_imagenet": ([], 0.0, {"stage2": ("sgd", 0.1, 1e-4)},
                               {"name": "cosine", "epochs": 200, "warmup_epochs": 5}),
    # AdaBin's cifar10/main.py: lr 0.1, weight decay 1e-4, 400 epochs; imagenet/main.py: 1e-5, 120.
    "adabin_resnet20_cifar10": ([], 0.0, {"stage2": ("sgd", 0.1, 1e-4)}, {"name": "cosine", "epochs": 400}),
    "adabin_resnet18_imagenet": ([], 0.0, {"stage2": ("sgd", 0.1, 1e-5)}, {"name": "cosine", "epochs": 120}),
    # BNext's src/script/BNext-*/run_*.sh with src/train_assistant_group_amp.py: AdamW lr 1e-3, weight
    # decay 1e-8 (1e-3 on the rest), timm's cosine after 5 warm-up epochs from 1e-5, 512 epochs, only
    # the teachers' loss (every value in test_bnext_recipe.py).
    **{f"bnext_{size}_paper": ([], 0.0, {"stage2": ("adamw", 1e-3, 1e-8)}, BNEXT_SCHEDULE)
       for size in ("tiny", "small", "middle", "large")},
    # larq-zoo's sota_experiments.py TrainQuickNet{Small,,Large}: SGD's peak lr 0.1 (Adam's 1e-2 on the binary
    # kernels), no weight decay, 600 epochs, cosine per step after 5 warm-up epochs (every value in
    # test_quicknet_recipe.py).
    **{f"quicknet{size}_paper": ([], 0.0, {"stage2": ("case", 0.1, 0.0)},
                                 {"name": "cosine_per_step", "epochs": 600, "warmup_epochs": 5})
       for size in ("_small", "", "_large")},
    # larq-zoo's multi_stage_experiments.py TrainR2BBFP, TrainR2BBAN, TrainR2BBNN: Adam 1e-3, 1e-3, 2e-4;
    # Keras's l2(1e-5) in the first two (weight decay 2e-5 on larq-zoo's loss, 5e-6 on ours, a quarter of
    # it); 75 epochs, x0.3 at 40/60/70 after 5 warm-up epochs (every value in test_real_to_binary_recipe.py).
    "real_to_binary_paper": ([], 0.0, {"stage0": (1e-3, 5e-6), "stage1": (1e-3, 5e-6), "stage2": (2e-4, 0.0)},
                             {"name": "multistep", "epochs": 75, "milestones": [40, 60, 70], "gamma": 0.3,
                              "warmup_epochs": 5}),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_trains_with_the_recipe_its_source_states(preset):
    extra, label_smoothing, optimizer, schedule = PRESETS[preset]
    stages = plan([f"experiment={preset}", *extra], check_init=False)
    assert [cfg.stage.name for cfg in stages] == list(optimizer)
    for cfg in stages:
        assert cfg.loss.label_smoothing == label_smoothing, cfg.stage.name
        expected = optimizer[cfg.stage.name]  # (lr, weight decay) for Adam, else (name, lr, weight decay)
        assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == \
            (expected if len(expected) == 3 else ("adam", *expected)), cfg.stage.name
        assert {key: cfg.schedule.get(key) for key in schedule} == schedule, cfg.stage.name


def test_every_named_preset_is_pinned():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bnntrain" / "configs" / "experiment"
    named = {path.stem for path in folder.glob("*.yaml")} - {"ablation"}  # ablation is a sweep over the default
    assert named == set(PRESETS)
