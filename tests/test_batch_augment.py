"""Colour augmentation on whole batches: each image gets what torchvision's per-image
ColorJitter and our per-image Lighting give it, for the same draws; the draws follow the
same distributions; and the loaders move it out of the workers where it is asked for."""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from bnntrain.data import build_loaders
from bnntrain.data.batch_augment import BatchColorJitter, BatchLighting, hsv_to_rgb, rgb_to_hsv
from bnntrain.data.transforms import Lighting
from conftest import write_image_folder
from test_config import make

OPS = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
       "hue": TF.adjust_hue}


def images(n=8, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5  # a flat grey image: hue undefined, saturation 0
    x[1, :, :2] = 0  # black pixels
    return x


def test_each_image_gets_torchvisions_colour_jitter_for_its_draws():
    jitter = BatchColorJitter(0.4, 0.4, 0.4, 0.1)
    x = images()
    torch.manual_seed(3)
    order, factors = jitter.draw(len(x), x.device)
    got = jitter.apply(x, order, factors)
    for i in range(len(x)):
        want = x[i]
        for k in order[i].tolist():  # torchvision's functional ops, in this image's order
            op = BatchColorJitter.OPS[k]
            want = OPS[op](want, factors[op][i].item())
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-6)


def test_hsv_round_trip_and_torchvisions_hue():
    x = images(seed=1)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, rtol=0, atol=1e-6)


def test_the_draws_follow_torchvisions_distributions():
    jitter = BatchColorJitter(0.4, 0.3, 0.2, 0.1)
    torch.manual_seed(0)
    order, factors = jitter.draw(20000, torch.device("cpu"))
    for op, (low, high) in (("brightness", (0.6, 1.4)), ("contrast", (0.7, 1.3)), ("saturation", (0.8, 1.2)),
                            ("hue", (-0.1, 0.1))):
        f = factors[op]
        assert low <= f.min() and f.max() <= high
        assert f.mean().item() == pytest.approx((low + high) / 2, abs=0.01)  # uniform: mean and variance
        assert f.var().item() == pytest.approx((high - low) ** 2 / 12, rel=0.05)
    # Every one of the 24 orders, equally often (torchvision: torch.randperm(4) per image).
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 20000 / 24 * 0.85


def test_batch_lighting_is_the_per_image_lighting_for_its_draw():
    x = images()
    torch.manual_seed(5)
    got = BatchLighting(0.1)(x)
    torch.manual_seed(5)
    alphas = torch.randn(len(x), 3) * 0.1
    one = Lighting(0.1)
    for i in range(len(x)):
        shift = one.eigvec @ (alphas[i] * one.eigval)
        torch.testing.assert_close(got[i], x[i] + shift.view(3, 1, 1), rtol=0, atol=1e-6)
    assert math.isclose(BatchLighting(0.0)(x).sub(x).abs().max().item(), 0.0)


@pytest.mark.parametrize("setting, in_workers", [(True, False), (False, True)])
def test_the_loaders_move_colour_work_to_the_batches_where_asked(setting, in_workers, tmp_path):
    root = write_image_folder(tmp_path / "inet", size=40, test_split="val")
    cfg = make("data=imagenet", f"data.root={root}", "data.num_workers=0", "stage=1",
               f"data.batch_augment={str(setting).lower()}", "+augment.train.lighting.alphastd=0.1")
    loaders = build_loaders(cfg.data, cfg.augment)
    names = [type(t).__name__ for t in loaders.train.dataset.transform.transforms]
    assert ("ColorJitter" in names) == in_workers and ("Lighting" in names) == in_workers
    on_batches = [] if loaders.train.augment is None else [type(m).__name__ for m in loaders.train.augment]
    assert on_batches == ([] if in_workers else ["BatchColorJitter", "BatchLighting"])
    loaders.set_epoch(0)
    first = [x for x, _ in loaders.train]
    loaders.set_epoch(0)
    again = [x for x, _ in loaders.train]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded per batch: resumable
    assert make("data=imagenet", f"data.root={root}").data.batch_augment == "auto"


LABELS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])  # 10 classes, one repeated


def indexed_images(n: int, size: int = 6) -> torch.Tensor:
    """Image i is 1 in channel i and 0 in every other, at every pixel: a mixed image's channel
    means are then the weights it was mixed with, row i = lam e_i + (1 - lam) e_j."""
    return torch.eye(n).view(n, n, 1, 1).expand(n, n, size, size).clone()


@pytest.mark.parametrize("alphas", [{"mixup": 0.2}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_mixing_targets_are_the_mix_of_the_images(alphas, seed):
    """The targets are exactly lam * onehot(y) + (1 - lam) * onehot(y[perm]) for the lam and the
    pairing the images were mixed with, both read back from the images (for CutMix lam is the
    fraction of the image kept)."""
    from omegaconf import OmegaConf

    from bnntrain.data.transforms import build_batch_mixing

    mix = build_batch_mixing(OmegaConf.create(alphas), num_classes=10)
    torch.manual_seed(seed)
    images, targets = mix(indexed_images(len(LABELS)), LABELS)
    weights = images.mean((2, 3))
    kept = weights.diagonal()
    partner = (weights - torch.diag(kept)).argmax(1)
    assert 0 < kept.min() and kept.max() < 1  # these seeds mix every image
    assert sorted(partner.tolist()) == list(range(len(LABELS)))  # a pairing of the batch with itself
    assert torch.allclose(kept, kept[0].expand_as(kept))  # one lam per batch
    assert torch.count_nonzero(weights, dim=1).tolist() == [2] * len(LABELS)
    if ((images == 0) | (images == 1)).all():  # CutMix pastes a box: the kept area is lam
        inside = images[torch.arange(len(LABELS)), torch.arange(len(LABELS))] == 1
        assert torch.allclose(inside.float().mean((1, 2)), kept)
    lam = kept[0]
    onehot = torch.nn.functional.one_hot(LABELS, 10).float()
    torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot[partner], rtol=0, atol=1e-6)
