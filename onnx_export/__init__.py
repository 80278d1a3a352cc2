"""Cut a Llama-family model into per-layer ONNX segments with explicit KV cache, without torch."""
