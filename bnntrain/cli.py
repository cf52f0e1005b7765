"""The command line: `python -m bnntrain [group=option ...] [key=value ...]`, a Hydra app."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import runs
from .errors import ConfigError, UserError

log = logging.getLogger("bnntrain")
CONFIG_MODULE = "bnntrain.configs"
# Hydra flags that take a value, so the value is not mistaken for an override.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                    "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def _compose(overrides: list[str]) -> DictConfig:
    return hydra.compose(config_name="config", overrides=overrides)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from . import pipeline  # imported here: torch is slow to import, and a bad override needs none of it
    from .engine import distributed

    distributed.init(cfg.trainer.device)  # a no-op unless launched as several processes
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports progress
    elif cfg.get("resume") is None:  # a resumed run keeps the config.yaml it started with
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if distributed.launched_by_torchrun():
        log.info(f"data parallel over {distributed.world_size()} ranks, backend {distributed.backend()}")
    try:
        pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task), _compose)
    except UserError as err:
        # Raised in a DataLoader worker, the message carries the worker's traceback; its last
        # line is ours.
        message = str(err).strip().splitlines()[-1]
        log.debug(f"error: {message}")  # into the run's log file
        print(f"error: {message}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # the launcher goes on with the other jobs, and Hydra reports the failure at the end
        sys.exit(2)


def quote_stage_choices(argv: list[str]) -> list[str]:
    """`stage=1` -> `stage='1'`: Hydra rejects a config-group choice that parses as a number,
    and the stage options are named 0, 1 and 2. Sweeps (`stage=1,2`) are quoted item by item."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"stage=(\d+(?:,\d+)*)", arg)
        out.append("stage=" + ",".join(f"'{n}'" for n in match.group(1).split(",")) if match else arg)
    return out


def task_overrides(argv: list[str]) -> list[str] | None:
    """The config overrides in argv, or None for a sweep (Hydra checks each job itself)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            return None
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-") and not arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra")):
            out.append(arg)
    return out


def compose_checked(overrides: list[str]) -> DictConfig | None:
    """Compose once before the app runs, so that an unknown option or key is reported as
    one line (a ConfigError) rather than Hydra's multi-line report. None for a sweep."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides)):
            return None  # a sweep (the preset may set hydra.mode=MULTIRUN): Hydra checks each job
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        reason = err.__cause__  # e.g. "Key 'lrr' is not in struct" behind "Could not override"
        raise ConfigError(one_line(str(err) + (f"\n({str(reason).splitlines()[0]})" if reason else ""))) from None


def one_line(message: str) -> str:
    """Hydra's multi-line report as one line: the problem, then the options it expected."""
    message = message.split("Config search path:")[0]
    lines = [line.strip() for line in message.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    text = " ".join(lines)
    # "Available options in 'data': a b c" reads better as a list.
    return re.sub(r"(Available options in '[^']+':) (.*)$", lambda m: f"{m.group(1)} {', '.join(m.group(2).split())}",
                  text)


def main() -> None:
    argv = quote_stage_choices(sys.argv[1:])
    try:
        argv, device = prepare(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + under_torchrun(argv, device)
    app()


def prepare(argv: list[str]) -> tuple[list[str], str]:
    """Check the command before Hydra writes anything; return the arguments to run (a resume
    is pinned to the folder it continues) and the device the run will use."""
    overrides = task_overrides(argv)
    if overrides is None:
        return argv, "auto"
    resume = runs.override_value(overrides, "resume")
    if resume is None:
        runs.refuse_existing_run(argv)
    else:
        # Hydra composes the resumed run's overrides plus today's, and the run goes on in its folder.
        run_dir, full = runs.resume_target(Path(resume), overrides)
        argv = [a for a in argv if a not in overrides] + full + [f"resume={resume}"]
        overrides = full
        if runs.override_value(argv, "hydra.run.dir") is None:
            # output_subdir=null: Hydra leaves the run's .hydra/ (the record resume reads) alone.
            argv = argv + [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    cfg = compose_checked(overrides)
    return argv, "auto" if cfg is None else str(cfg.trainer.device)


def under_torchrun(argv: list[str], device: str) -> list[str]:
    """Under torchrun every rank runs this app: join the process group first and pin one run
    folder, named by rank 0's clock, for all ranks (Hydra would name one per rank)."""
    from .engine import distributed

    if not distributed.launched_by_torchrun():
        return argv
    distributed.init(device)
    if not any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in argv):
        argv = argv + [f"hydra.run.dir=outputs/{distributed.shared_timestamp()}"]
    return argv


if __name__ == "__main__":
    main()
