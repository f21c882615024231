"""Triton kernels for the TwinQuant dual-component linear layer (W4A16).

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias

They read scales [N, K/G], D [slots*R, K] and U [N, R] as the checkpoint stores them (D and U
in the activation dtype, or int8 codes with an fp32 scale per row: the down projection scales
its fp32 sums per rank row, the epilogue scales U's rows in registers before its dot), and the
int32 codes [N, K/8] after one lossless reordering at load (`repack`, nothing re-quantized):
within every chunk of C = min(64, G) input columns, nibble j of word l holds column
j * C/8 + l instead of 8 * l + j. Then the j-th nibbles of consecutive words meet consecutive
activations, so the decode kernel reads x in vector loads and never shuffles registers.

* ``lowrank_down``: t = x @ D^T for every slot of a (possibly merged) layer at once, split
  over K into a small fp32 workspace [S, M, slots*R]; it reads x and D once.
* ``tq_gemm``: the residual product with the low-rank up projection, bias and store in one
  epilogue. On CUDA (sm_80+, G 64/128), 2 <= M <= 32 tokens (up to 64 or 128 on the layer
  shapes where it measured faster, `MMA_CONFIGS`) go to the tensor-core decode kernel of
  `twinquant_mma.py` (Gluon, mma.sync with the codes turned into the MMA's register operand in
  place, split over K with an in-kernel fix-up). Otherwise decode (M <= GEMV_MAX_M,
  by layer shape) uses `_tq_gemv_vec_kernel`: each thread
  streams 16-byte vectors of codes for a few output rows, turns two nibbles into fp16 1024 + q
  with one LOP3, and accumulates in fp32 (the constant part is removed per scale group from
  the sum of x); larger M a tensor-core tile kernel (`_tq_gemm_kernel`: MODE 4 with the
  operands swapped and PTX nibble conversion up to 16 tokens, MODE 7 above, whose dequantized tile is finished
  -- scaled, in the activation dtype -- before the MMA; split-K where the grid is small). On an
  H100/H200 with Triton 3.6, 16 < M <= 256 run MODE 10 instead (before the mma decode kernel;
  `RS_CONFIGS`, measured faster on every layer shape):
  the Gluon kernel of `twinquant_wgmma.py` that dequantizes the codes straight into wgmma's
  register operand while the previous step's asynchronous wgmma runs (wide layers at
  128 < M <= 256 ran MODE 9, its shared-memory-operand sibling, before; now only when forced).
* ``tq_linear``: what the plugin calls; above `dequant_threshold` tokens (64-256, by layer
  size; 256 where MODE 10 runs) it dequantizes into a transient buffer and runs both
  components as one cuBLAS GEMM.

Why two launches rather than computing t inside every GEMM program: t needs the whole K
reduction before the up projection, so a single launch must either re-read all of D in every
output tile (several times the residual's own bytes at decode tile widths) or synchronise the
grid. The rank-r intermediate (M x slots*R fp32, a few KB) is exchanged through L2 instead. On
sm_90+ the two overlap (programmatic dependent launch, `pdl_usable`): the residual kernel is
launched while the down projection runs and waits for t (`griddepcontrol.wait`) only in its
epilogue, after its main loop.

Merged layers (q/k/v, gate/up) keep one factor pair per sub-layer ("slot"): output rows of
slot s use t[:, s*R:(s+1)*R]. Every output tile lies inside one slot (BLOCK_N divides the
slot boundaries), so a tile finds its slot from two boundaries.

Measured on the H100 and the H200: benchmarks/kernels/README.md.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) computes bf16 dots on
# raw bit patterns; there the operands are upcast to fp32 first. Compiled kernels never do.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def pdl_usable(device_index: int) -> bool:
    """Programmatic dependent launch (sm_90+; TWINQUANT_PDL=0 turns it off): with a low-rank
    branch, the residual kernel is launched while the down projection still runs, and waits for
    it (`griddepcontrol.wait`) only where it first reads t, in its epilogue. Without it the two
    launches run back to back and the residual kernel's whole main loop waits for the small one."""
    if _INTERPRETED or os.environ.get("TWINQUANT_PDL") == "0" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def rank_chunked() -> bool:
    """Whether the Gluon kernels' low-rank epilogues (the mma decode kernel up to 16 tokens per
    program, MODE 10) take the ranks 16 at a time, TWINQUANT_RANK_CHUNK=1, instead of all at once.
    Their registers (allocated for the kernel's peak) then stop growing with the rank; all at once,
    rank 64 costs a third to half of the rank-0 programs per SM on several dispatch configs
    (`benchmarks/kernels/README.md`, v14). Off by default: written and compiled
    without a GPU, not yet checked or timed on one (`benchmarks/kernels/bench_rank_chunk.py`)."""
    return os.environ.get("TWINQUANT_RANK_CHUNK") == "1"


# Where PDL measured slower than two launches back to back (H200, benchmarks/results/pdl_h200.json,
# benchmarks/kernels/bench_pdl.py): mma decode configs whose one wave of long programs loses slots
# to the down projection's programs still running. (min M, max M, min N, max N, min K, min rank)
PDL_OFF = [
    (2, 8, 8193, 1 << 62, 0, 0),  # gate/up, 2-8 tokens: (2, 8, 2) / (1, 8, 2), +4-10 us with PDL
    (9, 16, 0, 4096, 8192, 0),  # down, 9-16 tokens: (2, 8, 16), +1-9 us
    (2, 8, 0, 4096, 8192, 65),  # down, 2-8 tokens, rank 128: (1, 8, 8), +2.5 us
]


