"""What the command-line tools beside the trainer share: `key=value` arguments and
one-line errors (the trainer's own CLI is cli.py)."""
from __future__ import annotations

import sys
from typing import Callable

from .errors import ConfigError, UserError


def split_args(argv: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """The tool's own `key=value` arguments, and the rest (Hydra overrides, for a tool that takes them)."""
    own, rest = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in keys:
            if not value:
                raise ConfigError(f"{key}= needs a value")
            own[key] = value
        else:
            rest.append(arg)
    return own, rest


def run_tool(body: Callable[[list[str]], None], argv: list[str] | None, usage: str) -> None:
    """Run a tool: `-h` prints its usage, and a UserError becomes one `error:` line on
    stderr and exit status 2, as in the trainer's CLI."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage)
        return
    try:
        body(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
