"""When a stage writes a checkpoint in the middle of an epoch, and when it stops.

SIGTERM (what SLURM and `kill` send), SIGUSR1 (SLURM's `--signal` warning before the end of
a job's time) and SIGINT (Ctrl-C) ask the run to stop: the optimizer step under way
finishes, a checkpoint holding everything needed to resume is written, and the run exits
with 128 + the signal's number (130 for SIGINT, 138 for SIGUSR1, 143 for SIGTERM). A second
Ctrl-C stops at once. `trainer.checkpoint_every` writes the same checkpoint every so many
optimizer steps and/or minutes, so that a run killed without warning (SIGKILL, a lost node)
loses at most that much.

The signals are heard from the moment a run holds its folder: one that comes while a stage
loads its data and model stops the run before it trains, with nothing new to save, and
`resume=` then continues (or, before any checkpoint, starts the run over in its folder).

Under torchrun the ranks must stop and save at the same step: the minutes and the signals
are agreed on (an all-reduce) every `trainer.log_every` steps, where the loop synchronises
anyway; single-process runs look at every step.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import torch

from ..errors import UserError
from . import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def preemption_signal() -> int | None:
    """submitit's preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) where
    this process is a submitit job, SLURM's or the local executor's; else None."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class Stopped(UserError):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is 128 + the signal.
    `then`: submitit's own handler of its preemption signal, which requeues the job."""

    def __init__(self, message: str, signum: int, then: Callable | None = None) -> None:
        super().__init__(message)
        self.signum, self.exit_code, self.then = signum, 128 + signum, then


_in_force: list["StopSignals"] = []  # entered and not left yet, the innermost last


def raise_if_stopped(where: str) -> None:
    """Raise Stopped if a stop signal has come: for long work that is not handed the run's
    StopSignals (listing or verifying a data folder), which must end within seconds."""
    signals = _in_force[-1] if _in_force else None
    if signals is not None and signals.received is not None:
        name = signal.Signals(signals.received).name
        raise Stopped(f"stopped by {name} while {where}, before training: nothing to save", signals.received,
                      then=signals.requeue())


class StopSignals:
    """Within `with StopSignals() as signals:` the stop signals set `signals.received` rather
    than end the process (a second SIGINT raises KeyboardInterrupt as usual). Under submitit
    its preemption signal does too; its handler (checkpoint and requeue) is kept for after
    our own checkpoint (`requeue`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def requeue(self) -> Callable | None:
        """submitit's handler, where its preemption signal is what stopped the run."""
        handler = self._previous.get(self.received) if self.received == preemption_signal() else None
        return handler if callable(handler) else None

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for sig in (*STOP_SIGNALS, *[s for s in [preemption_signal()] if s is not None]):
                self._previous[sig] = signal.signal(sig, self._handle)
        _in_force.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _in_force.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepWatch:
    """After each optimizer step: (write a mid-epoch checkpoint?, stop?)."""

    def __init__(self, signals: StopSignals, every_steps: int | None, every_minutes: float | None,
                 sync_every: int, device: torch.device) -> None:
        self.signals, self.every_steps, self.every_minutes = signals, every_steps, every_minutes
        self.sync_every, self.device = sync_every, device
        self.last_save = time.monotonic()

    def __call__(self, step: int) -> tuple[bool, bool]:
        due = bool(self.every_steps) and step % self.every_steps == 0
        timed = bool(self.every_minutes) and time.monotonic() - self.last_save >= 60 * self.every_minutes
        stop = self.signals.received is not None
        if distributed.world_size() > 1:
            if step % self.sync_every:
                return due, False  # a step count is the same on every rank; clocks and signals are not
            timed, stop = self._any_rank(timed, stop)
        save = due or timed or stop
        if save:
            self.last_save = time.monotonic()
        return save, stop

    def stop_requested(self) -> bool:
        """Whether a stop signal came before this stage trained a step (while the data, model
        and checkpoints were loading), agreed across ranks: they all stop, or none."""
        stop = self.signals.received is not None
        return self._any_rank(stop)[0] if distributed.world_size() > 1 else stop

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Each flag, true where it is true on any rank (one all-reduce)."""
        agreed = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        return [bool(f) for f in agreed]

    def signal_name(self) -> str:
        return signal.Signals(self.signals.received or signal.SIGTERM).name
