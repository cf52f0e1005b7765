"""Checkpoints: atomic writes, weights_only loading, clear errors."""
import pytest
import torch

from bnntrain.engine import load_checkpoint, load_model_weights, save_checkpoint
from bnntrain.errors import CheckpointError
from bnntrain.models import build_model
from test_config import make


def tiny_model(**options):
    cfg = make("model.width=0.125", *[f"model.{k}={v}" for k, v in options.items()])
    return build_model(cfg.model, num_classes=10, in_channels=3)


def test_roundtrip_with_weights_only(tmp_path):
    model = tiny_model()
    state = {"model": model.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 3, "stage": "stage1", "config": {"a": [1, 2]}, "init_from": None}
    save_checkpoint(state, tmp_path / "last.pt")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    assert loaded["epoch"] == 3 and loaded["config"] == {"a": [1, 2]}
    other = tiny_model()
    load_model_weights(other, load_checkpoint(tmp_path / "last.pt")["model"], "x")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a bnntrain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_another_architecture_names_the_keys():
    model = tiny_model()
    wider = tiny_model(width=0.25)
    with pytest.raises(CheckpointError, match="another architecture.*shape mismatch: stem.0.weight"):
        load_model_weights(model, wider.state_dict(), "wide.pt")
    single = tiny_model(skip="single")
    with pytest.raises(CheckpointError, match="missing: .*unexpected: "):
        load_model_weights(model, single.state_dict(), "single.pt")
