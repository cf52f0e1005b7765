"""A run killed part-way and resumed ends with the same weights as one never interrupted."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import results, run_cli

# Two stages of three epochs on synthetic data, slow enough to be killed in the middle.
ARGS = ["data=synthetic", "data.image_size=16", "data.train_size=256", "data.batch_size=16",
        "model.width=0.25", "schedule.epochs=3", "seed=3"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_cli(ARGS, straight).returncode == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bnntrain", *ARGS, f"hydra.run.dir={broken}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (broken / "stage1" / "last.pt").exists():  # killed after stage 1's first epoch
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
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
    assert list(results(broken)) == ["stage1", "stage2"]
    for stage in ("stage1", "stage2"):
        a, b = weights(straight / stage / "last.pt"), weights(broken / stage / "last.pt")
        for key in a:
            assert torch.equal(a[key], b[key]), f"{stage} {key} differs after resume"
    assert results(broken)["stage2"]["top1"] == pytest.approx(results(straight)["stage2"]["top1"])


def test_resume_from_a_last_pt_skips_finished_stages(tmp_path):
    run = tmp_path / "run"
    small = ARGS[:3] + ["data.train_size=32", "model.width=0.125", "schedule.epochs=1"]
    assert run_cli(small, run).returncode == 0
    before = (run / "stage1/last.pt").stat().st_mtime_ns
    out = run_cli([f"resume={run / 'stage2/last.pt'}"], tmp_path / "again")
    assert out.returncode == 0, out.stderr
    assert (run / "stage1/last.pt").stat().st_mtime_ns == before  # finished: not retrained


def children(pid: int) -> list[int]:
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is installed with torch")
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="finds the ranks to kill through Linux's /proc")
def test_killed_torchrun_run_resumes_under_torchrun(tmp_path):
    """Two gloo ranks, killed (launcher and ranks) after an epoch, resumed with the same
    torchrun command plus resume=RUN: the weights equal those of a run never interrupted."""
    args = ["data=synthetic", "data.image_size=16", "data.train_size=384", "data.test_size=64",
            "data.batch_size=16", "model.width=0.25", "stage=1", "schedule.epochs=3", "seed=5",
            "trainer.device=cpu", "trainer.progress=plain"]
    torchrun = ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "bnntrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    out = subprocess.run(torchrun + args + [f"hydra.run.dir={straight}"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr

    proc = subprocess.Popen(torchrun + args + [f"hydra.run.dir={broken}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not (broken / "stage1" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: kill the launcher and its ranks
    # one by one, as a lost node would.
    ranks = children(proc.pid)
    assert len(ranks) == 2
    for pid in [proc.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(broken / "stage1/last.pt", weights_only=True)["epoch"] < 3
    assert not (broken / "results.json").exists()

    out = subprocess.run(torchrun + [f"resume={broken}"], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("stage1 epoch 3/3") == 1 and "stage1 epoch 1/3" not in out.stdout  # rank 0 only
    assert "stage1: weights identical on all 2 ranks" in out.stdout
    assert not (tmp_path / "outputs").exists() and results(broken)["stage1"]["epochs"] == 3
    a, b = weights(straight / "stage1/last.pt"), weights(broken / "stage1/last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume under torchrun"
