"""Hopper tile kernels for the TwinQuant linear layer (W4A16, 17 <= M <= 256), written in Gluon.

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias        (t = x @ D^T from `lowrank_down`)

Why a second tile kernel: Triton's MODE 7 (`twinquant_gemm._tq_gemm_kernel`) dequantizes each
weight tile into a single shared-memory buffer, so every step ends with a wait for its wgmma
before the next tile may be written: dequantization and tensor cores take turns (ncu: tensor
pipe 34% busy at M = 256 against cuBLAS's 71%). Gluon states the schedule explicitly:

* x tiles [BM, BK] and code tiles [BN, BK/8] arrive by cp.async in a STAGES-deep ring;
* the dequantized tile w = (q - 8) * s [BN, BK] goes to one of two shared buffers;
* the wgmma of step i is issued asynchronously and step i + 1's codes are dequantized while it
  runs; `warpgroup_mma_wait(1)` then retires step i - 1, whose buffers are refilled.

Same inputs as MODE 7 (codes in the `repack` layout, scales [N, K/G], factors bf16/fp16 or int8
with fp32 row scales); group sizes 64 and 128 (one 64-column chunk per K step). The epilogue
adds the low-rank term with one more wgmma (t in registers, U's tile in shared memory), then
the bias, and stores (fp32 atomics into a zeroed y when split over K).
MODE 10 (`_tq_gemm_wgmma_rs_kernel`, below) takes the other way out of the shared-memory
round trip: wgmma's A operand may come from registers, so the dequantized weights (tokens on
wgmma's N side, swap AB) never touch shared memory. The codes and x share one cp.async ring,
each step's fragment is made while the previous step's wgmma runs, and split-K sums meet in a
scratch buffer that the last program of a tile (a ticket) finishes, as in twinquant_mma.py.

Only compiled for sm_90 (Gluon has no CPU interpreter); CI compiles it for sm_90 without a GPU,
numerics are checked on the GPU by benchmarks/kernels/bench_kernels.py and bench_tile.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from csrc_triton.twinquant_gemm import _LOW_PTX_BF16, _LOW_PTX_FP16, chunk_words
from csrc_triton.twinquant_mma import _code_ptrs, _fragment, _planes_scaled, _split_k_finish

BLOCK_K = gl.constexpr(64)  # one 64-column chunk of the `repack` layout per step
# cp.async global -> shared: `async_copy_global_to_shared` up to Triton 3.6, `async_load` later
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# CTA-wide barrier: `thread_barrier` up to Triton 3.6, `barrier` later
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _scaled_nibbles(p, s, EXP: gl.constexpr):
    """(q - 8) * s in the activation dtype for q = bits 0-3 of every word of p (two at a time in PTX,
    as MODE 7 does); s broadcasts against p."""
    s = gl.broadcast(s, p)[0]
    if EXP == 0x4300:
        w = gl.inline_asm_elementwise(_LOW_PTX_BF16, "=r,r,r,r", [p, s], dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        w = gl.inline_asm_elementwise(_LOW_PTX_FP16, "=r,r,r,r", [p, s], dtype=gl.float16, is_pure=True, pack=2)
    return w


@gluon.jit
def _register_smem_mma(a, b, acc, MMA: gl.constexpr):
    """acc + a @ b^T with a [R1, K] as the register operand and b [R2, K] staged in shared memory."""
    B_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for(b.shape, b.dtype)
    b_buf = gl.allocate_shared_memory(b.dtype, b.shape, B_SMEM)
    b_buf.store(b)
    fence_async_shared()
    _cta_barrier()
    a_op = gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
    return warpgroup_mma(a_op, b_buf.permute((1, 0)), acc)


@gluon.jit
def _issue_loads(x_ptr, qw_ptr, x_buf, q_buf, step, k_lo, k_hi, M, off_m, off_n, N,
                 stride_xm, stride_qn, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 X_LAYOUT: gl.constexpr, Q_LAYOUT: gl.constexpr):
    """cp.async of step `step`'s x tile [BM, BK] and code tile [BN, BK/8] (masked off past k_hi)."""
    k0 = k_lo + step * BLOCK_K
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_LAYOUT))
    offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, X_LAYOUT))
    xm = gl.expand_dims(offs_m < M, 1) & gl.expand_dims(offs_k < k_hi, 0)
    xp = x_ptr + gl.expand_dims(offs_m, 1) * stride_xm + gl.expand_dims(offs_k, 0)
    _cp_async(x_buf, xp, mask=xm)
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, Q_LAYOUT))
    offs_w = k0 // 8 + gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, Q_LAYOUT))
    qm = gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_w < k_hi // 8, 0)
    qp = qw_ptr + gl.expand_dims(offs_n, 1) * stride_qn + gl.expand_dims(offs_w, 0)
    _cp_async(q_buf, qp, mask=qm)
    async_copy.commit_group()


