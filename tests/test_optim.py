"""Optimizer and lr schedules: the recipe's numbers, epoch by epoch."""
import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.run.config import compose, plan
from bnntrain.errors import ConfigError
from bnntrain.optim import build_optimizer, build_scheduler


def adam(**values):
    """The adam preset (configs/optimizer/adam.yaml) with these values."""
    return OmegaConf.merge(compose([]).optimizer, values)


def lrs(schedule: dict, lr: float, epochs: int) -> list[float]:
    opt = build_optimizer(adam(lr=lr, weight_decay=0.0), torch.nn.Linear(1, 1))
    sched = build_scheduler(OmegaConf.create(schedule), opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_adam_with_default_betas_and_weight_decay():
    opt = build_optimizer(adam(lr=2e-4, weight_decay=1e-5), torch.nn.Linear(1, 1))
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-4, 1e-5, (0.9, 0.999))


def test_imagenet_step_decay():
    got = lrs({"name": "multistep", "epochs": 75, "milestones": [40, 60, 70], "gamma": 0.1}, 1e-3, 75)
    assert got[39] == pytest.approx(1e-3) and got[40] == pytest.approx(1e-4)
    assert got[60] == pytest.approx(1e-5) and got[74] == pytest.approx(1e-6)


def test_cifar100_step_decay():
    got = lrs({"name": "multistep", "epochs": 350, "milestones": [150, 250, 320], "gamma": 0.2}, 2e-4, 350)
    assert got[149] == pytest.approx(2e-4) and got[150] == pytest.approx(4e-5)
    assert got[250] == pytest.approx(8e-6) and got[349] == pytest.approx(1.6e-6)


def test_one_stage_warmup_then_step_decay():
    got = lrs({"name": "multistep", "epochs": 75, "milestones": [40, 60, 70], "gamma": 0.1,
               "warmup_epochs": 5, "warmup_lr": 1e-3}, 4e-3, 75)
    assert got[:5] == pytest.approx([1e-3] * 5)
    assert got[5] == pytest.approx(4e-3) and got[39] == pytest.approx(4e-3)
    assert got[40] == pytest.approx(4e-4) and got[70] == pytest.approx(4e-6)


@pytest.mark.parametrize("bad, words", [
    (["schedule.epochs=30"], "past the last epoch"),
    (["schedule.epochs=0"], "schedule.epochs must be a whole number >= 1"),
    (["+schedule.warmup_epochs=2"], "warmup_lr"),
])
def test_invalid_schedules_are_rejected(bad, words):
    with pytest.raises(ConfigError, match=words):
        plan(["stage=1", "schedule=imagenet", *bad])
