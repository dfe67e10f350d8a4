"""Export side of the ERNIE 4.5 toolchain (needs torch): checkpoint -> verified ONNX artifact.

The stages, one sub-package each, in the order an export runs them (`build.export_artifact`):

    checkpoint  what a published checkpoint holds: config.json, safetensors weights, the tokenizer
    model       the exportable PyTorch definitions (the KV cache is an argument)
    graph       torch.export -> ONNX, then graph rewrites: quantization, fused attention, the LM head
    artifact    the artifact directory: files, manifest, golden vectors, verification, atomic publish

`python -m ernie_export` is the command line (__main__.py). A second architecture adds a config
reader and weight map in checkpoint/, a definition in model/, and reuses graph/ and artifact/.
"""

__version__ = "0.1.0"