@gluon.jit
def _lowrank_operands(ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_ws_s,
                      stride_ws_m, stride_un, TM: gl.constexpr, BN: gl.constexpr, BLOCK_R: gl.constexpr,
                      HAS_US: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr, R0: gl.constexpr = 0):
    """The epilogue's low-rank operands in one blocked layout, ranks R0 .. R0 + BLOCK_R: t [TM,
    BLOCK_R] fp32 of tokens m0.. (the sum of the down projection's K-slices, the slot of rows
    off_n..; with PDL waited for here, after U's load) and U [BN, BLOCK_R] of rows off_n.. (int8
    codes times their row scales, in fp32: scaled and rounded once, as a float factor is stored)."""
    EPI: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])
    tr = R0 + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, EPI))
    un = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, EPI))
    u = gl.load(up_ptr + gl.expand_dims(un, 1) * stride_un + gl.expand_dims(tr, 0),
                mask=gl.expand_dims(un < N, 1) & gl.expand_dims(tr < R, 0), other=0)
    if HAS_US:
        us = gl.load(us_ptr + un, mask=un < N, other=0.0)
        u = u.to(gl.float32) * gl.expand_dims(us, 1)
    slot = (off_n >= SLOT_B1).to(gl.int32) + (off_n >= SLOT_B2).to(gl.int32)
    tm = m0 + gl.arange(0, TM, layout=gl.SliceLayout(1, EPI))
    t_mask = gl.expand_dims(tm < M, 1) & gl.expand_dims(tr < R, 0)
    t_ptrs = ws_ptr + gl.expand_dims(tm, 1) * stride_ws_m + slot * R + gl.expand_dims(tr, 0)
    t = gl.zeros([TM, BLOCK_R], gl.float32, layout=EPI)
    if PDL:  # t is the down projection's, launched just before this kernel
        tl.extra.cuda.gdc_wait()
    for sp in range(NUM_SPLITS):
        t += gl.load(t_ptrs + sp * stride_ws_s, mask=t_mask, other=0.0)
    return t, u


