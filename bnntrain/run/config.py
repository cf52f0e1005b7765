"""A run's config: composing it, checking it, and the one-line errors.

Every entry point composes through here: the command line (before Hydra starts, and for
each stage inside the run), `bnntrain.tools.summary`, `scripts/bench.py` and the tests. A
stage's config comes about in five steps:

1. Hydra composes `configs/config.yaml` with the overrides. Each preset of a group extends
   the group's `_base.yaml`, which holds every key the group's presets share. A pipeline
   choice (`stage=two_stage`) lists its stages in `stage.run`.
2. Each stage is composed as `stage=N` with the same overrides, so that a stage of a
   pipeline trains exactly as the same stage run alone.
3. The stage's own overrides, `stages.<name>.<key>=...`, are merged into it.
4. `optimizer.lr` and `optimizer.weight_decay` left null take the stage recipe's values
   for the chosen optimizer (`stage.recipe.<optimizer>`); a stage whose recipe was written
   for another optimizer stops with a line asking for the value. A stage without colour
   jitter (`stage.color_jitter: false`) drops it from `augment.train`.
5. Interpolations are resolved, what steps 3 and 4 consumed (`stages`, `stage.recipe`) is
   dropped, and every value is checked (`checks.py`).

What comes out holds each value once, as the stage trains with it: it is what
`--cfg job` prints and what each stage folder's `config.yaml` holds.
"""
from __future__ import annotations

import copy
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import check_stage
from ..errors import CheckpointError, ConfigError, UserError

CONFIG_MODULE = "bnntrain.configs"
RUN_FOLDER = "<run folder>"  # where a pipeline's later stages find their init, before the folder exists
# Hydra flags that take a value, so the value is not mistaken for an override.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                    "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
ORDER = ("stage", "model", "data", "augment", "optimizer", "schedule", "loss", "distill", "seed", "init", "resume",
         "trainer")
RENAMED = {"model=seed_resnet18": "model=tricks_resnet18"}  # old choice -> new, kept for one release


# --- the command line as Hydra must see it -------------------------------------------------

def normalize(argv: list[str]) -> list[str]:
    """`stage=1` -> `stage='1'`: Hydra rejects a group choice that parses as a number (sweeps,
    `stage=1,2`, item by item). `stages.<name>.<key>=v` -> `++stages...`: per-stage overrides
    are keys that config.yaml cannot declare in advance."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"stage=(\d+(?:,\d+)*)", arg)
        if match:
            arg = "stage=" + ",".join(f"'{n}'" for n in match.group(1).split(","))
        elif arg.startswith("stages.") and "=" in arg:
            arg = "++" + arg
        out.append(arg)
    return out


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if override_key(o) == key and "=" in o]
    return values[-1] if values else None


def task_overrides(argv: list[str]) -> list[str] | None:
    """The config overrides in argv (no flags, no hydra keys), or None for a sweep."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            return None
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-") and not override_key(arg).startswith(("hydra.", "hydra/")):
            out.append(arg)
    return out


def renamed_choices(overrides: list[str]) -> list[str]:
    return [f"note: {old} is now {new}; the old name goes in the next release"
            for old, new in RENAMED.items() if old in overrides]


# --- composing ----------------------------------------------------------------------------

@contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's compose API needs an initialised instance: the app's own inside a run, ours outside."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            yield


def is_sweep(overrides: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))
    except Exception as err:  # Hydra's parser raises its own error types
        raise ConfigError(one_line(str(err))) from None


def compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The config Hydra composes from these overrides (one stage, or a pipeline that lists its
    stages in `stage.run`), unresolved; with Hydra's own (`hydra.*`, launchers) where asked.
    An unknown option or key is a ConfigError of one line."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    overrides = normalize(overrides)
    key = (tuple(overrides), hydra_config)
    if key in _composed:  # a run composes the same config before Hydra starts and again inside it
        return copy.deepcopy(_composed[key])
    if is_sweep(overrides):
        raise ConfigError("a sweep (a,b) describes several runs; give single values here")
    try:
        with _hydra():
            composed = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        reason = err.__cause__  # e.g. "Key 'lrr' is not in struct" behind "Could not override"
        raise ConfigError(one_line(str(err) + (f"\n({str(reason).splitlines()[0]})" if reason else ""))) from None
    if not hydra_config:  # Hydra's own part holds the time and the folders of this moment
        _composed[key] = copy.deepcopy(composed)
    return composed


