"""The Triton tile kernel (tensor cores, any M the other kernels do not take), MODE 4 and 7.

y[BM, BN] = x[BM, :] @ deq(R)[BN, :]^T with x in its natural column order; BLOCK_K divides the
group, so a step has one scale per output row. Split over K where the grid is small (fp32
atomics into a zeroed y). The low-rank term (t from the down projection, the tile's rows of U)
and the bias are added in the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from csrc_triton.kernels.base import Kernel, Launch, LayerShape
from csrc_triton.layout import chunk_words, next_pow2
from csrc_triton.triton_common import (
    INTERPRETED,
    dot,
    dot_acc,
    operand,
    pdl_wait,
    plane_pair,
    scaled_low_nibble,
    slot_of,
    tile_of,
)

MODES = (4, 7)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # divides the group size; MODE 4: a multiple of 128
    warps: int
    stages: int
    split_k: int
    mode: int  # 4 (M <= 16: operands swapped, nibble-plane dots) or 7 (weights scaled before the MMA)


@triton.jit
def _tq_gemm_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_US: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, MODE: tl.constexpr,
    EXP: tl.constexpr, ASM: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    """Tensor-core tile kernel: y[BM, BN] = x[BM, :] @ deq(R)[BN, :]^T, x in
    its natural column order. BLOCK_K divides the group, so a step has one scale per output row.

    MODE 7 (M > 16): x[BM, BK] @ w[BN, BK]^T with w = (q - 8) * s already in the activation
      dtype: the words of a step are loaded once, their nibbles spread over the columns of
      their chunk (`repack` layout) by a broadcast and a reshape, and turned into scaled
      floats two at a time in PTX (`_scaled_low_nibble`). Nothing is left for the epilogue of
      a step, so the MMA accumulates straight into acc across steps (Hopper: an asynchronous
      wgmma with both operands in shared memory; Triton stages w there).
    MODE 4 (M <= 16; BLOCK_K a multiple of 128; codes as v = E + q, E = 128 bf16 / 1024 fp16;
      sum_k x_k (q_k - 8) = x.v - (E + 8) sum x): no reshape. The operands are
      swapped, acc^T[BN, BM] = deq(R) x^T, so the codes are the register operand and the tokens
      the narrow side of the MMA; nibble planes j and j + 4 of the words [BN, BK/8] become
      floats two words at a time in four PTX instructions (`_plane_pair`), and each plane meets
      the activation columns it holds (runs of CHUNK_W read straight from x): eight dots with
      K = BK/8 per step, the scale applied to their fp32 sum.
    SPLIT_K > 1: program (tile, s) reduces K-slice s and adds into an fp32 y (zeroed by the
    caller); split 0 adds the low-rank term and the bias. int8 U (HAS_US): each row of codes is
    scaled and rounded to the activation dtype in registers before the epilogue dot."""
    pid_m, pid_n = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    act = x_ptr.dtype.element_ty
    CHUNK: tl.constexpr = 8 * CHUNK_W
    WORDS: tl.constexpr = BLOCK_K // 8
    q_rows = qw_ptr + offs_n[:, None] * stride_qn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    SWAP: tl.constexpr = MODE == 4
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_w = k0 // 8 + tl.arange(0, WORDS)
        w_mask = offs_w < k_hi // 8
        p = tl.load(q_rows + offs_w[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
        if MODE == 4:
            s = tl.load(sc_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
            col = (offs_w // CHUNK_W) * CHUNK + offs_w % CHUNK_W  # column of nibble 0 of each word
            col = tl.max_contiguous(tl.multiple_of(col, CHUNK_W), CHUNK_W)
            xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for j in tl.static_range(4):
                lo, hi = plane_pair(p, j, EXP, ASM, act)
                xj = tl.load(x_rows + (col + j * CHUNK_W)[None, :], mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                part += dot(lo, tl.trans(xj), UPCAST)
                xs += tl.sum(xj.to(tl.float32), axis=1)
                xj = tl.load(
                    x_rows + (col + (j + 4) * CHUNK_W)[None, :], mask=m_mask[:, None] & w_mask[None, :], other=0.0
                )
                part += dot(hi, tl.trans(xj), UPCAST)
                xs += tl.sum(xj.to(tl.float32), axis=1)
            e_plus_8 = 136.0 if EXP == 0x4300 else 1032.0
            acc += (part - e_plus_8 * xs[None, :]) * s[:, None]
        else:
            s = tl.load(sc_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(act)
            p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
            p = p >> (tl.arange(0, 8) * 4)[None, None, :, None]  # nibble j of [BN, chunk, j, l] at bits 0-3
            w = scaled_low_nibble(
                tl.reshape(p, (BLOCK_N, BLOCK_K)), s[:, None], EXP, ASM, act
            )  # col c*CHUNK + j*CHUNK_W + l
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < k_hi), other=0.0)
            acc = dot_acc(xk, tl.trans(w), acc, UPCAST)

    if pid_k == 0:
        if HAS_LOWRANK:
            n0 = pid_n * BLOCK_N
            slot = slot_of(n0, SLOT_B1, SLOT_B2)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            pdl_wait(PDL)  # t is the down projection's, launched just before this kernel
            for sp in range(0, NUM_SPLITS):
                t += tl.load(ws_ptr + sp * stride_ws_s + offs_m[:, None] * stride_ws_m + slot * R + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0)
            if HAS_US:  # scaled before the dot (rounded once, as a bf16 factor is), so the MMA
                # still accumulates into acc: scaling its result would need a second accumulator
                us = tl.load(us_ptr + offs_n, mask=n_mask, other=0.0)
                u = u.to(tl.float32) * us[:, None]
            u = operand(u, act, UPCAST)
            if SWAP:
                acc = dot_acc(u, tl.trans(t.to(act)), acc, UPCAST)
            else:
                acc = dot_acc(t.to(act), tl.trans(u), acc, UPCAST)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if SWAP:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
    if SWAP:
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        y_mask = m_mask[None, :] & n_mask[:, None]
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


class TileKernel(Kernel):
    """Always implementable: the plan's last resort below the large-M threshold."""

    name = "tile"

    def choose(self, m: int, shape: LayerShape, tables) -> TileConfig:
        return tables.tile.pick(m, shape.n, shape.k, shape.max_block_n, shape.group_size)

    def launch(self, a: Launch, cfg: TileConfig) -> None:
        m, n, k, group = a.m, a.n, a.k, a.group_size
        bn = min(cfg.block_n, a.max_block_n)  # a tile never straddles two slots, also with a forced config
        bm, bk, split, mode = cfg.block_m, cfg.block_k, cfg.split_k, cfg.mode
        if mode not in MODES:
            raise ValueError(f"tile kernel MODE {mode}: expected one of {MODES}")
        if group % bk or bk % (8 * chunk_words(group)) or (mode == 4 and bk % 128):
            raise ValueError(f"BLOCK_K {bk} must divide the group size {group}, span whole "
                             f"{8 * chunk_words(group)}-column chunks, and (MODE 4) be a multiple of 128")
        k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
        split = triton.cdiv(k, k_per_split)
        y = a.out if split == 1 else torch.zeros((m, n), dtype=torch.float32, device=a.x.device)
        exp = 0x4300 if a.x.dtype == torch.bfloat16 else 0x6400
        br = max(16, next_pow2(a.rank)) if a.has_lr else 16
        ws, num_splits = a.make_t()
        _tq_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
            *a.operands(ws), y, m, n, k, a.rank, a.slot_b1, a.slot_b2, num_splits, k_per_split, *a.strides(ws),
            y.stride(0), GROUP=group, CHUNK_W=chunk_words(group), HAS_LOWRANK=a.has_lr, HAS_US=a.has_us,
            HAS_BIAS=a.bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8, SPLIT_K=split,
            MODE=mode, EXP=exp, ASM=not INTERPRETED, UPCAST=INTERPRETED, PDL=a.pdl, num_warps=cfg.warps,
            num_stages=cfg.stages, launch_pdl=a.pdl,
        )
        if split > 1:
            a.out.copy_(y)


KERNEL = TileKernel()
