"""The stage loop's hooks: quantizer schedules, and each hook's state carried by the
checkpoint across a resume, also from a checkpoint written before hooks kept any."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import bnntrain.engine.stage
from bnntrain.engine import layout
from bnntrain.engine.hooks import Hook, QuantizerSchedule
from bnntrain.engine.stage import train_stage
from test_config import make

FIXTURE = Path(__file__).parent / "fixtures" / "reactnet18_w0.0625_v0.1.pt"  # stage 2 after 1 epoch, by 0.1.0


class Scheduled(nn.Module):
    """A module whose behaviour follows the stage's progress, as a scheduled quantizer's does."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def set_progress(self, fraction: float) -> None:
        self.seen.append(fraction)


def test_scheduled_modules_learn_the_fraction_of_the_stage_done_at_each_epoch():
    model = nn.Sequential(nn.Linear(2, 2), Scheduled(), nn.Sequential(nn.ReLU(), Scheduled()))
    run = SimpleNamespace(parts=SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
                          epochs=4)
    hook = QuantizerSchedule()
    hook.before_stage(run)
    for epoch in (2, 3):  # a stage resumed after two of its four epochs
        hook.before_epoch(run, epoch)
    assert [m.seen for m in model.modules() if isinstance(m, Scheduled)] == [[0.5, 0.75], [0.5, 0.75]]


class EpochCount(Hook):
    """A hook with state: the epochs it has seen, across resumes."""
    name = "count"

    def __init__(self) -> None:
        self.epochs, self.loaded = 0, None

    def after_epoch(self, run, epoch):
        self.epochs += 1

    def state_dict(self):
        return {"epochs": self.epochs} if self.epochs else {}

    def load_state_dict(self, state):
        self.loaded = state
        self.epochs = state.get("epochs", 0)


def test_a_hook_keeps_its_state_across_resumes_from_a_checkpoint_that_had_none(tmp_path, monkeypatch):
    counts, stage_hooks = [], bnntrain.engine.stage.stage_hooks

    def with_count(cfg):
        counts.append(EpochCount())
        return [counts[-1], *stage_hooks(cfg)]  # before the checkpoint is written
    monkeypatch.setattr(bnntrain.engine.stage, "stage_hooks", with_count)
    shutil.copy(FIXTURE, tmp_path / "old.pt")
    old = torch.load(FIXTURE, weights_only=True)
    assert "hooks" not in old and layout.hook_state(old, "count") == {}

    def resume(path, epochs):
        cfg = make("stage=2", "model=reactnet18", "model.width=0.0625", f"schedule.epochs={epochs}",
                   "trainer.device=cpu", "trainer.progress=plain")
        train_stage(cfg, tmp_path / "stage2", resume=path)
        return torch.load(tmp_path / "stage2/last.pt", weights_only=True)

    second = resume(tmp_path / "old.pt", 2)  # the checkpoint of 0.1.0 resumes: its second epoch
    assert counts[0].loaded == {} and second["hooks"]["count"] == {"epochs": 1}
    assert second["epoch"] == 2 and second["trainer"]["step"] > old["trainer"]["step"]
    shutil.copy(tmp_path / "stage2/last.pt", tmp_path / "second.pt")
    third = resume(tmp_path / "second.pt", 3)
    assert counts[1].loaded == {"epochs": 1} and third["hooks"]["count"] == {"epochs": 2}
