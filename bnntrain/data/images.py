"""Reading image files as 8-bit RGB, whatever their mode, and naming the file that fails.

Two decoders (`data.decoder`): Pillow (`load_rgb`, a PIL image: what Pillow's colour
transforms need) and torchcodec (`load_rgb_tensor`, a uint8 tensor; the optional extra
`decode`). Both decode JPEGs with libjpeg-turbo to the same pixels; on torchcodec's tensor
the crop and resize then run in torch, and decode plus crop cost about 25% less per
full-size ImageNet JPEG (scripts/bench_decode.py).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import DataError


class BadImage(DataError):
    """A file that cannot be read as an image; `path` names it."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        # With one argument it is the whole message: how DataLoader re-raises a worker's error.
        super().__init__(path if reason is None else f"cannot read image {path}: {reason}")
        self.path = path


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's convert("RGB") clips 16-bit and 32-bit greyscale (modes I;16, I)
    to 255, a white image: those are rescaled to 0..255 first, from their bit depth."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() <= 65535 else float(2**32 - 1)
        image = Image.fromarray(np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # floating point greyscale, taken as 0..1
        image = Image.fromarray(np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB (greyscale, 16-bit, palette and CMYK files too)."""
    try:
        image = Image.open(path)
        image.load()  # decode now, so that a truncated file fails here (and Pillow closes the file)
        # An RGB file as it is: convert("RGB") would copy every pixel once more.
        return image if image.mode == "RGB" else to_rgb(image)
    except (OSError, ValueError, Image.UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise BadImage(path, str(err) or type(err).__name__) from None


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


def load_rgb_tensor(path: str) -> torch.Tensor:
    """An image file as a uint8 RGB tensor [3, H, W] (in the channels-last strides both
    decoders give, the layout torch's antialiased uint8 resize is fastest on): JPEGs by
    torchcodec's decoder (libjpeg-turbo, the same pixels as Pillow's for RGB, greyscale and
    CMYK files); any other file, and any JPEG torchcodec refuses, through `load_rgb`, which
    reads what Pillow can and names what it cannot."""
    from torchcodec.decoders import decode_jpeg
    from torchvision import tv_tensors

    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise BadImage(path, err.strerror or type(err).__name__) from None
    # A JPEG without its end marker is truncated: Pillow refuses it, and so must we.
    if data[:2] == JPEG_START and data[-2:] == JPEG_END:
        try:
            return tv_tensors.Image(decode_jpeg(data, mode="RGB"))
        except RuntimeError:
            pass  # Pillow reads it, or names the problem
    return tv_tensors.Image(torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1))