@gluon.jit
def _tq_gemm_wgmma_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_R: gl.constexpr, GROUP_M: gl.constexpr,
    SPLIT_K: gl.constexpr, STAGES: gl.constexpr, SWAP: gl.constexpr, EXP: gl.constexpr,
    PDL: gl.constexpr, num_warps: gl.constexpr,
):
    act: gl.constexpr = x_ptr.dtype.element_ty
    pid = gl.program_id(0)
    pid_k = gl.program_id(1)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    k_lo = pid_k * k_per_split
    k_hi = gl.minimum(k_lo + k_per_split, K)
    n_steps = gl.cdiv(k_hi - k_lo, BLOCK_K)

    # Register layouts. Codes: each thread owns 4 consecutive words of one row, i.e. (repack
    # layout) columns j*8 + l of its chunk for l in 4 consecutive values and every nibble j.
    WORDS: gl.constexpr = BLOCK_K // 8
    TPR: gl.constexpr = 2  # threads per code row
    L3: gl.constexpr = gl.BlockedLayout([1, 8, WORDS // TPR], [32 // TPR, 1, TPR], [num_warps, 1, 1], [2, 1, 0])
    P_LAYOUT: gl.constexpr = gl.SliceLayout(1, L3)  # [BN, WORDS]
    S_LAYOUT: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))  # [BN]
    J_LAYOUT: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, L3))  # [8]
    X_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # 16-byte copies
    Q_LAYOUT: gl.constexpr = gl.BlockedLayout([1, WORDS // TPR], [32 // TPR, TPR], [num_warps, 1], [1, 0])
    if SWAP:  # acc^T [BN, BM] = w [BN, BK] @ x^T: the tokens are the MMA's N side
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
    else:
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 16])

    X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], act)
    W_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], act)
    Q_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_bufs = gl.allocate_shared_memory(act, [STAGES, BLOCK_M, BLOCK_K], X_SMEM)
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], Q_SMEM)
    w_bufs = gl.allocate_shared_memory(act, [2, BLOCK_N, BLOCK_K], W_SMEM)

    for s in gl.static_range(STAGES - 1):
        _issue_loads(x_ptr, qw_ptr, x_bufs.index(s), q_bufs.index(s), s, k_lo, k_hi, M, off_m, off_n, N,
                     stride_xm, stride_qn, BLOCK_M, BLOCK_N, X_LAYOUT, Q_LAYOUT)

    offs_sn = off_n + gl.arange(0, BLOCK_N, layout=S_LAYOUT)
    sn_mask = offs_sn < N
    s_ptrs = sc_ptr + offs_sn * stride_sn
    shifts = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=J_LAYOUT) * 4, 0), 2)  # [1, 8, 1]
    s_cur = gl.load(s_ptrs + k_lo // GROUP, mask=sn_mask, other=0.0).to(act)
    if SWAP:
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
    else:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=MMA)
    for i in range(n_steps):
        slot = i % STAGES
        # the scale of the next step (the same group for half of the steps at G = 128)
        s_next = gl.load(s_ptrs + (k_lo + (i + 1) * BLOCK_K) // GROUP,
                         mask=sn_mask & (k_lo + (i + 1) * BLOCK_K < k_hi), other=0.0).to(act)
        async_copy.wait_group(STAGES - 2)  # this thread's copies of step i have landed
        _cta_barrier()  # ... and everyone's
        p = q_bufs.index(slot).load(P_LAYOUT)
        w = _scaled_nibbles(gl.expand_dims(p, 1) >> shifts, gl.expand_dims(gl.expand_dims(s_cur, 1), 2), EXP)
        w_buf = w_bufs.index(i % 2)  # its last reader, the wgmma of step i - 2, has retired
        w_buf.store(gl.reshape(w, [BLOCK_N, BLOCK_K]))  # [BN, 8, WORDS] -> column j*8 + l
        fence_async_shared()
        _cta_barrier()
        if SWAP:
            acc = warpgroup_mma(w_buf, x_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        else:
            acc = warpgroup_mma(x_bufs.index(slot), w_buf.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # step i - 1 retired
        nxt = i + STAGES - 1  # into the slot of step i - 1
        _issue_loads(x_ptr, qw_ptr, x_bufs.index(nxt % STAGES), q_bufs.index(nxt % STAGES), nxt, k_lo, k_hi, M,
                     off_m, off_n, N, stride_xm, stride_qn, BLOCK_M, BLOCK_N, X_LAYOUT, Q_LAYOUT)
        s_cur = s_next
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    async_copy.wait_group(0)

    if SWAP:
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        m_2d = gl.expand_dims(offs_m, 0)
        n_2d = gl.expand_dims(offs_n, 1)
    else:
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, MMA))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
        m_2d = gl.expand_dims(offs_m, 1)
        n_2d = gl.expand_dims(offs_n, 0)
    n_mask = offs_n < N
    if pid_k == 0:
        if HAS_LOWRANK:
            t, u = _lowrank_operands(ws_ptr, up_ptr, us_ptr, off_m, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
                                     stride_ws_s, stride_ws_m, stride_un, BLOCK_M, BLOCK_N, BLOCK_R, HAS_US, PDL,
                                     num_warps)
            if SWAP:  # acc^T += U [BN, BR] @ t^T
                acc = _register_smem_mma(u.to(act), t.to(act), acc, MMA)
            else:  # acc += t [BM, BR] @ U^T
                acc = _register_smem_mma(t.to(act), u.to(act), acc, MMA)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)
            if SWAP:
                acc += gl.expand_dims(bias, 1)
            else:
                acc += gl.expand_dims(bias, 0)
    y_ptrs = y_ptr + m_2d * stride_ym + n_2d
    y_mask = (m_2d < M) & (n_2d < N)
    if SPLIT_K > 1:
        gl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def launch(operands, y, m, n, k, r, b1, b2, num_splits, strides, group_size, has_lr, has_us, has_bias,
           bm, bn, warps, stages, split, k_per_split, br, swap=False, pdl=False):
    """Launch on prepared operands (see `twinquant_gemm.tq_gemm`, which dispatches here)."""
    if chunk_words(group_size) * 8 != BLOCK_K.value:
        raise ValueError(f"the wgmma kernel steps over 64-column chunks: group size {group_size} must be 64 or 128")
    exp = 0x4300 if operands[0].dtype == torch.bfloat16 else 0x6400
    _tq_gemm_wgmma_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
        *operands, y, m, n, k, r, b1, b2, num_splits, k_per_split, *strides, y.stride(0),
        GROUP=group_size, HAS_LOWRANK=has_lr, HAS_US=has_us, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_R=br, GROUP_M=8, SPLIT_K=split, STAGES=stages, SWAP=swap, EXP=exp, PDL=pdl, num_warps=warps,
        launch_pdl=pdl,
    )


