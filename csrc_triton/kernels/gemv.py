"""The one-token decode kernel (M <= 4, CUDA cores): whole 16-byte code vectors per thread.

Each thread streams 16-byte vectors of codes for a few output rows, turns two nibbles into fp16
1024 + q with one LOP3 (or four from one shift, UNPACK 2), and accumulates in fp32; the
constant part is removed per scale group from the sum of x. The low-rank term is added in the
epilogue from t and the program's rows of U.

t = x D^T comes either from `lowrank_down` (its own launch, K-slices in a workspace, with PDL on sm_90) or, with
`t_splits` (`Launch.t_splits`, the table's `gemv_t_splits` rows with `in_kernel`), from this launch itself:
every program takes a ticket as it starts; the first T_PROGS tickets compute t's pieces (a K-slice of a
block of D's rows each, added into a zeroed scratch with fp32 atomics) and count themselves done; the other
programs run the residual product and, before their epilogue, wait for that count. Programs that hold a
ticket are running, so every piece the waiting ones need is being made (no deadlock, whatever order the GPU
starts programs in). The last program to finish zeroes t and the counters again (`base.t_scratch`: all
zero between calls, as CUDA graphs need). One launch instead of two at one token, and no launch gap between
them. The tensor-core decode kernel (`mma_decode.py`) does the same from 2 to 16 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from csrc_triton.kernels.base import Kernel, Launch, LayerShape
from csrc_triton.layout import chunk_words, next_pow2
from csrc_triton.triton_common import INTERPRETED, pdl_wait, slot_of


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # token rows per program: 1 or 2
    block_n: int  # output rows per program
    block_w: int  # code words per row and step (a multiple of 4)
    warps: int
    unpack: int  # 0, 1 or 2 (the kernel's UNPACK)
    prefetch: int = 0  # 1: the next step's codes and scales are loaded before this step's arithmetic


@triton.jit
def _unpack_v(p, J: tl.constexpr):
    """Nibble J of every word as the float 1 + q/16 (q placed in the top mantissa bits of 1.0)."""
    if J <= 4:
        bits = (p << (19 - 4 * J)) & 0x780000
    else:
        bits = (p >> (4 * J - 19)) & 0x780000
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_epilogue(y, m, M, offs_n, n_mask, x_ptr, u, us_ptr, ws_ptr, bias_ptr, y_ptr,
                   R, slot, NUM_SPLITS, stride_ws_s, stride_ws_m, stride_ym,
                   HAS_LOWRANK: tl.constexpr, HAS_US: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, T_L2: tl.constexpr):
    """Token row m of a decode program: y [BLOCK_N] (the residual product's row sums) plus the
    low-rank term (u [BLOCK_N, BLOCK_R] fp32, this program's rows of U, loaded after the main
    loop; t from the down projection's NUM_SPLITS <= BLOCK_S K-slices, all loads issued at once;
    T_L2: t was written by other programs of this launch, so read from L2, not L1) and the bias, stored."""
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = (offs_r < R) & (offs_r * 0 + m < M)
        t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in tl.static_range(BLOCK_S):  # unrolled: every slice's load is issued before the sum
            t += tl.load(ws_ptr + sp * stride_ws_s + m * stride_ws_m + slot * R + offs_r,
                         mask=r_mask & (offs_r * 0 + sp < NUM_SPLITS), other=0.0,
                         cache_modifier=".cg" if T_L2 else "")
        # t is rounded to the activation dtype, as the tile kernel's tensor-core operand is
        t = t.to(x_ptr.dtype.element_ty).to(tl.float32)
        lr = tl.sum(u * t[None, :], axis=1)
        if HAS_US:
            lr *= tl.load(us_ptr + offs_n, mask=n_mask, other=0.0)
        y += lr
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask & (offs_n * 0 + m < M))


# Nibble planes J and J + 4 of a word as the two fp16 halves of one register, 1024 + q each
# (exact): a shift (none for J = 0) and one LOP3 per two nibbles, then fp16 -> fp32 (one
# HADD2.F32 per value in the sm_90 SASS). $0 $1 out, $2 the word.
_PAIR_F16_PTX = """
{
.reg .b32 t;
SHIFT
lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;
mov.b32 {$0, $1}, t;
}
"""


_PAIR_F16_PTX_0, _PAIR_F16_PTX_1, _PAIR_F16_PTX_2, _PAIR_F16_PTX_3 = (
    tl.constexpr(_PAIR_F16_PTX.replace("SHIFT", "mov.b32 t, $2;" if j == 0 else f"shr.u32 t, $2, {4 * j};"))
    for j in range(4))


@triton.jit
def _unpack_pair_f32(p, J: tl.constexpr, ASM: tl.constexpr):
    """Nibbles J and J + 4 (J < 4) of every word of p as float32 1024 + q."""
    if ASM:
        if J == 0:
            asm: tl.constexpr = _PAIR_F16_PTX_0
        elif J == 1:
            asm: tl.constexpr = _PAIR_F16_PTX_1
        elif J == 2:
            asm: tl.constexpr = _PAIR_F16_PTX_2
        else:
            asm: tl.constexpr = _PAIR_F16_PTX_3
        lo, hi = tl.inline_asm_elementwise(asm, "=h,=h,r", [p], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        return lo.to(tl.float32), hi.to(tl.float32)
    lo = ((p >> (4 * J)) & 0xF).to(tl.float32) + 1024.0
    hi = ((p >> (4 * J + 16)) & 0xF).to(tl.float32) + 1024.0
    return lo, hi


# Four nibble planes of a word from one shift (none for planes 0, 1, 4, 5): a LOP3 keeps nibbles
# j and j + 4 where they are (mask 0x000F000F: fp16 1024 + q) or one nibble up (mask
# 0x00F000F0: 1024 + 16 q, still exact) under fp16 1024. $0-$3 out (planes s, s+4, s+1, s+5 of
# the word shifted by 4 s), $4 the word.
_QUAD_F16_PTX = """
{
.reg .b32 t, a, b;
SHIFT
lop3.b32 a, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, t, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 {$0, $1}, a;
mov.b32 {$2, $3}, b;
}
"""


_QUAD_F16_PTX_0, _QUAD_F16_PTX_8 = (
    tl.constexpr(_QUAD_F16_PTX.replace("SHIFT", "mov.b32 t, $4;" if s == 0 else f"shr.u32 t, $4, {s};")) for s in (0, 8)
)


@triton.jit
def _unpack_quad_f32(p, S: tl.constexpr, ASM: tl.constexpr):
    """Planes S, S + 4 as float32 1024 + q and planes S + 1, S + 5 as 1024 + 16 q (S = 0 or 2)."""
    if ASM:
        if S == 0:
            asm: tl.constexpr = _QUAD_F16_PTX_0
        else:
            asm: tl.constexpr = _QUAD_F16_PTX_8
        a, a4, b, b4 = tl.inline_asm_elementwise(asm, "=h,=h,=h,=h,r", [p], dtype=(tl.float16,) * 4, is_pure=True,
                                                 pack=1)
        return a.to(tl.float32), a4.to(tl.float32), b.to(tl.float32), b4.to(tl.float32)
    a = ((p >> (4 * S)) & 0xF).to(tl.float32) + 1024.0
    a4 = ((p >> (4 * S + 16)) & 0xF).to(tl.float32) + 1024.0
    b = ((p >> (4 * S + 4)) & 0xF).to(tl.float32) * 16.0 + 1024.0
    b4 = ((p >> (4 * S + 20)) & 0xF).to(tl.float32) * 16.0 + 1024.0
    return a, a4, b, b4


@triton.jit
def _vec_codes(q_rows, s_rows, qmask_rows, srow_ok, flat, fw, w0, kw, n_groups,
               GROUP: tl.constexpr, W4: tl.constexpr, EVEN: tl.constexpr):
    """One step's codes [BLOCK_N * W4, 4] (int32 words) and scales [BLOCK_N * W4] (one per
    thread-held word group: its 4 words lie in one scale group) from word column w0 on."""
    g = (w0 + (flat % W4) * 4) * 8 // GROUP
    if EVEN:
        return tl.load(q_rows + (w0 + fw)), tl.load(s_rows + g)
    p = tl.load(q_rows + (w0 + fw), mask=qmask_rows & (w0 + fw < kw), other=0)
    return p, tl.load(s_rows + g, mask=srow_ok & (g < n_groups), other=0.0)


@triton.jit
def _plane_sums(v, xj, sv, xs, sw, xw, WIDE: tl.constexpr):
    """UNPACK 2: a plane's products and activations go to the sums of its kind (WIDE: 1024 + 16 q)."""
    if WIDE:
        return sv, xs, sw + v * xj, xw + xj
    return sv + v * xj, xs + xj, sw, xw


