"""The quantize pipeline (checkpoint -> GGUF or FP8 folder) and the GGUF writer."""
