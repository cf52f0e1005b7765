"""Checkpoints: atomic writes, weights_only loading, clear errors."""
import resource
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bnntrain.engine import load_checkpoint, load_model_weights, save_checkpoint
from bnntrain.errors import CheckpointError, UserError
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


class FailsToPickle:
    """Placed late in a checkpoint: torch.save has created its file and pickled the tensors
    before this entry raises."""

    def __init__(self, tmp_file):
        self.tmp_file, self.seen = tmp_file, None

    def __reduce__(self):
        self.seen = self.tmp_file.exists()  # the new file is being written when the save fails
        raise RuntimeError("cannot pickle this entry")


@contextmanager
def file_size_limit(limit):
    """Writes past `limit` bytes fail (EFBIG) in this process, as a full disk fails them."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def earlier_checkpoint(path):
    model = tiny_model()
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 1,
                     "stage": "stage1", "config": {}, "init_from": None}, path)
    return path.read_bytes(), model.state_dict()


def big_state(**late):
    return {"model": {"w": torch.randn(1_000_000)}, "num_classes": 10, "in_channels": 3, "epoch": 2,
            "stage": "stage1", "config": {}, "init_from": None, **late}


def assert_earlier_checkpoint_whole(path, before, weights):
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .tmp left behind
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and all(torch.equal(loaded["model"][k], v) for k, v in weights.items())


def test_a_save_that_fails_while_pickling_keeps_the_earlier_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    before, weights = earlier_checkpoint(path)
    late = FailsToPickle(tmp_path / "last.pt.tmp")
    with pytest.raises(RuntimeError, match="cannot pickle this entry"):
        save_checkpoint(big_state(late=late), path)
    assert late.seen  # the failure came part-way through writing the new checkpoint
    assert_earlier_checkpoint_whole(path, before, weights)


def test_a_save_that_runs_out_of_space_keeps_the_earlier_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    before, weights = earlier_checkpoint(path)
    assert len(before) < 2**20  # the earlier file (0.76 MB) fits under the limit; the new one (4 MB) does not
    with file_size_limit(2**20), pytest.raises(Exception):
        save_checkpoint(big_state(), path)
    assert_earlier_checkpoint_whole(path, before, weights)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, where every write fails with ENOSPC")
def test_a_checkpoint_on_a_full_disk_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    before, _ = earlier_checkpoint(path)
    (tmp_path / "last.pt.tmp").symlink_to("/dev/full")  # the new file's bytes land on a full device
    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        save_checkpoint(big_state(), path)
    assert path.read_bytes() == before