@triton.jit
def _vec_step(p, s, acc0, acc1, x_ptr, w0, m0, M, kw, stride_xm, wv, row,
              CHUNK_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W4: tl.constexpr,
              EVEN: tl.constexpr, UNPACK: tl.constexpr, ASM: tl.constexpr):
    """Adds one step (codes p and scales s from `_vec_codes` at word column w0) to the row
    sums acc0 (token row m0) and acc1 (m0 + 1, BLOCK_M 2) [BLOCK_N, W4]."""
    CHUNK: tl.constexpr = 8 * CHUNK_W
    w = w0 + wv
    xcol = (w // CHUNK_W) * CHUNK + w % CHUNK_W  # column of nibble 0 of each word
    xcol = tl.max_contiguous(tl.multiple_of(xcol, [1, 1, 4]), [1, 1, 4])
    xr = x_ptr + m0 * stride_xm + xcol
    xmask = row < M if EVEN else (w < kw) & (row < M)
    p = tl.reshape(p, (BLOCK_N, W4, 4))
    s = tl.reshape(s, (BLOCK_N, W4)).to(tl.float32)
    sv0 = tl.zeros((BLOCK_N, W4, 4), dtype=tl.float32)
    xs0 = tl.zeros((1, W4, 4), dtype=tl.float32)
    sv1 = tl.zeros((BLOCK_N, W4, 4), dtype=tl.float32)
    xs1 = tl.zeros((1, W4, 4), dtype=tl.float32)
    if UNPACK == 2:  # planes 1, 3, 5, 7 come as 1024 + 16 q: their own sums, 1/16 at the end
        sw0 = tl.zeros((BLOCK_N, W4, 4), dtype=tl.float32)
        xw0 = tl.zeros((1, W4, 4), dtype=tl.float32)
        sw1 = tl.zeros((BLOCK_N, W4, 4), dtype=tl.float32)
        xw1 = tl.zeros((1, W4, 4), dtype=tl.float32)
        for ss in tl.static_range(2):
            a, a4, b, b4 = _unpack_quad_f32(p, 2 * ss, ASM)
            for h in tl.static_range(4):
                v = a if h == 0 else (a4 if h == 1 else (b if h == 2 else b4))
                plane = 2 * ss + (4 if h % 2 == 1 else 0) + (1 if h >= 2 else 0)
                xp = xr + plane * CHUNK_W
                if EVEN and BLOCK_M == 1:
                    xj = tl.load(xp).to(tl.float32)
                else:
                    xj = tl.load(xp, mask=xmask, other=0.0).to(tl.float32)
                sv0, xs0, sw0, xw0 = _plane_sums(v, xj, sv0, xs0, sw0, xw0, h >= 2)
                if BLOCK_M > 1:
                    xj = tl.load(xp + stride_xm, mask=xmask & (row + 1 < M), other=0.0).to(tl.float32)
                    sv1, xs1, sw1, xw1 = _plane_sums(v, xj, sv1, xs1, sw1, xw1, h >= 2)
        # sum (q - 8) x = (sum v x - 1032 sum x) + (sum w x - 1152 sum x) / 16
        acc0 += s * (tl.sum(sv0, axis=2) - 1032.0 * tl.sum(xs0, axis=2)
                     + 0.0625 * (tl.sum(sw0, axis=2) - 1152.0 * tl.sum(xw0, axis=2)))
        if BLOCK_M > 1:
            acc1 += s * (tl.sum(sv1, axis=2) - 1032.0 * tl.sum(xs1, axis=2)
                         + 0.0625 * (tl.sum(sw1, axis=2) - 1152.0 * tl.sum(xw1, axis=2)))
    else:
        for jj in tl.static_range(8 if UNPACK == 0 else 4):
            if UNPACK == 0:
                va = _unpack_v(p, jj)
                vb = va
            else:  # planes jj and jj + 4 from one LOP3
                va, vb = _unpack_pair_f32(p, jj, ASM)
            for h in tl.static_range(1 if UNPACK == 0 else 2):
                v = va if h == 0 else vb
                xp = xr + (jj + 4 * h) * CHUNK_W
                if EVEN and BLOCK_M == 1:
                    xj = tl.load(xp).to(tl.float32)
                else:
                    xj = tl.load(xp, mask=xmask, other=0.0).to(tl.float32)
                sv0 += v * xj
                xs0 += xj
                if BLOCK_M > 1:
                    xj = tl.load(xp + stride_xm, mask=xmask & (row + 1 < M), other=0.0).to(tl.float32)
                    sv1 += v * xj
                    xs1 += xj
        VS: tl.constexpr = 16.0 if UNPACK == 0 else 1.0
        XS: tl.constexpr = 24.0 if UNPACK == 0 else 1032.0
        acc0 += s * (VS * tl.sum(sv0, axis=2) - XS * tl.sum(xs0, axis=2))
        if BLOCK_M > 1:
            acc1 += s * (VS * tl.sum(sv1, axis=2) - XS * tl.sum(xs1, axis=2))
    return acc0, acc1


@triton.jit
def _t_piece(j, x_ptr, d_ptr, ds_ptr, t_ptr, M, K, RT, k_per, stride_xm, stride_dr,
             BLOCK_RT: tl.constexpr, HAS_DS: tl.constexpr):
    """Piece j of t = x D^T made inside the gemv launch: rows [rb BLOCK_RT, +BLOCK_RT) of D over the
    K-slice [ks k_per, +k_per) (j = ks * row blocks + rb), for each token row, added into t (fp32, RT
    per token row) with relaxed atomics; int8 D: times its row scales."""
    BLOCK_KT: tl.constexpr = 16
    rb = j % tl.cdiv(RT, BLOCK_RT)
    k_lo = (j // tl.cdiv(RT, BLOCK_RT)) * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    offs_r = rb * BLOCK_RT + tl.arange(0, BLOCK_RT)
    r_mask = offs_r < RT
    for mm in range(M):  # M <= 4: D's slice is read again from L2 for each further token row
        acc = tl.zeros((BLOCK_RT, BLOCK_KT), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_KT):
            offs_k = k0 + tl.arange(0, BLOCK_KT)
            k_mask = offs_k < k_hi
            d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                        other=0).to(tl.float32)
            xk = tl.load(x_ptr + mm * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            acc += d * xk[None, :]
        t = tl.sum(acc, axis=1)
        if HAS_DS:
            t *= tl.load(ds_ptr + offs_r, mask=r_mask, other=0.0)
        tl.atomic_add(t_ptr + mm * RT + offs_r, t, mask=r_mask, sem="relaxed")


@triton.jit
def _tq_gemv_vec_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, d_ptr, ds_ptr, sync_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, RT, T_PROGS, k_per,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym, stride_dr,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_US: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, EVEN: tl.constexpr, UNPACK: tl.constexpr,
    PREFETCH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, T_IN: tl.constexpr, BLOCK_RT: tl.constexpr,
    HAS_DS: tl.constexpr,
):
    """One program of the decode launch (`_gemv_program`). T_IN (module docstring): a 1-D grid of T_PROGS
    pieces of t, then the residual programs, each role taken by ticket (sync_ptr: tickets, pieces done,
    residual programs done); t in ws_ptr [4, RT] fp32. Else a 2-D grid of residual programs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    residual = True
    if T_IN:
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        if ticket < T_PROGS:
            _t_piece(ticket, x_ptr, d_ptr, ds_ptr, ws_ptr, M, K, RT, k_per, stride_xm, stride_dr, BLOCK_RT, HAS_DS)
            tl.debug_barrier()  # every thread's additions are in before the count says so (release)
            tl.atomic_add(sync_ptr + 1, 1, sem="release")
        residual = ticket >= T_PROGS
        pid_m = (ticket - T_PROGS) % tl.cdiv(M, BLOCK_M)
        pid_n = (ticket - T_PROGS) // tl.cdiv(M, BLOCK_M)
    if residual:
        _gemv_program(
            pid_m, pid_n, x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, sync_ptr, M, N, K, R,
            SLOT_B1, SLOT_B2, NUM_SPLITS, RT, T_PROGS, stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s,
            stride_ws_m, stride_ym, GROUP, CHUNK_W, HAS_LOWRANK, HAS_US, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_W, BLOCK_R,
            BLOCK_S, EVEN, UNPACK, PREFETCH, ASM, PDL, T_IN)


@triton.jit
def _gemv_program(
    pid_m, pid_n, x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, sync_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, RT, T_PROGS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_US: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, EVEN: tl.constexpr, UNPACK: tl.constexpr,
    PREFETCH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr, T_IN: tl.constexpr,
):
    """Decode kernel with whole 16-byte code vectors per thread, BLOCK_M (1 or
    2) token rows and BLOCK_N output rows per program. The codes of a step are a [BLOCK_N,
    BLOCK_W/4, 4] tensor (loaded flat, below), so a thread holds 4 consecutive words (one
    16-byte load) of each of its rows; the 4 words lie in one scale group (G >= 32), so the
    thread reduces them and the 8 activations each nibble plane meets in registers, and loads
    each row's scale once per step. The activations
    of a plane are 4 consecutive columns (`repack` layout, CHUNK_W >= 4): one 8-byte load per
    token row, shared by the thread's BLOCK_N output rows.
    UNPACK 1: planes j and j + 4 become fp16 1024 + q from one LOP3 (`_unpack_pair_f32`), so
      sum (q - 8) x = sum v x - 1032 sum x. UNPACK 0 (`_unpack_v`): v = 1 + q/16 from a shift and
      a bit-select per nibble, sum (q - 8) x = 16 sum v x - 24 sum x (slower on the H200).
      UNPACK 2 (`_unpack_quad_f32`): one shift per four planes; planes 1, 3, 5, 7 are read one
      nibble up, as w = 1024 + 16 q, and summed apart: (sum w x - 1152 sum x) / 16.
    PREFETCH 1: the next step's codes and scales are loaded (into registers) before this step's
      arithmetic, so each warp keeps two steps of loads in flight; 0: one step at a time.
    EVEN (K a multiple of 8 * BLOCK_W, N of BLOCK_N): no masks on the codes and scales.
    The low-rank branch reads its rows of U and t (the down projection's output, with PDL still
    being written while the loop runs; T_IN: made by this launch's first programs, waited for here) after
    the main loop, t's K-slices in unrolled loads."""
    m0 = pid_m * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kw = K // 8
    W4: tl.constexpr = BLOCK_W // 4
    # The codes of a step are loaded as a 2-D [BLOCK_N * W4, 4] tensor (row-major over (row,
    # word group)) and reshaped to [BLOCK_N, W4, 4]: a 2-D load with one contiguous dimension
    # gets the same layout from every Triton version (threads over the flattened dimension,
    # word groups fastest), so each thread holds one word group of every row, and the
    # activations [1, W4, 4] (one row: threads can only go over the word groups) broadcast
    # over the output rows without a layout conversion.
    flat = tl.arange(0, BLOCK_N * W4)
    frow = flat // W4
    fw = (flat % W4)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BN*W4, 4] word offsets within a step
    q_rows = qw_ptr + (pid_n * BLOCK_N + frow)[:, None] * stride_qn
    qmask_rows = (pid_n * BLOCK_N + frow < N)[:, None]
    s_rows = sc_ptr + (pid_n * BLOCK_N + frow) * stride_sn
    srow_ok = pid_n * BLOCK_N + frow < N
    n_groups = K // GROUP
    wv = tl.arange(0, W4)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]  # [1, W4, 4]
    row = tl.zeros((1, W4, 4), dtype=tl.int32) + m0  # (tensor compares; the interpreter rejects scalar & tensor masks)
    acc0 = tl.zeros((BLOCK_N, W4), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, W4), dtype=tl.float32)  # second token row (BLOCK_M 2; else unused)
    if PREFETCH:
        p, s = _vec_codes(q_rows, s_rows, qmask_rows, srow_ok, flat, fw, 0, kw, n_groups, GROUP, W4, EVEN)
        for w0 in range(BLOCK_W, kw, BLOCK_W):
            p_next, s_next = _vec_codes(q_rows, s_rows, qmask_rows, srow_ok, flat, fw, w0, kw, n_groups, GROUP, W4,
                                        EVEN)
            acc0, acc1 = _vec_step(p, s, acc0, acc1, x_ptr, w0 - BLOCK_W, m0, M, kw, stride_xm, wv, row, CHUNK_W,
                                   BLOCK_M, BLOCK_N, W4, EVEN, UNPACK, ASM)
            p, s = p_next, s_next
        acc0, acc1 = _vec_step(p, s, acc0, acc1, x_ptr, (kw - 1) // BLOCK_W * BLOCK_W, m0, M, kw, stride_xm, wv, row,
                               CHUNK_W, BLOCK_M, BLOCK_N, W4, EVEN, UNPACK, ASM)
    else:
        for w0 in range(0, kw, BLOCK_W):
            p, s = _vec_codes(q_rows, s_rows, qmask_rows, srow_ok, flat, fw, w0, kw, n_groups, GROUP, W4, EVEN)
            acc0, acc1 = _vec_step(p, s, acc0, acc1, x_ptr, w0, m0, M, kw, stride_xm, wv, row, CHUNK_W, BLOCK_M,
                                   BLOCK_N, W4, EVEN, UNPACK, ASM)
    u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    if HAS_LOWRANK:  # issued before the wait for t, so the two loads overlap (loaded before the main
        # loop, U held registers through it: gate/up 28.6 -> 31.0 us, benchmarks/results/gemv_h200.json)
        offs_r = tl.arange(0, BLOCK_R)
        u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
                    mask=n_mask[:, None] & (offs_r < R)[None, :], other=0).to(tl.float32)

    n0 = pid_n * BLOCK_N
    slot = slot_of(n0, SLOT_B1, SLOT_B2)
    if HAS_LOWRANK:
        pdl_wait(PDL)  # t is the down projection's, launched just before this kernel
    if T_IN:  # t's pieces: made by programs that hold their tickets, so running (module docstring)
        done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        while done < T_PROGS:
            done = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
    _gemv_epilogue(tl.sum(acc0, axis=1), m0, M, offs_n, n_mask, x_ptr, u, us_ptr, ws_ptr, bias_ptr, y_ptr, R, slot,
                   NUM_SPLITS, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_US, HAS_BIAS, BLOCK_R, BLOCK_S,
                   T_IN)
    if BLOCK_M > 1:
        _gemv_epilogue(tl.sum(acc1, axis=1), m0 + 1, M, offs_n, n_mask, x_ptr, u, us_ptr, ws_ptr, bias_ptr, y_ptr, R,
                       slot, NUM_SPLITS, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_US, HAS_BIAS, BLOCK_R,
                       BLOCK_S, T_IN)
    if T_IN:  # the last residual program zeroes t and the three counters (all have read t by then)
        tl.debug_barrier()
        finished = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if finished == tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) - 1:
            offs = tl.arange(0, 1024)
            for z0 in range(0, M * RT, 1024):
                tl.store(ws_ptr + z0 + offs, tl.zeros((1024,), dtype=tl.float32), mask=z0 + offs < M * RT)
            tl.store(sync_ptr + tl.arange(0, 4), tl.zeros((4,), dtype=tl.int32))


