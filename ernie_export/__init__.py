"""Export side of the ERNIE 4.5 toolchain (needs torch): config, weights, model, export, verify."""

__version__ = "0.1.0"
