"""Weight files: the format registry (weight_file.py), safetensors and GGUF reading, what a file holds, quantized
tensors, LoRA files (lora/)."""
