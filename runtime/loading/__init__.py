"""Loading weights: GGUF conversion and the default model's cache."""
