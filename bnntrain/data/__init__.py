"""Datasets, transforms and the loaders a stage trains from (loaders.py)."""
from .loaders import BATCH_AUGMENT, DeviceBatches, Loaders, augments_on_batches, build_loaders

__all__ = ["BATCH_AUGMENT", "DeviceBatches", "Loaders", "augments_on_batches", "build_loaders"]
