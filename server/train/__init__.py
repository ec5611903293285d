"""Training a PEFT LoRA adapter of any task (`loraplex train`)."""
