from . import resnet  # noqa: F401  (registers the ResNets)
from .registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
