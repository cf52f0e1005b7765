"""Long runs that survive: one owner per run folder, stop signals, mid-epoch checkpoints
that resume exactly, full disks and read-only folders, bad images, extending a finished run.
Every case through the real CLI (a process, or its `main` here where the command is refused
before it starts), on tiny data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnntrain.run import cli, pipeline
from bnntrain.errors import UserError
from bnntrain.tools.export.cli import main as export_main
import forked_cli
from conftest import TINY, cli_in_process, main_in_process, need, results, run_cli, shared_run, write_image_folder
from test_errors import assert_one_line_error
from test_resume import ENV, assert_same, assert_stage_matches, children

pytestmark = pytest.mark.slow

# 96 images in batches of 16: six optimizer steps an epoch; two stages of two epochs.
ARGS = ["data=synthetic", "data.image_size=16", "data.train_size=96", "data.test_size=32", "data.batch_size=16",
        "model.width=0.125", "schedule.epochs=2", "seed=11", "trainer.progress=plain"]

# `python -m bnntrain`, sent a signal of its own in the middle of optimizer step AT (counted
# over the whole run), or killed outright after writing a checkpoint AT batches into an epoch,
# or held (asleep, until the test kills it) after writing one AT batches into its second epoch.
SIGNAL_AT = """
import os, signal, sys, time
import bnntrain.engine.trainer as trainer, bnntrain.engine.saving as saving
from bnntrain.run.cli import main
how, at = sys.argv.pop(1), int(sys.argv.pop(1))
steps, save = [0], saving.save_checkpoint
def train_step(self, *args, _step=trainer.Trainer.train_step, **kwargs):
    out = _step(self, *args, **kwargs)
    steps[0] += 1
    if how.startswith("SIG") and steps[0] == at:
        os.kill(os.getpid(), getattr(signal, how))
    return out
def save_then_die(state, path):
    save(state, path)
    if how == "KILL_AFTER_SAVE" and state["position"]["batches"] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "HOLD_AFTER_SAVE" and (state["epoch"], state["position"]["batches"]) == (1, at):
        open(os.path.join(os.path.dirname(sys.argv[0]), "held"), "w").close()
        time.sleep(600)
trainer.Trainer.train_step, saving.save_checkpoint = train_step, save_then_die
main()
"""


def interrupted(args, run, how, at, launcher=(sys.executable,)):
    (run.parent / "signal_at.py").write_text(SIGNAL_AT)
    command = [str(run.parent / "signal_at.py"), how, str(at), *args, f"hydra.run.dir={run}"]
    if launcher == (sys.executable,):
        return forked_cli.run(command, env=ENV, timeout=300)
    return subprocess.run([*launcher, *command], capture_output=True, text=True, env=ENV, timeout=300)


def assert_same_run(a, b):
    """The same weights, optimizer, trainer and results in every stage of two run folders."""
    assert results(a).keys() == results(b).keys()
    for stage in results(a):
        x, y = (torch.load(r / stage / "last.pt", weights_only=True) for r in (a, b))
        for key in ("model", "optimizer", "objective", "trainer", "metrics", "best_top1", "epoch"):
            assert_same(x[key], y[key], f"{stage} {key}")


def train(run):
    out = run_cli(ARGS, run)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run never interrupted, made once for the session (both workers read it)."""
    return shared_run(tmp_path_factory, "long-runs-straight", train)


