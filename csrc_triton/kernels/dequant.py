"""Above the large-M threshold: one cuBLAS GEMM over transient dense weights made in one pass.

`dequantize` writes deq(R) (in the checkpoint's column order) and, where `fold_lowrank` says so,
adds U_s D_s of every slot to it in the same pass (tensor-core products over 64-wide rank slices,
rounded once); else the layer runs [x | x D^T] @ [deq(R) | U_blockdiag]^T. The weights are freed
after the call: no dense copy is kept. A layer whose dense weights exceed `TRANSIENT_BYTES` is made
and multiplied in row ranges (`Launch.row_ranges`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from csrc_triton.kernels.base import Kernel, Launch, LayerShape
from csrc_triton.layout import check_factor, chunk_words, next_pow2
from csrc_triton.triton_common import INTERPRETED, dot_acc, slot_of


@dataclass(frozen=True)
class DequantConfig:
    fold: bool  # U D folded into the transient weights (else the concatenated GEMM)


@triton.jit
def _dequant_kernel(qw_ptr, sc_ptr, w_ptr, down_ptr, up_ptr, N, K, R, B1, B2, stride_qn, stride_sn, stride_wn,
                    stride_dn, stride_un, GROUP: tl.constexpr, CHUNK_W: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, HAS_LOWRANK: tl.constexpr, UPCAST: tl.constexpr):
    """deq(R) in the checkpoint's column order from `repack`ed codes: each word is loaded once
    and its nibbles spread over the columns of its chunk by a broadcast and a reshape. With
    HAS_LOWRANK the tile also gets U_s D_s added (the low-rank component folded into the same
    transient weights, rows of slot s: B1 <= n < B2 is slot 1, n >= B2 slot 2), tensor-core
    products over BLOCK_R-wide rank slices of each slot the tile touches, accumulated in fp32,
    then rounded once to the output dtype."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    CHUNK: tl.constexpr = 8 * CHUNK_W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_g = pid_k * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    nm = offs_n < N
    p = tl.load(
        qw_ptr + offs_n[:, None] * stride_qn + offs_p[None, :], mask=nm[:, None] & (offs_p[None, :] < K // 8), other=0
    )
    s = tl.load(
        sc_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
        mask=nm[:, None] & (offs_g[None, :] < K // GROUP),
        other=0.0,
    )
    p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
    q = ((p >> (tl.arange(0, 8) * 4)[None, None, :, None]) & 0xF) - 8  # [BN, chunk, j, l]
    q = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP))  # column c*CHUNK + j*CHUNK_W + l
    w = tl.reshape(q * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        n0 = pid_n * BLOCK_N
        n1 = tl.minimum(n0 + BLOCK_N, N) - 1
        slot = slot_of(offs_n, B1, B2)
        for sl in range(slot_of(n0, B1, B2), slot_of(n1, B1, B2) + 1):
            for r0 in range(0, R, BLOCK_R):  # rank in slices: shared memory independent of R
                rr = r0 + offs_r
                u = tl.load(up_ptr + offs_n[:, None] * stride_un + rr[None, :],
                            mask=(nm & (slot == sl))[:, None] & (rr[None, :] < R), other=0.0)
                d = tl.load(down_ptr + (sl * R + rr)[:, None] * stride_dn + offs_k[None, :],
                            mask=(rr[:, None] < R) & (offs_k[None, :] < K), other=0.0)
                w = dot_acc(u, d, w, UPCAST)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=nm[:, None] & (offs_k[None, :] < K))


# Tile of the fold (dequantization + U D), (BLOCK_N, BLOCK_K, warps): of (64, 128, 4), (128, 128, 8)
# and (128, 256, 8), the fastest on 3 of the 4 Llama-3-8B shapes at ranks 32-256 (H200,
# benchmarks/results/large_m_h200.json; (128, 128, 8) won on q/k/v on the H100, large_m_h100.json)
FOLD_TILE = (64, 128, 4)


