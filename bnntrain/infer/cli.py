"""`python -m bnntrain.infer`: predictions for a folder of images, or latency against PyTorch's
float convolutions, for a packed file run by the XNOR-popcount kernels."""
from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..run.config import run_tool, split_args
from ..errors import ConfigError, DataError
from ..registry import UnknownChoice, choose
from .baseline import float_model
from .packed_conv import PackedBinaryConv2d, require_numba
from .runtime import load, set_threads
from .timing import alternating_blocks, paired_ratio

USAGE = """usage: python -m bnntrain.infer model=FILE images=FOLDER [batch=16] [threads=N] [strict=false] [data=PRESET | mean=M,M,M std=S,S,S] [resize=N]
       python -m bnntrain.infer model=FILE --bench [batch=1,16] [threads=N] [strict=false] [openvino=DIR]"""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}

def _floats(value: str, key: str, channels: int) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"{key}={value}: expected {channels} comma-separated numbers") from None
    if len(numbers) != channels:
        raise ConfigError(f"{key}={value}: expected {channels} comma-separated numbers (one per input channel)")
    return numbers


def _int(value: str, key: str, low: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        raise ConfigError(f"{key}={value}: expected a whole number >= {low}")
    return number


def _strict(own: dict[str, str]) -> bool:
    value = own.get("strict", "true").lower()
    if value not in ("true", "false"):
        raise ConfigError(f"strict={own['strict']}: expected true or false")
    return value == "true"


def preset_statistics(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean and std of a data preset (`bnntrain/configs/data/NAME.yaml`)."""
    from omegaconf import OmegaConf

    folder = Path(__file__).parent.parent / "configs" / "data"
    presets = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))  # _base: no preset
    try:
        choose("data preset", name, presets)
    except UnknownChoice as err:
        raise ConfigError(str(err)) from None
    data = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml"))
    data = data.get("data", data)  # digits.yaml is a global package
    return tuple(data["mean"]), tuple(data["std"])


def normalization(own: dict[str, str], channels: int) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they come from): mean= and std=, or data=PRESET, or ImageNet's."""
    if ("mean" in own) != ("std" in own):
        raise ConfigError("give mean= and std= together")
    if "mean" in own:
        if "data" in own:
            raise ConfigError("give data=PRESET or mean= and std=, not both")
        return _floats(own["mean"], "mean", channels), _floats(own["std"], "std", channels), "mean=/std="
    if "data" in own:
        mean, std = preset_statistics(own["data"])
        if len(mean) != channels:
            raise ConfigError(f"data={own['data']} has {len(mean)} channels; the model takes {channels}")
        return mean, std, f"data={own['data']}"
    if channels != 3:
        raise ConfigError(f"the model takes {channels}-channel images: give data=PRESET or mean= and std=")
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's"


def image_files(folder: str) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"images={root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"images={root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return files


def preprocess(paths: Sequence[Path], image_size: int, channels: int, resize: int,
               mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The test transform of the data presets: resize the shorter side to `resize`, centre-crop
    `image_size`, scale to [0, 1] and normalise per channel."""
    from torchvision.transforms import v2

    from ..data.images import load_rgb
    from ..data.transforms import BatchNormalize

    transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), v2.ToImage()])
    batch = []
    for path in paths:
        image = load_rgb(str(path))
        batch.append(transform(image.convert("L") if channels == 1 else image))
    return BatchNormalize(mean, std)(torch.stack(batch))


def default_resize(config: dict) -> int:
    """The presets' test resize: ImageNet-stem models resize to size x 256/224 (256 for 224),
    others to the image size itself (CIFAR, folder, digits)."""
    size = config["image_size"]
    return round(size * 256 / 224) if config["model"].get("stem") == "imagenet" else size


def load_noting(own: dict[str, str]) -> nn.Module:
    """`load` with its warnings (layers left to PyTorch under strict=false) as `note:` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(own["model"], strict=_strict(own))
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return model


def predict(own: dict[str, str]) -> None:
    batch = _int(own.get("batch", "16"), "batch")
    files = image_files(own["images"])
    model = load_noting(own)
    config = model.export_config
    channels, size = config["in_channels"], config["image_size"]
    if channels not in (1, 3):
        raise ConfigError(f"the model takes {channels}-channel input; images are read as RGB or greyscale")
    mean, std, source = normalization(own, channels)
    resize = _int(own["resize"], "resize") if "resize" in own else default_resize(config)
    if resize < size:
        raise ConfigError(f"resize={resize} is smaller than the model's image size {size}")
    print(f"note: {len(files)} images, resized to {resize} and centre-cropped to {size}, normalised with "
          f"{source} mean {list(mean)} and std {list(std)}", file=sys.stderr)
    root = Path(own["images"]).expanduser()
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            classes = model(preprocess(chunk, size, channels, resize, mean, std)).argmax(1).tolist()
            for path, index in zip(chunk, classes):
                print(f"{path.relative_to(root)}\t{index}")


def time_models(models: dict[str, Callable[[Tensor], object]], images: Tensor,
                seconds: float = 2.0) -> dict[str, list[float]]:
    """Seconds per call of each model on `images`, one median per block of back-to-back calls,
    each model in its own steady state (`timing.alternating_blocks`)."""
    with torch.inference_mode():
        return alternating_blocks({name: (lambda model=model: model(images)) for name, model in models.items()},
                                  seconds)


def openvino_runner(folder: str, batch: int) -> tuple[Callable[[Tensor], object], int]:
    """The OpenVINO IR that `python -m bnntrain.tools.export ... openvino=DIR` wrote, compiled for
    this batch size on the same threads: (run a batch of images, its BinaryConvolution count)."""
    from ..tools.export.openvino import compile_openvino, runtime_layer_types

    xml = Path(folder).expanduser() / "model.xml"
    if not xml.is_file():
        raise ConfigError(f"openvino={folder}: no model.xml there (python -m bnntrain.tools.export ... openvino=DIR "
                          f"writes one)")
    compiled = compile_openvino(xml, batch, torch.get_num_threads())
    request = compiled.create_infer_request()
    return (lambda images: request.infer({0: images.numpy()})), runtime_layer_types(compiled).count("BinaryConvolution")


def bench(own: dict[str, str]) -> None:
    batches = [_int(b, "batch") for b in own.get("batch", "1,16").split(",")]
    if "openvino" in own:
        from ..tools.export.openvino import require_openvino
        require_openvino()
    packed = load_noting(own)
    config = packed.export_config
    baseline = float_model(own["model"])
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    n_packed = sum(isinstance(m, PackedBinaryConv2d) for m in packed.modules())
    print(f"{own['model']}: {config['model']['name']}, input {'x'.join(map(str, shape))}, {n_packed} binary layers "
          f"packed, {len(packed.fallbacks)} in PyTorch; {torch.get_num_threads()} threads")
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        images = torch.randn(batch, *shape, generator=generator)
        models: dict[str, Callable[[Tensor], object]] = {"packed": packed, "float": baseline}
        binary = 0
        if "openvino" in own:
            models["openvino"], binary = openvino_runner(own["openvino"], batch)
        print(bench_line(batch, time_models(models, images), binary))


def bench_line(batch: int, times: dict[str, list[float]], binary: int = 0) -> str:
    """One batch size's line of --bench: medians, the speed-up over the float baseline
    (float / packed) and, with an `openvino` arm, bnntrain.infer's time as a multiple of
    OpenVINO's (packed / OpenVINO), each a median of the rounds' paired ratios."""
    ours, theirs = statistics.median(times["packed"]), statistics.median(times["float"])
    line = (f"batch {batch:>3}: {ours * 1e3:8.2f} ms (XNOR-popcount), {theirs * 1e3:8.2f} ms (PyTorch float convs), "
            f"{paired_ratio(times['packed'], times['float']):.2f}x")
    if "openvino" in times:
        other = statistics.median(times["openvino"])
        line += (f"; OpenVINO {other * 1e3:.2f} ms ({binary} BinaryConvolution): "
                 f"{paired_ratio(times['openvino'], times['packed']):.2f}x its time")
    return f"{line}; medians of {len(times['packed'])} blocks, each runtime timed alone"


def run(argv: list[str]) -> None:
    flags = [a for a in argv if a.startswith("--")]
    own, rest = split_args([a for a in argv if not a.startswith("--")],
                           ("model", "images", "batch", "threads", "strict", "data", "mean", "std", "resize",
                            "openvino"))
    unknown = [f for f in flags if f != "--bench"] + rest
    if unknown:
        raise ConfigError(f"unknown argument(s): {' '.join(unknown)}; expected model=FILE images=FOLDER or "
                          f"model=FILE --bench")
    if "model" not in own:
        raise ConfigError("expected model=FILE (a bnntrain.tools.export file) and images=FOLDER or --bench")
    if ("images" in own) == ("--bench" in flags):
        raise ConfigError("give images=FOLDER (predictions) or --bench (latency), one of them")
    if "openvino" in own and "--bench" not in flags:
        raise ConfigError("openvino=DIR goes with --bench (OpenVINO's latency beside bnntrain.infer's)")
    if not Path(own["model"]).expanduser().is_file():
        raise ConfigError(f"model={own['model']}: no such file")
    require_numba()
    if "threads" in own:
        set_threads(_int(own["threads"], "threads"))
    else:
        set_threads(torch.get_num_threads())
    (bench if "--bench" in flags else predict)(own)


def main(argv: list[str] | None = None) -> None:
    run_tool(run, argv, USAGE)


if __name__ == "__main__":
    main()
