"""W4A8-FP8 at large M: cuBLAS's block-scaled FP8 GEMM over a transient FP8 copy of the codes.

    y = blockscaled_fp8_gemm(xq, e4m3(q)) + (x @ D^T) @ U^T + bias

The format's numerics are a block-scaled FP8 GEMM with 1 x 128 blocks on both sides: the
activation codes xq with their per-token scale (the same for every block of a token), the weight
codes q = c - 8 with the group scales (group size 128). So above the table's threshold the layer
makes e4m3(q) for the whole layer in one pass (`w4a8.codes_to_8bit`, N x K bytes, freed after
the call; in row ranges above `TRANSIENT_BYTES`, as `dequant_cublas` does for W4A16) and calls
`torch._scaled_mm` with 1x128 x 1x128 block scaling (cuBLAS, sm_90, CUDA 12.9+). The low-rank
term reads x unquantized, as everywhere: t = x @ D^T from `lowrank_down`, then one bf16 product
per slot added into y, and the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csrc_triton.kernels.base import Kernel, Launch, LayerShape
from csrc_triton.kernels.lowrank_down import lowrank_down
from csrc_triton.kernels.w4a8 import codes_to_8bit, quantize_rows

BLOCK = 128  # cuBLAS's 1D block: the group size this kernel takes
M_ALIGN = 16  # token counts padded to a multiple (on an H100, 2,321 tokens failed; 300 and 372 ran)
MIN_TORCH, MIN_CUDA = (2, 11), (12, 9)  # torch._scaled_mm with 1x128 block scales on both sides, as measured


def _version(v: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in (v or "0").split("+")[0].split(".")[:2])


@dataclass(frozen=True)
class Fp8CublasConfig:
    """Nothing to choose: cuBLAS picks its own algorithm."""


class Fp8CublasKernel(Kernel):
    name = "fp8_cublas"

    def can_implement(self, shape: LayerShape, device) -> tuple[bool, str | None]:
        why = self.disabled()
        if why:
            return False, why
        if shape.act_quant != "fp8":
            return False, "the layer's activations are not FP8"
        if shape.group_size != BLOCK:
            return False, f"group size {shape.group_size}; cuBLAS's block-scaled FP8 GEMM takes {BLOCK}-wide groups"
        if not device.cuda or tuple(device.capability) != (9, 0):
            return False, "cuBLAS's 1x128 block-scaled FP8 GEMM runs on sm_90 only"
        if shape.n % 16 or shape.k % 16:
            return False, f"layer {shape.k} -> {shape.n}: cuBLAS's FP8 GEMM needs multiples of 16"
        if _version(device.torch_version) < MIN_TORCH or _version(device.cuda_runtime) < MIN_CUDA:
            need = f"torch {'.'.join(map(str, MIN_TORCH))}+ on CUDA {'.'.join(map(str, MIN_CUDA))}+"
            return False, (f"torch {device.torch_version} (CUDA {device.cuda_runtime}): block-scaled _scaled_mm "
                           f"measured with {need}")
        return True, None

    def choose(self, m: int, shape: LayerShape, tables) -> Fp8CublasConfig | None:
        return tables.w4a8_fp8_cublas.lookup(m, shape.n, shape.k)

    def launch(self, a: Launch, cfg: Fp8CublasConfig) -> None:
        m, k = a.m, a.k
        xq, xs, _ = quantize_rows(a.x, "fp8", a.group_size)
        mp = -(-m // M_ALIGN) * M_ALIGN  # cuBLAS refuses (NOT_SUPPORTED) a token count off its alignment
        if mp != m:
            xq = torch.cat([xq.view(torch.uint8), xq.new_zeros(mp - m, k, dtype=torch.uint8)]).view(xq.dtype)
            xs = torch.cat([xs, xs.new_ones(mp - m)])
        scale_a = xs.expand(k // BLOCK, mp).contiguous().t()  # [M, K/128], M-major
        y = a.out
        for lo, hi in a.row_ranges(1):  # the whole layer, unless its codes are too many
            w8 = codes_to_8bit(a.qweight[lo:hi], a.group_size, "fp8")  # [rows, K]
            scale_b = a.scales[lo:hi].float().t().contiguous()  # [K/128, rows], N-major
            if (lo, hi) == (0, a.n) and mp == m:
                torch._scaled_mm(xq, w8.t(), scale_a, scale_b, out_dtype=y.dtype, out=y)
            else:
                y[:, lo:hi] = torch._scaled_mm(xq, w8.t(), scale_a, scale_b, out_dtype=y.dtype)[:m]
            del w8
        if a.has_lr:
            t = lowrank_down(a.x, a.down, reduce=True, down_scale=a.down_scale)[0].to(a.x.dtype)
            up = a.up if a.up_scale is None else (a.up.float() * a.up_scale[:, None]).to(a.x.dtype)
            r, edges = a.rank, a.slot_edges
            for s in range(len(edges) - 1):
                lo, hi = edges[s], edges[s + 1]
                y[:, lo:hi].addmm_(t[:, s * r:(s + 1) * r], up[lo:hi].t())
        if a.bias is not None:
            y += a.bias


KERNEL = Fp8CublasKernel()
