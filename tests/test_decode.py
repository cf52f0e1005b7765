"""data.decoder: torchcodec decodes JPEGs to Pillow's pixels, the crops of the two paths
agree to resampling noise, `auto` picks torchcodec only where no colour work is left in
the workers, and a file torchcodec cannot read goes through Pillow (or is named)."""
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from bnntrain.data import build_loaders
from bnntrain.data.images import BadImage, load_rgb, load_rgb_tensor
from bnntrain.data.transforms import ON_BATCHES, decoder_for
from bnntrain.errors import ConfigError
from conftest import need, write_image_folder
from test_config import make

need("torchcodec", extra="decode")  # data.decoder=torchcodec


@pytest.fixture
def files(tmp_path):
    """One photo-like image saved as an RGB, a greyscale and a CMYK JPEG, a PNG and a BMP."""
    x = torch.linspace(0, 1, 96)
    pixels = (torch.stack([x[:, None] * x[None, :80], x[:, None].expand(96, 80), 1 - x[None, :80].expand(96, 80)], -1)
              * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    paths = {}
    for name, mode, fmt in (("rgb.jpg", "RGB", "JPEG"), ("grey.jpg", "L", "JPEG"), ("cmyk.jpg", "CMYK", "JPEG"),
                            ("rgb.png", "RGB", "PNG"), ("rgb.bmp", "RGB", "BMP")):
        image.convert(mode).save(tmp_path / name, fmt)
        paths[name] = str(tmp_path / name)
    return paths


def test_the_same_pixels_as_pillow(files):
    for name, path in files.items():
        got = load_rgb_tensor(path)
        assert got.dtype == torch.uint8 and got.shape == (3, 96, 80), name
        assert torch.equal(got, TF.pil_to_tensor(load_rgb(path))), name


def test_a_truncated_or_unreadable_jpeg_is_named(files, tmp_path):
    data = open(files["rgb.jpg"], "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.jpg").write_bytes(b"\xff\xd8 not a jpeg \xff\xd9")
    for name in ("cut.jpg", "noise.jpg", "missing.jpg"):
        with pytest.raises(BadImage, match=rf"cannot read image .*{name}"):
            load_rgb_tensor(str(tmp_path / name))


def test_auto_decodes_with_torchcodec_only_where_the_workers_do_no_colour_work():
    stage1, stage2 = make("data=imagenet", "stage=1").augment, make("data=imagenet", "stage=2").augment
    assert stage1.train.color_jitter and not stage2.train.get("color_jitter")
    assert decoder_for("auto", stage1.train) == "pillow"  # colour jitter per image: Pillow's is faster
    assert decoder_for("auto", stage1.train, leave_out=ON_BATCHES) == "torchcodec"  # jitter on the batches
    assert decoder_for("auto", stage2.train) == decoder_for("auto", stage1.test) == "torchcodec"
    assert decoder_for("pillow", stage2.train) == "pillow"
    with pytest.raises(ConfigError, match="data.decoder must be one of auto, pillow, torchcodec"):
        make("data=imagenet", "data.decoder=libjpeg")


def test_crops_agree_with_pillows_to_resampling_noise(tmp_path):
    """The ImageNet preset's training crops (same seed: the same boxes and flips) and test
    crops through both decoders."""
    root = write_image_folder(tmp_path / "inet", size=300, per_class=2, test_split="val")
    batches = {}
    for decoder in ("pillow", "torchcodec"):
        cfg = make("data=imagenet", f"data.root={root}", "data.num_workers=0", "data.batch_size=6", "stage=2",
                   f"data.decoder={decoder}")
        loaders = build_loaders(cfg.data, cfg.augment)
        assert repr(loaders.train.dataset.transform.transforms[0]) == f"Decode({decoder})"
        loaders.set_epoch(0)
        batches[decoder] = [x for x, _ in loaders.train] + [x for x, _ in loaders.test]
    for a, b in zip(batches["pillow"], batches["torchcodec"]):
        assert a.shape == b.shape
        # Normalised units (std about 0.23 of 255): 0.01 is about half a grey level (measured 0.002).
        difference = (a - b).abs().mean().item()
        assert difference < 0.01, difference
