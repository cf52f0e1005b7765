"""`build_loaders` turns the `data` and `augment` config groups and a stage into batches on a device."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from ..engine import distributed
from ..errors import DataError
from .datasets import DATASETS
from .samples import (BadImageLog, ResumableSampler, SeededSamples, kill_workers_at_exit, quiet_worker, sample_seed,
                      verify)
from .transforms import (ON_BATCHES, BatchNormalize, build_batch_augment, build_batch_mixing, build_transform,
                         decoder_for)

Batch = tuple[torch.Tensor, torch.Tensor]


class DeviceBatches:
    """A DataLoader's batches, moved to `device` and finished there as whole batches.

    Workers deliver uint8 images; here they become normalised floats (and, for training,
    are mixed), one vectorised op per batch on the device rather than one per image in a
    worker. Batch b of epoch e is mixed with a seed from (seed, epoch, b), like the samples
    (samples.py). `dataset` is the data set itself, `sampler` and `len()` the loader's.

    Args:
        loader: a DataLoader over a split's seeded samples (as `build_loaders` makes it), which
            yields uint8 images, targets and the paths of unreadable images it skipped.
        device: where the batches go.
        normalize: the data preset's per-channel normalisation.
        mix: MixUp or CutMix over whole (images, targets) batches, or None.
        seed: the run's seed.
        bad_images: where skipped unreadable images are recorded; None makes one an error.
        augment: colour augmentation of whole batches (`data.batch_augment`), or None.
    """

    def __init__(self, loader: DataLoader, device: torch.device, normalize: BatchNormalize,
                 mix: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None, seed: int = 0,
                 bad_images: BadImageLog | None = None, augment: torch.nn.Module | None = None) -> None:
        self.loader, self.device, self.mix, self.seed, self.bad_images = loader, device, mix, seed, bad_images
        self.normalize = normalize.to(device)
        self.augment = None if augment is None else augment.to(device)
        self.dataset, self.sampler = loader.dataset.dataset, loader.sampler
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`'s batches from batch `start` on (a run resumed mid-epoch).

        Args:
            epoch: the epoch, counted from 0: it picks the shuffle and the augmentation draws.
            start: the batches of it already trained, which are skipped.
        """
        self.epoch, self.start = epoch, start
        self.loader.dataset.epoch = epoch
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start * self.loader.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for images, targets in self.unmixed():
            yield self.mix(images, targets) if self.mix is not None else (images, targets)

    def unmixed(self) -> Iterator[Batch]:
        """The batches with their per-image transforms and batch augmentation, normalised,
        without batch mixing. Batch b's draws (augmentation, then mixing) follow from its own
        seed of (seed, epoch, b).

        Yields:
            (images, targets) on the device: normalised float32 images and class indices.

        Raises:
            DataError: a batch held unreadable images and there is no log to record them in.
        """
        for b, (images, targets, bad) in enumerate(self.loader, start=self.start):
            if any(bad):
                if self.bad_images is None:
                    raise DataError(f"unreadable images were skipped without a log: {bad}")
                self.bad_images.record(bad)
            if self.augment is not None or self.mix is not None:
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, -1 - b))
            images = self.normalize(images.to(self.device, non_blocking=True), self.augment)
            yield images, targets.to(self.device, non_blocking=True)


