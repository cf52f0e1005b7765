"""The XNOR-popcount CPU runtime for packed files (runtime.py, numba kernels in kernels.py),
and its command (`python -m bnntrain.infer`, cli.py)."""
from .runtime import FloatBinaryConv2d, PackedBinaryConv2d, float_model, load, pack_model, require_numba, set_threads

__all__ = ["FloatBinaryConv2d", "PackedBinaryConv2d", "float_model", "load", "pack_model", "require_numba",
           "set_threads"]
