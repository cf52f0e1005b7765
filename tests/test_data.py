"""Datasets and loaders on files the tests write in the real on-disk formats."""
import pickle

import numpy as np
import pytest
import torch

from bnntrain.data import build_loaders
from bnntrain.errors import DataError
from conftest import write_cifar10, write_cifar100, write_image_folder
from test_config import make

# data=NAME: the writer of its files, its classes, its folder, and its training files in order.
CIFAR = {"cifar10": (write_cifar10, 10, "cifar-10-batches-py", [f"data_batch_{b}" for b in range(1, 6)]),
         "cifar100": (write_cifar100, 100, "cifar-100-python", ["train"])}


def loaders(*overrides):
    cfg = make(*overrides)
    return build_loaders(cfg.data, cfg.augment)


def test_digits_fixed_seeded_split():
    a, b = loaders(), loaders()
    assert len(a.train.dataset) == 1437 and len(a.test.dataset) == 360 and a.num_classes == 10
    assert torch.equal(a.test.dataset.images, b.test.dataset.images)
    x, y = next(iter(a.test))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert set(a.test.dataset.labels.tolist()) == set(range(10))


def test_synthetic_shapes():
    data = loaders("data=synthetic", "data.image_size=16", "data.train_size=40", "data.batch_size=8")
    x, y = next(iter(data.train))
    assert x.shape == (8, 3, 16, 16) and y.max() < 10


def test_the_last_partial_batch_is_dropped_for_training_and_kept_for_testing():
    data = loaders("data=synthetic", "data.image_size=8", "data.train_size=44", "data.test_size=44",
                   "data.batch_size=8")
    train = [len(y) for _, y in data.train]
    test = [len(y) for _, y in data.test]
    assert train == [8] * 5 and len(data.train) == 5  # 44 = 5 x 8 + 4: the 4 left over are not trained on
    assert test == [8] * 5 + [4] and len(data.test) == 6  # every test image is evaluated
    labels = torch.cat([y for _, y in data.test])
    assert torch.equal(labels, data.test.dataset.labels)  # in order, each once


