"""The table of a sweep: final and best top-1 of every job, as CSV and Markdown.

Hydra calls `AblationTable.on_multirun_end` once all jobs of a sweep have finished (see
experiment/ablation.yaml); each job left its `results.json` in its own folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def job_label(overrides: list[str]) -> str:
    """The ablation toggle of a job, or its overrides where it has none."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "ablation":
            return value
    return " ".join(overrides) or "(no overrides)"


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if (p / "results.json").exists()),
                      key=lambda p: (len(p.name), p.name)):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"run": job_label(overrides), "folder": job.name}
        results = json.loads((job / "results.json").read_text())
        for stage, r in results.items():
            row[f"{stage} top1"] = round(r["top1"], 2)
            row[f"{stage} best top1"] = round(r["best_top1"], 2)
        rows.append(row)
    return rows


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    (sweep_dir / "ablation.md").write_text("\n".join(lines) + "\n")


class AblationTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if rows:
            write_tables(rows, sweep_dir)
            print((sweep_dir / "ablation.md").read_text(), end="")
