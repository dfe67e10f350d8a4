"""Export side of the ERNIE 4.5 toolchain (needs torch).

    config     config.json -> ErnieConfig (both published layouts)
    weights    find a checkpoint (directory or hub id); safetensors -> canonical tensors
    model      the exportable PyTorch model (KV cache as argument)
    trace      torch.export -> ONNX, named by runtime.contract
    artifact   weights file, tokenizer files, manifest; staging and atomic publish
    verify     parity against eager through the runtime's own loop; `python -m ernie_export.verify`
    build      the pipeline; __main__ is `python -m ernie_export`
    synthetic  random-weight checkpoints in the real layout (tests, demo)
"""

__version__ = "0.1.0"
