"""Seeding. Each epoch re-seeds every generator from (seed, stage, epoch), so an epoch's
shuffling, augmentation and mixing depend only on those three numbers: a resumed run
replays exactly the epochs that an uninterrupted run would have trained."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    stage_index = int("".join(ch for ch in stage if ch.isdigit()) or 0)
    return seed * 1_000_003 + stage_index * 10_007 + epoch