def fold_lowrank(m: int, n: int, r: int) -> bool:
    """Whether the large-M path folds U D into the transient weights (cost ~ N K r tensor-core
    FLOPs, at ~250 TFLOP/s in the fold pass) rather than running [x | x D^T] @ [deq(R) | U]^T
    (cost ~ 3 M K bytes: x read twice and copied): fold when M > N r / 256. The rule agrees with
    every case of benchmarks/results/large_m_h200.json (M 1024/4096, ranks 32-256): it folds q/k/v,
    o and down at 4096 tokens up to rank 128 (up to -12%), gate_up only at rank 32, and at 1024 tokens
    only rank 32 below gate_up's width; where it does not fold, folding was up to 24% slower. On the
    H100 (large_m_h100.json, the final code against v12) the folded cases ran 4-16% faster."""
    return 256 * m > n * r


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
               slot_bounds: tuple[int, ...] = (), tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """deq(R) [N, K] in the checkpoint's column order from `repack`ed codes, written into `out`
    (a new tensor if None). With float factors `down` [slots*r, K] and `up` [N, r]: the effective
    weights deq(R) + U_s D_s of every slot s (`slot_bounds`: first output row of slots 1, 2), in one pass."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty((n, k), dtype=dtype, device=qweight.device) if out is None else out
    has_lr = down is not None and down.shape[0] > 0
    r = up.shape[1] if has_lr else 0
    if has_lr:
        if down.dtype == torch.int8 or up.dtype == torch.int8:
            raise ValueError("dequantize folds float factors: dequantize int8 ones first (dequantize_rows)")
        if len(slot_bounds) > 2 or down.shape != ((len(slot_bounds) + 1) * r, k) or up.shape != (n, r):
            raise ValueError(f"low-rank factors down {list(down.shape)} / up {list(up.shape)} do not fit "
                             f"[{len(slot_bounds) + 1}*r, {k}] / [{n}, r] for slot bounds {slot_bounds}")
    bn, bk, warps = tile or (FOLD_TILE if has_lr else (64, max(128, group_size), 4))
    bk = max(bk, group_size)
    b1, b2 = (list(slot_bounds) + [1 << 30, 1 << 30])[:2]
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, w, down if has_lr else w, up if has_lr else w, n, k, r, b1, b2,
        qweight.stride(0), scales.stride(0), w.stride(0), down.stride(0) if has_lr else 0,
        up.stride(0) if has_lr else 0, GROUP=group_size, CHUNK_W=chunk_words(group_size), BLOCK_N=bn,
        BLOCK_K=bk, BLOCK_R=min(64, max(16, next_pow2(r))), HAS_LOWRANK=has_lr, UPCAST=INTERPRETED, num_warps=warps,
    )
    return w


@triton.jit
def _dequant_rows_kernel(q_ptr, s_ptr, out_ptr, ROWS, COLS, stride_q, stride_o,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < COLS)
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=rows < ROWS, other=0.0)
    tl.store(
        out_ptr + rows[:, None] * stride_o + cols[None, :], (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask
    )


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 factor with one fp32 scale per row, as a [rows, cols] tensor of `dtype` (one launch)."""
    rows, cols = q.shape
    out = torch.empty((rows, cols), dtype=dtype, device=q.device)
    br, bc = 16, min(256, max(16, next_pow2(cols)))
    _dequant_rows_kernel[(triton.cdiv(rows, br), triton.cdiv(cols, bc))](
        q, scale, out, rows, cols, q.stride(0), out.stride(0), BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return out


class DequantCublasKernel(Kernel):
    """Always implementable; the plan takes it above the large-M threshold of the device's table."""

    name = "dequant_cublas"

    def choose(self, m: int, shape: LayerShape, tables) -> DequantConfig:
        return DequantConfig(fold=shape.rank == 0 or fold_lowrank(m, shape.n, shape.rank))

    def launch(self, a: Launch, cfg: DequantConfig) -> None:
        x, k = a.x, a.k
        down, up = a.down, a.up
        if a.has_lr:
            check_factor(down, a.down_scale, down.shape[0], "down")
            check_factor(up, a.up_scale, a.n, "up")
            if a.down_scale is not None:
                down, up = dequantize_rows(down, a.down_scale, x.dtype), dequantize_rows(up, a.up_scale, x.dtype)
        fold = not a.has_lr or cfg.fold
        r, edges = a.rank, a.slot_edges
        xt = x if fold else torch.cat([x, torch.mm(x, down.t())], dim=1)
        for lo, hi in a.row_ranges(x.element_size()):  # the whole layer, unless its weights are too many
            first, last = bisect.bisect_right(edges, lo) - 1, bisect.bisect_right(edges, hi - 1) - 1
            if fold:
                w = dequantize(a.qweight[lo:hi], a.scales[lo:hi], a.group_size, x.dtype,
                               down=down[first * r : (last + 1) * r] if a.has_lr else None,
                               up=up[lo:hi] if a.has_lr else None,
                               slot_bounds=tuple(b - lo for b in edges[first + 1 : last + 1]))
            else:  # [x | x D^T] @ [deq(R) | U, block-diagonal over the slots]^T
                w = torch.empty((hi - lo, k + down.shape[0]), dtype=x.dtype, device=x.device)
                dequantize(a.qweight[lo:hi], a.scales[lo:hi], a.group_size, x.dtype, out=w[:, :k])
                w[:, k:].zero_()
                for s in range(first, last + 1):
                    s_lo, s_hi = max(edges[s], lo), min(edges[s + 1], hi)
                    w[s_lo - lo : s_hi - lo, k + s * r : k + (s + 1) * r] = up[s_lo:s_hi]
            y = a.out[:, lo:hi]
            torch.mm(xt, w.t(), out=y) if a.bias is None else torch.addmm(a.bias[lo:hi], xt, w.t(), out=y)
            del w


KERNEL = DequantCublasKernel()
