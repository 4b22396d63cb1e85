"""Quantization: GPTQ/RTN as pure tensor functions (gptq), packed storage (packing), model application (apply)."""
