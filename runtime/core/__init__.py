"""The core every front end shares: the artifact contract, ONNX Runtime sessions, one model step, the KV cache."""
