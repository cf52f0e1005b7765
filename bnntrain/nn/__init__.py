from .blocks import BinaryBlock, BlockOptions, SeedBottleneck
from .layers import BinaryConv2d, BinaryLinear, binary_layers, set_precision
from .quantizers import ACTIVATION_QUANTIZERS, binarize_weight, sign

__all__ = ["ACTIVATION_QUANTIZERS", "BinaryBlock", "BinaryConv2d", "BinaryLinear", "BlockOptions",
           "SeedBottleneck", "binarize_weight", "binary_layers", "set_precision", "sign"]
