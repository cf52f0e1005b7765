"""Binary layers whose quantizers are switched at run time (layers.py), the residual blocks the
networks are built from (blocks.py), and the quantizers themselves (quantizers/)."""
from .binarize import binarize
from .blocks import BinaryBlock, BlockOptions, TricksBottleneck
from .layers import ACTIVATION_MODES, WEIGHT_MODES, BinaryConv2d, BinaryLinear, binary_layers, set_precision
from .quantizers import INPUT_QUANTIZERS, PRECISION_MODES, WEIGHT_QUANTIZERS, Quantizer, sign

__all__ = ["ACTIVATION_MODES", "INPUT_QUANTIZERS", "PRECISION_MODES", "WEIGHT_MODES", "WEIGHT_QUANTIZERS",
           "BinaryBlock", "BinaryConv2d", "BinaryLinear", "BlockOptions", "Quantizer", "TricksBottleneck",
           "binarize", "binary_layers", "set_precision", "sign"]
