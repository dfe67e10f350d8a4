"""Deployment side of the ERNIE 4.5 toolchain: runs exported artifacts on ONNX Runtime.

Needs only onnxruntime (or onnxruntime-gpu), numpy, tokenizers and jinja2 — never torch (tested).
Sub-packages, each using only those before it:

    core      the artifact contract (manifest, graph I/O names), sessions, the model step and KV cache
    generate  the Python API and `python -m runtime.generate`: options, sampling, text, chat
    serve     `python -m runtime.serve` (OpenAI-compatible, continuous batching), `runtime.serve.ray`
    eval      `python -m runtime.eval` (perplexity, comparison), `runtime.eval.check` (golden vectors)
"""

__version__ = "0.1.0"
