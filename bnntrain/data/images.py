"""Reading image files as 8-bit RGB, whatever their mode, and naming the file that fails."""
from __future__ import annotations

import numpy as np
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
