"""Every input a user can get wrong: a non-zero exit, one `error:` line, no traceback,
and nothing an earlier run wrote is changed."""
import hashlib
import shutil

import pytest
import torch

from bnntrain.engine import save_checkpoint

from conftest import TINY, cli_in_process, run_cli, shared_run, write_image_folder


def train_stage1(run):
    out = run_cli(TINY + ["stage=1"], run)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished stage-1 run that no failed command may touch (one for the whole session:
    test_hostile_runs reads it too)."""
    return shared_run(tmp_path_factory, "earlier-stage1", train_stage1)


def fingerprint(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def assert_one_line_error(out, *words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for word in words:
        assert word in lines[0], lines[0]


def bad_files(tmp_path):
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    write_image_folder(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "test" / "frog").rename(tmp_path / "mismatch" / "test" / "toad")


CASES = {
    "missing data.root": (["data=folder", "data.root={tmp}/nope"], ["data.root", "does not exist"]),
    "empty data.root": (["data=folder", "data.root={tmp}/empty"], ["is empty"]),
    "wrong layout": (["data=folder", "data.root={tmp}/flat"], ["must hold train/"]),
    "train and test classes differ": (["data=folder", "data.root={tmp}/mismatch"],
                                      ["{tmp}/mismatch/train and {tmp}/mismatch/test", "different class folders"]),
    "no data.root": (["data=imagenet"], ["data.root is not set"]),
    "unknown group option": (["data=nope"], ["data/nope", "cifar100, digits"]),
    "unknown key": (["optimizer.lrr=1"], ["optimizer.lrr"]),
    "stage 2 without init": (["stage=2"], ["init=PATH"]),
    "init missing": (["stage=2", "init={tmp}/nope.pt"], ["does not exist"]),
    "init not a checkpoint": (["stage=2", "init={tmp}/junk.pt"], ["not a readable checkpoint"]),
    "init from another architecture": (["stage=2", "model.width=0.25", "init={earlier}/stage1/last.pt"],
                                       ["another architecture", "stem.0.weight"]),
    "resume missing": (["resume={tmp}/nope"], ["does not exist"]),
    "resume not a run": (["resume={tmp}/empty"], ["not a bnntrain run folder"]),
    "negative lr": (["optimizer.lr=-0.1"], ["optimizer.lr must be a positive number"]),
    "negative batch size": (["data.batch_size=-4"], ["data.batch_size"]),
    "milestone past the end": (["data=cifar100", "schedule.epochs=100"], ["past the last epoch"]),
    "warm-up above the lr": (["schedule=imagenet_warmup", "optimizer.lr=5e-4", "schedule.epochs=10",
                              "schedule.milestones=[5]"], ["warmup_lr", "must not exceed"]),
    "lr not a number": (["optimizer.lr=fast"], ["optimizer.lr must be a positive number"]),
    "log_every zero": (["trainer.log_every=0"], ["trainer.log_every"]),
    "unknown progress style": (["trainer.progress=fancy"], ["trainer.progress"]),
    "sync_bn on the cpu": (["trainer.sync_bn=true", "trainer.device=cpu"], ["SyncBatchNorm", "CUDA"]),
    "grey folder images": (["data=folder", "data.root={tmp}/imgs", "data.channels=1"], ["3 channels"]),
    "teacher for other classes": (["stage=1", "distill=kd", "distill.teacher.checkpoint={earlier}/stage1/last.pt",
                                   "data.num_classes=5"], ["predicts 10 classes", "has 5"]),
    "unknown attention": (["model.attention=cbam"], ["model.attention"]),
}


# Refused by the checks before the run starts: run here, in this process, by the CLI's own
# `main` (see conftest.cli_in_process). The others load data or a checkpoint first, or fail
# inside the run: a real process each, of several seconds.
BEFORE_THE_RUN = {"unknown group option", "unknown key", "stage 2 without init", "init missing", "resume missing",
                  "resume not a run", "negative lr", "negative batch size", "milestone past the end",
                  "warm-up above the lr", "lr not a number", "log_every zero", "unknown progress style",
                  "sync_bn on the cpu", "grey folder images", "unknown attention"}


@pytest.mark.parametrize("case", [c if c in BEFORE_THE_RUN else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_bad_input(case, tmp_path, earlier_run):
    before = fingerprint(earlier_run)
    bad_files(tmp_path)
    args, words = CASES[case]
    args = [a.format(tmp=tmp_path, earlier=earlier_run) for a in args]
    words = [w.format(tmp=tmp_path) for w in words]
    base = TINY if not any(a.startswith("data=") for a in args) else ["model.width=0.125"]
    out = (cli_in_process if case in BEFORE_THE_RUN else run_cli)(base + args, tmp_path / "run")
    assert_one_line_error(out, *words)
    assert fingerprint(earlier_run) == before


@pytest.mark.slow
@pytest.mark.parametrize("args", [["optimizer.lrr=1"], ["stage=2"]])
def test_a_refusal_here_is_what_a_process_shows(args, tmp_path):
    """cli_in_process shows what a real `python -m bnntrain` does: the same exit status and
    the same output, for a key the config lacks and for a check of the composed config."""
    here, real = cli_in_process(TINY + args, tmp_path / "a"), run_cli(TINY + args, tmp_path / "a")
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)
    assert here.returncode == 2 and here.stderr.startswith("error: ")


def test_a_new_run_never_overwrites_an_existing_run_folder(tmp_path, earlier_run):
    before = fingerprint(earlier_run)  # .hydra/overrides.yaml, which resume reads, included
    out = run_cli(TINY + ["stage=1", "optimizer.lr=0.5", "model.width=0.25"], earlier_run)
    assert_one_line_error(out, "already holds a run with checkpoints", "resume=")
    assert fingerprint(earlier_run) == before


@pytest.mark.slow
def test_nan_loss_stops_without_writing_a_checkpoint(tmp_path):
    out = run_cli(TINY + ["stage=1", "optimizer.lr=1e30"], tmp_path / "run")
    assert_one_line_error(out, "loss became nan")
    assert not (tmp_path / "run/stage1/last.pt").exists()


@pytest.mark.slow
def test_divergence_after_resume_keeps_the_last_good_checkpoint(tmp_path, earlier_run):
    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    state = torch.load(run / "stage1/last.pt", weights_only=True)
    state["model"]["classifier.bias"][0] = float("nan")  # weights gone bad: the next loss is NaN
    save_checkpoint(state, run / "stage1/last.pt")  # with its new checksum
    (run / "results.json").unlink()  # as if interrupted before the stage finished
    before = fingerprint(run / "stage1")
    out = run_cli([f"resume={run}", "schedule.epochs=2"], cwd=tmp_path)
    assert_one_line_error(out, "loss became")
    assert {k: v for k, v in fingerprint(run / "stage1").items() if k.suffix == ".pt"} == \
        {k: v for k, v in before.items() if k.suffix == ".pt"}


@pytest.mark.slow
def test_an_unreadable_image_in_a_worker_is_one_line(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "1.jpg").write_bytes(b"not a jpeg")
    out = run_cli(["stage=1", "data=folder", f"data.root={root}", "data.num_workers=1", "data.image_size=16",
                   "model.width=0.125", "schedule.epochs=1"], tmp_path / "run")
    assert_one_line_error(out, "cannot read image", "dog/1.jpg")
