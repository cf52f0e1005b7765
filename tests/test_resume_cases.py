"""Resume in the harder cases: DataLoader workers with random augmentation, MixUp and a
warm-up schedule; the best checkpoint; and the checkpoints a resume must refuse."""
import re
import shutil

import pytest
import torch

from bnntrain.engine import save_checkpoint
from bnntrain.run import pipeline

from conftest import TINY, results, run_cli, shared_run, write_image_folder
from test_resume import assert_stage_matches, crash_run, fingerprint

pytestmark = pytest.mark.slow  # each test trains through the CLI two or three times


def epoch_lrs(stdout: str, stage: str = "stage1") -> dict[int, float]:
    """{epoch: lr} from the lines the run printed for each epoch."""
    return {int(e): float(lr) for e, lr in re.findall(rf"{stage} epoch (\d+)/\d+  lr (\S+)", stdout)}


def test_resume_with_workers_random_augmentation_mixup_and_warmup(tmp_path):
    """Two DataLoader workers apply random crops and flips, batches are mixed (MixUp), and
    the lr warms up for two epochs: killed inside the warm-up and resumed, the run replays
    the same batches at the same lrs and ends with the same weights."""
    root = write_image_folder(tmp_path / "imgs", size=20)
    args = ["stage=1", "data=folder", f"data.root={root}", "data.image_size=16", "data.batch_size=4",
            "data.num_workers=2", "augment.mixup=0.2", "model.width=0.125", "schedule=imagenet_warmup",
            "schedule.epochs=4", "schedule.warmup_epochs=2", "schedule.milestones=[3]", "optimizer.lr=2e-3",
            "seed=1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    out = run_cli(args, straight)
    assert out.returncode == 0, out.stderr
    lrs = epoch_lrs(out.stdout)
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 2e-3, 4: 2e-4}  # warm-up, the stage's lr, the step decay
    saved = torch.load(straight / "stage1/last.pt", weights_only=True)["config"]
    assert saved["data"]["num_workers"] == 2 and saved["augment"]["mixup"] == 0.2
    assert saved["augment"]["train"]["random_crop"] and saved["augment"]["train"]["horizontal_flip"]

    crash_run(args, broken, "stage1/last.pt", epoch=1)
    out = run_cli([f"resume={broken}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert epoch_lrs(out.stdout) == {e: lrs[e] for e in (2, 3, 4)}  # the warm-up goes on where it stopped
    assert_stage_matches(straight, broken, "stage1")


def test_resume_keeps_the_best_checkpoint_and_best_top1(tmp_path):
    """Two easy classes: the first epoch already reaches the best accuracy, so best.pt is
    epoch 1's. Killed after it and resumed, the run must remember that best (a resume that
    forgot it would take the next epoch for a new best and overwrite best.pt)."""
    args = ["stage=1", "data=synthetic", "data.num_classes=2", "data.image_size=16", "data.train_size=128",
            "data.test_size=32", "data.batch_size=16", "model.width=0.125", "schedule.epochs=3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    pipeline.run(args, straight)  # the reference, by what the CLI runs, in this process
    best = torch.load(straight / "stage1/best.pt", weights_only=True)
    assert best["epoch"] == 1, "premise: the uninterrupted run's best epoch is its first"
    assert results(straight)["stage1"]["best_top1"] == best["metrics"]["top1"]

    crash_run(args, broken, "stage1/last.pt", epoch=1)
    out = run_cli([f"resume={broken}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert torch.load(broken / "stage1/best.pt", weights_only=True)["epoch"] == 1
    assert results(broken)["stage1"]["best_top1"] == results(straight)["stage1"]["best_top1"]
    assert_stage_matches(straight, broken, "stage1")  # best.pt included


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A two-stage run killed after stage 2's first of two epochs."""
    run = shared_run(tmp_path_factory, "resume-interrupted",
                     lambda run: crash_run(TINY + ["schedule.epochs=2"], run, "stage2/last.pt", epoch=1))
    assert list(results(run)) == ["stage1"]
    return run


def from_stage1(last):
    shutil.copy(last.parent.parent / "stage1" / "last.pt", last)


def without_optimizer(last):
    state = torch.load(last, weights_only=True)
    del state["optimizer"]
    save_checkpoint(state, last)  # with its new checksum


BAD_CHECKPOINTS = {"another stage's": (from_stage1, ["is a stage1 checkpoint, not stage2"]),
                   "without its optimizer": (without_optimizer, ["cannot be resumed", "lacks optimizer"])}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_resume_refuses_a_checkpoint_it_cannot_continue(case, tmp_path, interrupted):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    spoil, words = BAD_CHECKPOINTS[case]
    spoil(run / "stage2" / "last.pt")
    # What the resume may rewrite before it reads the checkpoint: its log, and the run's
    # config.yaml (which records the resume); nothing else.
    kept = lambda: {k: v for k, v in fingerprint(run).items() if str(k) not in ("cli.log", "config.yaml")}  # noqa: E731
    before = kept()
    out = run_cli([f"resume={run}"], cwd=tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert str(run / "stage2" / "last.pt") in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert kept() == before  # the stages' files and results.json: nothing trained or written