def pdl_trigger(m: int, n: int, k: int, r: int) -> int:
    """How the down projection lets the residual kernel start (`_lowrank_down_kernel`'s TRIGGER):
    0 no PDL, 1 once its programs have all started (the measured best elsewhere; 2, after their
    loads, was slower than 1 in 82 of the 93 cases of pdl_h200.json that take PDL, by up to
    3.8 us, and faster by at most 0.9 us)."""
    for min_m, max_m, min_n, max_n, min_k, min_r in PDL_OFF:
        if min_m <= m <= max_m and min_n <= n <= max_n and k >= min_k and r >= min_r:
            return 0
    return 1


@triton.jit
def _slot(n, B1, B2):
    """Slot of output row(s) n in a merged layer: 0 below B1, 1 from B1, 2 from B2."""
    return (n >= B1).to(tl.int32) + (n >= B2).to(tl.int32)


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Wait until the down projection (the launch this one depends on) has finished and its
    writes are visible; a no-op unless launched with PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _operand(v, act, UPCAST: tl.constexpr):
    """A factor tile (float or int8 codes) as a tensor-core operand in the activation dtype.
    (The interpreter mishandles int8 -> bf16, so there it goes to fp32, as _dot would anyway.)"""
    if UPCAST:
        return v.to(tl.float32)
    return v.to(act)


@triton.jit
def _lowrank_down_kernel(
    x_ptr, d_ptr, ds_ptr, ws_ptr,
    M, K, RT, k_per_split,
    stride_xm, stride_dr, stride_ws_s, stride_ws_m,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    HAS_DS: tl.constexpr, UPCAST: tl.constexpr, TRIGGER: tl.constexpr,
):
    """t = x @ D^T over one K-slice. int8 D (HAS_DS): codes become the activation dtype
    exactly (|q| <= 127) and the per-row scale multiplies the slice's fp32 sum. TRIGGER (with
    PDL): the residual kernel that reads t may be launched once every program of this one has
    started (1) or has finished its loads (2); 0: when this kernel ends."""
    if TRIGGER == 1:
        tl.extra.cuda.gdc_launch_dependents()
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
                    mask=(offs_r[:, None] < RT) & kmask[None, :], other=0)
        acc += _dot(x, tl.trans(_operand(d, x_ptr.dtype.element_ty, UPCAST)), UPCAST)
    if HAS_DS:
        acc *= tl.load(ds_ptr + offs_r, mask=offs_r < RT, other=0.0)[None, :]
    if TRIGGER == 2:
        tl.extra.cuda.gdc_launch_dependents()
    ptrs = ws_ptr + pid_s * stride_ws_s + offs_m[:, None] * stride_ws_m + offs_r[None, :]
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < RT)
    if ATOMIC:  # (stride_ws_s is 0: every slice adds into the one zeroed slice)
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


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


# MODE 7: bits 0-3 of two words as (q - 8) * s in the activation dtype, for any pair of
# elements (Triton pairs consecutive registers when pack=2, and packs two 16-bit inputs into
# one register: $3 holds both scales). LOP3 puts the nibble under the exponent of 128 (bf16
# 0x4300) or 1024 (fp16 0x6400), the float E + q exactly; fma with 1.0 subtracts E + 8 (exact),
# fma with -0.0 multiplies by the scale (one rounding). fma.rn.bf16x2 runs from sm_80; add and
# mul of bf16x2 would need sm_90.
_LOW_NIBBLE_SCALED_PTX = """
{
.reg .b32 ta, tb, v, one, cst, nz;
mov.b32 one, ONE2;
mov.b32 cst, OFFSET2;
mov.b32 nz, 0x80008000;
lop3.b32 ta, $1, 0x0000000F, EXP1, 0xEA;
lop3.b32 tb, $2, 0x0000000F, EXP1, 0xEA;
prmt.b32 v, ta, tb, 0x5410;
fma.rn.TYPE v, v, one, cst;
fma.rn.TYPE $0, v, $3, nz;
}
"""
_LOW_PTX_BF16 = tl.constexpr(_LOW_NIBBLE_SCALED_PTX.replace("TYPE", "bf16x2").replace(
    "ONE2", "0x3F803F80").replace("OFFSET2", "0xC308C308").replace("EXP1", "0x4300"))
_LOW_PTX_FP16 = tl.constexpr(_LOW_NIBBLE_SCALED_PTX.replace("TYPE", "f16x2").replace(
    "ONE2", "0x3C003C00").replace("OFFSET2", "0xE408E408").replace("EXP1", "0x6400"))


