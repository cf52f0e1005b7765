"""Stage 0 (real-valued pre-training) and short real training runs of the named presets."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.run import pipeline
from bnntrain.tools import summary
from bnntrain.engine import Trainer
from bnntrain.engine.hooks import activations_at
from conftest import TINY, results, run_cli


@pytest.fixture
def epoch_starts(monkeypatch):
    """The weights every `Trainer.train_epoch` call starts from, in call order."""
    starts, train_epoch = [], Trainer.train_epoch

    def spy(self, *args, **kwargs):
        starts.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return train_epoch(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "train_epoch", spy)
    return starts


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_stage0_switches_from_leaky_clip_to_clamp_half_way():
    stage = OmegaConf.create({"activations": "leaky_clip", "switch": {"at": 0.5, "activations": "clamp"}})
    assert [activations_at(stage, e, 4) for e in range(4)] == ["leaky_clip", "leaky_clip", "clamp", "clamp"]
    assert activations_at(OmegaConf.create({"activations": "binary"}), 3, 4) == "binary"


@pytest.mark.slow
def test_three_stage_pipeline_hands_weights_along_and_reports_each_precision(tmp_path, capsys, epoch_starts):
    run = tmp_path / "run"
    pipeline.run(TINY + ["stage=three_stage", "schedule.epochs=2"], run)
    assert list(results(run)) == ["stage0", "stage1", "stage2"]
    s0, s1 = (torch.load(run / f"stage{i}/last.pt", weights_only=True) for i in (0, 1))
    assert s0["config"]["stage"]["activations"] == "leaky_clip" and s0["config"]["stage"]["weights"] == "real"
    assert s0["precision"] == {"activations": "clamp", "weights": "real"}  # its second half: clamp
    assert s1["init_from"] == str(run / "stage0/last.pt")
    # Two epochs a stage: stage 1's first epoch starts from stage 0's last weights, stage 2's from stage 1's.
    assert len(epoch_starts) == 6
    assert_same_tensors(epoch_starts[2], s0["model"])
    assert_same_tensors(epoch_starts[4], s1["model"])
    check_summaries(run, capsys)


def summary_of(path, capsys):
    """`python -m bnntrain.tools.summary ckpt=PATH`: its title line and the rows of binary layers."""
    summary.main([f"ckpt={path}"])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if "BinaryConv2d" in line]
    return text.splitlines()[0], rows, text


def check_summaries(run, capsys):
    """What `bnntrain.tools.summary` reports of each stage's checkpoint."""
    # Stage 0 ends after its switch: clamp activations, real weights; nothing binary, no BOPs.
    title, rows, text = summary_of(run / "stage0/last.pt", capsys)
    assert title.endswith("stage0; clamp activations, real weights; input 3x16x16")
    assert len(rows) == 16 and all((r[2], r[3]) == ("32", "32") and r[5] == r[7] == "0" for r in rows)
    assert "BOPs 0 " in text and "parameters: 0 binary" in text
    # Stage 1: binary activations into real weights. Still no binary MACs: BOPs need both binary.
    title, rows, text = summary_of(run / "stage1/last.pt", capsys)
    assert title.endswith("stage1; binary activations, real weights; input 3x16x16")
    assert len(rows) == 16 and all((r[2], r[3]) == ("1", "32") and r[5] == r[7] == "0" for r in rows)
    assert "BOPs 0 " in text
    # Stage 2, for contrast: every binary conv counts its weights and MACs as binary.
    title, rows, text = summary_of(run / "stage2/last.pt", capsys)
    assert title.endswith("stage2; binary activations, binary weights; input 3x16x16")
    assert all((r[2], r[3]) == ("1", "1") and r[5] != "0" and r[8] == "0" for r in rows)
    assert "BOPs 0 " not in text


@pytest.mark.slow
def test_stage0_alone(tmp_path):
    out = run_cli(TINY + ["stage=0"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert list(results(tmp_path / "run")) == ["stage0"]
    s0 = torch.load(tmp_path / "run/stage0/last.pt", weights_only=True)
    assert s0["init_from"] is None and s0["precision"]["weights"] == "real"
    cost = json.loads((tmp_path / "run/stage0/cost.json").read_text())["totals"]
    assert cost["bops"] == 0 and cost["binary_params"] == 0  # real-valued pre-training: nothing binary


@pytest.mark.slow
def test_stage2_starts_from_stage1s_last_weights_learned_thresholds_included(tmp_path, epoch_starts):
    """ReActNet's RSign thresholds and RPReLU shifts are trained in stage 1 and handed over
    with the weights: stage 2 starts from every tensor of stage 1's last.pt."""
    run = tmp_path / "run"
    pipeline.run(["model=reactnet18", "model.width=0.0625", "schedule.epochs=1", "trainer.progress=plain"], run)
    s1 = torch.load(run / "stage1/last.pt", weights_only=True)["model"]
    thresholds = [k for k in s1 if "threshold" in k]
    assert thresholds and any(s1[k].abs().max() > 0 for k in thresholds)  # learned: moved from their zero start
    assert len(epoch_starts) == 2
    assert_same_tensors(epoch_starts[1], s1)


def test_a_stage_may_start_from_the_previous_ones_best_checkpoint(tmp_path, epoch_starts):
    """`stage.start_from=best` (AdamBNN's step 2): the hand-over is stage 1's best.pt."""
    run = tmp_path / "run"
    pipeline.run([*TINY, "schedule.epochs=2", "stages.stage2.stage.start_from=best", "trainer.progress=plain"], run)
    assert torch.load(run / "stage2/last.pt", weights_only=True)["init_from"] == str(run / "stage1/best.pt")
    assert_same_tensors(epoch_starts[2], torch.load(run / "stage1/best.pt", weights_only=True)["model"])


def test_a_stage_may_keep_its_own_binary_weights_and_take_everything_else(tmp_path, epoch_starts):
    """`stage.hand_over=all_but_binary_weights` (ReActNet-A's released step 2): the binary
    convs' latent weights keep their fresh init; every other tensor comes from stage 1."""
    run = tmp_path / "run"
    pipeline.run([*TINY, "model=reactnet18", "stages.stage2.stage.hand_over=all_but_binary_weights",
                  "stages.stage2.model.binary_init=small_positive", "trainer.progress=plain"], run)
    s1 = torch.load(run / "stage1/last.pt", weights_only=True)["model"]
    start = epoch_starts[1]
    binary = {k for k in s1 if k.startswith("stages.") and ".convs." in k and k.endswith(".weight")}
    assert binary and all(0 <= start[k].min() and start[k].max() < 0.001 for k in binary)  # U[0, 0.001)
    assert_same_tensors({k: v for k, v in start.items() if k not in binary}, {k: v for k, v in s1.items()
                                                                            if k not in binary})


# Stage 2's top-1 on the digits' 360 test images, measured with seed 0: birealnet18 93.06%,
# reactnet18 44.72%. The floors sit a few points under.
FLOORS = {"birealnet18": 88, "reactnet18": 40}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["birealnet18", "reactnet18"])
def test_presets_learn_the_digits(model, tmp_path):
    """Two stages of three epochs at 1/8 width: stage 2, fully binary, well above chance (10%)."""
    pipeline.run([f"model={model}", "model.width=0.125", "schedule.epochs=3"], tmp_path / "run")  # what the CLI runs
    assert results(tmp_path / "run")["stage2"]["top1"] >= FLOORS[model]
