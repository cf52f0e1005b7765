"""A non-editable install ships the YAML configs; the console script is the same CLI."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_runs_from_anywhere(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("bnntrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("bnntrain/configs/config.yaml", "bnntrain/configs/stage/1.yaml", "bnntrain/configs/data/digits.yaml",
                 "bnntrain/configs/hydra/job_logging/bnntrain.yaml"):
        assert path in names
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import bnntrain; print(bnntrain.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site))
    out = subprocess.run([sys.executable, "-m", "bnntrain", "stage=1", "data=imagenet", "--cfg", "job"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "milestones:\n  - 40\n  - 60\n  - 70" in out.stdout and "lr: 0.001" in out.stdout


@pytest.mark.skipif(shutil.which("bnntrain") is None, reason="the console script is installed by pip install")
def test_console_script(tmp_path):
    out = subprocess.run(["bnntrain", "stage=2", "data=cifar100", "--cfg", "job"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0002" in out.stdout and "weight_decay: 0.0" in out.stdout and "epochs: 350" in out.stdout
