"""Checkpoints: atomic writes, weights_only loading, clear errors."""
import os
import re
import resource
import secrets
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


def checkpoint_state(net, **changes):
    return {"model": net.state_dict(), "num_classes": 10, "in_channels": 3, "epoch": 3, "stage": "stage1",
            "config": {}, "init_from": None, **changes}


def test_the_checksum_covers_tensors_and_plain_values(tmp_path):
    save_checkpoint(checkpoint_state(tiny_model()), tmp_path / "last.pt")
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["checksum"].startswith("sha256:") and "checksum" not in load_checkpoint(tmp_path / "last.pt")
    for name, edit in (("weight", lambda s: s["model"]["stem.0.weight"].view(-1)[7].add_(1e-6)),
                       ("epoch", lambda s: s.update(epoch=4)), ("config", lambda s: s["config"].update(x=1))):
        state = torch.load(tmp_path / "last.pt", weights_only=True)
        edit(state)
        torch.save(state, tmp_path / f"{name}.pt")  # the saved checksum kept, the contents changed
        with pytest.raises(CheckpointError, match=f"{name}.pt is damaged: its contents do not match the checksum"):
            load_checkpoint(tmp_path / f"{name}.pt")


def test_a_file_without_a_checksum_loads_with_one_note(tmp_path, capsys):
    torch.save(checkpoint_state(tiny_model()), tmp_path / "old.pt")
    for _ in range(2):
        assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 3
    assert capsys.readouterr().err == (f"note: {tmp_path / 'old.pt'} has no checksum (saved by an earlier bnntrain), "
                                       f"so damage to it cannot be detected\n")


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_not_loaded(tmp_path):
    torch.save(checkpoint_state(tiny_model(), model=RunsACommand(tmp_path / "ran")), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"holds more than tensors .*it names posix\.system.* not loaded"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("changes, words", [
    ({"model": "weights.bin"}, "its model entry is a str, not a state dict"),
    ({"model": [torch.zeros(2)]}, "its model entry is a list, not a state dict"),
    ({"model": {"w": [1.0]}}, "its model entry maps 'w' to a list, not a tensor"),
    ({"num_classes": "10"}, "its num_classes is '10', not a whole number >= 1"),
    ({"in_channels": True}, "its in_channels is True"),
    ({"config": "model: resnet18"}, "its config is a str, not a dict"),
])
def test_entries_of_the_wrong_kind_are_named(changes, words, tmp_path):
    save_checkpoint(checkpoint_state(tiny_model(), **changes), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=f"c.pt is not a bnntrain checkpoint: {re.escape(words)}"):
        load_checkpoint(tmp_path / "c.pt")


def test_an_incomplete_state_dict_is_not_called_another_architecture():
    model = tiny_model()
    weights = model.state_dict()
    total = len(weights)
    for key in list(weights)[:4]:
        del weights[key]
    with pytest.raises(CheckpointError, match=f"lacks 4 of the model's {total} tensors \\(incomplete or damaged\\); "
                                              f"missing: stem.0.weight"):
        load_model_weights(model, weights, "part.pt")


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

    def __init__(self, folder):
        self.folder, self.seen = folder, None

    def __reduce__(self):
        # The new file is being written when the save fails.
        self.seen = any(p.name.endswith(".tmp") and any(p.iterdir()) for p in self.folder.iterdir())
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
    late = FailsToPickle(tmp_path)
    with pytest.raises(RuntimeError, match="cannot pickle this entry"):
        save_checkpoint(big_state(late=late), path)
    assert late.seen  # the failure came part-way through writing the new checkpoint
    assert_earlier_checkpoint_whole(path, before, weights)


def test_a_save_that_runs_out_of_space_keeps_the_earlier_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    before, weights = earlier_checkpoint(path)
    assert len(before) < 2**20  # the earlier file (0.76 MB) fits under the limit; the new one (4 MB) does not
    too_large = f"^cannot write {re.escape(str(path))}: File too large$"  # EFBIG, as a full disk's ENOSPC
    with file_size_limit(2**20), pytest.raises(UserError, match=too_large):
        save_checkpoint(big_state(), path)
    assert_earlier_checkpoint_whole(path, before, weights)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, where every write fails with ENOSPC")
def test_a_checkpoint_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    before, _ = earlier_checkpoint(path)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "known")  # the temporary file's name, known in advance
    # The new file's bytes land on a full device.
    (tmp_path / f".last.pt.{os.getpid()}-known.tmp").mkdir()
    (tmp_path / f".last.pt.{os.getpid()}-known.tmp" / "last.pt").symlink_to("/dev/full")
    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        save_checkpoint(big_state(), path)
    assert path.read_bytes() == before
