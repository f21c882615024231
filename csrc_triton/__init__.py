"""The CUDA kernels of vllm-twinquant (Triton and Gluon) and the plan that picks one per call.

`linear` runs the TwinQuant layer; `plan` says which kernel it uses for M tokens (see
`dispatch.py`); the kernels live one per file in `kernels/`, their launch tables per device in
`configs/`. Importing needs Triton; running needs CUDA, or TRITON_INTERPRET=1 for the Triton
kernels (the Gluon ones compile for a GPU only).
"""

from csrc_triton.dispatch import KernelPlan, NoKernel, plan, ranges, scratch_tokens, summary, tables_for
from csrc_triton.kernels.base import Device, LayerShape
from csrc_triton.kernels.dequant import dequantize, dequantize_rows, fold_lowrank
from csrc_triton.kernels.lowrank_down import lowrank_down
from csrc_triton.layer import gemm, linear
from csrc_triton.layout import chunk_words, max_block_n_for, repack, unrepack

__all__ = ["Device", "KernelPlan", "LayerShape", "NoKernel", "chunk_words", "dequantize", "dequantize_rows",
           "fold_lowrank", "gemm", "linear", "lowrank_down", "max_block_n_for", "plan", "ranges", "repack",
           "scratch_tokens", "summary", "tables_for", "unrepack"]
