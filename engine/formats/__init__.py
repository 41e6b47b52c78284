"""Weight files: safetensors and GGUF reading, what a file holds, quantized tensors, LoRA files."""
