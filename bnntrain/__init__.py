"""bnntrain: train binarized neural networks with the published two-stage recipes."""
__version__ = "0.1.0"