_composed: dict[tuple[tuple[str, ...], bool], DictConfig] = {}


def plan(overrides: list[str], run_dir: str | Path = RUN_FOLDER, world_size: int = 1,
         check_init: bool = True) -> list[DictConfig]:
    """The config of every stage these overrides describe, in order, each resolved and checked,
    exactly as it will train. A later stage of a pipeline starts from the previous stage's
    `<run_dir>/<stage>/last.pt` (`best.pt` where `stage.start_from` says); `world_size` ranks
    scale the lr where `trainer.scale_lr` says so.
    `check_init=False` shows a stage that starts from a checkpoint without naming one.

    Args:
        overrides: command-line overrides (`stage=1`, `model=resnet18`, `optimizer.lr=1e-3`, ...).
        run_dir: the run folder, where a later stage finds the previous stage's checkpoint.
        world_size: the number of ranks that will train.
        check_init: require that a stage which starts from a checkpoint names an existing one.

    Returns:
        One resolved stage config per stage, in the order they train.

    Raises:
        ConfigError: an unknown option or key, or an invalid value.
        CheckpointError: `init=` names a file that does not exist.
    """
    top = compose(overrides)
    note_unread_keys(overrides)
    if "run" in top.stage:
        kept = [o for o in normalize(overrides) if override_key(o) != "stage"]
        composed = [compose(kept + [f"stage='{choice}'"]) for choice in top.stage.run]
    else:
        composed = [top]
    names = [cfg.stage.name for cfg in composed]
    # A stage named on the command line must run (a preset may set up stages a run leaves out).
    asked = {override_key(o).split(".")[1] for o in normalize(overrides) if override_key(o).startswith("stages.")}
    unknown = sorted(asked - set(names))
    if unknown:
        raise ConfigError(f"stages.{unknown[0]} is set, but this run trains {', '.join(names)}")
    stages = []
    for i, cfg in enumerate(composed):
        previous = None if i == 0 else Path(run_dir) / names[i - 1]
        stages.append(finish_stage(cfg, previous, world_size))
    first = stages[0]
    if not check_init:
        return stages
    if first.stage.needs_init and first.init is None and first.resume is None:
        raise ConfigError(f"{first.stage.name} starts from a trained checkpoint: give init=PATH "
                          f"(for example outputs/<date>/<time>/stage1/last.pt)")
    if first.init is not None and not Path(first.init).expanduser().is_file():
        raise CheckpointError(f"checkpoint {first.init} does not exist (init=)")
    return stages


def note_unread_keys(overrides: list[str]) -> None:
    """`+foo=1` adds a key no part of bnntrain reads: legal for Hydra, almost surely a typo."""
    from .. import notes
    from .untrusted import config_groups

    known = {*ORDER, "stages", *config_groups()}
    for override in overrides:
        if override.startswith("+") and not override.startswith("++"):
            if override_key(override).replace("/", ".").split(".")[0] not in known:
                notes.add(f"warning: {override} adds a key that bnntrain does not read (a typo?)")


