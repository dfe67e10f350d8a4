"""The artifact: writing its files and manifest, golden vectors, verification against eager PyTorch
(`python -m ernie_export.artifact.verify`), and the atomic publish."""
