"""`build_loaders` turns the `data` and `augment` config groups and a stage into DataLoaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..engine import distributed
from ..errors import DataError
from .datasets import DATASETS
from .transforms import build_collate, build_transform


@dataclass
class Loaders:
    train: DataLoader
    test: DataLoader
    num_classes: int
    channels: int

    def set_epoch(self, epoch: int) -> None:
        """Each epoch's shuffle follows from (seed, epoch), the same on every rank."""
        self.train.sampler.set_epoch(epoch)


def build_loaders(data: DictConfig, augment: DictConfig, color_jitter: bool = True, seed: int = 0) -> Loaders:
    """Train and test loaders; under torchrun each rank gets its share of every batch.

    `data.batch_size` is per process: the global batch is batch_size x the number of ranks.
    """
    train_tf = build_transform(augment.get("train"), data.mean, data.std, color_jitter=color_jitter)
    test_tf = build_transform(augment.get("test"), data.mean, data.std)
    train_set, test_set, num_classes = DATASETS.get(data.name)(data, train_tf, test_tf)
    train_set, test_set = _limit(train_set, data.get("train_limit")), _limit(test_set, data.get("test_limit"))
    if len(train_set) == 0 or len(test_set) == 0:
        raise DataError(f"data={data.name}: the train or test split holds no images")
    # A DistributedSampler with one replica is a seeded shuffle: a single process sees the
    # same global batches as N ranks with 1/N of the batch each.
    train_sampler = DistributedSampler(train_set, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                       shuffle=True, seed=seed)
    common = dict(batch_size=data.batch_size, num_workers=data.num_workers,
                  pin_memory=torch.cuda.is_available(),
                  # Workers are started anew each epoch so that each epoch's augmentation
                  # follows from that epoch's seed: a resumed run replays the same batches.
                  persistent_workers=False)
    train = DataLoader(train_set, sampler=train_sampler, drop_last=len(train_sampler) >= data.batch_size,
                       collate_fn=build_collate(augment, num_classes), **common)
    test = DataLoader(test_set, sampler=distributed.ShardSampler(len(test_set)), **common)
    return Loaders(train, test, num_classes, data.channels)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    """A fixed random subset (the same for every run) of at most `limit` items."""
    if not limit or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return Subset(dataset, keep.sort().values.tolist())
