"""lookalike_export: pretrained backbones -> parity-checked ONNX embedders in a Triton model repository.

Needs torch (the `export` extra); the serving path never imports this package.
"""
