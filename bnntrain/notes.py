"""Warnings for input that is legal but almost certainly a mistake (a dataset of one class,
a `+key` nothing reads), and what taking a run folder found. They are kept until the run's
log exists (the pipeline logs them) or the tool ends, and each is said once, however many
times the config is checked."""
from __future__ import annotations

_pending: list[str] = []
_said: set[str] = set()


def add(message: str) -> None:
    if message not in _said:
        _said.add(message)
        _pending.append(message)


def drain() -> list[str]:
    """The notes not yet said, in order; they count as said from now on."""
    out = list(_pending)
    _pending.clear()
    return out
