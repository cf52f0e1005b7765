"""Export: the inference form of a model (inference.py), the packed 1-bit file (packed.py),
ONNX (onnx.py), OpenVINO (openvino.py) and the command that writes them (cli.py)."""
from .cli import export_checkpoint, main, run
from .inference import InferenceBinaryLayer, compare_sign, fold_batchnorms, to_inference
from .onnx import export_onnx
from .openvino import export_openvino
from .packed import FORMAT, VERSION, export_model, load, pack_signs, read, unpack_signs

__all__ = ["FORMAT", "VERSION", "InferenceBinaryLayer", "compare_sign", "export_checkpoint", "export_model",
           "export_onnx", "export_openvino", "fold_batchnorms", "load", "main", "pack_signs", "read", "run", "to_inference",
           "unpack_signs"]
