"""Quantizers, one object each (base.py says what one states), in two registries: the sign
estimators a binary layer applies to its input (estimators.py) and the binarizers of its
weight (weights.py). A new one is a file here that registers it: the registries import
every module of this package before their first lookup."""
from .base import INPUT_QUANTIZERS, WEIGHT_QUANTIZERS, Quantizer, QuantizerSpec, build_quantizer, sign
from .precision import PRECISION_MODES, clamp, leaky_clip

__all__ = ["INPUT_QUANTIZERS", "PRECISION_MODES", "WEIGHT_QUANTIZERS", "Quantizer", "QuantizerSpec",
           "build_quantizer", "clamp", "leaky_clip", "sign"]