T_TOKENS = 4  # tokens for which the launch can make t itself (the pieces loop over the token rows)


class GemvKernel(Kernel):
    name = "gemv"
    t_tokens = T_TOKENS

    def can_implement(self, shape: LayerShape, device) -> tuple[bool, str | None]:
        if self.disabled():
            return False, self.disabled()
        if shape.group_size < 32 or shape.k % shape.group_size:
            return False, f"group size {shape.group_size}: the kernel needs G >= 32 dividing K"
        return True, None

    def choose(self, m: int, shape: LayerShape, tables) -> GemvConfig | None:
        return tables.gemv.lookup(m, shape.n, shape.k)

    def launch(self, a: Launch, cfg: GemvConfig) -> None:
        if cfg.block_m not in (1, 2) or cfg.block_w % 4 or cfg.unpack not in (0, 1, 2) or cfg.prefetch not in (0, 1):
            raise ValueError(f"gemv config {cfg}: block_m 1 or 2, block_w a multiple of 4, unpack 0-2, prefetch 0 or 1")
        m, n, k = a.m, a.n, a.k
        bn = min(cfg.block_n, a.max_block_n)
        br = max(16, next_pow2(a.rank)) if a.has_lr else 16
        residual = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, bn)
        ts = a.t_source(self.name, T_TOKENS)
        grid = (ts.t_progs + residual,) if ts.in_launch else (triton.cdiv(m, cfg.block_m), triton.cdiv(n, bn))
        x, qw, sc, up, us, ws_arg, bias = a.operands(ts.ws)
        _tq_gemv_vec_kernel[grid](
            x, qw, sc, up, us, ws_arg, bias, a.out, ts.down, ts.down_scale, ts.sync, m, n, k, a.rank, a.slot_b1,
            a.slot_b2, ts.num_splits, ts.rt, ts.t_progs, ts.k_per, *a.strides(None)[:4], *ts.ws_strides,
            a.out.stride(0), ts.stride_dr,
            GROUP=a.group_size, CHUNK_W=chunk_words(a.group_size), HAS_LOWRANK=a.has_lr, HAS_US=a.has_us,
            HAS_BIAS=a.bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_W=cfg.block_w, BLOCK_R=br,
            BLOCK_S=next_pow2(max(1, ts.num_splits)), EVEN=(k // 8) % cfg.block_w == 0 and n % bn == 0,
            UNPACK=cfg.unpack, PREFETCH=cfg.prefetch, ASM=not INTERPRETED, PDL=a.pdl and not ts.in_launch,
            T_IN=ts.in_launch, BLOCK_RT=a.t_block_r if ts.in_launch else 16,
            HAS_DS=ts.in_launch and a.down_scale is not None, num_warps=cfg.warps,
            launch_pdl=a.pdl and not ts.in_launch,
        )


KERNEL = GemvKernel()