@dataclass
class Loaders:
    """The batches a stage trains and evaluates on, and what the data decides of the model.

    Attributes:
        train: the training batches: shuffled, augmented and mixed as the config says.
        test: the test batches, in order (under torchrun, each rank's share).
        num_classes: the data set's classes.
        channels: the images' channels (`data.channels`).
    """

    train: DeviceBatches
    test: DeviceBatches
    num_classes: int
    channels: int

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Each epoch's shuffle and augmentation follow from (seed, epoch), the same on every
        rank.

        Args:
            epoch: the epoch, counted from 0.
            start: the number of batches of this epoch already trained (a resumed run).
        """
        self.train.set_epoch(epoch, start)


def build_loaders(data: DictConfig, augment: DictConfig, seed: int = 0, device: torch.device | str = "cpu",
                  bad_images: BadImageLog | None = None) -> Loaders:
    """Train and test batches on `device`; under torchrun each rank gets its share of every batch.

    `data.batch_size` is per process: the global batch is batch_size x the number of ranks.
    Every key of `data` comes from its preset (configs/data/_base.yaml lists them).

    Args:
        data: the `data` group of a stage config.
        augment: the `augment` group: the train and test transforms and the batch mixing.
        seed: the run's seed: the shuffle, the augmentation draws and the subsets follow from it.
        device: where the batches go.
        bad_images: where unreadable images are recorded (`data.bad_images=skip`); None makes
            one an error.

    Returns:
        The train and test batches with the class and channel counts.

    Raises:
        DataError: the data set is missing or laid out otherwise, a split holds no images, or
            images cannot be read.
        ConfigError: an augment option that its transform refuses.
        ValueError: an unknown data set or transform name (`UnknownChoice`).
    """
    device = torch.device(device)
    on_batches = augments_on_batches(data.batch_augment, device)
    on_device = ON_BATCHES if on_batches else ()  # left out of the workers' per-image transforms
    decoder = data.decoder
    train_tf = build_transform(augment.train, on_device, decoder_for(decoder, augment.train, on_device))
    test_tf = build_transform(augment.test, decoder=decoder_for(decoder, augment.test))
    train_set, test_set, num_classes = DATASETS.get(data.name)(data, train_tf, test_tf)
    train_set, test_set = _limit(train_set, data.train_limit), _limit(test_set, data.test_limit)
    if len(train_set) == 0 or len(test_set) == 0:
        raise DataError(f"data={data.name}: the train or test split holds no images")
    policy = data.bad_images
    if data.verify:
        show = distributed.is_main() and sys.stderr.isatty()
        test_set = verify(test_set, data.num_workers, policy, bad_images, show)
    train_set, test_set = SeededSamples(train_set, seed, policy), SeededSamples(test_set, seed, policy)
    # A DistributedSampler with one replica is a seeded shuffle: a single process sees the
    # same global batches as N ranks with 1/N of the batch each.
    train_sampler = ResumableSampler(train_set, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                     shuffle=True, seed=seed)
    if data.num_workers:
        kill_workers_at_exit()
    common = dict(batch_size=data.batch_size, num_workers=data.num_workers, pin_memory=device.type == "cuda",
                  worker_init_fn=quiet_worker if data.num_workers else None)
    train = DataLoader(train_set, sampler=train_sampler, drop_last=len(train_sampler) >= data.batch_size, **common)
    test = DataLoader(test_set, sampler=distributed.ShardSampler(len(test_set)), **common)
    normalize = BatchNormalize(data.mean, data.std)
    train_batches = DeviceBatches(train, device, normalize, build_batch_mixing(augment, num_classes), seed, bad_images,
                                  build_batch_augment(augment.train) if on_batches else None)
    return Loaders(train_batches, DeviceBatches(test, device, normalize, bad_images=bad_images), num_classes,
                   data.channels)


BATCH_AUGMENT = ("auto", True, False)  # data.batch_augment
"""The values of `data.batch_augment` (see `augments_on_batches`)."""


def augments_on_batches(setting: str | bool, device: torch.device) -> bool:
    """`data.batch_augment`: colour jitter and lighting on whole batches on the training device
    (`true`), per image in the workers (`false`), or `auto`: on with CUDA; on the CPU the batch
    work would run in the training process, and there the workers are faster (scripts/bench_data.py).

    Args:
        setting: `data.batch_augment`: `auto`, True or False.
        device: the training device.

    Returns:
        Whether colour augmentation runs on whole batches on the device.
    """
    return device.type == "cuda" if setting == "auto" else bool(setting)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    """A fixed random subset (the same for every run) of at most `limit` items."""
    if not limit or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return Subset(dataset, keep.sort().values.tolist())
