"""What a run folder or a checkpoint says, read as data and never as instructions.

A run folder or a checkpoint may have been copied, downloaded or edited by hand. Hydra and
OmegaConf would act on some of what such files can hold: a `hydra.*` override builds the
object its `_target_` names (a callback, a logging handler) and can move the run's output;
`${...}` calls a resolver (`${oc.env:SECRET}` reads the environment) when the value is
read. So:

- `resume=` keeps only the overrides of `.hydra/overrides.yaml` that a user could have typed
  for the task: config keys and group choices, with plain values. Hydra's own keys, `resume`
  itself, package overrides, sweeps, `_target_` keys and interpolations are dropped, and the
  run says in one line which.
- A checkpoint's saved config is made inert: every `${` in it becomes a literal `${`, so it
  reads back exactly as written, with no resolver called.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

PLAIN_CHOICE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # a config file's name, not a path


def config_groups() -> set[str]:
    """The config groups (model, data, ...): the folders of the config package, Hydra's aside."""
    root = resources.files("bnntrain.configs")
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra"))}


def refusal(line: Any, groups: set[str]) -> str | None:
    """Why a saved override is not kept (None: it is kept)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not isinstance(line, str):
        return "not an override"
    try:
        override = OverridesParser.create().parse_override(line)
    except Exception:  # Hydra's parser raises its own error types
        return "not an override"
    key = override.key_or_group
    parts = key.replace("/", ".").split(".")
    if parts[0] == "hydra" or key == "resume":
        return "not a setting of the task"
    if override.package is not None or "_target_" in parts or override.is_sweep_override():
        return "not a plain setting"
    if "${" in line:
        return "an interpolation"
    if key in groups and override.value() is not None and not PLAIN_CHOICE.fullmatch(str(override.value())):
        return "not a config name"
    return None


def saved_overrides(record: Path) -> tuple[list[str], list[str]]:
    """The overrides of a run's `.hydra/overrides.yaml` that are kept, and those refused."""
    try:
        lines = yaml.safe_load(record.read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{record} cannot be read as a run's record ({type(err).__name__})") from None
    if not isinstance(lines, list):
        raise UserError(f"{record} is not a run's record (expected a list of overrides)")
    groups = config_groups()
    kept, refused = [], []
    for line in lines:
        (refused if refusal(line, groups) else kept).append(line if isinstance(line, str) else repr(line))
    return kept, refused


def inert(value: Any) -> Any:
    """`value` (plain containers) with every `${` escaped, so OmegaConf reads it literally."""
    if isinstance(value, dict):
        return {k: inert(v) for k, v in value.items()}
    if isinstance(value, list):
        return [inert(v) for v in value]
    if isinstance(value, str) and "${" in value:
        return value.replace("${", "\\${")
    return value
