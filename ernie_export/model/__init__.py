"""Exportable PyTorch definitions of the ERNIE 4.5 architectures (dense.py: the dense decoder and `build_model`, which
picks by the config; moe.py: the MoE decoder, the dense one with sparse MoE blocks)."""
