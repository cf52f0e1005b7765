"""Run folders: finding the one to resume and refusing to write into one that holds a run.

The command line checks these before anything starts and before Hydra writes a file.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .config import override_key, override_value
from .errors import UserError

COMMAND_FILE = Path(".hydra") / "overrides.yaml"  # Hydra's record of the overrides that made a run


def has_checkpoint(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob("*/last.pt"))


def resume_target(path: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    """The run folder to continue and the overrides that made it, plus today's (less `resume`)."""
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
    if not has_checkpoint(run_dir):
        raise UserError(f"resume={path}: {run_dir} holds no stage checkpoint (<stage>/last.pt) to continue")
    original = yaml.safe_load(saved.read_text()) or []
    return run_dir, list(original) + [o for o in overrides if override_key(o) != "resume"]


def refuse_existing_run(argv: list[str]) -> None:
    """A new run pointed at a folder that holds checkpoints would overwrite them (and Hydra
    would overwrite the record that `resume` reads): stop before anything is written."""
    run_dir = override_value(argv, "hydra.run.dir")
    if run_dir and has_checkpoint(Path(run_dir)):
        raise UserError(f"{run_dir} already holds a run with checkpoints; resume={run_dir} continues it, "
                        f"or choose another hydra.run.dir")
