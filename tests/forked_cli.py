"""`python -m bnntrain ...`, `python script.py ...` and `python -c CODE ...` as processes forked from a server that
has imported torch, Hydra and bnntrain already (multiprocessing's forkserver): the same code
path, exit status, signals and output as a fresh interpreter's, without its seconds of imports
(about 6 of a tiny run's 11 CPU seconds: torch, and torch._dynamo, which every optimizer's
constructor imports).

A command whose environment differs from the server's in what an interpreter reads only as it
starts (thread counts, allocator settings, PYTHON* variables) runs as a real subprocess instead.
Kept free of pytest and of the test modules: the server imports it.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing import forkserver
from multiprocessing import process as mp_process
from pathlib import Path

# What a command imports before it does anything: imported once, in the server.
PRELOAD = ["torch", "torch._dynamo", "torchvision", "hydra", "omegaconf", "PIL.Image", "numpy", "bnntrain.run.cli",
           "bnntrain.run.pipeline", "bnntrain.engine.trainer", "bnntrain.engine.build", "bnntrain.models",
           "bnntrain.data", "bnntrain.optim", "bnntrain.losses", "bnntrain.tools.export", "forked_cli"]
# Read by the interpreter or by libraries as they load: a command that sets them otherwise is not forked.
# (numba is not preloaded: a command that imports it reads NUMBA_* itself, as a fresh one does.)
STARTUP = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "PYTHONPATH", "PYTHONWARNINGS",
           "PYTHONMALLOC", "LD_PRELOAD", "PYTORCH_JIT", "CUDA_VISIBLE_DEVICES")
SERVER_ENV = {"OMP_NUM_THREADS": "1"}  # as the tests run their commands
_context = None
_MAIN_PROCESS = type(mp_process.current_process())  # multiprocessing's own class, which it deletes
_server_env: dict[str, str] = {}  # the environment the server started with


def _server() -> multiprocessing.context.BaseContext:
    """The forkserver context, started on first use with the commands' thread settings."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = {k: os.environ.get(k) for k in SERVER_ENV}
        os.environ.update(SERVER_ENV)
        try:
            forkserver.ensure_running()
            _server_env.update(os.environ)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        _context = context
    return _context


def forkable(env: dict[str, str]) -> bool:
    """Whether a command with `env` behaves in a forked process as in a fresh one."""
    server = _server_env or {**os.environ, **SERVER_ENV}
    return all(env.get(k) == server.get(k) for k in STARTUP) and not any(k.startswith("MALLOC_") for k in env)


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _command(target: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked child: become `python TARGET...` (`-m MODULE` or a script) and exit as it would."""
    # The main process of its own, as a fresh interpreter is (multiprocessing made it a child).
    mp_process._current_process = _MAIN_PROCESS()
    mp_process._parent_process = None
    mp_process._children.clear()
    multiprocessing.set_start_method(None, force=True)  # the platform's default (the server's was forkserver)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = ["-m", *target[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        elif target[0] == "-c":
            sys.argv = ["-c", *target[2:]]
            sys.path.insert(0, "")
            exec(compile(target[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(target)
            sys.path.insert(0, str(Path(target[0]).resolve().parent))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as stop:
        code = _exit_code(stop)
    except KeyboardInterrupt:  # an interpreter dies of the SIGINT it did not handle
        sys.stdout.flush(), sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # what an interpreter does as it exits: join its threads, run atexit
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


class Forked:
    """A started command: `pid`, `poll()`, `wait(timeout)`, `kill()`, and its output once done."""

    def __init__(self, target: list[str], cwd: Path | None, env: dict[str, str]) -> None:
        self.folder = tempfile.mkdtemp(prefix="forked-")
        self.out, self.err = os.path.join(self.folder, "out"), os.path.join(self.folder, "err")
        self.process = _server().Process(target=_command, args=(target, str(cwd or os.getcwd()), env,
                                                                self.out, self.err))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("forked command", timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        """Its stdout and stderr (once it has exited); the files are removed."""
        texts = tuple(Path(p).read_text(errors="replace") for p in (self.out, self.err))
        shutil.rmtree(self.folder, ignore_errors=True)
        return texts


def start(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Forked:
    """`python ARGS` started (`-m MODULE ...`, `-c CODE ...` or `SCRIPT ...`), forked: its
    environment must be `forkable`; output to files, read with `output()` once it has exited."""
    env = dict(os.environ if env is None else env)
    if not forkable(env):
        raise ValueError("this environment changes what an interpreter reads as it starts: use subprocess")
    return Forked(list(args), cwd, env)


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)`, forked
    where `env` allows it (`forkable`)."""
    env = dict(os.environ if env is None else env)
    if not forkable(env):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)
    command = Forked(list(args), cwd, env)
    try:
        code = command.wait(timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.wait()
        raise
    out, err = command.output()
    return subprocess.CompletedProcess([sys.executable, *args], code, out, err)