@triton.jit
def _scaled_low_nibble(p, s, EXP: tl.constexpr, ASM: tl.constexpr, act: tl.constexpr):
    """(q - 8) * s in the activation dtype for q = bits 0-3 of every word of p; s (already in
    that dtype) broadcasts against p. One rounding, as a dequantized weight."""
    if ASM:
        s = tl.broadcast_to(s, p.shape)
        if EXP == 0x4300:
            w = tl.inline_asm_elementwise(_LOW_PTX_BF16, "=r,r,r,r", [p, s], dtype=tl.bfloat16,
                                          is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise(_LOW_PTX_FP16, "=r,r,r,r", [p, s], dtype=tl.float16,
                                          is_pure=True, pack=2)
    else:
        w = (((p & 0xF) - 8).to(tl.float32) * s.to(tl.float32)).to(act)
    return w


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
    """Tensor-core tile kernel (M > GEMV_MAX_M): y[BM, BN] = x[BM, :] @ deq(R)[BN, :]^T, x in
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
    (MODE 0-3, 5 and 6, tried and removed, are in benchmarks/kernels/README.md with their numbers.)
    SPLIT_K > 1: program (tile, s) reduces K-slice s and adds into an fp32 y (zeroed by the
    caller); split 0 adds the low-rank term and the bias. int8 U (HAS_US): each row of codes is
    scaled and rounded to the activation dtype in registers before the epilogue dot."""
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
                lo, hi = _plane_pair(p, j, EXP, ASM, act)
                xj = tl.load(x_rows + (col + j * CHUNK_W)[None, :], mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                part += _dot(lo, tl.trans(xj), UPCAST)
                xs += tl.sum(xj.to(tl.float32), axis=1)
                xj = tl.load(x_rows + (col + (j + 4) * CHUNK_W)[None, :], mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                part += _dot(hi, tl.trans(xj), UPCAST)
                xs += tl.sum(xj.to(tl.float32), axis=1)
            e_plus_8 = 136.0 if EXP == 0x4300 else 1032.0
            acc += (part - e_plus_8 * xs[None, :]) * s[:, None]
        else:
            s = tl.load(sc_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(act)
            p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
            p = p >> (tl.arange(0, 8) * 4)[None, None, :, None]  # nibble j of [BN, chunk, j, l] at bits 0-3
            w = _scaled_low_nibble(tl.reshape(p, (BLOCK_N, BLOCK_K)), s[:, None], EXP, ASM, act)  # col c*CHUNK + j*CHUNK_W + l
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < k_hi), other=0.0)
            acc = _dot_acc(xk, tl.trans(w), acc, UPCAST)

    if pid_k == 0:
        if HAS_LOWRANK:
            n0 = pid_n * BLOCK_N
            slot = _slot(n0, SLOT_B1, SLOT_B2)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            _pdl_wait(PDL)  # t is the down projection's, launched just before this kernel
            for sp in range(0, NUM_SPLITS):
                t += tl.load(ws_ptr + sp * stride_ws_s + offs_m[:, None] * stride_ws_m + slot * R + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0)
            if HAS_US:  # scaled before the dot (rounded once, as a bf16 factor is), so the MMA
                # still accumulates into acc: scaling its result would need a second accumulator
                us = tl.load(us_ptr + offs_n, mask=n_mask, other=0.0)
                u = u.to(tl.float32) * us[:, None]
            u = _operand(u, act, UPCAST)
            if SWAP:
                acc = _dot_acc(u, tl.trans(t.to(act)), acc, UPCAST)
            else:
                acc = _dot_acc(t.to(act), tl.trans(u), acc, UPCAST)
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
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Token row m of a decode program: y [BLOCK_N] (the residual product's row sums) plus the
    low-rank term (u [BLOCK_N, BLOCK_R] fp32, this program's rows of U, loaded after the main
    loop; t from the down projection's NUM_SPLITS <= BLOCK_S K-slices, all loads issued at once)
    and the bias, stored."""
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = (offs_r < R) & (offs_r * 0 + m < M)
        t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for sp in tl.static_range(BLOCK_S):  # unrolled: every slice's load is issued before the sum
            t += tl.load(ws_ptr + sp * stride_ws_s + m * stride_ws_m + slot * R + offs_r,
                         mask=r_mask & (offs_r * 0 + sp < NUM_SPLITS), other=0.0)
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
    tl.constexpr(_QUAD_F16_PTX.replace("SHIFT", "mov.b32 t, $4;" if s == 0 else f"shr.u32 t, $4, {s};")) for s in (0, 8))


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
def _tq_gemv_vec_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_US: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, EVEN: tl.constexpr, UNPACK: tl.constexpr,
    PREFETCH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
):
    """Decode kernel with whole 16-byte code vectors per thread (M <= GEMV_MAX_M), BLOCK_M (1 or
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
    being written while the loop runs) after the main loop, t's K-slices in unrolled loads."""
    m0 = tl.program_id(0) * BLOCK_M
    pid_n = tl.program_id(1)
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
    slot = _slot(n0, SLOT_B1, SLOT_B2)
    if HAS_LOWRANK:
        _pdl_wait(PDL)  # t is the down projection's, launched just before this kernel
    _gemv_epilogue(tl.sum(acc0, axis=1), m0, M, offs_n, n_mask, x_ptr, u, us_ptr, ws_ptr, bias_ptr, y_ptr, R, slot,
                   NUM_SPLITS, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_US, HAS_BIAS, BLOCK_R, BLOCK_S)
    if BLOCK_M > 1:
        _gemv_epilogue(tl.sum(acc1, axis=1), m0 + 1, M, offs_n, n_mask, x_ptr, u, us_ptr, ws_ptr, bias_ptr, y_ptr, R,
                       slot, NUM_SPLITS, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_US, HAS_BIAS, BLOCK_R,
                       BLOCK_S)


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
# Decode dispatch (M <= GEMV_MAX_M), from the H200 decode sweep (bench_kernels.py --decode-sweep,
# benchmarks/results/kernels_h200_decode_sweep.json): per M, one config per Llama layer shape --
# down (N <= 4096, K >= 8192), o (N <= 4096), q/k/v (N <= 8192), gate/up (wider); at M = 1
# re-measured with the 6-field configs (benchmarks/kernels/bench_gemv.py). 5 or 6 fields: the
# vector decode kernel; None: the tile kernel as `pick_config` chooses it, where that stayed
# faster (M 3-4 on three of the four shapes).
GEMV_MAX_M = 4
GEMV_CONFIGS = [  # (max M, max N, min K, config): first match
    (1, 4096, 8192, (1, 4, 256, 2, 2, 1)),  # down: UNPACK 2 + PREFETCH (benchmarks/results/gemv_h200.json)
    (1, 4096, 0, (1, 4, 256, 2, 1)),
    (1, 8192, 0, (1, 8, 256, 2, 1)),
    (1, 1 << 62, 0, (1, 8, 256, 2, 1)),
    (2, 4096, 8192, (2, 4, 256, 2, 1)),
    (2, 4096, 0, (2, 4, 256, 2, 1)),
    (2, 8192, 0, (2, 8, 128, 1, 1)),
    (2, 1 << 62, 0, (2, 8, 128, 1, 1)),
    (4, 4096, 8192, None),
    (4, 4096, 0, (2, 8, 128, 1, 1)),
    (4, 1 << 62, 0, None),
]


# Tensor-core decode kernel (csrc_triton/twinquant_mma.py, (MT, warps, SPLIT_K[, tokens per
# program])) for 2 <= M <= 128 where it is usable (`mma_usable`), from the H200 sweeps
# (benchmarks/kernels/bench_mma.py; benchmarks/results/kernels_h200_mma.json for M <= 16,
# kernels_h200_mma_wide.json above): same shape rules as GEMV_CONFIGS; None: not this kernel (the
# vector kernel at M = 1, which stayed 1-10% faster there, the tile kernel where it was faster).
# SPLIT_K is the number of programs along K the sweep ran (the x slice then fits in 64 KB, except
# down at 17-64 tokens: 112 KB, and o at 33-128: 128 KB).
MMA_MAX_M = 128
MMA_CONFIGS = [  # (max M, max N, min K, config): first match
    (1, 1 << 62, 0, None),
    (8, 4096, 8192, (1, 8, 8)),
    (8, 8192, 0, (1, 8, 8)),
    (8, 1 << 62, 0, (2, 8, 2)),
    (16, 4096, 8192, (2, 8, 16)),
    (16, 8192, 0, (1, 4, 8)),
    (16, 1 << 62, 0, (2, 8, 4)),
    (32, 4096, 8192, (1, 8, 8, 32)),  # down
    (32, 4096, 0, (1, 8, 8, 32)),  # o
    (32, 8192, 0, (1, 4, 4, 32)),  # q/k/v
    (32, 1 << 62, 0, (1, 8, 4, 32)),  # gate/up
    (64, 4096, 8192, (2, 4, 16, 64)),
    (64, 4096, 0, (1, 8, 4, 64)),
    (64, 1 << 62, 0, None),  # q/k/v, gate/up: the tile kernel (as fast or faster)
    (128, 4096, 8192, None),
    (128, 4096, 0, (2, 8, 4, 64)),
    (128, 1 << 62, 0, None),
]


# MODE 10 (twinquant_wgmma.py: the weights dequantized into wgmma's register operand, x from
# shared memory) for RS_MIN_M < M <= RS_MAX_M on sm_90 where `wgmma_usable` (G 64/128), as a
# tile config (TOK, BLOCK_N, 64, warps, stages, SPLIT_K, 10), from the H200 sweep
# (benchmarks/kernels/bench_tile.py, benchmarks/results/tile_h200.json); same shape rules as
# MMA_CONFIGS; None: not this kernel (the one the dispatch picks otherwise was as fast or faster).
RS_MIN_M, RS_MAX_M = 16, 256
# Measured faster than the previous dispatch (sum of rank 0 and rank 64) at every shape and M of
# the sweep; the exceptions at one rank are in benchmarks/kernels/README.md ("Results v12").
RS_CONFIGS = [  # (max M, max N, min K, config): first match
    (32, 8192, 0, (32, 64, 64, 4, 4, 4, 10)),  # down, o, q/k/v
    (32, 1 << 62, 0, (32, 128, 64, 4, 4, 1, 10)),  # gate/up
    (64, 8192, 0, (64, 64, 64, 4, 4, 4, 10)),
    (64, 1 << 62, 0, (64, 128, 64, 4, 4, 1, 10)),
    (128, 4096, 8192, (128, 64, 64, 4, 4, 4, 10)),
    (128, 4096, 0, (128, 64, 64, 4, 4, 2, 10)),
    (128, 8192, 0, (64, 64, 64, 4, 4, 2, 10)),
    (128, 1 << 62, 0, (128, 128, 64, 4, 3, 1, 10)),
    (256, 4096, 8192, (256, 128, 64, 8, 4, 4, 10)),
    (256, 4096, 0, (64, 64, 64, 4, 4, 1, 10)),
    (256, 8192, 0, (128, 128, 64, 8, 4, 1, 10)),
    (256, 1 << 62, 0, (256, 128, 64, 8, 4, 1, 10)),
]


def rs_usable(device: torch.device, dtype: torch.dtype, group_size: int) -> bool:
    """Whether the dispatch may pick MODE 10 for activations of `dtype` on `device`: bf16/fp16
    on a CUDA device where `wgmma_usable`, G 64 or 128."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and group_size in (64, 128)
            and wgmma_usable(device.index or 0))


def pick_rs_config(m: int, n: int, k: int) -> tuple | None:
    """The MODE 10 config for RS_MIN_M < M <= RS_MAX_M tokens (None: not this kernel)."""
    for max_m, max_n, min_k, cfg in RS_CONFIGS:
        if m <= max_m and n <= max_n and k >= min_k:
            return cfg
    raise AssertionError("unreachable")


def fit_rs_tile(config: tuple, max_bn: int) -> tuple | None:
    """A MODE 10 config with BLOCK_N = 16 * MT * warps halved (MT first, then warps down to one
    warpgroup) until it divides the slot bounds (`max_bn`); None if even 64 rows do not."""
    tok, bn, bk, warps, stages, split, mode = config
    while bn > max_bn and bn > 16 * warps:
        bn //= 2  # fewer 16-row tiles per warp
    while bn > max_bn and warps > 4:
        bn, warps = bn // 2, warps // 2
    return (tok, bn, bk, warps, stages, split, mode) if bn <= max_bn else None


def pick_mma_config(m: int, n: int, k: int) -> tuple | None:
    """The tensor-core decode config for M <= MMA_MAX_M tokens (None: not this kernel)."""
    for max_m, max_n, min_k, cfg in MMA_CONFIGS:
        if m <= max_m and n <= max_n and k >= min_k:
            return cfg
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=None)
def _mma_device_ok(device_index: int) -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device_index) < (8, 0):
        return False
    try:
        from csrc_triton import twinquant_mma  # noqa: F401
    except Exception:  # noqa: BLE001 -- no (compatible) Gluon in this Triton
        return False
    return True


def mma_usable(device: torch.device, dtype: torch.dtype, group_size: int, k: int) -> bool:
    """Whether the dispatch may pick the tensor-core decode kernel for activations of `dtype` on
    `device`: CUDA sm_80+, Gluon importable, bf16/fp16, G = 64 or 128 (TWINQUANT_MMA=0 turns it off)."""
    if _INTERPRETED or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if group_size not in (64, 128) or k % group_size or os.environ.get("TWINQUANT_MMA") == "0":
        return False
    return _mma_device_ok(device.index or 0)


def split_scratch_tokens(device: torch.device, dtype: torch.dtype, group_size: int, k: int) -> int:
    """Tokens the split-K scratch (`twinquant_mma.scratch`) must hold for the kernels the
    dispatch may pick for such a layer (0: none of them splits through it)."""
    if rs_usable(device, dtype, group_size):
        from csrc_triton.twinquant_wgmma import RS_MAX_TOK

        return RS_MAX_TOK
    if mma_usable(device, dtype, group_size, k):
        from csrc_triton.twinquant_mma import MAX_TOKENS

        return MAX_TOKENS
    return 0


def fit_mma_tile(config: tuple, max_bn: int) -> tuple | None:
    """(MT, warps, SPLIT_K[, tokens]) with fewer 16-row tiles (MT first, then warps) until a
    program's 16 * MT * warps rows divide the slot bounds (`max_bn`); None if even 16 rows do not."""
    mt, warps, split, *rest = config
    while 16 * mt * warps > max_bn and (mt > 1 or warps > 1):
        mt, warps = (mt // 2, warps) if mt > 1 else (mt, warps // 2)
    return (mt, warps, split, *rest) if 16 * mt * warps <= max_bn else None


def pick_gemv_config(m: int, n: int, k: int) -> tuple | None:
    """The decode config for M <= GEMV_MAX_M tokens (None: the tile kernel's `pick_config`)."""
    for max_m, max_n, min_k, cfg in GEMV_CONFIGS:
        if m <= max_m and n <= max_n and k >= min_k:
            return cfg
    raise AssertionError("unreachable")


# Tile kernel, first row with M <= max M, N >= min N and K >= min K; BLOCK_K is capped at the
# group size, BLOCK_N at the slot boundaries; split-K is added while the grid has fewer than
# _MIN_PROGRAMS programs. From the H100 sweeps (benchmarks/kernels/README.md).
_CONFIGS = [  # (max M, min N, min K, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, MODE, max SPLIT_K)
    (16, 0, 0, 16, 64, 128, 4, 3, 4, 8),
    (64, 16384, 0, 64, 128, 128, 4, 3, 7, 1),
    (64, 0, 0, 64, 64, 128, 8, 3, 7, 4),
    (128, 16384, 0, 128, 128, 64, 8, 4, 7, 1),
    (128, 0, 8192, 128, 64, 64, 8, 4, 7, 4),
    (128, 0, 0, 128, 64, 128, 8, 3, 7, 1),
    (1 << 62, 0, 0, 128, 128, 64, 8, 4, 7, 4),
]
_MIN_PROGRAMS = 264  # two per SM on an H100
# The Gluon wgmma kernels (MODE 8/9, and MODE 10 which replaced MODE 9 in the dispatch) were
# written and measured with Triton 3.6 on an H100/H200; other Triton versions compile them (CI
# checks one) but run the other kernels unless TWINQUANT_WGMMA=1.
_WGMMA_TRITON = ("3.6",)


@functools.lru_cache(maxsize=None)
def wgmma_usable(device_index: int) -> bool:
    """Whether the dispatch may pick a Gluon wgmma kernel (MODE 10) on this CUDA device: sm_90,
    Gluon importable, a Triton version it was measured with (TWINQUANT_WGMMA=0/1 forces it off/on)."""
    flag = os.environ.get("TWINQUANT_WGMMA")
    if flag == "0" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    try:
        from csrc_triton import twinquant_wgmma  # noqa: F401
    except Exception:  # noqa: BLE001 -- no (compatible) Gluon in this Triton
        return False
    return flag == "1" or triton.__version__.startswith(_WGMMA_TRITON)


def pick_config(m: int, n: int, k: int, max_block_n: int = 256, group_size: int = 128):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, MODE) of the Triton tile kernel (where
    MODE 10 is not picked). MODE 8/9, the first Gluon wgmma kernel, runs only when forced: MODE 10
    measured faster on every shape where the dispatch used MODE 9 (129-256 tokens, N >= 16384)."""
    for max_m, min_n, min_k, bm, bn, bk, warps, stages, mode, max_split in _CONFIGS:
        if m <= max_m and n >= min_n and k >= min_k:
            break
    if mode == 4 and group_size % 128:
        mode = 7  # MODE 4 steps over whole 128-column groups
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


def lowrank_down(x: torch.Tensor, down: torch.Tensor, num_splits: int | None = None,
                 reduce: bool = False, down_scale: torch.Tensor | None = None, trigger: int = 0) -> torch.Tensor:
    """Workspace [S, M, RT] fp32 whose sum over S is x @ down^T (int8 `down`: x @ (down *
    down_scale[:, None])^T, down_scale fp32 [RT]). With `reduce` the K-slices add
    into one zeroed slice (S = 1, fp32 atomics): every output tile of the main kernel then
    reads t once instead of once per slice, which is what matters from a few dozen tokens on
    (one extra memset launch, so decode keeps the per-slice workspace). `trigger` (1 or 2): the
    next launch, the residual kernel, is launched with PDL (`pdl_usable`), may start once this
    kernel's programs have all started (1) or finished their loads (2), and waits for t itself."""
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
    atomic = reduce and num_splits > 1
    if atomic:
        ws = torch.zeros((1, m, rt), dtype=torch.float32, device=x.device)
    else:
        ws = torch.empty((num_splits, m, rt), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(rt, br), num_splits)
    _check_factor(down, down_scale, rt, "down")
    _lowrank_down_kernel[grid](
        x, down, down_scale if down_scale is not None else x, ws, m, k, rt, k_per_split,
        x.stride(0), down.stride(0), 0 if atomic else ws.stride(0), ws.stride(1),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, ATOMIC=atomic, HAS_DS=down_scale is not None,
        UPCAST=_INTERPRETED, TRIGGER=trigger, num_warps=4, num_stages=3,
    )
    return ws


def _check_factor(f: torch.Tensor, scale: torch.Tensor | None, rows: int, name: str) -> None:
    """int8 factors come with an fp32 scale per row; float factors come without."""
    if (f.dtype == torch.int8) != (scale is not None):
        raise ValueError(f"low-rank {name} factor is {f.dtype}: int8 factors need a {name}_scale, float ones take none")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (rows,) or not scale.is_contiguous()):
        raise ValueError(f"{name}_scale must be a contiguous float32 [{rows}], got {scale.dtype} {list(scale.shape)}")


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
    down_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ deq(R)^T + (x @ D^T) @ U^T + bias, for x [M, K] fp16/bf16 with unit column stride.

    qweight int32 [N, K/8] in the `repack` layout, scales [N, K/G] as the checkpoint stores them;
    down [slots*R, K] and up [N, R] in x's dtype, or int8 with fp32 row scales down_scale
    [slots*R] and up_scale [N] (None for rank 0). slot_bounds: first
    output row of slots 1 and 2 of a merged layer (empty for a plain layer). `config`
    overrides the launch configuration: (MT, warps, SPLIT_K[, tokens per program]) selects the
    tensor-core decode kernel (twinquant_mma.py), (BLOCK_M, BLOCK_N, BLOCK_W, warps, UNPACK[, PREFETCH]) the vector
    decode kernel, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, MODE) the tile kernel."""
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
    if config is None and RS_MIN_M < m <= RS_MAX_M and rs_usable(x.device, x.dtype, group_size):
        config = pick_rs_config(m, n, k)
        config = fit_rs_tile(config, max_bn) if config is not None else None  # (else: the kernels below)
    if config is None and m <= MMA_MAX_M and mma_usable(x.device, x.dtype, group_size, k):
        config = pick_mma_config(m, n, k)
        config = fit_mma_tile(config, max_bn) if config is not None else None  # (else: the kernels below)
    if config is None and m <= GEMV_MAX_M:
        config = pick_gemv_config(m, n, k)
    if config is None:
        config = pick_config(m, n, k, max_bn, group_size)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    has_us = has_lr and up_scale is not None
    if has_lr:
        _check_factor(up, up_scale, n, "up")
    trigger = pdl_trigger(m, n, k, r) if has_lr and x.is_cuda and pdl_usable(x.device.index or 0) else 0
    pdl = trigger > 0

    def with_t():
        """Launch the down projection (after every buffer the residual kernel needs is set up,
        so that with PDL it is the launch right before that kernel), then return the residual
        kernel's operands and strides (then y and y's stride)."""
        if has_lr:
            # one reduced slice for the tile kernel from 17 tokens on and for the mma decode kernel,
            # whose one finishing program per column tile would otherwise add up every K-slice of t
            # with PDL the vector kernel takes t in 8 K-slices, not up to 32: its epilogue adds fewer
            # partial slices, and the longer down projection runs under the residual kernel's loop
            # (M = 1, H200: 0.8-3.0 us less on q/k/v, o and gate/up, benchmarks/results/pdl_breakdown_h200.json)
            splits = 8 if pdl and len(config) in (5, 6) else None
            ws = lowrank_down(x, down, splits, reduce=(len(config) == 7 and m > 16) or len(config) in (3, 4),
                              down_scale=down_scale, trigger=trigger)
            num_splits = ws.shape[0]
        else:
            ws, num_splits = x, 0
        operands = (x, qweight, scales, up if has_lr else x, up_scale if has_us else x, ws,
                    bias if bias is not None else x)
        strides = (
            x.stride(0), qweight.stride(0), scales.stride(0), up.stride(0) if has_lr else 0,
            ws.stride(0) if has_lr else 0, ws.stride(1) if has_lr else 0,
        )
        return operands, strides, num_splits

    br = max(16, _next_pow2(r)) if has_lr else 16
    if len(config) in (3, 4):  # the tensor-core decode kernel (csrc_triton/twinquant_mma.py)
        from csrc_triton import twinquant_mma
        fitted = fit_mma_tile(config, max_bn)  # a tile never straddles two slots
        if fitted is None:
            raise ValueError(f"mma decode config {config}: 16 * MT * warps rows must divide the slot bounds {slot_bounds}")
        mt, warps, split, *tok = fitted
        operands, strides, num_splits = with_t()
        twinquant_mma.launch(operands, out, m, n, k, r, b1, b2, num_splits, strides, group_size, has_lr, has_us,
                             bias is not None, mt, warps, split, br, *tok, pdl=pdl, rank_chunk=rank_chunked())
        return out
    if len(config) in (5, 6):
        bm, bn, bw, warps, unpack, *prefetch = config
        prefetch = prefetch[0] if prefetch else 0
        bn = min(bn, max_bn)
        if bm not in (1, 2) or bw % 4 or unpack not in (0, 1, 2) or prefetch not in (0, 1):
            raise ValueError(f"vector decode config {config}: BLOCK_M 1 or 2, BLOCK_W a multiple of 4, UNPACK 0-2, "
                             "PREFETCH 0 or 1")
        operands, strides, num_splits = with_t()
        _tq_gemv_vec_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            *operands, out, m, n, k, r, b1, b2, num_splits, *strides, out.stride(0),
            GROUP=group_size, CHUNK_W=chunk_words(group_size), HAS_LOWRANK=has_lr, HAS_US=has_us,
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, BLOCK_R=br,
            BLOCK_S=_next_pow2(max(1, num_splits)), EVEN=(k // 8) % bw == 0 and n % bn == 0, UNPACK=unpack,
            PREFETCH=prefetch, ASM=not _INTERPRETED, PDL=pdl, num_warps=warps, launch_pdl=pdl,
        )
        return out
    bm, bn, bk, warps, stages, split, mode = config
    bn = min(bn, max_bn)  # a tile never straddles two slots, also with a forced config
    if mode not in (4, 7, 8, 9, 10):
        raise ValueError(f"tile kernel MODE {mode}: expected 4, 7, 8, 9 or 10")
    if mode == 10:  # the Hopper kernel with the weights as wgmma's register operand (twinquant_wgmma.py)
        from csrc_triton import twinquant_wgmma
        operands, strides, num_splits = with_t()
        twinquant_wgmma.launch_rs(operands, out, m, n, k, r, b1, b2, num_splits, strides, group_size, has_lr,
                                  has_us, bias is not None, bm, bn, warps, stages, split, br, pdl=pdl,
                                  rank_chunk=rank_chunked())
        return out
    if mode in (8, 9):  # the Hopper wgmma kernel (csrc_triton/twinquant_wgmma.py), 64-column K steps;
        # MODE 9 swaps the operands (tokens on the MMA's N side)
        from csrc_triton import twinquant_wgmma
        k_per_split = triton.cdiv(triton.cdiv(k, split), 64) * 64
        split = triton.cdiv(k, k_per_split)
        y = out if split == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
        operands, strides, num_splits = with_t()
        twinquant_wgmma.launch(operands, y, m, n, k, r, b1, b2, num_splits, strides, group_size, has_lr, has_us,
                               bias is not None, bm, bn, warps, stages, split, k_per_split, br, swap=mode == 9,
                               pdl=pdl)
        if split > 1:
            out.copy_(y)
        return out
    if group_size % bk or bk % (8 * chunk_words(group_size)) or (mode == 4 and bk % 128):
        raise ValueError(f"BLOCK_K {bk} must divide the group size {group_size}, span whole "
                         f"{8 * chunk_words(group_size)}-column chunks, and (MODE 4) be a multiple of 128")
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    y = out if split == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    exp = 0x4300 if x.dtype == torch.bfloat16 else 0x6400
    operands, strides, num_splits = with_t()
    _tq_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
        *operands, y, m, n, k, r, b1, b2, num_splits, k_per_split, *strides, y.stride(0),
        GROUP=group_size, CHUNK_W=chunk_words(group_size), HAS_LOWRANK=has_lr, HAS_US=has_us,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8, SPLIT_K=split, MODE=mode,
        EXP=exp, ASM=not _INTERPRETED, UPCAST=_INTERPRETED, PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )
    if split > 1:
        out.copy_(y)
    return out


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
    p = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_p[None, :], mask=nm[:, None] & (offs_p[None, :] < K // 8), other=0)
    s = tl.load(sc_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=nm[:, None] & (offs_g[None, :] < K // GROUP), other=0.0)
    p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
    q = ((p >> (tl.arange(0, 8) * 4)[None, None, :, None]) & 0xF) - 8  # [BN, chunk, j, l]
    q = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP))  # column c*CHUNK + j*CHUNK_W + l
    w = tl.reshape(q * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        n0 = pid_n * BLOCK_N
        n1 = tl.minimum(n0 + BLOCK_N, N) - 1
        slot = _slot(offs_n, B1, B2)
        for sl in range(_slot(n0, B1, B2), _slot(n1, B1, B2) + 1):
            for r0 in range(0, R, BLOCK_R):  # rank in slices: shared memory independent of R
                rr = r0 + offs_r
                u = tl.load(up_ptr + offs_n[:, None] * stride_un + rr[None, :],
                            mask=(nm & (slot == sl))[:, None] & (rr[None, :] < R), other=0.0)
                d = tl.load(down_ptr + (sl * R + rr)[:, None] * stride_dn + offs_k[None, :],
                            mask=(rr[:, None] < R) & (offs_k[None, :] < K), other=0.0)
                w = _dot_acc(u, d, w, UPCAST)
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
    weights deq(R) + U_s D_s of every slot s (`slot_bounds` as in `tq_gemm`), in one pass."""
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
        BLOCK_K=bk, BLOCK_R=min(64, max(16, _next_pow2(r))), HAS_LOWRANK=has_lr, UPCAST=_INTERPRETED, num_warps=warps,
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
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 factor with one fp32 scale per row, as a [rows, cols] tensor of `dtype` (one launch)."""
    rows, cols = q.shape
    out = torch.empty((rows, cols), dtype=dtype, device=q.device)
    br, bc = 16, min(256, max(16, _next_pow2(cols)))
    _dequant_rows_kernel[(triton.cdiv(rows, br), triton.cdiv(cols, bc))](
        q, scale, out, rows, cols, q.stride(0), out.stride(0), BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return out


# Above this many tokens one transient dense copy of the layer fed to cuBLAS beats the tile
# kernel (H100 sweeps, benchmarks/kernels/README.md): smaller layers cross over earlier. Where
# MODE 10 runs (`rs_usable`), not before RS_MAX_M tokens.
DEQUANT_ABOVE = [  # (layers with fewer than this many weights, M threshold)
    (20 << 20, 64),  # o of an 8B model (16.8 M)
    (32 << 20, 128),  # q/k/v of an 8B model (25.2 M)
    (1 << 62, 256),
]


def dequant_threshold(n: int, k: int) -> int:
    return next(thr for size, thr in DEQUANT_ABOVE if n * k < size)


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
    down_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer on CUDA. Up to `large_m_threshold` tokens: the Triton kernels. Above: one cuBLAS
    GEMM over transient weights made in one `dequantize` pass (freed after the call; no dense
    copy is kept; int8 factors are dequantized first): where `fold_lowrank`, x @ W^T with
    W = deq(R) + U_s D_s per slot s; else [x | x D^T] @ [deq(R) | U_blockdiag]^T."""
    m, k = x.shape
    n = qweight.shape[0]
    thr = dequant_threshold(n, k) if large_m_threshold is None else large_m_threshold
    if large_m_threshold is None and rs_usable(x.device, x.dtype, group_size):
        thr = max(thr, RS_MAX_M)  # MODE 10 measured faster than the dense copy up to its last M
    if m <= thr:
        return tq_gemm(x, qweight, scales, group_size, down, up, bias, slot_bounds,
                       down_scale=down_scale, up_scale=up_scale)
    has_lr = down is not None and down.shape[0] > 0
    if has_lr:
        _check_factor(down, down_scale, down.shape[0], "down")
        _check_factor(up, up_scale, n, "up")
        if down_scale is not None:
            down, up = dequantize_rows(down, down_scale, x.dtype), dequantize_rows(up, up_scale, x.dtype)
    r = up.shape[1] if has_lr else 0
    if not has_lr or fold_lowrank(m, n, r):
        w = dequantize(qweight, scales, group_size, x.dtype, down=down if has_lr else None,
                       up=up if has_lr else None, slot_bounds=slot_bounds)
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    w = torch.empty((n, k + down.shape[0]), dtype=x.dtype, device=x.device)
    dequantize(qweight, scales, group_size, x.dtype, out=w[:, :k])
    w[:, k:].zero_()
    bounds = (0, *slot_bounds, n)
    for s in range(len(bounds) - 1):
        w[bounds[s] : bounds[s + 1], k + s * r : k + (s + 1) * r] = up[bounds[s] : bounds[s + 1]]
    x = torch.cat([x, torch.mm(x, down.t())], dim=1)
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
