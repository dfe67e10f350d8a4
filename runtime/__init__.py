"""Deployment side of the ERNIE 4.5 toolchain: runs exported artifacts on ONNX Runtime.

Needs only onnxruntime (or onnxruntime-gpu), numpy, tokenizers and jinja2 — never torch.
"""

__version__ = "0.1.0"
