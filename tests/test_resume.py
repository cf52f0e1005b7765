"""A run killed part-way and resumed ends with the same weights as one never interrupted:
killed inside stage 1, right after stage 1 finished, inside stage 2 (under torchrun: in
test_long_runs.py)."""
import hashlib
import os
import signal
import time

import pytest
import torch

from bnntrain.run import pipeline
import forked_cli
from conftest import results, run_cli, shared_run

pytestmark = pytest.mark.slow  # each test trains through the CLI two or three times

# Two stages of three epochs on synthetic data (about half a second an epoch: slow enough
# to be killed in the middle of one).
ARGS = ["data=synthetic", "data.image_size=16", "data.train_size=256", "data.batch_size=16",
        "model.width=0.125", "schedule.epochs=3", "seed=3", "loss.center.weight=0.01"]  # centres in stage 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}

# `python -m bnntrain`, killed with SIGKILL the moment it has written one file: `<stage>/last.pt`
# holding a given number of epochs, or `results.json` (a stage has just finished). An
# interruption at an exact point between two epochs or two stages, whatever the machine's speed.
CRASH = """
import os, signal, sys
from pathlib import Path

import bnntrain.engine.saving
import bnntrain.run.pipeline
from bnntrain.run.cli import main

target, epoch = sys.argv.pop(1), int(sys.argv.pop(1))
save_checkpoint, write_text = bnntrain.engine.saving.save_checkpoint, bnntrain.run.pipeline.write_text


def save_then_die(state, path):
    save_checkpoint(state, path)
    if f"{Path(path).parent.name}/{Path(path).name}" == target and state["epoch"] == epoch:
        os.kill(os.getpid(), signal.SIGKILL)


def write_then_die(path, text):
    write_text(path, text)
    if Path(path).name == target:
        os.kill(os.getpid(), signal.SIGKILL)


bnntrain.engine.saving.save_checkpoint, bnntrain.run.pipeline.write_text = save_then_die, write_then_die
main()
"""


def crash_run(args, run_dir, after: str, epoch: int = 0) -> None:
    """Run ARGS in `run_dir` and kill it right after it writes `after` ('stage2/last.pt' of
    `epoch` epochs, or 'results.json')."""
    out = forked_cli.run(["-c", CRASH, after, str(epoch), *args, f"hydra.run.dir={run_dir}"], env=ENV, timeout=300)
    assert out.returncode == -signal.SIGKILL, f"the run was not killed after {after}: {out.stderr}"


def fingerprint(folder):
    """Every file under `folder` and a hash of its bytes (not the lock file, which names whoever
    last used the folder)."""
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_same(a, b, where=""):
    """Equal tensors (exactly), numbers and containers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_stage_matches(straight, resumed, stage):
    """The resumed stage ends exactly as the uninterrupted one: its last.pt and best.pt hold
    the same weights, optimizer, schedule, centres, loop state, epoch, metrics and best top-1
    (all but the config and the paths, which name the run folder, and so the checksum over
    them), and results.json agrees."""
    for name in ("last.pt", "best.pt"):
        a = torch.load(straight / stage / name, weights_only=True)
        b = torch.load(resumed / stage / name, weights_only=True)
        for key in sorted((set(a) | set(b)) - {"config", "init_from", "checksum"}):
            assert_same(a.get(key), b.get(key), f"{stage}/{name}[{key!r}]")
    a, b = results(straight)[stage], results(resumed)[stage]
    for key in ("top1", "top5", "loss", "best_top1", "epochs"):
        assert a[key] == b[key], f"results.json {stage} {key}: {a[key]} vs {b[key]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run never interrupted."""
    run = shared_run(tmp_path_factory, "resume-straight", lambda run: pipeline.run(ARGS, run))  # what the CLI runs
    assert list(results(run)) == ["stage1", "stage2"]
    return run


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, straight):
    broken = tmp_path / "broken"
    proc = forked_cli.start(["-m", "bnntrain", *ARGS, f"hydra.run.dir={broken}"], env=ENV)
    deadline = time.time() + 240
    while not (broken / "stage1" / "last.pt").exists():  # killed after stage 1's first epoch
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = torch.load(broken / "stage1/last.pt", weights_only=True)["epoch"]
    assert epoch_at_kill < 3 and not (broken / "results.json").exists()

    hydra_record = (broken / ".hydra/overrides.yaml").read_text()
    # No hydra.run.dir: the resumed run writes into its own folder, not a new outputs/ one, and
    # an override that only the resumed run's config has (data.test_size: synthetic) is accepted.
    out = run_cli([f"resume={broken}", "data.test_size=64"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "outputs").exists() and (broken / ".hydra/overrides.yaml").read_text() == hydra_record
    assert "resuming the run" in (broken / "cli.log").read_text()
    assert f"stage1 epoch {epoch_at_kill + 1}/3" in out.stdout and f"stage1 epoch {epoch_at_kill}/3" not in out.stdout
    assert list(results(broken)) == ["stage1", "stage2"]
    for stage in ("stage1", "stage2"):
        assert_stage_matches(straight, broken, stage)


def test_resume_from_a_last_pt_skips_finished_stages(tmp_path, straight):
    """Killed right after stage 1 finished (results.json names it, stage 2 has not begun), then
    resumed from stage 1's last.pt: stage 1 is not touched, stage 2 trains as it would have."""
    broken = tmp_path / "broken"
    crash_run(ARGS, broken, "results.json")
    assert list(results(broken)) == ["stage1"] and not (broken / "stage2").exists()
    finished, entry = fingerprint(broken / "stage1"), results(broken)["stage1"]

    out = run_cli([f"resume={broken / 'stage1' / 'last.pt'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stage1 epoch" not in out.stdout and "stage2 epoch 1/3" in out.stdout and "stage2 epoch 3/3" in out.stdout
    assert fingerprint(broken / "stage1") == finished  # not retrained, not rewritten: every byte as it was
    assert results(broken)["stage1"] == entry
    assert_stage_matches(straight, broken, "stage1")
    assert_stage_matches(straight, broken, "stage2")


def test_run_killed_inside_stage_2_resumes_there(tmp_path, straight):
    broken = tmp_path / "broken"
    crash_run(ARGS, broken, "stage2/last.pt", epoch=1)  # stage 2 has trained one of its three epochs
    assert list(results(broken)) == ["stage1"]
    assert torch.load(broken / "stage2/last.pt", weights_only=True)["epoch"] == 1
    finished = fingerprint(broken / "stage1")

    out = run_cli([f"resume={broken}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stage2: resuming from" in out.stdout and "after epoch 1" in out.stdout
    assert "stage1 epoch" not in out.stdout and "stage2 epoch 1/3" not in out.stdout
    assert "stage2 epoch 2/3" in out.stdout and "stage2 epoch 3/3" in out.stdout
    assert fingerprint(broken / "stage1") == finished
    assert list(results(broken)) == ["stage1", "stage2"]
    assert_stage_matches(straight, broken, "stage2")


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux's /proc)."""
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
