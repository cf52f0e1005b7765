"""Hydra's flags among the overrides: the overrides bnntrain adds itself (the run or sweep
folder) must join the command's own, since Hydra's parser takes the overrides as one run of
arguments, and a combination Hydra refuses is one line, not a traceback."""
from pathlib import Path

from conftest import run_cli
from bnntrain.run.cli import with_overrides


def test_added_overrides_join_the_commands_own():
    assert with_overrides(["-m", "a=1,2", "--cfg", "job"], ["x=1"]) == ["-m", "a=1,2", "x=1", "--cfg", "job"]
    assert with_overrides(["--cfg", "hydra"], ["x=1"]) == ["--cfg", "hydra", "x=1"]
    assert with_overrides([], ["x=1"]) == ["x=1"]
    assert with_overrides(["a=1", "b=2"], ["x=1", "y=2"]) == ["a=1", "b=2", "x=1", "y=2"]


def test_a_flag_after_the_overrides_keeps_the_run_folder(tmp_path: Path):
    """`stage=1 --cfg hydra`: bnntrain names the run folder itself, and that override once came
    after the flag, which Hydra's parser refused."""
    done = run_cli(["stage=1", "--cfg", "hydra"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dir: outputs/" in done.stdout


def test_a_sweep_asked_for_its_job_config_is_one_line(tmp_path: Path):
    done = run_cli(["-m", "stages.stage2.optimizer.lr=1e-4,2e-4", "--cfg", "job"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --cfg job prints the config of one run, and -m makes a "
                                                "sweep of several: leave out -m and give one value per key"]
    assert not (tmp_path / "multirun").exists()
