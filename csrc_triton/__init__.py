"""Triton kernels of vllm-twinquant (import needs triton; CUDA to launch, or TRITON_INTERPRET=1)."""

from csrc_triton.twinquant_gemm import dequantize, lowrank_down, tq_gemm, tq_linear

__all__ = ["dequantize", "lowrank_down", "tq_gemm", "tq_linear"]
