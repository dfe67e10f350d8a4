"""Exportable PyTorch definitions of the ERNIE 4.5 architectures (dense.py: the dense decoder)."""
