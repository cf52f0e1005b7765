"""Progress output and TensorBoard logging for one stage. Only the main process writes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

log = logging.getLogger("bnntrain")


def flat_hparams(cfg: Any) -> dict[str, Any]:
    """Dotted scalar entries of a config, for TensorBoard's hparams view."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif node is not None:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


class StageLogger:
    """Writes `train/loss`, `train/lr`, `val/*` and the stage's hyperparameters to TensorBoard,
    shows a tqdm bar on a terminal and prints one plain line per epoch."""

    def __init__(self, stage_dir: Path, stage: str, epochs: int, enabled: bool = True,
                 progress: str = "auto") -> None:
        self.stage, self.epochs, self.enabled = stage, epochs, enabled
        self.bar = enabled and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
            self.writer = SummaryWriter(log_dir=str(stage_dir))

    def batches(self, loader: Iterable, epoch: int) -> Iterable:
        if not self.bar:
            return loader
        return tqdm(loader, desc=f"{self.stage} epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)

    def train_loss(self, step: int, loss: float) -> None:
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)

    def epoch(self, epoch: int, lr: float, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        if not self.enabled:
            return
        self.writer.add_scalar("train/lr", lr, epoch + 1)
        self.writer.add_scalar("train/epoch_loss", train["loss"], epoch + 1)
        for key, value in val.items():
            self.writer.add_scalar(f"val/{key}", value, epoch + 1)
        self.writer.flush()
        log.info(f"{self.stage} epoch {epoch + 1}/{self.epochs}  lr {lr:.2e}  train loss {train['loss']:.4f}  "
                 f"val loss {val['loss']:.4f}  top1 {val['top1']:.2f}  top5 {val['top5']:.2f}  ({seconds:.1f}s)")

    def recalibration(self, epoch: int, batches: int, before: dict[str, float], after: dict[str, float],
                      seconds: float) -> None:
        """What re-estimating the BN statistics did: test top-1 before and after, and its cost."""
        if not self.enabled:
            return
        self.scalars({"bn_recalibrate/top1_before": before["top1"], "bn_recalibrate/top1_after": after["top1"],
                      "bn_recalibrate/seconds": seconds}, epoch + 1)
        log.info(f"{self.stage} epoch {epoch + 1}/{self.epochs}  BN statistics re-estimated from {batches} batches "
                 f"in {seconds:.1f}s: top1 {before['top1']:.2f} -> {after['top1']:.2f}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            # Indented four spaces, TensorBoard's markdown shows a table as it is printed.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def close(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        if not self.enabled:
            return
        # add_hparams takes flat dicts of scalars and strings only.
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in final.items()}, run_name="hparams")
        self.writer.close()
