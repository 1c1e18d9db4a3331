"""lookalike: similar-product image search served by NVIDIA Triton Inference Server (server side)."""

__version__ = "0.1.0"
