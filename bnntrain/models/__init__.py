from . import reactnet, resnet  # noqa: F401  (registers the models)
from .registry import MODELS, build_model, model_from_checkpoint

__all__ = ["MODELS", "build_model", "model_from_checkpoint"]
