"""The command line: `python -m bnntrain [group=option ...] [key=value ...]`, a Hydra app.

Before Hydra starts (and makes a run folder), `prepare` composes and checks every stage
through `bnntrain.config`, so a bad option or value is one `error:` line and nothing is
written. `--cfg job` prints each stage's config as that stage will train.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import runs
from .checks import check_path
from .config import (error_line, fail, is_sweep, normalize, override_value, plan, renamed_choices,
                     task_overrides, to_yaml)
from .errors import UserError

log = logging.getLogger("bnntrain")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from . import pipeline  # imported here: torch is slow to import, and a bad override needs none of it
    from .engine import distributed
    from .engine.stopping import Stopped

    distributed.init(cfg.trainer.device)  # a no-op unless launched as several processes
    hydra_cfg = HydraConfig.get()
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one rank reports progress
    if distributed.launched_by_torchrun():
        log.info(f"data parallel over {distributed.world_size()} ranks, backend {distributed.backend()}")
    try:
        pipeline.run(list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir), distributed.world_size())
        distributed.shutdown()
    except Stopped as stop:  # a stop signal: the checkpoint is written
        log.info(str(stop))
        print(str(stop), file=sys.stderr)
        distributed.shutdown(wait=False)
        if stop.then is not None:  # submitit's preemption: its handler requeues the job, which resumes
            stop.then(stop.signum, None)
        sys.exit(stop.exit_code)
    except UserError as err:
        log.debug(error_line(err))  # into the run's log file
        distributed.shutdown(wait=False)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            print(error_line(err), file=sys.stderr)
            raise  # the launcher goes on with the other jobs, and Hydra reports the failure at the end
        fail(err)


def main() -> None:
    argv = normalize(sys.argv[1:])
    overrides = task_overrides(argv)
    try:
        if overrides is not None and is_sweep(overrides):  # e.g. a preset that sets hydra.mode=MULTIRUN
            overrides = None
    except UserError as err:
        fail(err)
    for note in renamed_choices(overrides or []):
        print(note, file=sys.stderr)
    try:
        if overrides is not None and job_config_request(argv) is not None:
            print_job_config(overrides, job_config_request(argv) or None)
            return
        argv, device = prepare(argv, overrides)
    except UserError as err:
        fail(err)
    sys.argv = [sys.argv[0]] + under_torchrun(argv, device)
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second one): nothing to save
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def job_config_request(argv: list[str]) -> str | None:
    """`--cfg job` (or `-c job`): the package asked for with `--package` ('' for all); None otherwise."""
    pairs = list(zip(argv, argv[1:] + [""]))
    if not any((flag in ("--cfg", "-c") and value == "job") or flag == "--cfg=job" for flag, value in pairs):
        return None
    return next((value for flag, value in pairs if flag in ("--package", "-p")), "")


def print_job_config(overrides: list[str], package: str | None) -> None:
    """Each stage's config, resolved, as it will train (a pipeline's labelled by stage)."""
    resume = override_value(overrides, "resume")
    if resume is not None:
        _, overrides = runs.resume_target(Path(resume), overrides)
        overrides += [f"resume={resume}"]
    print(to_yaml(plan(overrides, check_init=False), package), end="")


def prepare(argv: list[str], overrides: list[str] | None) -> tuple[list[str], str]:
    """Check the command before Hydra writes anything; return the arguments to run (a resume
    is pinned to the folder it continues) and the device the run will use."""
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        check_path(key, override_value(argv, key))
    out_key = "hydra.run.dir" if overrides is not None else "hydra.sweep.dir"
    runs.check_writable(Path(override_value(argv, out_key) or ("outputs" if overrides is not None else "multirun")),
                        out_key)
    if overrides is None:
        return argv, "auto"  # a sweep: Hydra composes each job, and each job checks itself
    resume = override_value(overrides, "resume")
    check_path("resume", resume)
    # One owner: rank 0 checks the folder and holds its lock (another rank checking would find
    # rank 0's own lock, if rank 0 got there first).
    owner = os.environ.get("RANK", "0") == "0"
    for folder in (override_value(argv, "hydra.run.dir"), resume and runs.run_folder(Path(resume))):
        if folder and owner:
            runs.check_free(Path(folder))  # a live run's folder: say whose, before anything else
    if resume is None:
        runs.refuse_existing_run(argv)
    else:
        # Hydra composes the resumed run's overrides plus today's, and the run goes on in its folder.
        run_dir, full = runs.resume_target(Path(resume), overrides)
        argv = [a for a in argv if a not in overrides] + full + [f"resume={resume}"]
        overrides = full + [f"resume={resume}"]
        if override_value(argv, "hydra.run.dir") is None:
            # output_subdir=null: Hydra leaves the run's .hydra/ (the record resume reads) alone.
            argv = argv + [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    stages = plan(overrides)
    run_dir = override_value(argv, "hydra.run.dir")
    if run_dir is not None and owner:
        note = runs.acquire(Path(run_dir))  # before Hydra writes a file there
        runs.notes.extend([note] if note else [])
    return argv, str(stages[0].trainer.device)


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