def test_a_stop_signal_saves_says_how_to_resume_and_resumes_exactly(straight, tmp_path):
    """Each stop signal stops the run at the same point with the same checkpoint; a resume
    reads only that checkpoint (and the run's record), so one resume, from SIGTERM's, shows
    every signal's resume exact."""
    checkpoints = {}
    for sig in ("SIGTERM", "SIGUSR1", "SIGINT"):
        run = tmp_path / sig
        out = interrupted(ARGS, run, sig, at=9)  # step 9: stage 1, epoch 2, batch 3
        assert out.returncode == 128 + getattr(signal, sig), out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert lines == [f"stopped by {sig} at stage1 epoch 2, batch 3, checkpoint written to {run}/stage1/last.pt; "
                         f"resume with: python -m bnntrain resume={run}"], out.stderr
        assert "Traceback" not in out.stdout + out.stderr
        checkpoints[sig] = saved = torch.load(run / "stage1/last.pt", weights_only=True)
        assert (saved["epoch"], saved["position"]["batches"]) == (1, 3) and not (run / "results.json").exists()
    for sig in ("SIGUSR1", "SIGINT"):  # all but the paths in the config, which name the run folder
        for key in sorted((set(checkpoints["SIGTERM"]) | set(checkpoints[sig])) - {"config", "init_from", "checksum"}):
            assert_same(checkpoints["SIGTERM"].get(key), checkpoints[sig].get(key), f"{sig} {key}")
    run = tmp_path / "SIGTERM"
    resumed = run_cli([f"resume={run}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "after epoch 1 and 3 batches of epoch 2" in resumed.stdout
    assert_same_run(straight, run)
    # The resumed epoch's train loss is over all its batches, those before the stop included.
    assert epoch_line(resumed.stdout, "stage1 epoch 2/2") == epoch_line((straight / "cli.log").read_text(),
                                                                         "stage1 epoch 2/2")


def epoch_line(log, start):
    """The line an epoch logs, from its stage and epoch to the test top-5 (not the seconds)."""
    (line,) = [line[line.index(start):line.rindex("(")] for line in log.splitlines() if start in line and "lr " in line]
    return line


# `python -m bnntrain`, sent SIGTERM while the AT-th stage builds its data loaders, before it trains.
SIGNAL_WHILE_LOADING = """
import os, signal, sys
import bnntrain.engine.build as build_module
from bnntrain.run.cli import main
at, build, calls = int(sys.argv.pop(1)), build_module.build_loaders, [0]
def build_loaders(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return build(*args, **kwargs)
build_module.build_loaders = build_loaders
main()
"""


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_stop_signal_while_a_stage_loads_stops_it_and_resume_goes_on(stage, straight, tmp_path):
    """Before stage 1's first checkpoint a resume starts the run over in its folder; between
    stages it goes on with stage 2. Either way the result equals an uninterrupted run."""
    run, script = tmp_path / "run", tmp_path / "signal_while_loading.py"
    script.write_text(SIGNAL_WHILE_LOADING)
    out = forked_cli.run([str(script), stage[-1], *ARGS, f"hydra.run.dir={run}"], env=ENV, timeout=300)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"stopped by SIGTERM at the start of {stage}, nothing new to save; "
                     f"resume with: python -m bnntrain resume={run}"], out.stderr
    assert not (run / stage / "last.pt").exists() and (run / ".lock").read_text() == ""
    assert (run / "stage1/last.pt").exists() == (stage == "stage2")
    resumed = run_cli([f"resume={run}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    if stage == "stage1":
        assert "holds no checkpoint yet: the run starts from its beginning there" in resumed.stdout
    else:
        assert "stage1: finished (2 epochs), skipped" in resumed.stdout
    assert_same_run(straight, run)


def test_killed_mid_epoch_resumes_exactly_with_workers_augmentation_and_mixup(tmp_path):
    """Killed after a mid-epoch checkpoint and resumed, with two DataLoader workers and with
    none: both end exactly as the uninterrupted run with two workers, which shows each resume
    exact and the batches independent of the number of workers."""
    root = write_image_folder(tmp_path / "imgs", per_class=24, size=20)  # 72 images: 4 full batches of 16
    args = ["stage=1", "data=folder", f"data.root={root}", "data.image_size=16", "data.batch_size=16",
            "model.width=0.125", "schedule.epochs=2", "augment.mixup=0.2", "trainer.checkpoint_every.steps=2",
            "trainer.progress=plain", "seed=4"]
    straight = tmp_path / "straight"
    pipeline.run([*args, "data.num_workers=2"], straight)  # the reference, by what the CLI runs, in this process
    for workers in (2, 0):
        broken = tmp_path / f"broken{workers}"
        out = interrupted([*args, f"data.num_workers={workers}"], broken, "KILL_AFTER_SAVE", at=2)
        assert out.returncode == -signal.SIGKILL, out.stderr
        assert torch.load(broken / "stage1/last.pt", weights_only=True)["position"]["batches"] == 2
        resumed = run_cli([f"resume={broken}"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert_same_run(straight, broken)


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="finds the ranks to kill through Linux's /proc")
def test_killed_mid_epoch_under_torchrun_resumes_exactly(tmp_path):
    """Two gloo ranks, held after a checkpoint in the middle of epoch 2 and killed there,
    launcher and ranks one by one, as a lost node would; resumed with the same torchrun
    command plus resume=RUN, the run ends exactly as one never interrupted."""
    args = [*ARGS, "stage=1", "trainer.device=cpu", "trainer.checkpoint_every.steps=2", "data.batch_size=8"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    out = subprocess.run([*torchrun, "-m", "bnntrain", *args, f"hydra.run.dir={straight}"], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    (tmp_path / "signal_at.py").write_text(SIGNAL_AT)
    proc = subprocess.Popen([*torchrun, str(tmp_path / "signal_at.py"), "HOLD_AFTER_SAVE", "4", *args,
                             f"hydra.run.dir={broken}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "held").exists():  # rank 0 wrote the checkpoint at batch 4 of epoch 2
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        # torchrun starts each rank in a session of its own: kill the launcher and its ranks.
        ranks = children(proc.pid)
        assert len(ranks) == 2
        for pid in [proc.pid, *ranks]:
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    saved = torch.load(broken / "stage1/last.pt", weights_only=True)
    assert (saved["epoch"], saved["position"]["batches"]) == (1, 4) and not (broken / "results.json").exists()
    resumed = subprocess.run([*torchrun, "-m", "bnntrain", f"resume={broken}"], capture_output=True, text=True,
                             env=ENV, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    # Rank 0 alone reports, and only what was left: the rest of epoch 2.
    assert resumed.stdout.count("stage1 epoch 2/2") == 1 and "stage1 epoch 1/2" not in resumed.stdout
    assert "stage1: weights identical on all 2 ranks" in resumed.stdout
    assert not (tmp_path / "outputs").exists() and results(broken)["stage1"]["epochs"] == 2
    assert_same_run(straight, broken)
    assert_stage_matches(straight, broken, "stage1")  # best.pt too


def test_a_live_run_owns_its_folder(tmp_path):
    run = tmp_path / "run"
    # Long enough to outlive both checks on a loaded machine; stopped with SIGTERM after them.
    slow = forked_cli.start(["-m", "bnntrain", *ARGS, "schedule.epochs=200", f"hydra.run.dir={run}"], env=ENV)
    deadline = time.time() + 120
    while not (run / "stage1/last.pt").exists():  # training, with its lock held and its stop signals set
        assert slow.poll() is None and time.time() < deadline
        time.sleep(0.05)
    assert (run / ".lock").read_text()
    for second in ([*TINY, f"hydra.run.dir={run}"], [f"resume={run}"]):
        out = forked_cli.run(["-m", "bnntrain", *second], env=ENV, cwd=tmp_path, timeout=120)
        assert_one_line_error(out, f"{run} is in use by a run still going", f"PID {slow.pid}", "started 20")
        assert out.returncode == 2
    assert slow.poll() is None, "the run ended before the checks: they proved nothing"
    slow.send_signal(signal.SIGTERM)
    assert slow.wait(timeout=300) == 128 + signal.SIGTERM, slow.output()[1]
    assert (run / ".lock").read_text() == ""  # let go when it stops
    assert len(list((run / "stage1").glob("events.out.tfevents.*"))) == 1  # one writer


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": "node7", "pid": 999999, "started": "2026-01-01T00:00:00"}))
    out = run_cli([*TINY, "stage=1"], run)
    assert out.returncode == 0, out.stderr
    assert "took over" in (run / "cli.log").read_text() and "host node7, PID 999999" in (run / "cli.log").read_text()


def test_extending_a_finished_run(straight, tmp_path):
    run = shutil.copytree(straight, tmp_path / "run")  # a finished run of its own
    fewer = run_cli([f"resume={run}", "schedule.epochs=1"], cwd=tmp_path)
    assert_one_line_error(fewer, "stage1 has trained 2 epochs already", "asks for fewer")
    earlier = run_cli([f"resume={run}", "stages.stage1.schedule.epochs=3"], cwd=tmp_path)
    assert_one_line_error(earlier, "stage1 finished and stage2 started from it", "stages.stage2.schedule.epochs=N")
    out = run_cli([f"resume={run}", "stages.stage2.schedule.epochs=4"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert results(run)["stage2"]["epochs"] == 4 and results(run)["stage1"]["epochs"] == 2
    assert "stage2 epoch 3/4" in out.stdout and "stage1 epoch" not in out.stdout
    # The schedule is the 4-epoch one from epoch 2 on: cosine at 2/4 of 2e-4.
    assert "stage2 epoch 3/4  lr 1.00e-04" in out.stdout


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")


@pytest.mark.parametrize("when", ["first", "later"])
def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(when, straight, tmp_path):
    """The first save (best.pt and last.pt: two checkpoints) fails on a disk smaller than one
    checkpoint; a later one (a third file, before the rename) on a disk of two and a half."""
    size = (straight / "stage1/last.pt").stat().st_size
    disk = tmp_path / "disk"
    mount_tmpfs(disk, f"size={size // 2 if when == 'first' else int(2.5 * size) + 100_000}")
    try:
        run = disk / "run"
        out = run_cli([*ARGS, "stage=1", "schedule.epochs=3"], run)
        good = "none yet" if when == "first" else f"{run}/stage1/last.pt (epoch 1)"
        assert_one_line_error(out, f"cannot write {run}/stage1/", "No space left on device",
                              f"the last good checkpoint: {good}")
        assert not list(run.rglob("*.tmp"))
        if when == "later":
            assert torch.load(run / "stage1/last.pt", weights_only=True)["epoch"] == 1  # whole
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_read_only_folder_is_one_line_before_anything_starts(tmp_path):
    mount = tmp_path / "ro"
    mount_tmpfs(mount, "ro,size=64k")
    try:
        out = cli_in_process(TINY, mount / "run")  # refused before the run starts
        assert_one_line_error(out, f"hydra.run.dir={mount}/run cannot be written", "read-only file system")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def write_bad_images(root: Path) -> dict[str, Path]:
    root = write_image_folder(root, per_class=6, size=20)
    bad = {"truncated": root / "train/cat/1.jpg", "empty": root / "train/dog/2.jpg", "text": root / "train/frog/3.jpg"}
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:100])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("not an image at all")
    pixels = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 150)  # 16-bit greyscale, 0..59850
    Image.fromarray(pixels).save(root / "train/cat/4.png")
    return bad


def test_bad_images_stop_the_run_or_are_skipped_once_each(tmp_path):
    bad = write_bad_images(tmp_path / "imgs")
    args = ["stage=1", "data=folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16", "data.batch_size=6",
            "data.num_workers=2", "model.width=0.125", "schedule.epochs=2"]
    out = run_cli(args, tmp_path / "strict")
    assert_one_line_error(out, "cannot read image", "imgs/train/")
    out = run_cli([*args, "data.bad_images=skip"], tmp_path / "lenient")
    assert out.returncode == 0, out.stderr
    listed = (tmp_path / "lenient/bad_images.txt").read_text().split()
    assert sorted(listed) == sorted(str(p) for p in bad.values())  # each once, over two epochs
    too_many = run_cli([*args, "data.bad_images=skip", "data.max_bad_images=2"], tmp_path / "many")
    assert_one_line_error(too_many, "3 unreadable images, more than data.max_bad_images=2")


def test_verify_checks_the_test_images_before_training(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4, size=20)
    (root / "test/dog/2.jpg").write_bytes(b"")
    args = ["stage=1", "data=folder", f"data.root={root}", "data.image_size=16", "data.batch_size=6",
            "data.num_workers=1", "model.width=0.125", "schedule.epochs=1", "data.verify=true"]
    out = run_cli(args, tmp_path / "strict")
    assert_one_line_error(out, "1 of 12 images cannot be read (data.verify)", "test/dog/2.jpg")
    assert not (tmp_path / "strict/stage1").exists()  # before any training
    out = run_cli([*args, "data.bad_images=skip"], tmp_path / "lenient")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "lenient/bad_images.txt").read_text().split() == [str(root / "test/dog/2.jpg")]


def test_sixteen_bit_images_become_their_8_bit_picture(tmp_path):
    from bnntrain.data.images import load_rgb

    pixels = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 150)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(pixels / 65535 * 255).astype(np.uint8))


class Payload:
    """An object a checkpoint should not hold: unpickling it runs this module's code."""


def test_a_checkpoint_that_holds_code_is_refused_without_inviting_the_unsafe_way(tmp_path):
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "code.pt")
    out = run_cli([*TINY, "stage=2", f"init={tmp_path / 'code.pt'}"], tmp_path / "run")
    assert_one_line_error(out, "holds more than tensors", "was not loaded")
    assert "weights_only" not in out.stderr


def test_export_checks_its_outputs_before_it_starts(tmp_path, straight):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "ro,size=64k")
    try:
        ckpt = straight / "stage2/last.pt"
        for args in ([f"out={ro}/m.bnn"], [f"out={tmp_path}/m.bnn", f"onnx={ro}/m.onnx"]):
            out = main_in_process(export_main, ["bnntrain.tools.export", f"ckpt={ckpt}", *args])
            assert_one_line_error(out, "cannot be written", "read-only file system")
            assert not (tmp_path / "m.bnn").exists()  # refused before any work
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def processes_with(*words: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and all(w in cmdline for w in words):
            pids.append(int(proc.name))
    return pids


def test_a_preempted_submitit_job_requeues_itself_and_resumes(straight, tmp_path):
    """submitit's own mechanism, with its local executor: its preemption signal (USR2) stops
    the job with a checkpoint, submitit requeues it, and it goes on where it stopped."""
    need("hydra_plugins.hydra_submitit_launcher", extra="slurm")
    sweep = tmp_path / "sweep"
    args = [*ARGS, "trainer.device=cpu", "trainer.checkpoint_every.steps=1"]
    job = subprocess.Popen([sys.executable, "-m", "bnntrain", "-m", "hydra/launcher=submitit_local", *args,
                            f"hydra.sweep.dir={sweep}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=ENV)
    deadline = time.time() + 240
    while not (sweep / "0/stage1/last.pt").exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)
    tasks = processes_with("submitit.core._submit", str(sweep))
    assert tasks, "no submitit task found"
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    log = (sweep / "0/cli.log").read_text()
    assert "stopped by SIGUSR2" in log and "a requeued job: resuming the run" in log
    assert_same_run(straight, sweep / "0")


def test_only_rank_zero_checks_and_holds_the_folder_lock(tmp_path, monkeypatch):
    """Under torchrun every rank prepares the run; rank 0 may already hold the folder's lock
    when another rank looks, so only rank 0 checks it (rank 1 refusing its own run's folder
    was a race)."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"from pathlib import Path; from bnntrain.run import folders as runs; "
                               f"runs.acquire(Path({str(run)!r})); import time; time.sleep(120)"])
    try:
        deadline = time.time() + 60
        while not (run / ".lock").exists() or not (run / ".lock").read_text():
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.05)
        args = [*TINY, f"hydra.run.dir={run}"]
        monkeypatch.setenv("RANK", "1")
        cli.prepare(args, list(TINY))  # another rank: rank 0's lock is not its business
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match=f"{run} is in use by a run still going: host .*, PID {holder.pid}"):
            cli.prepare(args, list(TINY))
    finally:
        holder.kill()
        holder.wait()
