"""Colour augmentation of whole batches on the training device (`data.batch_augment`).

Colour jitter and PCA lighting change each pixel's colour and nothing else, so they commute
with the geometric transforms that stay in the loader workers (crop, resize, flip). Done
here, each on a batch of float images in [0, 1], they cost one vectorised pass per op on
the GPU instead of several milliseconds of Pillow per image in a worker.

`BatchColorJitter` draws, for every image of the batch, what torchvision's ColorJitter draws
for one image: each factor uniform in its range and a uniformly random order of the four
operations; each operation is torchvision's formula, with that image's factor.
(Hand-written: kornia's batch ColorJitter applies its operations in one fixed order, not
torchvision's random one, and would be a new dependency for four short formulas.)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC

GREY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale


def grey(images: Tensor) -> Tensor:
    r, g, b = images.unbind(-3)
    return (GREY[0] * r + GREY[1] * g + GREY[2] * b).unsqueeze(-3)


def blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    return (ratio * a + (1 - ratio) * b).clamp_(0, 1)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """RGB in [0, 1] to hue, saturation, value in [0, 1], channel-wise, for any leading shape."""
    r, g, b = images.unbind(-3)
    top, _ = images.max(-3)
    bottom, _ = images.min(-3)
    span = top - bottom
    flat = span == 0
    saturation = span / torch.where(top == 0, torch.ones_like(top), top)
    safe = torch.where(flat, torch.ones_like(span), span)
    rc, gc, bc = (top - r) / safe, (top - g) / safe, (top - b) / safe
    hue = torch.where(top == r, bc - gc, torch.where(top == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(flat, torch.zeros_like(hue), (hue / 6.0) % 1.0)
    return torch.stack([hue, saturation, top], dim=-3)


def hsv_to_rgb(images: Tensor) -> Tensor:
    h, s, v = images.unbind(-3)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in enumerate(choices):
        at = sector == k
        for c in range(3):
            out[c] = torch.where(at, rgb[c], out[c])
    return torch.stack(out, dim=-3)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    hsv = rgb_to_hsv(images)
    hsv[..., 0, :, :] = (hsv[..., 0, :, :] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hsv)


def _range(value: float | Sequence[float] | None, centre: float, low: float) -> tuple[float, float] | None:
    """torchvision's ColorJitter ranges: x -> [max(low, centre - x), centre + x]; pairs as given."""
    if value is None or value == 0:
        return None
    if isinstance(value, (int, float)):
        return max(low, centre - value), centre + value
    return float(value[0]), float(value[1])


class BatchColorJitter(nn.Module):
    OPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, brightness: float = 0, contrast: float = 0, saturation: float = 0, hue: float = 0) -> None:
        super().__init__()
        self.ranges = {"brightness": _range(brightness, 1.0, 0.0), "contrast": _range(contrast, 1.0, 0.0),
                       "saturation": _range(saturation, 1.0, 0.0), "hue": _range(hue, 0.0, -0.5)}

    def draw(self, n: int, device: torch.device) -> tuple[Tensor, dict[str, Tensor | None]]:
        """Each image's order of the four operations and its factors, drawn as torchvision does."""
        order = torch.stack([torch.randperm(4) for _ in range(n)]).to(device)
        factors = {op: None if r is None else torch.empty(n).uniform_(*r).to(device) for op, r in self.ranges.items()}
        return order, factors

    def apply(self, images: Tensor, order: Tensor, factors: dict[str, Tensor | None]) -> Tensor:
        """The jitter with given draws: position k applies op order[i, k] to image i."""
        images = images.clone()
        for k in range(4):
            for index, op in enumerate(self.OPS):
                chosen = (order[:, k] == index).nonzero().flatten()
                if factors[op] is None or not len(chosen):
                    continue
                f = factors[op][chosen]
                x = images[chosen]
                if op == "brightness":
                    x = blend(x, torch.zeros_like(x), f.view(-1, 1, 1, 1))
                elif op == "contrast":
                    x = blend(x, grey(x).mean((-3, -2, -1), keepdim=True), f.view(-1, 1, 1, 1))
                elif op == "saturation":
                    x = blend(x, grey(x), f.view(-1, 1, 1, 1))
                else:
                    x = adjust_hue(x, f)
                images[chosen] = x
        return images

    def forward(self, images: Tensor) -> Tensor:
        return self.apply(images, *self.draw(images.shape[0], images.device))


class BatchLighting(nn.Module):
    """AlexNet's PCA lighting noise, one draw per image: add eigvec @ (alpha * eigval), alpha ~ N(0, std)."""

    def __init__(self, alphastd: float = 0.1) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(IMAGENET_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(IMAGENET_EIGVEC))

    def forward(self, images: Tensor) -> Tensor:
        alpha = (torch.randn(images.shape[0], 3) * self.alphastd).to(images.device)
        shift = (alpha * self.eigval) @ self.eigvec.T  # (N, 3): eigvec @ (alpha * eigval) for each image
        return images + shift.view(-1, 3, 1, 1)


BATCH_TRANSFORMS = {"color_jitter": BatchColorJitter, "lighting": BatchLighting}