def finish_stage(cfg: DictConfig, previous: Path | None, world_size: int = 1) -> DictConfig:
    """Steps 3-5 above for one composed stage; `previous`, the folder of the stage before it
    in a pipeline (None for the first, which starts from `init=`)."""
    name = cfg.stage.name
    own = cfg.stages.get(name)
    if own:
        try:  # the config is in struct mode: a key it lacks is refused, not added
            cfg = OmegaConf.merge(cfg, own)
        except OmegaConfBaseException as err:
            raise ConfigError(f"stages.{name}: {one_line(str(err))}") from None
    try:
        values: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(str(err))) from None
    del values["stages"]
    fill_from_recipe(values["optimizer"], values["stage"].pop("recipe", None) or {}, name)
    if not values["stage"]["color_jitter"] and "color_jitter" in (values["augment"]["train"] or {}):
        values["augment"]["train"]["color_jitter"] = None  # trick 9: the stage trains without it
    # A later stage starts from the previous one's last (or, as it asks, best) checkpoint.
    if previous is not None:
        values["init"] = str(previous / f"{values['stage']['start_from']}.pt")
    if values["trainer"]["scale_lr"] and world_size > 1:  # linear scaling with the global batch
        values["optimizer"]["lr"] *= world_size
        if values["schedule"].get("warmup_lr"):
            values["schedule"]["warmup_lr"] *= world_size
    # The recipe first, then what it trains, then how: the order a reader checks a stage in.
    ordered = {key: values[key] for key in ORDER if key in values}
    stage = OmegaConf.create({**ordered, **{k: v for k, v in values.items() if k not in ordered}})
    OmegaConf.set_struct(stage, True)
    check_stage(stage)
    return stage


def fill_from_recipe(optimizer: dict[str, Any], recipe: dict[str, Any], stage: str) -> None:
    """`optimizer.lr` / `weight_decay` left null take the stage recipe's values for this optimizer."""
    values = recipe.get(optimizer["name"]) or {}
    for key in ("lr", "weight_decay"):
        if optimizer[key] is not None:
            continue
        if values.get(key) is None:
            written = f"it is written for {', '.join(recipe)}" if recipe else "it states none"
            raise ConfigError(f"{stage}'s recipe has no {key} for optimizer={optimizer['name']} ({written}); "
                              f"give optimizer.{key}=... (or stages.{stage}.optimizer.{key}=...)")
        optimizer[key] = values[key]


def group_base(group: str) -> DictConfig:
    """What every preset of a config group holds (`configs/<group>/_base.yaml`): for a config
    saved before a key was added, the value every preset has had since."""
    from importlib import resources

    return OmegaConf.create(resources.files(CONFIG_MODULE).joinpath(group, "_base.yaml").read_text())


def last_stage(overrides: list[str]) -> DictConfig:
    """The one stage these overrides describe, or a pipeline's last (fully binary) stage.

    Args:
        overrides: command-line overrides, as `plan` takes them.

    Returns:
        That stage's resolved config.
    """
    return plan(overrides)[-1]


def to_yaml(stages: list[DictConfig], package: str | None = None) -> str:
    """One stage as it is; a pipeline as a mapping from each stage's name to its config."""
    picked = [OmegaConf.select(s, package) if package else s for s in stages]
    if len(stages) == 1:
        return OmegaConf.to_yaml(picked[0]) if isinstance(picked[0], DictConfig) else f"{picked[0]}\n"
    return OmegaConf.to_yaml({s.stage.name: p for s, p in zip(stages, picked)})


# --- one-line errors ----------------------------------------------------------------------

def one_line(message: str) -> str:
    """Hydra's multi-line report as one line: the problem, then the options it expected."""
    message = message.split("Config search path:")[0]
    lines = [line.strip() for line in message.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    text = " ".join(lines)
    # "Available options in 'data': a b c" reads better as a list; a group's _base is no option.
    return re.sub(r"(Available options in '[^']+':) (.*)$",
                  lambda m: f"{m.group(1)} {', '.join(o for o in m.group(2).split() if not o.startswith('_'))}", text)


def error_line(err: BaseException) -> str:
    """The `error:` line of a UserError. Raised in a DataLoader worker, the message carries
    the worker's traceback; its last line is ours."""
    lines = str(err).strip().splitlines()
    return f"error: {lines[-1] if lines else type(err).__name__}"


def fail(err: UserError) -> None:
    """Print the error as one line and exit with status 2."""
    print(error_line(err), file=sys.stderr)
    sys.exit(2)


# --- the tools beside the trainer ---------------------------------------------------------

def split_args(argv: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """A tool's own `key=value` arguments, and the rest (overrides, for a tool that takes them)."""
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
    """Run a tool: `-h` prints its usage, and a UserError is one `error:` line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage)
        return
    from .. import notes

    try:
        body(argv)
    except UserError as err:
        fail(err)
    for note in notes.drain():
        print(note, file=sys.stderr)
