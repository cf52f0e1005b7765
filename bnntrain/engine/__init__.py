"""The training engine: the loop (trainer.py), a stage built from its config (build.py) and
trained epoch by epoch (stage.py) with its hooks (hooks.py), checkpoints (checkpoint.py) and
what they hold (layout.py)."""
from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from .logger import StageLogger
from .trainer import Trainer

__all__ = ["StageLogger", "Trainer", "load_checkpoint", "load_model_weights", "save_checkpoint"]
