"""The table of a sweep: final and best top-1 of every job, as CSV and Markdown.

Hydra calls `AblationTable` after each job and once all jobs of a sweep have finished (see
experiment/ablation.yaml); each job leaves its `results.json` in its own folder.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..files import write_text


FAILED = "failed.txt"  # written into a job's folder when it stopped with an error


def job_label(overrides: list[str]) -> str:
    """The ablation toggle of a job, or its overrides where it has none."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "ablation":
            return value
    return " ".join(overrides) or "(no overrides)"


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder; a job that stopped with an error is listed as failed."""
    rows = []
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").exists()]
    for job in sorted(jobs, key=lambda p: (len(p.name), p.name)):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"run": job_label(overrides), "folder": job.name}
        results = json.loads((job / "results.json").read_text()) if (job / "results.json").exists() else {}
        for stage, r in results.items():
            row[f"{stage} top1"] = round(r["top1"], 2)
            row[f"{stage} best top1"] = round(r["best_top1"], 2)
        row["status"] = "done" if (job / "results.json").exists() and not (job / FAILED).exists() else "failed"
        rows.append(row)
    return rows


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """ablation.csv and ablation.md, each written whole or not at all."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "ablation.csv", table.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    write_text(sweep_dir / "ablation.md", "\n".join(lines) + "\n")


class AblationTable(Callback):
    """Rewrites the table after every job (so a failed or interrupted sweep still has one)
    and prints it when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status != JobStatus.COMPLETED:
            write_text(job_dir / FAILED, f"{job_return._return_value}\n")
        self._write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._write(Path(config.hydra.sweep.dir)):
            print((Path(config.hydra.sweep.dir) / "ablation.md").read_text(), end="")

    @staticmethod
    def _write(sweep_dir: Path) -> bool:
        rows = collect(sweep_dir) if sweep_dir.is_dir() else []
        if rows:
            write_tables(rows, sweep_dir)
        return bool(rows)
