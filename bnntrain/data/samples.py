"""What makes an epoch's batches a function of (seed, epoch) alone, and resumable anywhere.

- `SeededSamples` seeds each sample's augmentation from (seed, epoch, index) before it is
  loaded: a batch is the same whichever worker loads it, however many workers there are,
  and wherever the epoch was started, so a run stopped mid-epoch resumes exactly.
- `ResumableSampler` is PyTorch's DistributedSampler (a seeded shuffle per epoch, one share
  per rank) that can start an epoch part-way.
- With `data.bad_images: skip` an unreadable file is replaced by the next readable sample
  and its path travels with the batch to `BadImageLog`, which records each once.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import random
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ..engine.stopping import raise_if_stopped
from ..errors import DataError
from ..registry import choose
from .images import BadImage

BAD_IMAGES = ("error", "skip")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from three numbers (a SplitMix-style mix: neighbours land far apart)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's CPU generators (torch.manual_seed would also queue a seed
    for every CUDA device, at half a millisecond a call: per image, that is a cost)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class SeededSamples(Dataset):
    """`dataset`'s samples as (image, target, bad), each drawn with its own seed; `bad` lists
    (one per line) the unreadable files skipped to get there, or is empty."""

    def __init__(self, dataset: Dataset, seed: int, bad_images: str) -> None:
        choose("data.bad_images", bad_images, BAD_IMAGES)
        self.dataset, self.seed, self.skip, self.epoch = dataset, seed, bad_images == "skip", 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        skipped = []
        for offset in range(len(self)):  # the next readable sample stands in for a bad one
            i = (index + offset) % len(self)
            seed_all(sample_seed(self.seed, self.epoch, i))
            try:
                image, target = self.dataset[i]
                return image, target, "\n".join(skipped)
            except BadImage as err:
                if not self.skip:
                    raise
                skipped.append(err.path)
        raise DataError(f"no readable image among the {len(self)} of this split")


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after `start` of this rank's samples."""

    start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


def quiet_worker(_: int) -> None:
    """Loader workers leave SIGINT, SIGTERM and SIGUSR1 to the main process, which stops the
    run cleanly; a worker killed by Ctrl-C or by SLURM would end the epoch with an error.
    (So that a process leaving on an error does not wait for workers that ignore the SIGTERM
    of multiprocessing's clean-up, `kill_workers_at_exit` ends them first.) Nor do they hold the
    run folder's lock, which ends with the run's own process."""
    from ..run.folders import close_inherited_locks  # here: the run package imports the data package

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    close_inherited_locks()


@functools.cache
def kill_workers_at_exit() -> None:
    """At exit, end the loader workers still running with SIGKILL, before multiprocessing's own
    clean-up (atexit runs the last registered first), which would wait for them forever."""
    def kill() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would report each as a failure
        for child in multiprocessing.active_children():
            child.kill()
    atexit.register(kill)


class BadImageLog:
    """Each unreadable file once: a log line and a line of `<run>/bad_images.txt`; past
    `limit` of them, the run stops."""

    def __init__(self, path: Path | None, limit: int, log=None) -> None:
        self.path, self.limit, self.log = path, limit, log
        self.seen: set[str] = set()

    def record(self, batch_paths: list[str]) -> None:
        new = sorted({p for paths in batch_paths for p in paths.split("\n") if p} - self.seen)
        for path in new:
            self.seen.add(path)
            if self.log is not None:
                self.log.warning(f"skipped an unreadable image (data.bad_images=skip): {path}")
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(path + "\n")
        if len(self.seen) > self.limit:
            raise DataError(f"{len(self.seen)} unreadable images, more than data.max_bad_images={self.limit} "
                            f"(listed in {self.path or 'the log'}); the last: {new[-1]}")


class _FileCheck(Dataset):
    """Each file of an image-folder split, opened and decoded: '' where it reads, else its path."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        from .images import load_rgb

        try:
            load_rgb(self.paths[i])
            return ""
        except BadImage:
            return self.paths[i]


def image_paths(dataset: Dataset) -> list[str] | None:
    """The file of each item of an image-folder dataset (or a Subset of one); None otherwise."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = image_paths(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    return [path for path, _ in samples] if samples is not None else None


def verify(dataset: Dataset, workers: int, policy: str, bad_images: BadImageLog | None, show: bool) -> Dataset:
    """Open and decode every file of `dataset` in loader workers before training starts. The
    unreadable ones stop the run (`error`) or are recorded and left out (`skip`)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    paths = image_paths(dataset)
    if paths is None:
        return dataset  # held in memory: nothing to open
    workers = min(workers, os.cpu_count() or 1)
    # Small batches: a stop signal is looked at after each (see raise_if_stopped).
    loader = DataLoader(_FileCheck(paths), batch_size=16, num_workers=workers, collate_fn=list,
                        worker_init_fn=quiet_worker if workers else None)
    bad = []
    for batch in tqdm(loader, desc="verifying images", disable=not show, leave=False):
        raise_if_stopped(f"verifying {len(paths)} images (data.verify)")  # a big folder takes minutes
        bad += [p for p in batch if p]
    if bad and policy == "error":
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be read (data.verify), the first: {bad[0]}; "
                        f"data.bad_images=skip leaves them out")
    if bad and bad_images is not None:
        bad_images.record(["\n".join(bad)])
    unreadable = set(bad)
    keep = [i for i, p in enumerate(paths) if p not in unreadable]
    return Subset(dataset, keep) if bad else dataset
