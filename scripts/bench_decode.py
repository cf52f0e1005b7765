"""Decoding full-size JPEGs on the CPU: which path should a loader worker take?

    python scripts/bench_decode.py --images DIR/imagenet-sample-400 [--rounds 5] [--json FILE]

One process, one thread, every JPEG of the sample per round, the arms in a random order each
round; milliseconds per image, median over rounds:

- decode only: Pillow (`bnntrain.data.images.load_rgb`), torchcodec (`load_rgb_tensor`),
  and simplejpeg (libjpeg-turbo bindings) where installed;
- decode + the ImageNet preset's random-resized crop to 224 px: Pillow at full size,
  torchcodec with the crop on its tensor, and Pillow's `draft` (libjpeg's DCT scaling, decoding at 1/2, 1/4 or 1/8 size) where the
  drawn crop still holds 224 px on both sides at the reduced size, full size otherwise; with
  the fraction of images where draft applied and the mean pixel difference of its crops
  against the full-size path's.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bnntrain.data.images import load_rgb, load_rgb_tensor
from bnntrain.files import write_text

SIZE = 224


def crop_box(width: int, height: int, seed: int) -> tuple[int, int, int, int]:
    """The random-resized crop (top, left, height, width) torchvision draws for this image and seed."""
    torch.manual_seed(seed)
    return v2.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])


def full_size_crop(path: str, seed: int) -> Image.Image:
    image = load_rgb(path)
    top, left, h, w = crop_box(*image.size, seed)
    return TF.resized_crop(image, top, left, h, w, [SIZE, SIZE], antialias=True)


def torchcodec_crop(path: str, seed: int) -> torch.Tensor:
    image = load_rgb_tensor(path)
    top, left, h, w = crop_box(image.shape[2], image.shape[1], seed)
    return TF.resized_crop(image, top, left, h, w, [SIZE, SIZE], antialias=True)


def draft_crop(path: str, seed: int) -> tuple[Image.Image, bool]:
    image = Image.open(path)
    full = image.size
    top, left, h, w = crop_box(*full, seed)
    reduce = 1
    while reduce < 8 and min(h, w) // (2 * reduce) >= SIZE:
        reduce *= 2
    if reduce > 1:  # libjpeg scales by 1/2, 1/4, 1/8 while decoding; the crop box scales with it
        image.draft("RGB", (image.width // reduce, image.height // reduce))
        scale_x, scale_y = image.size[0] / full[0], image.size[1] / full[1]
        top, left, h, w = round(top * scale_y), round(left * scale_x), round(h * scale_y), round(w * scale_x)
    image = image.convert("RGB")
    return TF.resized_crop(image, top, left, h, w, [SIZE, SIZE], antialias=True), reduce > 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = sorted(str(p) for p in args.images.rglob("*.JPEG")) or sorted(str(p) for p in args.images.rglob("*.jp*g"))
    files = list(dict.fromkeys(Path(f).resolve().as_posix() for f in files))
    arms = {"decode, Pillow (data.decoder=pillow)": lambda f, i: load_rgb(f),
            "decode, torchcodec (data.decoder=torchcodec)": lambda f, i: load_rgb_tensor(f),
            "decode + crop, Pillow (data.decoder=pillow)": full_size_crop,
            "decode + crop, Pillow draft where the crop allows": lambda f, i: draft_crop(f, i)[0],
            "decode + crop, torchcodec, crop on the tensor (data.decoder=torchcodec)": torchcodec_crop}
    try:
        import simplejpeg

        arms["decode, simplejpeg"] = lambda f, i: simplejpeg.decode_jpeg(Path(f).read_bytes())
    except ImportError:
        print("simplejpeg is not installed: its arm is left out")
    times: dict[str, list[float]] = {name: [] for name in arms}
    order = random.Random(0)
    for _ in range(args.rounds):
        for name in order.sample(list(arms), len(arms)):
            start = time.perf_counter()
            for i, f in enumerate(files):
                arms[name](f, i)
            times[name].append(1000 * (time.perf_counter() - start) / len(files))
    drafted, differences = 0, []
    for i, f in enumerate(files):
        crop, used = draft_crop(f, i)
        if used:
            drafted += 1
            differences.append((TF.pil_to_tensor(crop).float() - TF.pil_to_tensor(full_size_crop(f, i)).float()).abs().mean())
    mean_difference = float(torch.stack(differences).mean()) if differences else 0.0
    results = {"images": len(files), "ms_per_image": {k: statistics.median(v) for k, v in times.items()},
               "draft_fraction": drafted / len(files), "draft_mean_abs_pixel_difference": mean_difference}
    for name, ms in results["ms_per_image"].items():
        print(f"{name:<55} {ms:6.2f} ms/image")
    print(f"draft applied to {drafted} of {len(files)} crops (mean |pixel difference| {mean_difference:.2f} of 255 "
          f"against the full-size crop)")
    if args.json:
        write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
