"""The command line: `python -m bnntrain [group=option ...] [key=value ...]`, a Hydra app."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import pipeline
from .errors import UserError

log = logging.getLogger("bnntrain")


def _compose(overrides: list[str]) -> DictConfig:
    return hydra.compose(config_name="config", overrides=overrides)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task), _compose)
    except UserError as err:
        log.debug(f"error: {err}")  # into the run's log file
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def quote_stage_choices(argv: list[str]) -> list[str]:
    """`stage=1` -> `stage='1'`: Hydra rejects a config-group choice that parses as a number,
    and the stage options are named 0, 1 and 2. Sweeps (`stage=1,2`) are quoted item by item."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"stage=(\d+(?:,\d+)*)", arg)
        out.append("stage=" + ",".join(f"'{n}'" for n in match.group(1).split(",")) if match else arg)
    return out


def main() -> None:
    sys.argv = [sys.argv[0]] + quote_stage_choices(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
