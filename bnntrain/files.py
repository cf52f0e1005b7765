"""Writing files so that a crash or a full disk never leaves half of one."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it into place. Until the
    rename, an earlier file at `path` stays whole; on any failure the temporary file is
    removed, and an OS error (no space left, permission denied) is one line naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(obj: Any, path: Path) -> None:
    """`torch.save`, written whole or not at all."""
    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError:
            # torch's file writer reports a failed write (a full disk) as an unexplained
            # RuntimeError; written again through Python's file object, it is the OS error it is.
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            tmp.write_bytes(buffer.getbuffer())
    atomic_write(path, write)