# -- MODE 10: the weights as wgmma's register operand ------------------------------------------
@gluon.jit
def _rs_step(i, acc, w, s_1, s_2, s_3, x_bufs, q_bufs, x_ptrs, x_all, q_ptrs, q_all, s_ptrs, k_lo, k_last, n_steps,
             BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, EXP: gl.constexpr,
             A_L: gl.constexpr, P_L: gl.constexpr):
    """Step i of MODE 10's main loop: acc += w @ x_i^T started, the copies of step i + STAGES - 1
    issued, step i + 1's fragment made (scale s_1) while the wgmma runs, then the wgmma retired.
    Returns (acc, step i + 1's fragment, the scales of steps i + 2 .. i + 4)."""
    acc = warpgroup_mma(w, x_bufs.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    s_4 = gl.load(s_ptrs + gl.minimum(k_lo + (i + 4) * BK, k_last) // GROUP)
    async_copy.wait_group(STAGES - 3)  # step i + 1's x and codes have landed (this thread's copies) ...
    p = q_bufs.index((i + 1) % STAGES).load(P_L)  # (read before the barrier: one barrier less)
    fence_async_shared()
    _cta_barrier()  # ... everyone's; and every warpgroup has retired its wgmma of step i - 1
    nxt = i + STAGES - 1  # into the slot of step i - 1
    _cp_async(x_bufs.index(nxt % STAGES), x_ptrs + nxt * BK, mask=x_all & (nxt < n_steps))
    _cp_async(q_bufs.index(nxt % STAGES), q_ptrs + nxt * (BK // 8), mask=q_all & (nxt < n_steps))
    async_copy.commit_group()
    v0, v1, v2, v3, v4, v5, v6, v7 = _planes_scaled(p, s_1.to(w.dtype), EXP)
    w_next = _fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN, BK, A_L)
    acc, w = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w))  # w is read until the wgmma retires
    return acc, w_next, s_2, s_3, s_4


@gluon.jit
def _lowrank_epilogue_rs(acc, ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_ws_s,
                         stride_ws_m, stride_un, TOK: gl.constexpr, BN: gl.constexpr, BLOCK_R: gl.constexpr,
                         HAS_US: gl.constexpr, PDL: gl.constexpr, RC: gl.constexpr, act: gl.constexpr,
                         MMA: gl.constexpr, num_warps: gl.constexpr):
    """acc^T [BN, TOK] + U [BN, BLOCK_R] @ t^T, RC ranks at a time (RC = BLOCK_R: all at once, the
    measured kernel; RC = 16 with RANK_CHUNK: one wgmma k-step per chunk, so that the registers it
    needs, and with them the whole kernel's, which are allocated for the peak, stay those of rank
    16 whatever the rank. All at once took 175 registers instead of 128 at rank 64 for TOK 64 and
    4 warps, and spilled from rank 128 on; Triton 3.6, ptxas for sm_90)."""
    for r0 in gl.static_range(0, BLOCK_R, RC):
        t, u = _lowrank_operands(ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
                                 stride_ws_s, stride_ws_m, stride_un, TOK, BN, RC, HAS_US, PDL and r0 == 0,
                                 num_warps, r0)
        if r0 > 0:
            _cta_barrier()  # every warpgroup's wgmma of the previous chunk has read its t
        acc = _register_smem_mma(u.to(act), t.to(act), acc, MMA)
    return acc


@gluon.jit
def _tq_gemm_wgmma_rs_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr,
    MT: gl.constexpr, TOK: gl.constexpr, BLOCK_R: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    EXP: gl.constexpr, PDL: gl.constexpr, RANK_CHUNK: gl.constexpr, num_warps: gl.constexpr,
):
    """Program (pid % token tiles, pid // token tiles; pid_k): tokens [m0, +TOK) x weight rows
    [off_n, +BN) (BN = 16 * MT * num_warps) over the K-slice pid_k. acc^T [BN, TOK] = w [BN, K] @ x^T
    with w = (q - 8) * s made in registers straight in wgmma's A-fragment layout, and x^T read by
    wgmma from shared memory. x and the codes (in the order `twinquant_mma._code_ptrs` derives)
    come through one STAGES-deep cp.async ring, the scales four steps ahead in registers. The
    wgmma of step i runs while step i + 1 is dequantized (`_rs_step`, two steps per iteration)."""
    act: gl.constexpr = x_ptr.dtype.element_ty
    BK: gl.constexpr = 64
    BN: gl.constexpr = 16 * MT * num_warps
    pid = gl.program_id(0)
    pid_k = gl.program_id(1)
    tiles_m = gl.cdiv(M, TOK)
    pid_m = pid % tiles_m  # the token tiles of a row tile run side by side (its codes are read once from HBM)
    pid_n = pid // tiles_m
    m0 = pid_m * TOK
    off_n = pid_n * BN
    k_lo = pid_k * k_per_split
    k_hi = gl.minimum(k_lo + k_per_split, K)
    n_steps = gl.cdiv(k_hi - k_lo, BK)

    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, TOK, 16])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    q_ptrs = _code_ptrs(qw_ptr, off_n, N, stride_qn, BN, BK, A_L)
    P_L: gl.constexpr = q_ptrs.type.layout
    sn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, P_L))))
    s_ptrs = sc_ptr + gl.minimum(sn, N - 1) * stride_sn

    # one ring of STAGES slots, filled by cp.async a step per commit group: x [TOK, BK] (16-byte
    # copies; padding tokens copy row M - 1, finite, never stored) and the step's codes, each
    # thread copying the 8-byte word pairs it later reads itself (so only x needs the barrier)
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TOK, BK], act)
    x_bufs = gl.allocate_shared_memory(act, [STAGES, TOK, BK], X_SMEM)
    CX: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    xm = gl.arange(0, TOK, layout=gl.SliceLayout(1, CX))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, CX))
    x_ptrs = x_ptr + gl.expand_dims(gl.minimum(m0 + xm, M - 1), 1) * stride_xm + gl.expand_dims(k_lo + xk, 0)
    x_all = gl.expand_dims(xm >= 0, 1) & gl.expand_dims(xk >= 0, 0)
    Q_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[3, 2, 1, 0])
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 1, 4, 2], Q_SMEM)
    q_ptrs = q_ptrs + k_lo // 8
    q_all = gl.full([BN, 1, 4, 2], 1, gl.int1, P_L)
    for st in gl.static_range(STAGES - 1):
        _cp_async(x_bufs.index(st), x_ptrs + st * BK, mask=x_all & (st < n_steps))
        _cp_async(q_bufs.index(st), q_ptrs + st * (BK // 8), mask=q_all & (st < n_steps))
        async_copy.commit_group()

    # the scales of steps i + 1 .. i + 4 in registers as loaded (converted where used: a
    # conversion next to its load would wait for it); steps past the slice re-read the last one
    k_last = k_hi - BK  # slices are whole groups, so whole steps
    s_1 = gl.load(s_ptrs + k_lo // GROUP)
    s_2 = gl.load(s_ptrs + gl.minimum(k_lo + BK, k_last) // GROUP)
    s_3 = gl.load(s_ptrs + gl.minimum(k_lo + 2 * BK, k_last) // GROUP)
    s_4 = gl.load(s_ptrs + gl.minimum(k_lo + 3 * BK, k_last) // GROUP)
    async_copy.wait_group(STAGES - 2)  # step 0's x and codes
    fence_async_shared()
    _cta_barrier()
    v0, v1, v2, v3, v4, v5, v6, v7 = _planes_scaled(q_bufs.index(0).load(P_L), s_1.to(act), EXP)
    w = _fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN, BK, A_L)
    s_1, s_2, s_3 = s_2, s_3, s_4
    acc = gl.zeros([BN, TOK], gl.float32, layout=MMA)
    # two steps per iteration, their fragments in two variables: with one, carried around the
    # loop, ptxas gives the next step's fragment the registers the running wgmma still reads
    # and waits for it before the dequantization instead of after (no overlap at all)
    for j in range(n_steps // 2):
        acc, w_b, s_1, s_2, s_3 = _rs_step(2 * j, acc, w, s_1, s_2, s_3, x_bufs, q_bufs, x_ptrs, x_all, q_ptrs,
                                           q_all, s_ptrs, k_lo, k_last, n_steps, BN, BK, STAGES, GROUP, EXP, A_L, P_L)
        acc, w, s_1, s_2, s_3 = _rs_step(2 * j + 1, acc, w_b, s_1, s_2, s_3, x_bufs, q_bufs, x_ptrs, x_all, q_ptrs,
                                         q_all, s_ptrs, k_lo, k_last, n_steps, BN, BK, STAGES, GROUP, EXP, A_L, P_L)
    if n_steps % 2:  # the last step (its x waited for by the last iteration)
        acc = warpgroup_mma(w, x_bufs.index((n_steps - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, w = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w))
    async_copy.wait_group(0)

    om = m0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    om2 = gl.expand_dims(om, 0)
    on2 = gl.expand_dims(on, 1)
    out_mask = (om2 < M) & (on2 < N)
    last = True
    if SPLIT:  # the last of the programs along K of this (row, token) tile finishes it
        acc, last = _split_k_finish(acc, part_ptr + om2 * N + on2, out_mask, ticket_ptr + pid)
    if last:
        if HAS_LOWRANK:  # acc^T += U [BN, BR] @ t^T
            acc = _lowrank_epilogue_rs(acc, ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2,
                                       NUM_SPLITS, stride_ws_s, stride_ws_m, stride_un, TOK, BN, BLOCK_R, HAS_US,
                                       PDL, 16 if RANK_CHUNK else BLOCK_R, act, MMA, num_warps)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + on, mask=on < N, other=0.0).to(gl.float32)
            acc += gl.expand_dims(bias, 1)
        gl.store(y_ptr + om2 * stride_ym + on2, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


RS_MAX_TOK = 256  # tokens per program (wgmma's N side)


def launch_rs(operands, y, m, n, k, r, b1, b2, num_splits, strides, group_size, has_lr, has_us, has_bias,
              tok, bn, warps, stages, split, br, pdl=False, rank_chunk=False):
    """MODE 10 on prepared operands (see `twinquant_gemm.tq_gemm`, which dispatches here): tok
    tokens x bn rows per program (bn = 16 * MT * warps), `split` programs along K (whole groups
    each; more than one only for M <= RS_MAX_TOK, the tokens `twinquant_mma.scratch` is sized for)."""
    from csrc_triton import twinquant_mma

    if group_size not in (64, 128) or k % group_size:
        raise ValueError(f"MODE 10 steps over 64-column chunks: group size {group_size} must be 64 or 128 "
                         f"and divide K = {k}")
    if tok % 8 or not 8 <= tok <= RS_MAX_TOK or bn % (16 * warps) or warps % 4 or stages < 3:
        raise ValueError(f"MODE 10 config: tokens per program a multiple of 8 up to {RS_MAX_TOK} (got {tok}), "
                         f"BLOCK_N a multiple of 16 * warps (got {bn}, {warps} warps; warps 4 or 8), stages >= 3 "
                         f"(got {stages})")
    groups = k // group_size
    split = max(1, min(split, groups))
    k_per_split = triton.cdiv(groups, split) * group_size
    split = triton.cdiv(k, k_per_split)
    if split > 1 and m > RS_MAX_TOK:
        split, k_per_split = 1, k
    part, ticket = twinquant_mma.scratch(y.device, n, RS_MAX_TOK)
    tiles = triton.cdiv(m, tok) * triton.cdiv(n, bn)
    assert split == 1 or (tiles <= ticket.numel() and m * n <= part.numel())
    exp = 0x4300 if operands[0].dtype == torch.bfloat16 else 0x6400
    _tq_gemm_wgmma_rs_kernel[(tiles, split)](
        *operands, y, part, ticket, m, n, k, r, b1, b2, num_splits, k_per_split, *strides, y.stride(0),
        GROUP=group_size, HAS_LOWRANK=has_lr, HAS_US=has_us, HAS_BIAS=has_bias, MT=bn // (16 * warps), TOK=tok,
        BLOCK_R=br, SPLIT=split > 1, STAGES=stages, EXP=exp, PDL=pdl, RANK_CHUNK=rank_chunk and has_lr,
        num_warps=warps, launch_pdl=pdl,
    )
