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
from ..data.samples import BadImageLog
from ..engine import distributed, load_checkpoint
from ..engine.stopping import StopSignals
from ..errors import ConfigError, UserError
from ..files import write_text
from .. import notes
from . import folders
from .folders import resume_target
from ..engine.stage import train_stage

log = logging.getLogger("bnntrain")


def run(overrides: list[str], run_dir: Path, world_size: int = 1) -> dict:
    """Train every planned stage; return the results written to `run_dir/results.json`."""
    resume = override_value(overrides, "resume")
    if resume is not None:  # the overrides are already the resumed run's (see cli.prepare)
        run_dir, _, _ = resume_target(Path(resume), [])
        log.info(f"resuming the run in {run_dir}")
    requeued = resume is None and folders.requeued_job(run_dir)
    if requeued:
        log.info(f"a requeued job: resuming the run in {run_dir}")
    stages = plan(overrides, run_dir, world_size)
    if distributed.is_main():
        took_over = folders.acquire(run_dir)
        if took_over:
            notes.add(took_over)
        for note in notes.drain():
            log.warning(note)
    if resume is not None and not folders.has_checkpoint(run_dir):
        log.info(f"{run_dir} holds no checkpoint yet: the run starts from its beginning there")
    try:
        with StopSignals() as signals:  # from the moment the run holds its folder
            return _run_stages(stages, run_dir, resume is not None or requeued, signals)
    finally:
        if distributed.is_main():
            folders.release(run_dir)


def _run_stages(stages: list[DictConfig], run_dir: Path, resuming: bool, signals: StopSignals) -> dict:
    if stages[0].init is not None:
        load_checkpoint(str(stages[0].init))  # a bad path fails now, not after the data has loaded
    results = _read_results(run_dir) if resuming else {}
    _extend(stages, results, run_dir)
    if distributed.is_main():
        write_text(run_dir / "config.yaml", to_yaml(_as_trained(stages, results, run_dir)))
    for stage_cfg in stages:
        name = stage_cfg.stage.name
        last = run_dir / name / "last.pt"
        if name in results:  # finished before the interruption
            log.info(f"{name}: finished ({results[name]['epochs']} epochs), skipped")
            continue
        if last.exists() and not resuming:
            raise UserError(f"{run_dir / name} already holds a checkpoint; resume={run_dir} continues that run, "
                            f"or choose a new hydra.run.dir")
        if stage_cfg.stage.needs_init and stage_cfg.init is None and not last.exists():
            raise ConfigError(f"{name} starts from a trained checkpoint: give init=PATH")
        bad_images = BadImageLog(run_dir / "bad_images.txt" if distributed.is_main() else None,
                                 stage_cfg.data.get("max_bad_images", 0), log)
        results[name] = train_stage(stage_cfg, run_dir / name, init=stage_cfg.init,
                                    resume=last if last.exists() else None, bad_images=bad_images, signals=signals)
        if distributed.is_main():
            write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    if distributed.is_main():
        _print_table(results)
    return results


def _extend(stages: list[DictConfig], results: dict, run_dir: Path) -> None:
    """A resumed run asking a finished stage for more epochs continues it from its last.pt
    (its entry leaves `results`); one that would change a stage a later stage started from,
    or ask for fewer epochs, is refused: never silently nothing."""
    names = [s.stage.name for s in stages]
    for i, cfg in enumerate(stages):
        name, epochs = cfg.stage.name, cfg.schedule.epochs
        if name not in results or epochs == results[name]["epochs"]:
            continue
        if epochs < results[name]["epochs"]:
            raise ConfigError(f"{name} has trained {results[name]['epochs']} epochs already; "
                              f"schedule.epochs={epochs} asks for fewer (start a new run with init= to shorten it)")
        later = [n for n in names[i + 1:] if (run_dir / n / "last.pt").exists()]
        if later:
            raise ConfigError(f"{name} finished and {later[0]} started from it: extending {name} would mean training "
                              f"{later[0]} again; extend {names[-1]} alone (stages.{names[-1]}.schedule.epochs=N), "
                              f"or start a new run from init=")
        log.info(f"{name}: extended from {results[name]['epochs']} to {epochs} epochs")
        del results[name]


def _as_trained(stages: list[DictConfig], results: dict, run_dir: Path) -> list[DictConfig]:
    """The config of each stage as it trains: a stage that finished before a resume keeps the
    config it finished with, the others take today's."""
    return [OmegaConf.load(run_dir / s.stage.name / "config.yaml") if s.stage.name in results else s
            for s in stages]


def _read_results(run_dir: Path) -> dict:
    """The stages a resumed run finished; a file that is not what the pipeline writes is refused."""
    path = run_dir / "results.json"
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} cannot be read ({type(err).__name__}); it is not this run's results") from None
    number = (int, float)
    if not isinstance(results, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("epochs"), int) and not isinstance(r["epochs"], bool)
            and all(isinstance(r.get(k), number) for k in ("top1", "top5", "best_top1")) for r in results.values()):
        raise UserError(f"{path} is not a run's results (stage -> epochs, top1, top5, best_top1)")
    return results


def _print_table(results: dict) -> None:
    lines = [f"{'stage':<8} {'epochs':>6} {'top1':>7} {'top5':>7} {'best top1':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<8} {r['epochs']:>6} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['best_top1']:>10.2f}")
    log.info("results (test accuracy, %)\n" + "\n".join(lines))