@pytest.mark.parametrize("name", ["folder", "cifar10", "cifar100"])
def test_train_and_test_limits_keep_a_fixed_subset_of_that_size(tmp_path, name):
    if name == "folder":
        root = write_image_folder(tmp_path / "imgs", per_class=6)  # 18 train, 18 test
        args = ["data=folder", f"data.root={root}", "data.image_size=16"]
    else:
        root = CIFAR[name][0](tmp_path / "cifar")  # 40 train, 20 test
        args = [f"data={name}", f"data.root={root}"]
    args += ["data.num_workers=0", "data.batch_size=4", "data.train_limit=7", "data.test_limit=5"]
    first, second = loaders(*args), loaders(*args)
    full = loaders(*args[:-2])
    assert len(first.train.dataset) == 7 and len(first.test.dataset) == 5
    assert sum(len(y) for _, y in first.test) == 5
    first.set_epoch(0)
    assert sorted(first.train.sampler) == list(range(7))  # an epoch draws from exactly these 7
    for split in ("train", "test"):
        a, b = getattr(first, split).dataset, getattr(second, split).dataset
        assert a.indices == b.indices  # the same subset on every run
        assert len(set(a.indices)) == len(a.indices) and max(a.indices) < len(getattr(full, split).dataset)
        items = [a[i][1] for i in range(len(a))]
        assert items == [getattr(full, split).dataset[j][1] for j in a.indices]  # the subset is of the full split
    assert len(full.train.dataset) == (18 if name == "folder" else 40)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    write, classes, folder, train_files = CIFAR[name]
    root = write(tmp_path / "cifar")
    data = loaders(f"data={name}", f"data.root={root}", "data.num_workers=0", "data.batch_size=8")
    train = data.train.dataset
    assert data.num_classes == classes and len(train) == 40 and len(data.test.dataset) == 20
    assert train.targets == [i % classes for i in range(40)]  # every training file, in order
    assert data.test.dataset.targets == [i % classes for i in range(20)]
    raw = []
    for file in train_files:
        with open(root / folder / file, "rb") as f:
            raw.append(pickle.load(f, encoding="latin1")["data"])
    # Each row holds the red, green and blue 32x32 planes; the reader keeps them as HWC images.
    assert np.array_equal(train.data, np.concatenate(raw).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    x, y = next(iter(data.train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.max() < classes
    # Normalised with the preset's CIFAR statistics: uniform noise in [0, 1] lands around +-2.
    assert -2.5 < x.min() < -1.0 and 1.0 < x.max() < 2.5


def test_image_folder_makes_greyscale_rgb(tmp_path):
    root = write_image_folder(tmp_path / "imgs", size=20)
    data = loaders("data=folder", f"data.root={root}", "data.num_workers=2", "data.image_size=16",
                   "data.batch_size=4")
    assert data.num_classes == 3 and data.train.loader.num_workers == 2
    x, _ = next(iter(data.train))
    assert x.shape == (4, 3, 16, 16)
    grey, _ = data.test.dataset[0]  # the greyscale file
    assert grey.shape == (3, 16, 16) and grey.dtype == torch.uint8


def test_imagenet_layout_uses_val(tmp_path):
    root = write_image_folder(tmp_path / "inet", size=40, test_split="val")
    data = loaders("data=imagenet", f"data.root={root}", "data.num_workers=0", "data.batch_size=2",
                   "augment.train.random_resized_crop.size=32", "augment.test.resize=36", "augment.test.center_crop=32")
    x, _ = next(iter(data.test))
    assert x.shape == (2, 3, 32, 32) and data.num_classes == 3


def test_training_batches_are_mixed_and_test_batches_are_not():
    data = loaders("augment.mixup=0.2", "data.batch_size=16")
    images, targets = next(iter(data.train))
    assert images.shape == (16, 1, 8, 8) and targets.shape == (16, 10)  # class probabilities
    assert torch.allclose(targets.sum(1), torch.ones(16))
    _, test_targets = next(iter(data.test))
    assert test_targets.dtype == torch.int64 and test_targets.dim() == 1


def test_colour_jitter_only_where_the_stage_wants_it(tmp_path):
    root = write_image_folder(tmp_path / "inet", size=40, test_split="val")
    args = ("data=imagenet", f"data.root={root}", "data.num_workers=0")
    names = lambda d: [type(t).__name__ for t in d.train.dataset.transform.transforms]  # noqa: E731
    assert "ColorJitter" in names(loaders(*args, "stage=1"))
    assert "ColorJitter" not in names(loaders(*args, "stage=2"))


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is empty"),
    (lambda p: (p / "images").mkdir(parents=True), "must hold train/"),
])
def test_bad_roots(tmp_path, setup, words):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=words):
        loaders("data=folder", f"data.root={root}")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_or_unreadable_files(tmp_path, name):
    write, _, folder, train_files = CIFAR[name]
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=f"holds no {folder}/ folder") as error:
        loaders(f"data={name}", f"data.root={tmp_path}")
    assert "data.download=true" in str(error.value)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / train_files[0]).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=f"files under {tmp_path}/{folder} are missing") as missing:
        loaders(f"data={name}", f"data.root={tmp_path}")
    root = write(tmp_path / "full")
    last = root / folder / train_files[-1]
    last.write_bytes(last.read_bytes()[:100])  # a truncated download
    with pytest.raises(DataError, match=f"files under {root}/{folder} cannot be read") as unreadable:
        loaders(f"data={name}", f"data.root={root}")
    assert "\n" not in str(missing.value) + str(unreadable.value)  # one line each


def test_folder_without_root_names_the_key():
    with pytest.raises(DataError, match="data.root is not set"):
        loaders("data=folder")


def test_an_unreadable_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    broken = root / "train" / "cat" / "0.jpg"
    broken.write_bytes(b"not a jpeg")
    data = loaders("data=folder", f"data.root={root}", "data.num_workers=0")
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        data.train.dataset[0]
