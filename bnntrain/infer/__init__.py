"""The XNOR-popcount CPU runtime for packed files (runtime.py; the packed layer in
packed_conv.py, numba kernels in kernels.py, fused blocks in fused.py, the float baseline in
baseline.py, timing against other runtimes in timing.py), and its command
(`python -m bnntrain.infer`, cli.py)."""
from .baseline import FloatBinaryConv2d, float_model
from .packed_conv import PackedBinaryConv2d, require_numba
from .runtime import load, pack_model, set_threads

__all__ = ["FloatBinaryConv2d", "PackedBinaryConv2d", "float_model", "load", "pack_model", "require_numba",
           "set_threads"]
