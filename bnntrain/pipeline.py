"""Which stages run, in what order, and the hand-over of weights between them.

`config.plan` gives the config of each stage (one for a single-stage choice such as
`stage=1`, one per entry of `stage.run` for a pipeline), each later stage's `init`
pointing at the previous stage's `last.pt` in this run folder. Here they train in order;
a resumed run skips the stages that finished and continues the interrupted one from its
`last.pt`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import override_value, plan, to_yaml
from .engine import distributed, load_checkpoint
from .errors import ConfigError, UserError
from .files import write_text
from .runs import resume_target
from .stage import train_stage

log = logging.getLogger("bnntrain")


def run(overrides: list[str], run_dir: Path, world_size: int = 1) -> dict:
    """Train every planned stage; return the results written to `run_dir/results.json`."""
    resume = override_value(overrides, "resume")
    if resume is not None:  # the overrides are already the resumed run's (see cli.prepare)
        run_dir, _ = resume_target(Path(resume), [])
        log.info(f"resuming the run in {run_dir}")
    stages = plan(overrides, run_dir, world_size)
    if stages[0].init is not None:
        load_checkpoint(str(stages[0].init))  # a bad path fails now, not after the data has loaded
    results = _read_results(run_dir) if resume is not None else {}
    if distributed.is_main():
        write_text(run_dir / "config.yaml", to_yaml(_as_trained(stages, results, run_dir)))
    for stage_cfg in stages:
        name = stage_cfg.stage.name
        last = run_dir / name / "last.pt"
        if name in results:  # finished before the interruption
            continue
        if last.exists() and resume is None:
            raise UserError(f"{run_dir / name} already holds a checkpoint; resume={run_dir} continues that run, "
                            f"or choose a new hydra.run.dir")
        if stage_cfg.stage.needs_init and stage_cfg.init is None and not last.exists():
            raise ConfigError(f"{name} starts from a trained checkpoint: give init=PATH")
        results[name] = train_stage(stage_cfg, run_dir / name, init=stage_cfg.init,
                                    resume=last if last.exists() else None)
        if distributed.is_main():
            write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    if distributed.is_main():
        _print_table(results)
    return results


def _as_trained(stages: list[DictConfig], results: dict, run_dir: Path) -> list[DictConfig]:
    """The config of each stage as it trains: a stage that finished before a resume keeps the
    config it finished with, the others take today's."""
    return [OmegaConf.load(run_dir / s.stage.name / "config.yaml") if s.stage.name in results else s
            for s in stages]


def _read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _print_table(results: dict) -> None:
    lines = [f"{'stage':<8} {'epochs':>6} {'top1':>7} {'top5':>7} {'best top1':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<8} {r['epochs']:>6} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['best_top1']:>10.2f}")
    log.info("results (test accuracy, %)\n" + "\n".join(lines))
