"""Which stages run, in what order, and the hand-over of weights between them.

A single-stage choice (`stage=1`) runs the composed config as it is. A pipeline choice
(`stage=two_stage`, the default) lists stage options in `stage.run`; each is composed
exactly as `python -m bnntrain stage=N <your overrides>` would be, and each later stage
starts from the previous stage's `last.pt`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .engine import distributed, load_checkpoint
from .errors import ConfigError, UserError
from .optim import validate_schedule
from .runs import override_key, resume_target
from .stage import train_stage

log = logging.getLogger("bnntrain")
Compose = Callable[[list[str]], DictConfig]


def plan_stages(cfg: DictConfig, overrides: list[str], compose: Compose) -> list[DictConfig]:
    if "run" not in cfg.stage:
        return [cfg]
    kept = [o for o in overrides if override_key(o) != "stage"]
    return [compose(kept + [f"stage='{choice}'"]) for choice in cfg.stage.run]


def validate(cfg: DictConfig) -> None:
    """Reject values that cannot work, before anything is trained or written."""
    if not isinstance(cfg.optimizer.lr, (int, float)) or cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be a positive number; got {cfg.optimizer.lr!r}")
    if (cfg.schedule.get("warmup_lr") or 0) > cfg.optimizer.lr:
        raise ConfigError(f"schedule.warmup_lr ({cfg.schedule.warmup_lr}) must not exceed optimizer.lr "
                          f"({cfg.optimizer.lr}): the warm-up leads up to the lr")
    if cfg.optimizer.get("weight_decay", 0) < 0:
        raise ConfigError(f"optimizer.weight_decay must be zero or positive; got {cfg.optimizer.weight_decay}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be a positive integer; got {cfg.data.batch_size}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be zero or positive; got {cfg.data.num_workers}")
    validate_schedule(cfg.schedule)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], compose: Compose) -> dict:
    """Run every planned stage; return the results written to `run_dir/results.json`."""
    resuming = cfg.get("resume") is not None
    if resuming:  # cfg is already the resumed run's config (see cli.prepare)
        run_dir, _ = resume_target(Path(str(cfg.resume)), [])
        log.info(f"resuming the run in {run_dir}")
    stages = plan_stages(cfg, overrides, compose)
    for stage_cfg in stages:
        validate(stage_cfg)
    if cfg.get("init") is not None:
        load_checkpoint(str(cfg.init))  # a bad path fails now, not after the data has loaded
    results = _read_results(run_dir) if resuming else {}
    previous = None if cfg.get("init") is None else str(cfg.init)
    for index, stage_cfg in enumerate(stages):
        name = stage_cfg.stage.name
        stage_dir = run_dir / name
        last = stage_dir / "last.pt"
        if name in results:  # finished before the interruption
            previous = str(run_dir / results[name]["checkpoint"])
            continue
        if last.exists() and not resuming:
            raise UserError(f"{stage_dir} already holds a checkpoint; resume={run_dir} continues that run, "
                            f"or choose a new hydra.run.dir")
        init = previous if index > 0 or stage_cfg.get("init") is None else str(stage_cfg.init)
        if stage_cfg.stage.needs_init and init is None and not last.exists():
            raise ConfigError(f"{name} starts from a trained checkpoint: give init=PATH "
                              f"(for example outputs/<date>/<time>/stage1/last.pt)")
        results[name] = train_stage(stage_cfg, stage_dir, init=init, resume=last if last.exists() else None)
        if distributed.is_main():
            _write_results(run_dir, results)
        previous = str(last)
    if distributed.is_main():
        _print_table(results)
    return results


def _read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_results(run_dir: Path, results: dict) -> None:
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, run_dir / "results.json")


def _print_table(results: dict) -> None:
    lines = [f"{'stage':<8} {'epochs':>6} {'top1':>7} {'top5':>7} {'best top1':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<8} {r['epochs']:>6} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['best_top1']:>10.2f}")
    log.info("results (test accuracy, %)\n" + "\n".join(lines))
