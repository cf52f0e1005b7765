from . import resnet  # noqa: F401  (registers the ResNets)
from .registry import MODELS, build_model, model_from_checkpoint

__all__ = ["MODELS", "build_model", "model_from_checkpoint"]
