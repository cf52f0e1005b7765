"""The on-disk formats, read with torchvision's readers: CIFAR-10's and CIFAR-100's pickles and
class folders.

Apart from `datasets.py` because torchvision takes longer to import (1.6 s) than a small run
on in-memory data (digits, synthetic) needs to train.
"""
from __future__ import annotations

import functools

import logging
import os
from pathlib import Path
from typing import Callable

from torchvision import datasets

from ..engine.stopping import raise_if_stopped
from ..errors import DataError
from .walk import FolderWalk

log = logging.getLogger("bnntrain")


def _without_md5(reader: type[datasets.CIFAR10]) -> tuple[list, list, dict]:
    """The reader's train list, test list and meta with no md5 to check: torchvision then checks
    that the files exist, not their hashes. Hashing on every start is slow, and a corrupt file
    still fails at unpickling, which the builder reports clearly. A download still checks the
    archive's md5 (tgz_md5)."""
    return ([[name, None] for name, _ in reader.train_list], [[name, None] for name, _ in reader.test_list],
            {**reader.meta, "md5": None})


# One class per data set, each at module level: workers that start with spawn unpickle the
# dataset by its class's name.
class CIFAR10Files(datasets.CIFAR10):
    train_list, test_list, meta = _without_md5(datasets.CIFAR10)


class CIFAR100Files(datasets.CIFAR100):
    train_list, test_list, meta = _without_md5(datasets.CIFAR100)


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (its classes, indices and IMG_EXTENSIONS) listed by FolderWalk:
    a symlink loop ends, and no file is counted twice."""

    def __init__(self, root: str, transform: Callable) -> None:
        # A partial, not a lambda: workers started by spawn or forkserver (Python 3.14's default
        # on Linux) receive the dataset pickled.
        self.walk = FolderWalk(functools.partial(raise_if_stopped, f"listing the images under {root}"))
        # The loader hands over the path: the transform's first step decodes it (transforms.Decode,
        # with Pillow or torchcodec as data.decoder chooses).
        super().__init__(root, transform=transform, loader=str)

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable | None = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        extensions = extensions or datasets.folder.IMG_EXTENSIONS  # what ImageFolder passes
        names = sorted(class_to_idx)
        listed = self.walk.files([os.path.join(directory, name) for name in names])
        samples = [(path, class_to_idx[name]) for name, paths in zip(names, listed) for path in paths
                   if datasets.folder.has_file_allowed_extension(path, extensions)]
        found = {index for _, index in samples}
        empty = sorted(name for name, index in class_to_idx.items() if index not in found)
        if empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. "
                                    f"Supported extensions are: {', '.join(extensions)}")
        return samples


def image_folder(path: Path, transform: Callable) -> datasets.ImageFolder:
    try:
        dataset = _ImageFolder(str(path), transform)
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in them
        raise DataError(f"{path} is not a class-folder dataset ({err}); expected {path}/<class>/<image>") from None
    if dataset.walk.skipped:
        first, more = dataset.walk.skipped[0], len(dataset.walk.skipped) - 1
        log.warning(f"{path}: skipped the link {first} -> {os.path.realpath(first)}, which leads back into folders "
                    f"already listed (each image counts once){f'; {more} more such links' if more else ''}")
    return dataset
