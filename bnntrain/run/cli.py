"""The command line: `python -m bnntrain [group=option ...] [key=value ...]`, a Hydra app.

Before Hydra starts (and makes a run folder), `prepare` composes and checks every stage
through `bnntrain.run.config`, so a bad option or value is one `error:` line and nothing is
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

from .. import notes
from . import folders
from .checks import check_path
from .config import (compose, error_line, fail, is_sweep, normalize, override_key, override_value, plan,
                     renamed_choices, task_overrides, to_yaml)
from ..errors import ConfigError, UserError

log = logging.getLogger("bnntrain")


@hydra.main(config_path="pkg://bnntrain.configs", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from . import pipeline  # imported here: torch is slow to import, and a bad override needs none of it
    from ..engine import distributed
    from ..engine.stopping import Stopped

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
        to_log_file(str(stop), logging.INFO)
        print(str(stop), file=sys.stderr)
        distributed.shutdown(wait=False)
        if stop.then is not None:  # submitit's preemption: its handler requeues the job, which resumes
            stop.then(stop.signum, None)
        sys.exit(stop.exit_code)
    except UserError as err:
        to_log_file(error_line(err), logging.ERROR)
        distributed.shutdown(wait=False)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            print(error_line(err), file=sys.stderr)
            raise  # the launcher goes on with the other jobs, and Hydra reports the failure at the end
        fail(err)


def to_log_file(message: str, level: int) -> None:
    """Into the run's log file only: the console gets the message once, on stderr."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


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
        if overrides is None and job_config_request(argv) is not None:
            raise ConfigError("--cfg job prints the config of one run, and -m makes a sweep of several: "
                              "leave out -m and give one value per key")
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
        _, overrides, _ = folders.resume_target(Path(resume), overrides)
        overrides += [f"resume={resume}"]
    print(to_yaml(plan(overrides, check_init=False), package), end="")


def prepare(argv: list[str], overrides: list[str] | None) -> tuple[list[str], str]:
    """Check the command before Hydra writes anything; return the arguments to run (pinned to
    a run folder this process holds, or a sweep folder of its own) and the device the run
    will use. A command refused here has written nothing."""
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        check_path(key, override_value(argv, key))
    sweep = overrides is None or multirun_preset(argv, overrides)
    out_key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    folders.check_writable(Path(override_value(argv, out_key) or ("multirun" if sweep else "outputs")), out_key)
    if sweep:
        return with_overrides(argv, sweep_folder(argv)), "auto"  # Hydra composes each job, and each job checks itself
    # One owner: rank 0 checks the folder and holds its lock (another rank checking would find
    # rank 0's own lock, if rank 0 got there first).
    owner = os.environ.get("RANK", "0") == "0"
    resume = override_value(overrides, "resume")
    if resume is not None:
        argv, overrides = resumed(argv, overrides, resume, owner)
    else:
        given = override_value(argv, "hydra.run.dir")
        if given and owner:
            folders.check_free(Path(given))  # a live run's folder: say whose, before anything else
        folders.refuse_existing_run(argv)
    stages = plan(overrides)
    run_dir = override_value(argv, "hydra.run.dir")
    if run_dir is not None:
        folders.refuse_inside_data(Path(run_dir), stages)
    if run_dir is None and owner and not launched_by_torchrun():  # under torchrun, see under_torchrun
        # Hydra's outputs/<date>/<time> would be shared by two runs started in the same second.
        run_dir = str(folders.new_run_folder(Path("outputs")))
        argv = with_overrides(argv, [f"hydra.run.dir={run_dir}"])
    if run_dir is not None and owner:
        took_over = folders.acquire(Path(run_dir))  # before Hydra writes a file there
        if took_over:
            notes.add(took_over)
    return argv, str(stages[0].trainer.device)


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """`argv` with `extra` overrides placed right after its own: Hydra's parser takes the
    overrides as one run of arguments, so one after a flag (`-m a=1,2 --cfg job b=3`) is refused."""
    last = max((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), default=len(argv) - 1)
    return argv[:last + 1] + extra + argv[last + 1:]


def resumed(argv: list[str], overrides: list[str], resume: str, owner: bool) -> tuple[list[str], list[str]]:
    """The command and overrides that continue the run `resume` names, in its own folder: the
    overrides that made it (those its record may give, see `untrusted`) plus today's."""
    check_path("resume", resume)
    run_dir, full, refused = folders.resume_target(Path(resume), overrides)  # it exists and is a run
    given = override_value(argv, "hydra.run.dir")
    if given is not None and Path(given).expanduser().resolve() != run_dir.resolve():
        raise UserError(f"resume={resume} continues the run in its own folder, {run_dir}; "
                        f"hydra.run.dir={given} names another (leave it out)")
    if owner:
        folders.check_free(run_dir)  # a live run's folder: say whose, before anything else
        folders.check_writable(run_dir, "resume")
    if refused:
        notes.add(folders.refused_note(run_dir, refused))  # logged once the run has its log
    # output_subdir=null: Hydra leaves the run's .hydra/ (the record resume reads) alone.
    kept = [a for a in argv if a not in overrides and not a.startswith("hydra.run.dir=")]
    return (with_overrides(kept, full + [f"resume={resume}", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]),
            full + [f"resume={resume}"])


def multirun_preset(argv: list[str], overrides: list[str]) -> bool:
    """True where the config itself sweeps (a preset with `hydra.mode: MULTIRUN`, such as
    experiment=ablation), though the command has no -m. A resumed run is one run. Only the
    command line and an experiment preset set `hydra.mode`: without either, nothing to compose."""
    if override_value(overrides, "resume") is not None:
        return False
    if override_value(overrides, "experiment") is None and override_value(argv, "hydra.mode") is None:
        return False
    hydra_keys = [a for a in argv if "=" in a and override_key(a).startswith("hydra.")]
    return str(compose(overrides + hydra_keys, hydra_config=True).hydra.mode) == str(RunMode.MULTIRUN)


def sweep_folder(argv: list[str]) -> list[str]:
    """A sweep into a folder that holds another sweep's jobs would rewrite their records:
    refused. With no folder given, the sweep gets one of its own."""
    given = override_value(argv, "hydra.sweep.dir")
    if given is not None:
        if folders.holds_jobs(Path(given)):
            raise UserError(f"hydra.sweep.dir={given} already holds a sweep, whose records this one would "
                            f"overwrite; choose another folder")
        return []
    return [f"hydra.sweep.dir={folders.new_run_folder(Path('multirun'))}"]


def launched_by_torchrun() -> bool:
    """As `distributed.launched_by_torchrun`, without importing torch before it is needed."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def under_torchrun(argv: list[str], device: str) -> list[str]:
    """Under torchrun every rank runs this app: join the process group first and pin one run
    folder, named by rank 0's clock, for all ranks (Hydra would name one per rank)."""
    from ..engine import distributed

    if not distributed.launched_by_torchrun():
        return argv
    distributed.init(device)
    if not any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in argv):
        # Rank 0 makes a run folder of its own and tells the others its name.
        made = str(folders.new_run_folder(Path("outputs"))) if distributed.is_main() else ""
        argv = argv + [f"hydra.run.dir={distributed.broadcast_text(made)}"]
    return argv


if __name__ == "__main__":
    main()
