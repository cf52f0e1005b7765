from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from .logger import StageLogger
from .trainer import Trainer

__all__ = ["StageLogger", "Trainer", "load_checkpoint", "load_model_weights", "save_checkpoint"]
