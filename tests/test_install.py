"""A non-editable install ships the YAML configs; the console script is the same CLI."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import forked_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


# pip installs the console script beside the interpreter it installs for; found there, the
# test does not depend on PATH (an activated virtualenv).
SCRIPT = Path(sys.executable).parent / ("bnntrain.exe" if os.name == "nt" else "bnntrain")


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.is_file(), reason=f"no console script at {SCRIPT}: bnntrain is not pip-installed "
                                                  "into this interpreter's environment")
def test_console_script(tmp_path):
    out = subprocess.run([str(SCRIPT), "stage=2", "data=cifar100", "--cfg", "job"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0002" in out.stdout and "weight_decay: 0.0" in out.stdout and "epochs: 350" in out.stdout
    # The same CLI as `python -m bnntrain`: the same config, line for line, and the same error.
    module = forked_cli.run(["-m", "bnntrain", "stage=2", "data=cifar100", "--cfg", "job"], cwd=tmp_path)
    assert module.returncode == 0 and out.stdout == module.stdout
    bad = subprocess.run([str(SCRIPT), "optimizer.lrr=1"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "optimizer.lrr" in bad.stderr
    assert not any(tmp_path.iterdir())  # printing a config or refusing a key writes nothing
