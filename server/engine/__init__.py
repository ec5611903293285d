"""The engine process: device, batcher, multi-LoRA model, heads and model families."""
