"""Run folders: finding the one to resume, refusing to write into one that holds a run or
that cannot be written, and holding a folder's lock while a run uses it.

The command line checks these before anything starts and before Hydra writes a file.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from .config import override_key, override_value
from ..errors import UserError
from .untrusted import saved_overrides

COMMAND_FILE = Path(".hydra") / "overrides.yaml"  # Hydra's record of the overrides that made a run


def has_checkpoint(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob("*/last.pt"))


def resume_target(path: Path, overrides: list[str]) -> tuple[Path, list[str], list[str]]:
    """The run folder to continue, the overrides that made it plus today's (less `resume`),
    and the lines of its record that were refused (see `untrusted.saved_overrides`).
    A run stopped before its first checkpoint has nothing to continue: it starts over there."""
    path = path.expanduser()
    if path.is_file():
        run_dir = path.parent.parent  # <run>/<stage>/last.pt
    elif path.is_dir():
        run_dir = path
    else:
        raise UserError(f"resume={path} does not exist; expected a run folder or a <run>/<stage>/last.pt")
    saved = run_dir / COMMAND_FILE
    if not saved.is_file():
        raise UserError(f"resume={path}: {run_dir} is not a bnntrain run folder (no {COMMAND_FILE})")
    kept, refused = saved_overrides(saved)
    return run_dir, kept + [o for o in overrides if override_key(o) != "resume"], refused


def refused_note(run_dir: Path, refused: list[str]) -> str:
    return (f"note: resume leaves out {len(refused)} line(s) of {run_dir / COMMAND_FILE} that are not plain "
            f"settings of the task: {', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}")


def refuse_existing_run(argv: list[str]) -> None:
    """A new run pointed at a folder that holds checkpoints would overwrite them (and Hydra
    would overwrite the record that `resume` reads): stop before anything is written."""
    run_dir = override_value(argv, "hydra.run.dir")
    if run_dir and has_checkpoint(Path(run_dir)):
        raise UserError(f"{run_dir} already holds a run with checkpoints; resume={run_dir} continues it, "
                        f"or choose another hydra.run.dir")


MIN_FREE = 256 << 10  # bytes a run needs free to start: its lock, Hydra's record, its log


def refuse_inside_data(run_dir: Path, stages: list) -> None:
    """A run folder in a dataset's folder would add its files to the data it trains on."""
    run = Path(run_dir).expanduser().resolve()
    for cfg in stages:
        root = cfg.data.get("root")
        data = Path(str(root)).expanduser().resolve() if root else None
        if data is not None and (data == run or data in run.parents):
            raise UserError(f"hydra.run.dir={run_dir} lies inside data.root={root}; write the run elsewhere")


def check_writable(folder: Path, key: str) -> None:
    """The folder, or the nearest one above it that exists, must take new files."""
    existing = next((p for p in [folder, *folder.parents] if p.is_dir()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if existing and os.statvfs(existing).f_flag & os.ST_RDONLY else \
            "permission denied"
        raise UserError(f"{key}={folder} cannot be written ({existing or folder}: {reason})")
    disk = os.statvfs(existing)
    if disk.f_bavail * disk.f_frsize < MIN_FREE or (disk.f_files and disk.f_favail < 16):
        # Hydra's own record would fail half-written, with a traceback, on a disk this full.
        raise UserError(f"{key}={folder} cannot be written ({existing}: the device is full, "
                        f"{disk.f_bavail * disk.f_frsize // 1024} KiB and {disk.f_favail} file entries free)")


def new_run_folder(parent: Path) -> Path:
    """A run folder of its own, `<parent>/<date>/<time>`, made now: a second process started in
    the same second gets `<time>_2` (mkdir is atomic, so two processes never share one)."""
    now = datetime.datetime.now()
    base = Path(parent) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            folder = base if n == 1 else base.with_name(f"{base.name}_{n}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"cannot make a run folder under {parent}: {err.strerror or err}") from None
    raise UserError(f"{base.parent} holds too many runs started at {base.name}")


def holds_jobs(sweep_dir: Path) -> bool:
    """True where a sweep already wrote into this folder (Hydra's record, or a job's)."""
    sweep_dir = Path(sweep_dir)
    return sweep_dir.is_dir() and ((sweep_dir / "multirun.yaml").exists() or
                                   any((p / COMMAND_FILE).exists() for p in sweep_dir.iterdir() if p.is_dir()))


LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run folder -> the open file whose lock this process holds


def acquire(run_dir: Path) -> str | None:
    """Hold `run_dir`'s lock for as long as this process runs (the OS lets go of it when the
    process ends, however it ends). A folder held by a live process is refused with one line
    naming it; a lock file left by a process that is gone is taken over, and the returned
    note says whose it was."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return None
    made = [p for p in [run_dir, *run_dir.parents] if not p.exists()]  # removed again if the lock fails
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only or full file system
        _remove(made)
        raise UserError(f"cannot write {run_dir / LOCK_FILE}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0))
        os.close(fd)
        raise UserError(f"{run_dir} is in use by a run still going: {holder}; wait for it to end, or give "
                        f"another hydra.run.dir") from None
    except OSError:  # a file system without locks: go on unguarded
        os.close(fd)
        return f"{run_dir}: this file system does not take locks; nothing stops a second run in this folder"
    previous = os.pread(fd, 4096, 0)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as err:  # a full disk: the lock is held, but who holds it cannot be written
        os.close(fd)
        if made:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            _remove(made)
        raise UserError(f"cannot write {run_dir / LOCK_FILE}: {err.strerror or err}") from None
    _held[run_dir] = fd
    return f"took over {run_dir}'s lock, left by {_describe(previous)}, which is no longer running" if previous else None


def _remove(folders: list[Path]) -> None:
    """Remove the (empty) folders a refused run made, deepest first."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def check_free(run_dir: Path) -> None:
    """Refuse, naming the holder, a folder whose lock a live process holds (taking nothing)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file() or Path(run_dir).resolve() in _held:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{Path(run_dir).resolve()} is in use by a run still going: "
                        f"{_describe(os.pread(fd, 4096, 0))}; wait for it to end, or give another hydra.run.dir") from None
    except OSError:
        pass
    finally:
        os.close(fd)


def close_inherited_locks() -> None:
    """In a process forked from a run (a loader worker): close the run folders' locks it
    inherited. A lock is held while any process has it open, so a killed run's workers would
    keep its folder "in use" until they notice, seconds later; the run's own process holds it."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def release(run_dir: Path) -> None:
    """Let go of the lock before the process ends, leaving an empty lock file (a clean end)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"host {holder['host']}, PID {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


JOB_FILE = ".submitit_job"  # the submitit job that owns a run folder


def requeued_job(run_dir: Path) -> bool:
    """True where this process is a submitit job started again (requeued after preemption or a
    time-out) in the folder it wrote before: it resumes there. The job's id is recorded in
    the folder the first time; SLURM and the local executor keep it across requeues."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    if "SUBMITIT_EXECUTOR" not in os.environ or not job:
        return False
    record = Path(run_dir) / JOB_FILE
    if record.is_file() and record.read_text().strip() == job:
        return has_checkpoint(Path(run_dir))
    if os.environ.get("RANK", "0") == "0":
        record.write_text(job + "\n")
    return False
