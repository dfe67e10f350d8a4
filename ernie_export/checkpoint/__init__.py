"""Checkpoint reading: config.json -> ErnieConfig (or ErnieMoeConfig), safetensors -> canonical tensors (whole, or one
layer at a time; moe_weights.py maps the MoE layouts), the tokenizer files; and synthetic checkpoints in the real layout
(`python -m ernie_export.checkpoint.synthetic [--arch moe]`)."""
