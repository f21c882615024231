"""Triton kernels for the TwinQuant dual-component linear layer (W4A16).

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias

They read scales [N, K/G], D [slots*R, K] and U [N, R] as the checkpoint stores them, and the
int32 codes [N, K/8] after one lossless reordering at load (`repack`, nothing re-quantized):
within every chunk of C = min(64, G) input columns, nibble j of word l holds column
j * C/8 + l instead of 8 * l + j. Then the j-th nibbles of consecutive words meet consecutive
activations, so the decode kernel reads x in vector loads and never shuffles registers.

* ``lowrank_down``: t = x @ D^T for every slot of a (possibly merged) layer at once, split
  over K into a small fp32 workspace [S, M, slots*R]; it reads x and D once.
* ``tq_gemm``: the residual product with the low-rank up projection, bias and store in one
  epilogue. Decode (M <= GEMV_MAX_M) uses a one-row-per-program kernel that streams whole
  int32 words and turns a nibble into a float with one shift and one bit-select (the code
  becomes the mantissa of 1 + q/16; the constant part is removed per word from the sum of
  x); larger M a tensor-core tile kernel (`_tq_gemm_kernel`: MODE 4 with the operands swapped
  and PTX nibble conversion up to 16 tokens, MODE 0 above; split-K where the grid is small).
* ``tq_linear``: what the plugin calls; above LARGE_M_THRESHOLD tokens (SMALL_LAYER_LARGE_M_THRESHOLD for
  layers under 32 M weights) it dequantizes into a transient buffer and runs both components
  as one cuBLAS GEMM.

Why two launches rather than computing t inside every GEMM program: t needs the whole K
reduction before the up projection, so a single launch must either re-read all of D in every
output tile (several times the residual's own bytes at decode tile widths) or synchronise the
grid. The rank-r intermediate (M x slots*R fp32, a few KB) is exchanged through L2 instead.

Merged layers (q/k/v, gate/up) keep one factor pair per sub-layer ("slot"): output rows of
slot s use t[:, s*R:(s+1)*R]. Every output tile lies inside one slot (BLOCK_N divides the
slot boundaries), so a tile finds its slot from two boundaries.

Measured on the H100: benchmarks/kernels/README.md.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) computes bf16 dots on
# raw bit patterns; there the operands are upcast to fp32 first. Compiled kernels never do.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _lowrank_down_kernel(
    x_ptr, d_ptr, ws_ptr,
    M, K, RT, k_per_split,
    stride_xm, stride_dr, stride_ws_s, stride_ws_m,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
        d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_k[None, :],
                    mask=(offs_r[:, None] < RT) & kmask[None, :], other=0.0)
        acc += _dot(x, tl.trans(d), UPCAST)
    tl.store(ws_ptr + pid_s * stride_ws_s + offs_m[:, None] * stride_ws_m + offs_r[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < RT))


@triton.jit
def _code_as_float(q, ONE: tl.constexpr, SHIFT: tl.constexpr, act: tl.constexpr):
    """Codes q in 0..15 as v = 1 + q/16 in the activation dtype: q is OR-ed into the top
    mantissa bits of 1.0 (exact: 4 of 7/10 mantissa bits), two integer ops and no I2F."""
    return ((q << SHIFT) | ONE).to(tl.int16).to(act, bitcast=True)


# Two nibble planes of a pair of words in four PTX instructions per output register: a shift,
# then one LOP3 puts nibbles j and j+4 of a word under the exponent of 128 (bf16 0x4300) or
# 1024 (fp16 0x6400) -- the float 128 + q (1024 + q), exactly -- and two PRMTs gather plane j
# and plane j+4 of the two words. Operands: $0 $1 out, $2 $3 words, $4 shift, $6 exponent.
_PLANE_PAIR_PTX = tl.constexpr("""
{
.reg .b32 ta, tb;
shr.u32 ta, $2, $4;
shr.u32 tb, $3, $4;
lop3.b32 ta, ta, 0x000F000F, $6, 0xEA;
lop3.b32 tb, tb, 0x000F000F, $6, 0xEA;
prmt.b32 $0, ta, tb, 0x5410;
prmt.b32 $1, ta, tb, 0x7632;
}
""")


@triton.jit
def _plane_pair(p, J: tl.constexpr, EXP: tl.constexpr, ASM: tl.constexpr, act: tl.constexpr):
    """Nibble planes J and J + 4 of the words p as floats E + q (E = 128 for bf16, 1024 for
    fp16: EXP is its bit pattern, which has no mantissa bits set)."""
    if ASM:
        sh = tl.full(p.shape, 4 * J, tl.int32)
        e = tl.full(p.shape, EXP | (EXP << 16), tl.int32)
        if EXP == 0x4300:
            lo, hi = tl.inline_asm_elementwise(_PLANE_PAIR_PTX, "=r,=r,r,r,r,r,r,r", [p, sh, e],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            lo, hi = tl.inline_asm_elementwise(_PLANE_PAIR_PTX, "=r,=r,r,r,r,r,r,r", [p, sh, e],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:  # the same values in plain Triton (the CPU interpreter has no PTX)
        lo = (((p >> (4 * J)) & 0xF) | EXP).to(tl.int16).to(act, bitcast=True)
        hi = (((p >> (4 * J + 16)) & 0xF) | EXP).to(tl.int16).to(act, bitcast=True)
    return lo, hi


@triton.jit
def _tq_gemm_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, MODE: tl.constexpr,
    ONE: tl.constexpr, SHIFT: tl.constexpr, EXP: tl.constexpr, ASM: tl.constexpr, UPCAST: tl.constexpr,
):
    """Tensor-core tile kernel (M > GEMV_MAX_M): y[BM, BN] = x[BM, :] @ deq(R)[BN, :]^T, x in
    its natural column order. BLOCK_K divides the group, so each step has one scale per output
    row: the dots run on the exact codes, held as floats with no mantissa rounding, and the
    scale multiplies their fp32 result after the constant part is removed with sum_k x_k.

    MODE 0 (codes as v = 1 + q/16, `_code_as_float`; sum_k x_k (q_k - 8) = 16 x.v - 24 sum x): the words of a step are loaded once
      and their nibbles spread over the columns of their chunk (`repack` layout) by a broadcast
      and a reshape; one dot x[BM, BK] @ v[BN, BK]^T. Fastest from M ~ 32 on.
    MODE 4 (BLOCK_K a multiple of 128; codes as v = E + q, E = 128 bf16 / 1024 fp16;
      sum_k x_k (q_k - 8) = x.v - (E + 8) sum x): no reshape. The operands are
      swapped, acc^T[BN, BM] = deq(R) x^T, so the codes are the register operand and the tokens
      the narrow side of the MMA; nibble planes j and j + 4 of the words [BN, BK/8] become
      floats two words at a time in four PTX instructions (`_plane_pair`), and each plane meets
      the activation columns it holds (runs of CHUNK_W read straight from x): eight dots with
      K = BK/8 per step. Fastest at M <= 16.
    (MODE 1-3, tried and removed, are in benchmarks/kernels/README.md; the numbers match the
    sweep records.)
    SPLIT_K > 1: program (tile, s) reduces K-slice s and adds into an fp32 y (zeroed by the
    caller); split 0 adds the low-rank term and the bias."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

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

    if MODE == 4:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_w = k0 // 8 + tl.arange(0, WORDS)
        w_mask = offs_w < k_hi // 8
        p = tl.load(q_rows + offs_w[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
        s = tl.load(sc_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        if MODE == 0:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < k_hi), other=0.0)
            p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
            q = (p >> (tl.arange(0, 8) * 4)[None, None, :, None]) & 0xF  # [BN, chunk, j, l]
            v = _code_as_float(tl.reshape(q, (BLOCK_N, BLOCK_K)), ONE, SHIFT, act)  # col c*CHUNK + j*CHUNK_W + l
            part = _dot(x, tl.trans(v), UPCAST)
            xs = tl.sum(x.to(tl.float32), axis=1)
            acc += (16.0 * part - 24.0 * xs[:, None]) * s[None, :]
        else:
            col = (offs_w // CHUNK_W) * CHUNK + offs_w % CHUNK_W  # column of nibble 0 of each word
            col = tl.max_contiguous(tl.multiple_of(col, CHUNK_W), CHUNK_W)
            xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for j in tl.static_range(4):
                lo, hi = _plane_pair(p, j, EXP, ASM, act)
                xj = tl.load(x_rows + (col + j * CHUNK_W)[None, :], mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                part += _dot(lo, tl.trans(xj), UPCAST)
                xs += tl.sum(xj.to(tl.float32), axis=1)
                xj = tl.load(x_rows + (col + (j + 4) * CHUNK_W)[None, :], mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                part += _dot(hi, tl.trans(xj), UPCAST)
                xs += tl.sum(xj.to(tl.float32), axis=1)
            e_plus_8 = 136.0 if EXP == 0x4300 else 1032.0
            acc += (part - e_plus_8 * xs[None, :]) * s[:, None]

    if pid_k == 0:
        if HAS_LOWRANK:
            n0 = pid_n * BLOCK_N
            slot = (n0 >= SLOT_B1).to(tl.int32) + (n0 >= SLOT_B2).to(tl.int32)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sp in range(0, NUM_SPLITS):
                t += tl.load(ws_ptr + sp * stride_ws_s + offs_m[:, None] * stride_ws_m + slot * R + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(act)
            if MODE == 4:
                acc += _dot(u, tl.trans(t.to(act)), UPCAST)
            else:
                acc += _dot(t.to(act), tl.trans(u), UPCAST)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if MODE == 4:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
    if MODE == 4:
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        y_mask = m_mask[None, :] & n_mask[:, None]
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _unpack_v(p, J: tl.constexpr):
    """Nibble J of every word as the float 1 + q/16 (q placed in the top mantissa bits of 1.0)."""
    if J <= 4:
        bits = (p << (19 - 4 * J)) & 0x780000
    else:
        bits = (p >> (4 * J - 19)) & 0x780000
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_epilogue(acc, m, M, offs_n, n_mask, x_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr,
                   R, slot, NUM_SPLITS, stride_un, stride_ws_s, stride_ws_m, stride_ym,
                   HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr):
    y = tl.sum(acc, axis=1)
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = (offs_r < R) & (offs_r * 0 + m < M)
        t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            t += tl.load(ws_ptr + sp * stride_ws_s + m * stride_ws_m + slot * R + offs_r, mask=r_mask, other=0.0)
        # t is rounded to the activation dtype, as the tile kernel's tensor-core operand is
        t = t.to(x_ptr.dtype.element_ty).to(tl.float32)
        u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        y += tl.sum(u * t[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask & (offs_n * 0 + m < M))


@triton.jit
def _tq_gemv_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Decode kernel (M <= GEMV_MAX_M): BLOCK_M (1, 2 or 4) token rows and BLOCK_N output rows
    per program; the codes are unpacked once for all BLOCK_M rows. (Loading the next tile of
    codes before using the current one measured ~8% slower on the H100, so it is not done.)

    Codes are in the `repack` layout: nibble j of the words [w0, w0 + BLOCK_W) multiplies
    x[base(w) + j * CHUNK_W], consecutive for consecutive words of a chunk. A nibble q becomes
    the float v = 1 + q/16 by placing it in the mantissa of 1.0 (one shift, one bit-select), so
    sum_j (q_j - 8) x_j = 16 sum_j v_j x_j - 24 sum_j x_j, the second sum shared by all rows."""
    m0 = tl.program_id(0) * BLOCK_M
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kw = K // 8
    CHUNK: tl.constexpr = 8 * CHUNK_W
    q_rows = qw_ptr + offs_n[:, None] * stride_qn
    s_rows = sc_ptr + offs_n[:, None] * stride_sn
    acc0 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, kw, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_mask = offs_w < kw
        mask = n_mask[:, None] & w_mask[None, :]
        p = tl.load(q_rows + offs_w[None, :], mask=mask, other=0)
        s = tl.load(s_rows + (offs_w * 8 // GROUP)[None, :], mask=mask, other=0.0)
        xcol = (offs_w // CHUNK_W) * CHUNK + offs_w % CHUNK_W
        xcol = tl.max_contiguous(tl.multiple_of(xcol, CHUNK_W), CHUNK_W)
        xr = x_ptr + m0 * stride_xm + xcol
        row = offs_w * 0 + m0  # (tensor compares; the interpreter rejects scalar & tensor masks)
        sf = s.to(tl.float32)
        sv0 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        xs0 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        if BLOCK_M > 1:
            sv1 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            xs1 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        if BLOCK_M > 2:
            sv2 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            xs2 = tl.zeros((BLOCK_W,), dtype=tl.float32)
            sv3 = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
            xs3 = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for j in tl.static_range(8):
            v = _unpack_v(p, j)
            xj = tl.load(xr + j * CHUNK_W, mask=w_mask & (row < M), other=0.0).to(tl.float32)
            sv0 += v * xj[None, :]
            xs0 += xj
            if BLOCK_M > 1:
                xj = tl.load(xr + stride_xm + j * CHUNK_W, mask=w_mask & (row + 1 < M), other=0.0).to(tl.float32)
                sv1 += v * xj[None, :]
                xs1 += xj
            if BLOCK_M > 2:
                xj = tl.load(xr + 2 * stride_xm + j * CHUNK_W, mask=w_mask & (row + 2 < M), other=0.0).to(tl.float32)
                sv2 += v * xj[None, :]
                xs2 += xj
                xj = tl.load(xr + 3 * stride_xm + j * CHUNK_W, mask=w_mask & (row + 3 < M), other=0.0).to(tl.float32)
                sv3 += v * xj[None, :]
                xs3 += xj
        acc0 += sf * (16.0 * sv0 - 24.0 * xs0[None, :])
        if BLOCK_M > 1:
            acc1 += sf * (16.0 * sv1 - 24.0 * xs1[None, :])
        if BLOCK_M > 2:
            acc2 += sf * (16.0 * sv2 - 24.0 * xs2[None, :])
            acc3 += sf * (16.0 * sv3 - 24.0 * xs3[None, :])

    n0 = pid_n * BLOCK_N
    slot = (n0 >= SLOT_B1).to(tl.int32) + (n0 >= SLOT_B2).to(tl.int32)
    _gemv_epilogue(acc0, m0, M, offs_n, n_mask, x_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr, R, slot, NUM_SPLITS,
                   stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_BIAS, BLOCK_R)
    if BLOCK_M > 1:
        _gemv_epilogue(acc1, m0 + 1, M, offs_n, n_mask, x_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr, R, slot, NUM_SPLITS,
                       stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_BIAS, BLOCK_R)
    if BLOCK_M > 2:
        _gemv_epilogue(acc2, m0 + 2, M, offs_n, n_mask, x_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr, R, slot, NUM_SPLITS,
                       stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_BIAS, BLOCK_R)
        _gemv_epilogue(acc3, m0 + 3, M, offs_n, n_mask, x_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr, R, slot, NUM_SPLITS,
                       stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_BIAS, BLOCK_R)


# -- code layout ------------------------------------------------------------------------------
def chunk_words(group_size: int) -> int:
    """Words per chunk of the repacked layout: a chunk is min(64, G) columns, so it never
    straddles a scale group (G in 32..128 divides K, so chunks tile every row exactly)."""
    return min(64, group_size) // 8


def repack(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Checkpoint codes (compressed-tensors order: column 8l + j in nibble j of word l) to the
    layout every kernel here reads (column c*C + j*C/8 + l of chunk c in nibble j of word l).
    Lossless and invertible (`unrepack`); same shape and dtype."""
    n, kw = qweight.shape
    cw = chunk_words(group_size)
    if (kw * 8) % (8 * cw):
        raise ValueError(f"in_features {kw * 8} is not a multiple of the {8 * cw}-column chunk")
    shifts = 4 * torch.arange(8, device=qweight.device, dtype=torch.int32)
    codes = (qweight[:, :, None] >> shifts) & 0xF  # [N, K/8, 8]: natural column order
    codes = codes.reshape(n, kw // cw, 8, cw).transpose(2, 3)  # [N, chunk, l, j]
    return _pack_nibbles(codes.reshape(n, kw, 8), shifts)


def unrepack(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    n, kw = qweight.shape
    cw = chunk_words(group_size)
    shifts = 4 * torch.arange(8, device=qweight.device, dtype=torch.int32)
    codes = ((qweight[:, :, None] >> shifts) & 0xF).reshape(n, kw // cw, cw, 8).transpose(2, 3)
    return _pack_nibbles(codes.reshape(n, kw, 8), shifts)


def _pack_nibbles(codes: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    # int64 sum avoids int32 overflow of the top nibble; the wrap to int32 keeps the bits
    words = (codes.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


# -- launch configuration ---------------------------------------------------------------------
# From the H100 sweeps recorded in benchmarks/kernels/README.md.
GEMV_MAX_M = 2  # from M = 4 the tile kernel is faster (sweep in benchmarks/results)
GEMV_CONFIGS = [  # (max M, max N, BLOCK_M, BLOCK_N, BLOCK_W, num_warps)
    (1, 4096, 1, 8, 256, 4),
    (1, 8192, 1, 8, 128, 2),
    (1, 1 << 62, 1, 8, 64, 1),
    (2, 8192, 1, 4, 128, 1),
    (2, 1 << 62, 2, 32, 32, 2),
]


def pick_gemv_config(m: int, n: int) -> tuple[int, int, int, int]:
    for max_m, max_n, bm, bn, bw, warps in GEMV_CONFIGS:
        if m <= max_m and n <= max_n:
            return bm, bn, bw, warps
    raise AssertionError("unreachable")


# Tile kernel, first row with M <= max M and N >= min N; BLOCK_K is
# capped at the group size, BLOCK_N at the slot boundaries; split-K is added while the grid has
# fewer than _MIN_PROGRAMS programs. From the H100 sweeps (benchmarks/kernels/README.md).
_CONFIGS = [  # (max M, min N, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, MODE, max SPLIT_K)
    (16, 0, 16, 64, 128, 4, 3, 4, 8),
    (64, 16384, 64, 128, 128, 4, 3, 0, 1),
    (64, 0, 64, 64, 128, 4, 3, 0, 4),
    (1 << 62, 0, 64, 128, 128, 4, 3, 0, 1),
]
_MIN_PROGRAMS = 264  # two per SM on an H100


def pick_config(m: int, n: int, k: int, max_block_n: int = 256, group_size: int = 128):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, MODE) of the tile kernel."""
    for max_m, min_n, bm, bn, bk, warps, stages, mode, max_split in _CONFIGS:
        if m <= max_m and n >= min_n:
            break
    if group_size % 128:
        mode = 0  # MODE 4 steps over whole 128-column groups
    bn = min(bn, max_block_n)
    bk = min(bk, group_size)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split < _MIN_PROGRAMS and split < max_split and k // (2 * split * bk) >= 4:
        split *= 2
    return bm, bn, bk, warps, stages, split, mode


def max_block_n_for(boundaries: tuple[int, ...]) -> int:
    """Largest power-of-two tile width (16..256) dividing every slot boundary, else 0."""
    g = 0
    for b in boundaries:
        g = math.gcd(g, b)
    bn = 256
    while bn > 16 and g % bn:
        bn //= 2
    return bn if g % bn == 0 else 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def lowrank_down(x: torch.Tensor, down: torch.Tensor, num_splits: int | None = None) -> torch.Tensor:
    """Workspace [S, M, RT] fp32 whose sum over S is x @ down^T."""
    m, k = x.shape
    rt = down.shape[0]
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    br = min(64, max(16, _next_pow2(rt)))
    bk = 128
    tiles = triton.cdiv(m, bm) * triton.cdiv(rt, br)
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(k, bk), 128 // tiles if tiles < 128 else 1, 32))
    k_per_split = triton.cdiv(triton.cdiv(k, num_splits), bk) * bk
    num_splits = triton.cdiv(k, k_per_split)
    ws = torch.empty((num_splits, m, rt), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(rt, br), num_splits)
    _lowrank_down_kernel[grid](
        x, down, ws, m, k, rt, k_per_split,
        x.stride(0), down.stride(0), ws.stride(0), ws.stride(1),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, UPCAST=_INTERPRETED, num_warps=4, num_stages=3,
    )
    return ws


def tq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    down: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    slot_bounds: tuple[int, ...] = (),
    config: tuple | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ deq(R)^T + (x @ D^T) @ U^T + bias, for x [M, K] fp16/bf16 with unit column stride.

    qweight int32 [N, K/8] in the `repack` layout, scales [N, K/G] as the checkpoint stores them;
    down [slots*R, K] and up [N, R] in x's dtype (None for rank 0). slot_bounds: first
    output row of slots 1 and 2 of a merged layer (empty for a plain layer). `config`
    overrides the launch configuration: (BLOCK_M, BLOCK_N, BLOCK_W, warps) selects the decode
    kernel, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, MODE) the tile kernel."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be a row-major 2-D tensor"
    m, k = x.shape
    n = qweight.shape[0]
    assert qweight.shape[1] * 8 == k and k % group_size == 0
    has_lr = down is not None and down.shape[0] > 0
    r = up.shape[1] if has_lr else 0
    if len(slot_bounds) > 2:
        raise ValueError("at most three slots per merged layer")
    b1, b2 = (list(slot_bounds) + [1 << 30, 1 << 30])[:2]
    max_bn = max_block_n_for((n, *slot_bounds)) if slot_bounds else 256
    if config is None:
        config = pick_gemv_config(m, n) if m <= GEMV_MAX_M else pick_config(m, n, k, max_bn, group_size)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if has_lr:
        ws = lowrank_down(x, down)
        num_splits = ws.shape[0]
    else:
        ws, num_splits = x, 0
    operands = (x, qweight, scales, up if has_lr else x, ws, bias if bias is not None else x)  # then y
    strides = (
        x.stride(0), qweight.stride(0), scales.stride(0), up.stride(0) if has_lr else 0,
        ws.stride(0) if has_lr else 0, ws.stride(1) if has_lr else 0,
    )  # then y's
    br = max(16, _next_pow2(r)) if has_lr else 16
    if len(config) == 4:
        bm, bn, bw, warps = config
        bn = min(bn, max_bn) if slot_bounds else bn
        _tq_gemv_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            *operands, out, m, n, k, r, b1, b2, num_splits, *strides, out.stride(0),
            GROUP=group_size, CHUNK_W=chunk_words(group_size), HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, BLOCK_R=br, num_warps=warps,
        )
        return out
    bm, bn, bk, warps, stages, split, mode = config
    if mode not in (0, 4):
        raise ValueError(f"tile kernel MODE {mode}: expected 0 or 4")
    if group_size % bk or bk % (8 * chunk_words(group_size)) or (mode == 4 and bk % 128):
        raise ValueError(f"BLOCK_K {bk} must divide the group size {group_size}, span whole "
                         f"{8 * chunk_words(group_size)}-column chunks, and (MODE 4) be a multiple of 128")
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    y = out if split == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    one, shift, exp = (0x3F80, 3, 0x4300) if x.dtype == torch.bfloat16 else (0x3C00, 6, 0x6400)
    _tq_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
        *operands, y, m, n, k, r, b1, b2, num_splits, k_per_split, *strides, y.stride(0),
        GROUP=group_size, CHUNK_W=chunk_words(group_size), HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8, SPLIT_K=split, MODE=mode,
        ONE=one, SHIFT=shift, EXP=exp, ASM=not _INTERPRETED, UPCAST=_INTERPRETED, num_warps=warps, num_stages=stages,
    )
    if split > 1:
        out.copy_(y)
    return out


@triton.jit
def _dequant_kernel(qw_ptr, sc_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """deq(R) in the checkpoint's column order from `repack`ed codes: each word is loaded once
    and its nibbles spread over the columns of its chunk by a broadcast and a reshape."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    CHUNK: tl.constexpr = 8 * CHUNK_W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_g = pid_k * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    nm = offs_n < N
    p = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_p[None, :], mask=nm[:, None] & (offs_p[None, :] < K // 8), other=0)
    s = tl.load(sc_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=nm[:, None] & (offs_g[None, :] < K // GROUP), other=0.0)
    p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
    q = ((p >> (tl.arange(0, 8) * 4)[None, None, :, None]) & 0xF) - 8  # [BN, chunk, j, l]
    q = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP))  # column c*CHUNK + j*CHUNK_W + l
    w = tl.reshape(q * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K)).to(w_ptr.dtype.element_ty)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w, mask=nm[:, None] & (offs_k[None, :] < K))


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """deq(R) [N, K] in the checkpoint's column order from `repack`ed codes, written into
    `out[:, :K]` (a new tensor if None)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty((n, k), dtype=dtype, device=qweight.device) if out is None else out
    bn, bk = 64, max(128, group_size)
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, w, n, k, qweight.stride(0), scales.stride(0), w.stride(0),
        GROUP=group_size, CHUNK_W=chunk_words(group_size), BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return w


# Above this many tokens the problem is compute-bound and one transient dense copy of the layer
# fed to cuBLAS beats dequantizing inside every tile (measured: benchmarks/kernels/README.md).
LARGE_M_THRESHOLD = 128
SMALL_LAYER_ELEMENTS = 32 << 20  # q/k/v and o of an 8B model: there dequant+cuBLAS wins from M = 64
SMALL_LAYER_LARGE_M_THRESHOLD = 32


def tq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    down: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    slot_bounds: tuple[int, ...] = (),
    large_m_threshold: int | None = None,
) -> torch.Tensor:
    """The layer on CUDA. Up to `large_m_threshold` tokens: the Triton kernels. Above: both
    components as one cuBLAS GEMM, [x | x D^T] @ [deq(R) | U_blockdiag]^T, from a transient
    buffer dequantized in one pass (freed after the call; no dense copy is kept)."""
    m, k = x.shape
    n = qweight.shape[0]
    if large_m_threshold is None:
        thr = SMALL_LAYER_LARGE_M_THRESHOLD if n * k < SMALL_LAYER_ELEMENTS else LARGE_M_THRESHOLD
    else:
        thr = large_m_threshold
    if m <= thr:
        return tq_gemm(x, qweight, scales, group_size, down, up, bias, slot_bounds)
    has_lr = down is not None and down.shape[0] > 0
    extra = down.shape[0] if has_lr else 0
    w = torch.empty((n, k + extra), dtype=x.dtype, device=x.device)
    dequantize(qweight, scales, group_size, x.dtype, out=w)
    if has_lr:
        r = up.shape[1]
        w[:, k:].zero_()
        bounds = (0, *slot_bounds, n)
        for s in range(len(bounds) - 1):
            w[bounds[s] : bounds[s + 1], k + s * r : k + (s + 1) * r] = up[bounds[s] : bounds[s + 1]]
        x = torch.cat([x, torch.mm(x, down.t())], dim=1)
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
