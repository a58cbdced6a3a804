"""numba CPU kernels: row dot products from the stored blocks (rowdot: Q8_0/Q4_0/Q4_K/FP8 by hand;
codes: every other GGML type), the matmul / SwiGLU / MoE entry points (kernels), the one-call
MLA decode attention (attention) and small row ops (ops)."""
