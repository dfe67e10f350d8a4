"""Checkpoint reading: config.json -> ErnieConfig, safetensors -> canonical tensors, the tokenizer files;
and synthetic checkpoints in the real layout (`python -m ernie_export.checkpoint.synthetic`)."""
