"""What a run does, seen from inside it: tiny real runs of the pipeline (bnntrain.run.pipeline.run,
what the CLI calls) with spies on the objects each stage builds, and tiny runs whose
checkpoints and logs show the effect of an option."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import bnntrain.engine.build as stage_module
from bnntrain.run import pipeline
from bnntrain.losses import kd_loss
from bnntrain.models import model_from_checkpoint
from conftest import TINY, results
from test_cli import assert_same_weights
from test_config import CONFIGS


class RunSpy:
    """Wraps the builders `train_stage` calls and records, per stage, the objects built and
    what every training step saw, without changing what the run computes."""

    def __init__(self, monkeypatch):
        self.stages = {}
        self.current = None
        real_objective = stage_module.build_objective
        real_optimizer = stage_module.build_optimizer
        real_teacher = stage_module.build_teacher

        def build_teacher(cfg, init, num_classes):
            teacher = real_teacher(cfg, init, num_classes)
            self.teacher_built = (teacher, {k: v.clone() for k, v in teacher.state_dict().items()}, init)
            return teacher

        def build_objective(cfg, model, num_classes, teacher, assistants=None):
            objective = real_objective(cfg, model, num_classes, teacher, assistants)
            self.current = record = {"cfg": cfg, "model": model, "objective": objective, "steps": [],
                                     "initial": {k: v.clone() for k, v in objective.state_dict().items()},
                                     "teacher": teacher}
            self.stages[cfg.stage.name] = record
            seen = {}
            model.register_forward_hook(lambda m, args, out: seen.__setitem__("logits", out))
            model.classifier.register_forward_pre_hook(lambda m, args: seen.__setitem__("features", args[0]))
            forward = objective.forward

            def recording(net, images, targets):
                loss = forward(net, images, targets)
                step = {"images": images.detach().clone(), "targets": targets.detach().clone(),
                        "logits": seen["logits"].detach().clone(), "features": seen["features"].detach().clone(),
                        "loss": loss.detach().clone()}
                if objective.center is not None:
                    step["centers"] = objective.center.centers.detach().clone()
                if teacher is not None:
                    with torch.no_grad():
                        step["teacher_logits"] = teacher(images)
                record["steps"].append(step)
                return loss

            objective.forward = recording  # an instance attribute: nn.Module.__call__ finds it first
            return objective

        def build_optimizer(cfg, model, extra=()):
            optimizer = real_optimizer(cfg, model, extra)
            record = self.current
            record["optimizer"] = optimizer
            record["raw_grad_means"], record["grad_means"] = [], []
            weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

            def channel_mean(grad):
                return grad.mean(dim=tuple(range(1, grad.dim()))).abs().max().item()

            for w in weights:  # the gradient as backward left it, before any step hook
                w.register_post_accumulate_grad_hook(lambda p: record["raw_grad_means"].append(channel_mean(p.grad)))
            # Registered after the optimizer's own hooks: sees the gradients the step uses.
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: record["grad_means"].append(
                max(channel_mean(w.grad) for w in weights if w.grad is not None)))
            return optimizer

        monkeypatch.setattr(stage_module, "build_objective", build_objective)
        monkeypatch.setattr(stage_module, "build_optimizer", build_optimizer)
        monkeypatch.setattr(stage_module, "build_teacher", build_teacher)


def no_decay_on_norm_and_bias() -> str:
    """The override that exempts BN, PReLU and biases from weight decay: its ablation toggle's."""
    toggle = yaml.safe_load((CONFIGS / "ablation" / "no_decay_norm_bias.yaml").read_text())
    ((key, value),) = toggle["optimizer"].items()
    return f"optimizer.{key}={str(value).lower()}"


def run_pipeline(tmp_path, monkeypatch, *overrides):
    spy = RunSpy(monkeypatch)
    run = tmp_path / "run"
    pipeline.run(TINY + list(overrides), run)
    return spy, run


