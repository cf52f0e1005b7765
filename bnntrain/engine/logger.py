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
    shows a tqdm bar on a terminal and prints one plain line per epoch.

    Args:
        stage_dir: the stage's folder, where the TensorBoard events go.
        stage: the stage's name, in the lines it prints.
        epochs: the stage's epochs.
        enabled: False on every process but the main one: nothing is written or printed.
        progress: `auto` (a bar where stderr is a terminal), `bar` (always) or anything else
            (never).
    """

    def __init__(self, stage_dir: Path, stage: str, epochs: int, enabled: bool = True,
                 progress: str = "auto") -> None:
        self.stage, self.epochs, self.enabled = stage, epochs, enabled
        self.bar = enabled and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
            self.writer = SummaryWriter(log_dir=str(stage_dir))

    def batches(self, loader: Iterable, epoch: int) -> Iterable:
        """An epoch's batches, behind a progress bar where the logger shows one.

        Args:
            loader: the epoch's batches.
            epoch: the epoch, counted from 0.

        Returns:
            `loader` itself, or a tqdm bar over it.
        """
        if not self.bar:
            return loader
        return tqdm(loader, desc=f"{self.stage} epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)

    def train_loss(self, step: int, loss: float) -> None:
        """Write a logged training loss (`train/loss`).

        Args:
            step: the optimizer step.
            loss: the mean loss since the last one logged.
        """
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)

    def epoch(self, epoch: int, lr: float, train: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """Write an epoch's learning rate, training loss and test metrics, and print its line.

        Args:
            epoch: the epoch, counted from 0.
            lr: its learning rate.
            train: what `Trainer.train_epoch` returned.
            val: what `Trainer.evaluate` returned.
            seconds: how long the epoch took.
        """
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
        """What re-estimating the BN statistics did: test top-1 before and after, and its cost.

        Args:
            epoch: the epoch, counted from 0.
            batches: the training batches the statistics were estimated from.
            before: the test metrics before.
            after: the test metrics after.
            seconds: how long the re-estimation took.
        """
        if not self.enabled:
            return
        self.scalars({"bn_recalibrate/top1_before": before["top1"], "bn_recalibrate/top1_after": after["top1"],
                      "bn_recalibrate/seconds": seconds}, epoch + 1)
        log.info(f"{self.stage} epoch {epoch + 1}/{self.epochs}  BN statistics re-estimated from {batches} batches "
                 f"in {seconds:.1f}s: top1 {before['top1']:.2f} -> {after['top1']:.2f}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write scalars to TensorBoard.

        Args:
            values: {tag: value}.
            step: the step (or epoch) they belong to.
        """
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str) -> None:
        """Write a text, such as the cost report's table, to TensorBoard as it is printed.

        Args:
            tag: its tag.
            text: the text.
        """
        if self.writer:
            # Indented four spaces, TensorBoard's markdown shows a table as it is printed.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def close(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        """Write the stage's hyperparameters with its final metrics, and close the writer.

        Args:
            hparams: the flat config (`flat_hparams`).
            final: the metrics to show beside them, as `hparam/<name>`.
        """
        if not self.enabled:
            return
        # add_hparams takes flat dicts of scalars and strings only.
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in final.items()}, run_name="hparams")
        self.writer.close()
