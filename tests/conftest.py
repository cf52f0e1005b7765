"""Shared helpers: run the real CLI in a subprocess on tiny settings (or, for a command refused
before its run starts, its `main` in this process), share a run made once per session, write
tiny datasets."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

import forked_cli

# The suite runs in two worker processes (pyproject.toml); one thread each keeps them from
# fighting over the cores, and so does one thread in every process a test starts (the CLI,
# torchrun's ranks), unless the test asks for more.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A binary ResNet-18 at 1/8 width on 16x16 synthetic images: every part of the real
# pipeline runs, in about a second per stage.
TINY = ["data=synthetic", "data.image_size=16", "data.train_size=64", "data.test_size=32",
        "data.batch_size=16", "model.width=0.125", "schedule.epochs=1"]


def need(*modules: str, extra: str) -> ModuleType:
    """The optional `modules` (of the extra `extra`), imported; the last is returned. Where one
    is missing the test is skipped, except under CI (CI=true), where the `dev` extra installs
    every one of them: there a missing one is a failure, not a silent skip. Called at module
    level it skips or fails the whole file."""
    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            missing = f"{name} is missing ({err}): it comes with pip install -e '.[{extra}]' (or '.[dev]')"
            break
    else:
        return module
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true: {missing}", pytrace=False)
    pytest.skip(missing, allow_module_level=True)


def run_cli(args: list[str], run_dir: Path | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m bnntrain ARGS hydra.run.dir=RUN_DIR`, capturing output."""
    cmd = ["-m", "bnntrain", *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return forked_cli.run(cmd, cwd=cwd, env=env, timeout=timeout)  # a process, without its seconds of imports


class ReachedTheRun(BaseException):
    """Raised where `cli_in_process` would start the run itself (a BaseException: no handler
    of the code under test takes it for an error of its own)."""


def main_in_process(main: Callable[[], None], argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A command's `main` run here, as `argv` (sys.argv) in `cwd`, without a process's seconds
    of imports: its exit status and the output a process would show, with its warnings and
    log records on stderr as Python prints them where logging is not set up."""
    from bnntrain import notes

    out, err = io.StringIO(), io.StringIO()
    last_resort = logging.StreamHandler(err)  # what a process without logging set up prints
    last_resort.setLevel(logging.WARNING)
    saved = sys.argv, os.getcwd(), list(notes._pending), set(notes._said)
    code = 0
    sys.argv = argv
    logging.getLogger().addHandler(last_resort)
    try:
        os.chdir(cwd or saved[1])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # a process's default filters, not pytest's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:  # a crash: a process would print its traceback and exit 1
                code = 1
                traceback.print_exc(file=err)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        logging.getLogger().removeHandler(last_resort)
        # Notes are said once per process: this command's do not silence another test's.
        notes._pending[:] = saved[2]
        notes._said.clear()
        notes._said.update(saved[3])
    for warning in caught:
        err.write(warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno))
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def cli_in_process(args: list[str], run_dir: Path | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`run_cli` in this process (see `main_in_process`), for a command the CLI refuses or
    answers (`--cfg job`) before its run starts. A command that gets as far as starting the
    run is a failure: such a command is tested with `run_cli`."""
    from bnntrain.run import cli

    def no_run() -> None:
        raise ReachedTheRun(f"{args} got past the checks to the run itself: test it with run_cli")

    argv = ["bnntrain", *args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])]
    app, cli.app = cli.app, no_run
    try:
        return main_in_process(cli.main, argv, cwd)
    finally:
        cli.app = app


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> Path:
    """`make(run_dir)` once per test session, for runs the tests only read: under xdist the
    first worker to ask makes it and the other waits for it (a module-scoped fixture alone
    would train it once in each worker, and once more in each module that imports it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    run, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(run, ignore_errors=True)  # a half-made one, from a worker that failed
            make(run)
            done.touch()
    return run


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_onnx_matches(packed: Path, x: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """The packed file's ONNX export, run by onnxruntime on `x`, gives `want` (the export's
    own outputs) within float32 rounding."""
    need("onnx", "onnxscript", extra="export")
    onnxruntime = need("onnxruntime", extra="export")
    from bnntrain.tools.export.onnx import export_onnx

    path = packed.with_suffix(".onnx")
    export_onnx(packed, path)
    (got,) = onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=tol, atol=tol)


def _write_pickles(folder: Path, files: dict[str, dict]) -> None:
    # The real files are Python 2 pickles whose str keys load as str with latin1.
    folder.mkdir(parents=True)
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """CIFAR-100 in torchvision's on-disk layout: pickled dicts under cifar-100-python/."""
    rng = np.random.default_rng(0)
    files = {name: {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [i % 20 for i in range(n)],
                    "filenames": [f"{i}.png" for i in range(n)], "batch_label": name}
             for name, n in (("train", n_train), ("test", n_test))}
    files["meta"] = {"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}
    _write_pickles(root / "cifar-100-python", files)
    return root


def write_cifar10(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """CIFAR-10 in torchvision's on-disk layout: the training images split over data_batch_1..5,
    then test_batch and batches.meta, under cifar-10-batches-py/. Image i of a split has label
    i % 10, counted across the five training batches."""
    rng = np.random.default_rng(0)
    parts = [(f"data_batch_{b + 1}", idx) for b, idx in enumerate(np.array_split(np.arange(n_train), 5))]
    files = {name: {"data": rng.integers(0, 256, (len(idx), 3072), dtype=np.uint8),
                    "labels": [int(i) % 10 for i in idx], "filenames": [f"{i}.png" for i in idx],
                    "batch_label": name}
             for name, idx in [*parts, ("test_batch", np.arange(n_test))]}
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_train // 5,
                             "num_vis": 3072}
    _write_pickles(root / "cifar-10-batches-py", files)
    return root


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "frog"), per_class: int = 6,
                       size: int = 20, test_split: str = "test") -> Path:
    """<root>/{train,test}/<class>/*.jpg, one greyscale image among them (the loader makes it RGB)."""
    rng = np.random.default_rng(0)
    for split in ("train", test_split):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 0 and c == 0:
                    image = image.convert("L")
                image.save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