def test_each_recipe_option_acts_on_the_training_steps(tmp_path, monkeypatch):
    spy, run = run_pipeline(tmp_path, monkeypatch, "augment.mixup=0.2", "augment.cutmix=1.0",
                            "loss.label_smoothing=0.1", "loss.center.weight=0.01",
                            "optimizer.gradient_centralization=true", no_decay_on_norm_and_bias())
    s1, s2 = spy.stages["stage1"], spy.stages["stage2"]
    assert len(s1["steps"]) == len(s2["steps"]) == 4  # 64 images in batches of 16

    # MixUp / CutMix: every training batch has class-probability targets, and batches are mixed.
    steps = s1["steps"] + s2["steps"]
    assert all(s["targets"].shape == (16, 10) for s in steps)
    assert all(torch.allclose(s["targets"].sum(1), torch.ones(16)) for s in steps)
    mixed = sum(int((s["targets"].max(1).values < 0.999).any()) for s in steps)
    assert mixed >= 4, mixed
    for s in steps:  # each row lam of its own class and 1 - lam of its partner's, one lam per batch
        weights = s["targets"][s["targets"] > 1e-6]
        parts = weights[weights < 1 - 1e-6].unique()
        assert (s["targets"] > 1e-6).sum(1).max() <= 2 and len(parts) <= 2, s["targets"]
        assert len(parts) < 2 or abs(parts.sum().item() - 1) < 1e-5, parts

    # Label smoothing 0.1 in both stages, and the centre loss (weight 0.01) in stage 2 only:
    # each step's loss is exactly that sum, which plain cross-entropy is not.
    assert s1["objective"].center is None and s1["initial"] == {}
    for name, record in (("stage1", s1), ("stage2", s2)):
        for s in record["steps"]:
            expected = F.cross_entropy(s["logits"], s["targets"], label_smoothing=0.1)
            plain = F.cross_entropy(s["logits"], s["targets"])
            if name == "stage2":
                centre = s["centers"][s["targets"].argmax(1)]
                expected = expected + 0.01 * 0.5 * (s["features"] - centre).pow(2).sum(1).mean()
                plain = plain + 0.01 * 0.5 * (s["features"] - centre).pow(2).sum(1).mean()
            assert s["loss"].item() == pytest.approx(expected.item(), rel=1e-5), name
            # Without the smoothing the loss would differ by far more than that tolerance (measured:
            # 2e-3 to 2e-2 on losses of about 2.3).
            assert abs(s["loss"].item() - plain.item()) > 20 * 1e-5 * s["loss"].item(), name

    # The centres were trained: they moved from where they started, and the checkpoint holds them.
    initial = s2["initial"]["center.centers"]
    final = s2["objective"].center.centers.detach()
    assert initial.shape == (10, 64) and (final - initial).abs().max() > 1e-4
    saved = torch.load(run / "stage2/last.pt", weights_only=True)["objective"]["center.centers"]
    assert torch.equal(saved, final)

    # Gradient centralization: what the optimizer steps on has zero mean per output channel,
    # though backward's own gradients do not.
    for record in (s1, s2):
        assert len(record["grad_means"]) == 4
        assert max(record["raw_grad_means"]) > 1e-4
        assert max(record["grad_means"]) < 1e-6 * max(record["raw_grad_means"]) + 1e-9

    # No weight decay on BN, PReLU and biases: the exempt group holds exactly those, at 0.
    for record, decay in ((s1, 1e-5), (s2, 0.0)):
        model, groups = record["model"], record["optimizer"].param_groups
        exempt = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                  if isinstance(m, (nn.BatchNorm2d, nn.PReLU)) or n == "bias"}
        weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        assert exempt and exempt | weights == {id(p) for p in model.parameters()} and not exempt & weights
        assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (decay, 0.0)
        assert {id(p) for p in groups[0]["params"]} == weights
        assert {id(p) for p in groups[1]["params"]} == exempt
    assert len(s1["optimizer"].param_groups) == 2
    centres_group = s2["optimizer"].param_groups[2]
    assert centres_group["weight_decay"] == 0.0 and [id(p) for p in centres_group["params"]] == \
        [id(s2["objective"].center.centers)]


def test_label_refinery_learns_from_stage_one_and_keeps_it_frozen(tmp_path, monkeypatch):
    spy, run = run_pipeline(tmp_path, monkeypatch, "distill=refinery")
    s1, s2 = spy.stages["stage1"], spy.stages["stage2"]
    assert s1["teacher"] is None and s2["teacher"] is not None
    teacher, before, init = spy.teacher_built
    assert teacher is s2["teacher"] and init == str(run / "stage1/last.pt")

    # The teacher is the model stage 1 ended with, at stage 1's precision.
    stage1 = model_from_checkpoint(torch.load(run / "stage1/last.pt", weights_only=True)).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), stage1(x), atol=1e-5)

    # kd_weight 1, temperature 1: each stage-2 step's loss is the KL to the teacher alone.
    assert len(s2["steps"]) == 4
    for s in s2["steps"]:
        assert s["loss"].item() == pytest.approx(kd_loss(s["logits"], s["teacher_logits"], 1.0).item(), rel=1e-5)
        assert s["loss"].item() != pytest.approx(F.cross_entropy(s["logits"], s["targets"]).item(), rel=1e-3)

    # Frozen: no gradients, eval mode throughout (BN statistics untouched), weights as loaded.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert any("running_mean" in k for k in before)


def test_a_pipeline_hands_stage_one_weights_to_stage_two(tmp_path, monkeypatch):
    # With an lr of 1e-12, stage 2 ends where it started: its weights show where that was.
    _, run = run_pipeline(tmp_path, monkeypatch, "stages.stage2.optimizer.lr=1e-12")
    s1 = torch.load(run / "stage1/last.pt", weights_only=True)
    s2 = torch.load(run / "stage2/last.pt", weights_only=True)
    assert s2["optimizer"]["param_groups"][0]["initial_lr"] == 1e-12
    assert_same_weights(s1["model"], s2["model"])


def fp16_autocast_works_on_this_cpu():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))
        return out.dtype == torch.float16
    except (RuntimeError, TypeError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("amp", [None, "fp16"])
def test_accumulation_and_clipping_take_one_step_per_window(tmp_path, amp):
    if amp == "fp16" and not fp16_autocast_works_on_this_cpu():
        pytest.skip("fp16 autocast does not run on this CPU")
    run = tmp_path / "run"
    extra = [f"trainer.amp={amp}"] if amp else []
    pipeline.run(TINY + ["stage=1", "schedule.epochs=2", "trainer.accumulate=3", "trainer.grad_clip=0.5",
                         "trainer.log_every=1", *extra], run)
    ckpt = torch.load(run / "stage1/last.pt", weights_only=True)
    # 4 batches an epoch in windows of 3: a full window and the epoch's last, shorter one.
    assert ckpt["trainer"]["step"] == 2 * math.ceil(4 / 3)
    assert ("scale" in ckpt["trainer"]["scaler"]) == (amp == "fp16")  # fp16 brings its gradient scaler
    events = EventAccumulator(str(run / "stage1"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]  # logged once per optimizer step
    assert all(math.isfinite(e.value) for e in losses + events.Scalars("train/epoch_loss"))
    assert math.isfinite(results(run)["stage1"]["loss"])

