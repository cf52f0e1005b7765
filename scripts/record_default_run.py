"""Runs the default `python -m bnntrain` (two stages on scikit-learn's digits) and records what
it ends with and how it got there: each stage's final numbers from the run's results.json, and
its test top-1 and flip ratio per epoch from the stage's TensorBoard events.

    python scripts/record_default_run.py [--out scripts/results_default_run_cpu.json] [--machine TEXT]

`log_seconds` is the run as its log shows it, first line to last (the time the two stages
take, as `seconds` in results.json counts them, plus the hand-over between them);
`process_seconds` is the whole command, Python's start and the imports included. The docs'
figure of the run's curves is drawn from the JSON this writes (scripts/plot_results.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scripts" / "results_default_run_cpu.json"
COMMAND = "python -m bnntrain"
STAGE_KEYS = ("top1", "top5", "best_top1", "epochs", "seconds")
# A line of the run's log file (bnntrain/configs/hydra/job_logging): "[2026-12-06 11:40:25,842][INFO] ..."
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def run_cli(run_dir: Path, overrides: Sequence[str] = ()) -> float:
    """`python -m bnntrain OVERRIDES` with its run folder at `run_dir`; the seconds it took.
    Run from the repository root, as the README's quick start runs it."""
    cmd = [sys.executable, "-m", "bnntrain", *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return seconds


def log_seconds(run_dir: Path) -> float:
    """Seconds from the first to the last timestamped line of the run folder's log file."""
    (log,) = run_dir.glob("*.log")  # one per run: named after the Hydra job
    times = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
             for m in map(LOG_TIME.match, log.read_text().splitlines()) if m]
    return (times[-1] - times[0]).total_seconds()


def scalars(stage_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar in a stage folder (its own event files only,
    not hparams/); a step logged twice (a resumed stage) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    # TensorBoard stores float32: seven significant digits are all the value holds.
    return {event.step: float(f"{event.value:.7g}") for event in events.Scalars(tag)}


def stage_curves(stage_dir: Path) -> dict[str, list]:
    """The stage's test top-1 (%) per epoch, and its flip ratio per epoch where it has binary
    weights (a stage with real weights logs none, and its curves have no `flip_ratio`)."""
    top1 = scalars(stage_dir, "val/top1")
    flips = scalars(stage_dir, "train/flip_ratio")
    epochs = sorted(top1)
    curves = {"epoch": epochs, "top1": [top1[e] for e in epochs]}
    if flips:
        curves["flip_ratio"] = [flips[e] for e in epochs]
    return curves


def read_run(run_dir: Path) -> dict[str, dict]:
    """Each stage of a finished run folder: its final numbers (results.json) and its curves."""
    results = json.loads((run_dir / "results.json").read_text())
    stages = {}
    for stage, final in results.items():
        stages[stage] = {key: final[key] for key in STAGE_KEYS}
        stages[stage]["seconds"] = round(final["seconds"], 1)
        stages[stage]["curves"] = stage_curves(run_dir / stage)
    return stages


def describe(run_dir: Path, overrides: Sequence[str], machine: str | None, process_seconds: float) -> dict:
    """The record of a finished run folder: command, seed, machine, torch, timings, and each
    stage's numbers and curves."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")  # the whole run's config, as composed
    return {"command": " ".join([COMMAND, *overrides]), "seed": int(config.seed),
            "machine": machine or f"{os.cpu_count()}-core CPU", "torch": version("torch"),
            "log_seconds": round(log_seconds(run_dir), 1), "process_seconds": round(process_seconds, 1),
            "stages": read_run(run_dir)}


def record(overrides: Sequence[str] = (), machine: str | None = None, run_dir: Path | None = None) -> dict:
    """Runs `python -m bnntrain OVERRIDES` in `run_dir` (a temporary folder if None) and
    returns its record (`describe`)."""
    with tempfile.TemporaryDirectory(prefix="bnntrain-default-run-") as tmp:
        folder = Path(run_dir) if run_dir is not None else Path(tmp) / "run"
        return describe(folder, overrides, machine, run_cli(folder, overrides))


def to_json(run: dict) -> str:
    """The record as indented JSON, each list of numbers on one line (a curve reads as a row)."""
    text = json.dumps(run, indent=2)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON to write")
    parser.add_argument("--machine", default=None, help="what ran it, in words (default: the CPU count)")
    args = parser.parse_args(argv)
    run = record(machine=args.machine)
    args.out.write_text(to_json(run))
    stages = ", ".join(f"{name} {stage['top1']:.2f}" for name, stage in run["stages"].items())
    print(f"wrote {args.out}: top-1 {stages}; {run['log_seconds']} s in the log, {run['process_seconds']} s in all")


if __name__ == "__main__":
    main()
