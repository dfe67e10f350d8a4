"""Graph building: tracing to ONNX and the rewrites applied to the traced graph (quantization, fused
attention, the LM head in row ranges)."""
