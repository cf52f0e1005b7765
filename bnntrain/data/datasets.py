"""Datasets by name. Each builder returns (train, test, num_classes) for a data config.

Builders check the on-disk layout first, so a wrong `data.root` gives one clear line
instead of a deep stack trace from inside torchvision.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import Registry

log = logging.getLogger("bnntrain")

Splits = tuple[Dataset, Dataset, int]
DATASETS: Registry[Callable[[DictConfig, Callable, Callable], Splits]] = Registry("data.name")
"""The data sets by name (`data.name`). Each builder takes the `data` config and the train and
test transforms, and returns (train, test, num_classes); a new one is a function registered
with `@DATASETS.register(name)`."""


class TensorImages(Dataset):
    """Images already in memory as a float tensor (N, C, H, W), with a per-item transform.

    Args:
        images: the (N, C, H, W) float images.
        labels: the N class indices.
        transform: applied to each image as it is read, or None.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def _root(cfg: DictConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.root is not set: data={cfg.name} needs data.root=PATH to the dataset folder")
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    if not any(root.iterdir()):
        raise DataError(f"data.root={root} is empty")
    return root


@DATASETS.register("digits")
def digits(cfg: DictConfig, train_tf: Callable, test_tf: Callable) -> Splits:
    """scikit-learn's 1,797 real 8x8 handwritten digits (no download), split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, torch.tensor(y), test_size=cfg.test_fraction,
                                              random_state=cfg.split_seed, stratify=y)
    return TensorImages(x_tr, y_tr, train_tf), TensorImages(x_te, y_te, test_tf), 10


@DATASETS.register("synthetic")
def synthetic(cfg: DictConfig, train_tf: Callable, test_tf: Callable) -> Splits:
    """Random images of a fixed shape whose label is learnable (a class-dependent mean)."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(cfg.num_classes, (n,), generator=g)
        means = torch.linspace(-1, 1, cfg.num_classes)[labels].view(-1, 1, 1, 1)
        return torch.randn(n, *shape, generator=g) + means, labels

    (x_tr, y_tr), (x_te, y_te) = make(cfg.train_size), make(cfg.test_size)
    return TensorImages(x_tr, y_tr, train_tf), TensorImages(x_te, y_te, test_tf), cfg.num_classes


def _cifar(cfg: DictConfig, train_tf: Callable, test_tf: Callable, reader: type, title: str) -> Splits:
    """CIFAR-10 or CIFAR-100 (`title`) in torchvision's layout, read by `reader` (a torchvision
    CIFAR class): its pickles under <root>/<reader.base_folder>/, or downloaded there."""
    folder = reader.base_folder
    files = [name for name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    root = Path(str(cfg.root)).expanduser() if cfg.root else None
    if cfg.download:
        if root is None:
            raise DataError(f"data.root is not set: data={cfg.name} data.download=true needs a folder to download into")
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = _root(cfg)
        if not (root / folder).is_dir():
            raise DataError(f"data.root={root} holds no {folder}/ folder: expected torchvision's {title} "
                            f"files ({root}/{folder}/{{{','.join(files)}}}), or add data.download=true")
    try:
        train = reader(str(root), train=True, transform=train_tf, download=cfg.download)
        test = reader(str(root), train=False, transform=test_tf)
    except RuntimeError as err:
        raise DataError(f"{title} files under {root}/{folder} are missing: {err}") from None
    except Exception as err:  # a truncated or foreign pickle
        raise DataError(f"{title} files under {root}/{folder} cannot be read ({type(err).__name__}: {err}); "
                        f"expected torchvision's pickled {', '.join(files[:-1])} and {files[-1]} files") from None
    return train, test, len(train.classes)


@DATASETS.register("cifar10")
def cifar10(cfg: DictConfig, train_tf: Callable, test_tf: Callable) -> Splits:
    """CIFAR-10: <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    from .folders import CIFAR10Files  # torchvision is imported only for the data sets that need it

    return _cifar(cfg, train_tf, test_tf, CIFAR10Files, "CIFAR-10")


@DATASETS.register("cifar100")
def cifar100(cfg: DictConfig, train_tf: Callable, test_tf: Callable) -> Splits:
    """CIFAR-100 (its 100 fine labels): <root>/cifar-100-python/{train,test,meta}."""
    from .folders import CIFAR100Files

    return _cifar(cfg, train_tf, test_tf, CIFAR100Files, "CIFAR-100")


def _class_folder_splits(cfg: DictConfig, train_tf: Callable, test_tf: Callable) -> Splits:
    from .folders import image_folder

    root = _root(cfg)
    test_split = next((s for s in cfg.test_splits if (root / s).is_dir()), None)
    if not (root / cfg.train_split).is_dir() or test_split is None:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"data.root={root} must hold {cfg.train_split}/ and one of "
                        f"{'/, '.join(cfg.test_splits)}/ with one folder per class; found {found or 'no folders'}")
    train = image_folder(root / cfg.train_split, train_tf)
    test = image_folder(root / test_split, test_tf)
    if train.classes != test.classes:
        raise DataError(f"{root}/{cfg.train_split} and {root}/{test_split} have different class folders")
    log.info(f"data.root={root}: {len(train)} training and {len(test)} test images in {len(train.classes)} classes")
    if len(train.classes) == 1:  # legal, but every label is the same: top-1 100% and loss 0 teach nothing
        log.warning(f"{root}/{cfg.train_split} holds one class folder ({train.classes[0]}/): every image has the "
                    f"same label, so the run learns nothing; a class-folder dataset needs a folder per class")
    return train, test, len(train.classes)


DATASETS.register("imagenet")(_class_folder_splits)
DATASETS.register("folder")(_class_folder_splits)
RGB_DATASETS = ("cifar10", "cifar100", "imagenet", "folder")  # they load colour images (checked with the config)

