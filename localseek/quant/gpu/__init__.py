"""GPU-tier kernels (torch on CUDA; tiled dequantize + matmul for now)."""
