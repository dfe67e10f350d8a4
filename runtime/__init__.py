"""Deployment side of the ERNIE 4.5 toolchain: runs exported artifacts on ONNX Runtime.

Needs only onnxruntime (or onnxruntime-gpu), numpy, tokenizers and jinja2 — never torch.

    contract  manifest.json: format, files, and the graphs' I/O names (the one place that names them)
    session   providers, sessions over one memory-mapped weights file, checked against the manifest
    step      one model step with IO binding, the KV cache object, the one decode loop
    sampling  next-token choice (numpy)
    text      tokenizer, sandboxed chat template, UTF-8-safe streaming
    generate  the Python API: load, Options.from_artifact, generate
    chat      a conversation that keeps its KV cache between turns
    cli       `python -m runtime.generate`
"""

__version__ = "0.1.0"
