"""Data folders that would trap a naive reader: symlink loops, one class, a stop signal while
the folder is listed or verified. Each runs the real CLI on a folder written here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import results, run_cli, write_image_folder

ARGS = ["stage=1", "data=folder", "model.width=0.125", "data.image_size=16", "data.batch_size=4",
        "data.num_workers=0", "schedule.epochs=1"]


def counted(out: subprocess.CompletedProcess) -> str:
    """The line saying how many images the run found."""
    return next(line for line in out.stdout.splitlines() if "training and" in line and "test images" in line)


def test_a_two_link_loop_ends_and_counts_each_image_once(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    cat = root / "train/cat"
    (cat / "a").mkdir()
    for i in range(3):
        (cat / "a" / f"{i}.jpg").write_bytes((cat / f"{i}.jpg").read_bytes())
    # cat/b -> a and cat/a/loop -> .. : os.walk(followlinks=True) doubles the tree at every level.
    (cat / "b").symlink_to("a")
    (cat / "a/loop").symlink_to("..")
    out = run_cli([*ARGS, f"data.root={root}"], tmp_path / "run", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "15 training and 12 test images in 3 classes" in counted(out)  # 12 + cat/a's 3
    said = out.stdout + out.stderr  # a warning: wherever the console's warnings go
    assert f"skipped the link {cat / 'b'} -> {os.path.realpath(cat / 'a')}, which leads back into folders" in said
    assert "1 more such links" in said  # cat/a/loop
    assert results(tmp_path / "run")["stage1"]["epochs"] == 1


def test_one_loop_link_counts_nothing_twice_and_outside_links_still_count(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    elsewhere = write_image_folder(tmp_path / "other", classes=("extra",), per_class=5)
    (root / "train/dog/loop").symlink_to("..")  # once round the loop = the whole train split again
    (root / "train/frog/more").symlink_to(elsewhere / "train/extra")  # a folder on another path: followed
    (tmp_path / "loose.jpg").write_bytes((root / "train/frog/1.jpg").read_bytes())
    (root / "train/frog/x.jpg").symlink_to(tmp_path / "loose.jpg")  # a linked file: one image
    for split in ("train", "test"):  # a class folder that is a link
        (root / split / "bird").symlink_to(elsewhere / "test/extra")
    out = run_cli([*ARGS, f"data.root={root}"], tmp_path / "run", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "23 training and 17 test images in 4 classes" in counted(out)  # train: 12 + 5 + 1 + 5
    assert f"skipped the link {root / 'train/dog/loop'}" in out.stdout + out.stderr


def test_a_single_class_folder_trains_with_a_warning(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("cat",), per_class=4)
    out = run_cli([*ARGS, f"data.root={root}"], tmp_path / "run", timeout=120)
    assert out.returncode == 0, out.stderr
    warning = [line for line in (out.stdout + out.stderr).splitlines() if "one class folder" in line]
    assert len(warning) == 1 and "learns nothing" in warning[0], out.stdout
    log_file = next((tmp_path / "run").glob("*.log")).read_text()
    assert "[WARNING]" in next(line for line in log_file.splitlines() if "one class folder" in line)


def slow_images(folder: Path, n: int) -> None:
    """`n` PNGs of 9 KB that take ~50 ms each to decode (3000 x 3000 black pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((3000, 3000), np.uint8)).save(folder / "0.png")
    data = (folder / "0.png").read_bytes()
    for i in range(1, n):
        (folder / f"{i}.png").write_bytes(data)


def test_sigterm_while_verifying_ends_the_run_within_seconds(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    slow_images(root / "test/cat", 600)  # 30 s of data.verify on one worker
    cmd = [sys.executable, "-m", "bnntrain", *ARGS, f"data.root={root}", "data.verify=true", "data.num_workers=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # the images are listed: verification starts now
            if "test images in" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=6)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 5
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM while verifying 606 images (data.verify)" in err
    assert f"resume with: python -m bnntrain resume={tmp_path / 'run'}" in err
    assert "Traceback" not in err


def test_a_stop_signal_ends_the_listing_of_a_folder(tmp_path):
    from bnntrain.data.folders import image_folder
    from bnntrain.engine.stopping import Stopped, StopSignals

    root = write_image_folder(tmp_path / "imgs", per_class=2)
    with StopSignals():
        os.kill(os.getpid(), signal.SIGTERM)  # heard by StopSignals: only a flag is set
        with pytest.raises(Stopped, match="while listing the images under") as stop:
            image_folder(root / "train", transform=None)
    assert stop.value.exit_code == 128 + signal.SIGTERM
