"""Writing files so that a crash or a full disk never leaves half of one, and so that
damage to one later is found when it is read (`checksum`)."""
from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it into place. Until the
    rename, an earlier file at `path` stays whole; on any failure the temporary file is
    removed, and an OS error (no space left, permission denied) is one line naming `path`.
    The temporary file has `path`'s own name (torch names the archive inside a checkpoint
    after it) in a folder of this process's own, so it is never another file: an input named
    `<path>.tmp`, or a second writer's."""
    path = Path(path)
    folder = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp = folder / path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp, folder)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        _remove(tmp, folder)
        raise
    folder.rmdir()


def _remove(tmp: Path, folder: Path) -> None:
    tmp.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


CHECKSUM_KEY = "checksum"


def checksum(state: dict) -> str:
    """"sha256:<hex>" of a dict's contents, its own `checksum` entry left out: each tensor's
    dtype, shape and bytes, and each other value's type and repr, dicts walked in sorted key
    order. torch.load checks no CRC of a tensor's bytes, so without this a flipped bit loads."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return f"sha256:{digest.hexdigest()}"


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        digest.update(f"tensor {value.dtype} {list(value.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'list' if isinstance(value, list) else 'tuple'} {len(value)}\n".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (set, frozenset)):  # a set's repr follows the per-process string hash
        digest.update(b"set\n")
        _feed(digest, sorted(value, key=repr))
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__} {len(text)} {text}\n".encode())


def save_tensors(obj: Any, path: Path) -> None:
    """`torch.save`, written whole or not at all; a dict gets its `checksum` entry."""
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: checksum(obj)}

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


def same_file(a: str | Path, b: str | Path) -> bool:
    """True where two paths name one file: equal once resolved, or the same inode (a hard link)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_overwrite(out: str | Path, key: str, others: dict[str, str | Path | None]) -> None:
    """A command's output `key=out` must not be one of its inputs or other outputs (`others`,
    by their keys): one line naming both, before any work is done."""
    for other_key, other in others.items():
        if other is not None and same_file(out, other):
            raise UserError(f"{key}={out} is also {other_key}={other}: the command would write over it; "
                            f"give another {key}")
