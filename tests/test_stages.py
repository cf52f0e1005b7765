"""Stage 0 (real-valued pre-training) and short real training runs of the named presets."""
import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.stage import _activations
from conftest import TINY, results, run_cli


def test_stage0_switches_from_leaky_clip_to_clamp_half_way():
    stage = OmegaConf.create({"activations": "leaky_clip", "switch": {"at": 0.5, "activations": "clamp"}})
    assert [_activations(stage, e, 4) for e in range(4)] == ["leaky_clip", "leaky_clip", "clamp", "clamp"]
    assert _activations(OmegaConf.create({"activations": "binary"}), 3, 4) == "binary"


def test_three_stage_pipeline_hands_weights_along(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["stage=three_stage", "schedule.epochs=2"], run)
    assert out.returncode == 0, out.stderr
    assert list(results(run)) == ["stage0", "stage1", "stage2"]
    s0, s1 = (torch.load(run / f"stage{i}/last.pt", weights_only=True) for i in (0, 1))
    assert s0["config"]["stage"]["activations"] == "leaky_clip" and s0["config"]["stage"]["weights"] == "real"
    assert s0["precision"] == {"activations": "clamp", "weights": "real"}  # its second half: clamp
    assert s1["init_from"] == str(run / "stage0/last.pt")


def test_stage0_alone(tmp_path):
    out = run_cli(TINY + ["stage=0"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert list(results(tmp_path / "run")) == ["stage0"]


@pytest.mark.parametrize("model", ["birealnet18", "reactnet18"])
def test_presets_learn_the_digits(model, tmp_path):
    """Two stages of three epochs at 1/8 width: stage 2, fully binary, well above chance (10%)."""
    out = run_cli([f"model={model}", "model.width=0.125", "schedule.epochs=3"], tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert results(tmp_path / "run")["stage2"]["top1"] > 40
