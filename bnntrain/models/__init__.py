"""The networks, each a module that registers itself in MODELS (registry.py), which imports
every module here before its first lookup."""
from .registry import MODELS, build_model, model_from_checkpoint

__all__ = ["MODELS", "build_model", "model_from_checkpoint"]
