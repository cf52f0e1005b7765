from .blocks import BinaryBlock, BlockOptions, TricksBottleneck
from .layers import BinaryConv2d, BinaryLinear, binary_layers, set_precision
from .quantizers import PRECISION_MODES, SIGN_ESTIMATORS, binarize_weight, sign

__all__ = ["PRECISION_MODES", "SIGN_ESTIMATORS", "BinaryBlock", "BinaryConv2d", "BinaryLinear", "BlockOptions",
           "TricksBottleneck", "binarize_weight", "binary_layers", "set_precision", "sign"]
