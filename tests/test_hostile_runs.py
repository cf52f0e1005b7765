"""Run folders, checkpoints and paths are data: what they hold never builds an object, calls
a resolver or moves an output; a refused command writes nothing; mistakes a user can make
are one `error:` line (also in the run's log) or one warning. Every case through the real CLI:
a process, or its `main` in this process where the command is refused before its run starts."""
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bnntrain.run import folders as runs
from bnntrain.run.config import plan
from bnntrain.engine import save_checkpoint
from bnntrain.tools import evaluate
from bnntrain.errors import UserError
import forked_cli
from conftest import TINY, cli_in_process, main_in_process, results, run_cli, write_image_folder
from test_errors import assert_one_line_error, fingerprint
from test_errors import earlier_run as finished  # noqa: F401 (a finished stage-1 run)
from test_long_runs import mount_tmpfs

pytestmark = pytest.mark.slow
SECRET = "not-for-the-log-3141"


def cli(args, cwd, module="bnntrain"):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "BNN_TEST_SECRET": SECRET}
    return forked_cli.run(["-m", module, *args], cwd=cwd, env=env, timeout=300)


def test_resume_keeps_only_the_task_settings_of_a_run_record(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    planted = [f"+hydra.callbacks.x._target_=logging.FileHandler", f"+hydra.callbacks.x.filename={tmp_path}/planted.log",
               f"hydra.run.dir={tmp_path}/elsewhere", "data.root=${oc.env:BNN_TEST_SECRET}",
               f"resume={tmp_path}/other", "model@x=resnet18", "experiment=../../../x", "seed=choice(1,2)"]
    with open(run / ".hydra/overrides.yaml", "a") as record:
        record.writelines(f"- '{line}'\n" for line in planted)
    out = cli([f"resume={run}", "stages.stage1.schedule.epochs=2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "planted.log").exists() and not (tmp_path / "elsewhere").exists()
    assert results(run)["stage1"]["epochs"] == 2  # the run itself went on, with its own settings
    note = f"note: resume leaves out {len(planted)} line(s) of {run}/.hydra/overrides.yaml"
    assert out.stdout.count(note) == 1 and note in (run / "cli.log").read_text()
    assert "+hydra.callbacks.x._target_=logging.FileHandler" in out.stdout
    assert not any(SECRET in p.read_text(errors="replace") for p in run.rglob("*") if p.is_file())


def test_evaluate_reads_a_checkpoints_config_literally_and_downloads_nothing(finished, tmp_path):
    state = torch.load(finished / "stage1/last.pt", weights_only=True)
    state["config"]["data"]["root"] = "${oc.env:BNN_TEST_SECRET}"
    save_checkpoint(state, tmp_path / "secret.pt")
    out = cli([f"ckpt={tmp_path}/secret.pt", f"out={tmp_path}/eval.json"], tmp_path, "bnntrain.tools.evaluate")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["root"] == "${oc.env:BNN_TEST_SECRET}"
    assert SECRET not in out.stdout + out.stderr
    # A checkpoint that says download: true into a folder of its choosing.
    cifar = plan(["stage=1", "data=cifar100", f"data.root={tmp_path}/downloads", "data.download=true"])[0]
    state["config"]["data"] = OmegaConf.to_container(cifar.data)
    save_checkpoint(state, tmp_path / "download.pt")
    out = main_in_process(evaluate.main, ["bnntrain.tools.evaluate", f"ckpt={tmp_path}/download.pt"], tmp_path)
    assert_one_line_error(out, f"data.root={tmp_path}/downloads does not exist")
    assert not (tmp_path / "downloads").exists()


def test_evaluate_never_writes_over_its_checkpoint(finished, tmp_path):
    ckpt = shutil.copy(finished / "stage1/last.pt", tmp_path / "model.pt")
    (tmp_path / "link.pt").symlink_to(ckpt)
    before = Path(ckpt).read_bytes()
    for out in (ckpt, "link.pt", "./model.pt"):
        result = main_in_process(evaluate.main, ["bnntrain.tools.evaluate", f"ckpt={ckpt}", f"out={out}"], tmp_path)
        assert_one_line_error(result, f"is also ckpt={ckpt}", "would write over it")
    assert Path(ckpt).read_bytes() == before


def test_each_run_gets_a_folder_of_its_own(tmp_path):
    made = [runs.new_run_folder(tmp_path / "outputs") for _ in range(3)]  # within one second, or two
    assert len(set(made)) == 3 and all(m.is_dir() for m in made)
    shutil.rmtree(tmp_path / "outputs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [forked_cli.start(["-m", "bnntrain", *TINY, "stage=1", f"seed={seed}"], cwd=tmp_path, env=env)
            for seed in (1, 2)]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0], [job.output()[1] for job in jobs]
    folders = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(folders) == 2
    seeds = set()
    for folder in folders:  # each folder's record is the run whose checkpoint it holds
        seed = int(next(o for o in (folder / ".hydra/overrides.yaml").read_text().split() if o.startswith("seed="))[5:])
        assert torch.load(folder / "stage1/last.pt", weights_only=True)["config"]["seed"] == seed
        seeds.add(seed)
    assert seeds == {1, 2}


def test_a_second_sweep_into_a_sweep_folder_is_refused_before_anything_is_written(tmp_path):
    sweep = tmp_path / "sweep"
    first = run_cli(["-m", "seed=0", f"hydra.sweep.dir={sweep}", *TINY, "stage=1"])
    assert first.returncode == 0, first.stderr
    before = fingerprint(sweep)
    second = cli_in_process(["-m", "seed=1,2", f"hydra.sweep.dir={sweep}", *TINY, "stage=1"])
    assert_one_line_error(second, f"hydra.sweep.dir={sweep} already holds a sweep")
    assert fingerprint(sweep) == before


def test_a_full_disk_at_the_start_is_one_line_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=128k")
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={disk}/fill", "bs=4k", "count=64"], capture_output=True)
        out = run_cli(TINY, disk / "runs" / "run")
        assert_one_line_error(out, f"hydra.run.dir={disk}/runs/run cannot be written", "the device is full")
        assert [p.name for p in disk.iterdir()] == ["fill"]
        # Past that check (a disk that filled up since): the lock's write fails, and what it made goes.
        with pytest.raises(UserError, match=f"cannot write {disk}/runs/run/.lock: No space left on device"):
            runs.acquire(disk / "runs" / "run")
        assert [p.name for p in disk.iterdir()] == ["fill"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_resume_on_a_read_only_file_system_is_one_line(finished, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=16m")
    try:
        run = shutil.copytree(finished, disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        out = cli_in_process([f"resume={run}", "stages.stage1.schedule.epochs=2"], cwd=tmp_path)
        assert_one_line_error(out, f"resume={run} cannot be written", "read-only file system")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("override, words", [
    ("seed=18446744073709551616", ["seed must be a whole number >= 0 and <= 18446744073709551615"]),
    ("optimizer.lr=inf", ["optimizer.lr must be a positive number; got inf"]),
    ("model.width=1000", ["model.width=1000 makes", "GiB of weights", "this machine has"]),
])
def test_values_that_cannot_train_are_one_line_before_anything_is_written(override, words, tmp_path):
    out = cli_in_process(TINY + ["stage=1", override], tmp_path / "run")
    assert_one_line_error(out, *words)
    assert not (tmp_path / "run").exists()


def test_legal_but_unlikely_input_is_one_warning_each(tmp_path):
    run = tmp_path / "run"
    out = run_cli(TINY + ["stage=1", "+foo=1", "model.width=1e-6"], run)
    assert out.returncode == 0, out.stderr
    log = (run / "cli.log").read_text()
    for words in ("+foo=1 adds a key that bnntrain does not read", "leaves binary layers 1 channel(s) wide"):
        assert sum(words in line for line in out.stdout.splitlines()) == 1, out.stdout
        assert words in log


def test_an_error_inside_a_run_is_in_its_log(tmp_path):
    run = tmp_path / "run"
    out = run_cli(["data=folder", f"data.root={tmp_path}/nope", "model.width=0.125", "stage=1"], run)
    assert_one_line_error(out, f"data.root={tmp_path}/nope does not exist")
    assert f"[ERROR] error: data.root={tmp_path}/nope does not exist" in (run / "cli.log").read_text()


STOP_WHILE_LOADING = """
import os, signal
import bnntrain.engine.build as stage
from bnntrain.run.cli import main
build = stage.build_loaders
def build_loaders(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return build(*args, **kwargs)
stage.build_loaders = build_loaders
main()
"""


def test_the_stop_message_is_said_once_and_logged(tmp_path):
    run, script = tmp_path / "run", tmp_path / "stop.py"
    script.write_text(STOP_WHILE_LOADING)
    out = forked_cli.run([str(script), *TINY, "stage=1", f"hydra.run.dir={run}"], timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        f"stopped by SIGTERM at the start of stage1, nothing new to save; resume with: python -m bnntrain resume={run}"]
    assert "stopped by" not in out.stdout and "stopped by SIGTERM" in (run / "cli.log").read_text()


def test_init_from_non_finite_weights_says_so(finished, tmp_path):
    state = torch.load(finished / "stage1/last.pt", weights_only=True)
    state["model"]["stem.0.weight"][0] = float("nan")
    save_checkpoint(state, tmp_path / "nan.pt")
    out = run_cli(TINY + ["stage=2", f"init={tmp_path}/nan.pt"], tmp_path / "run")
    assert_one_line_error(out, f"init={tmp_path}/nan.pt holds NaN or infinite weights (stem.0.weight)")


def test_resume_in_another_folder_is_refused_and_leaves_no_lock(finished, tmp_path):
    other = tmp_path / "other"
    out = cli_in_process([f"resume={finished}"], other)
    assert_one_line_error(out, f"resume={finished} continues the run in its own folder", f"hydra.run.dir={other}")
    assert not other.exists()


def test_a_run_folder_inside_the_data_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    out = cli_in_process(["data=folder", f"data.root={root}", "model.width=0.125", "stage=1"], root / "train" / "run")
    assert_one_line_error(out, f"lies inside data.root={root}")
    assert not (root / "train" / "run").exists()


def test_a_run_whose_results_are_not_results_is_one_line(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "results.json").write_text('{"stage1": {"epochs": "many"}}')
    out = run_cli([f"resume={run}"], cwd=tmp_path)
    assert_one_line_error(out, f"{run}/results.json is not a run's results")
