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
  x); larger M a tensor-core tile kernel that dequantizes tiles in registers.
* ``tq_linear``: what the plugin calls; above LARGE_M_THRESHOLD tokens it dequantizes into a
  transient buffer and runs both components as one cuBLAS GEMM.

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
def _tq_gemm_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):
    """Tensor-core tile kernel (M > GEMV_MAX_M): acc[BM, BN] += x[BM, BK] @ deq(R)[BN, BK]^T.
    Codes are unpacked in word order (nibble j of word l is element 8l + j of the tile), so x
    comes in as `permute_x(x)`, whose columns follow the same order."""
    pid = tl.program_id(0)
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
    PACKED_K: tl.constexpr = BLOCK_K // 8
    GROUPS_K: tl.constexpr = BLOCK_K // GROUP
    shifts = tl.arange(0, 8) * 4

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        offs_p = k0 // 8 + tl.arange(0, PACKED_K)
        p = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_p[None, :],
                    mask=n_mask[:, None] & (offs_p[None, :] < K // 8), other=0)
        offs_g = k0 // GROUP + tl.arange(0, GROUPS_K)
        s = tl.load(sc_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
                    mask=n_mask[:, None] & (offs_g[None, :] < K // GROUP), other=0.0)
        q = ((p[:, :, None] >> shifts[None, None, :]) & 0xF) - 8  # [BN, BK/8, 8]: k = 8 * word + nibble
        q = tl.reshape(q.to(tl.float32), (BLOCK_N, GROUPS_K, GROUP))
        w = tl.reshape(q * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K)).to(act)  # one rounding
        acc += _dot(x, tl.trans(w), UPCAST)

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
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc += _dot(t.to(act), tl.trans(u.to(act)), UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


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


def permute_x(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x with its columns in the word order of the repacked codes (column c*C + 8l + j takes
    x[:, c*C + j*C/8 + l]): what the tile kernel and `dequantize` pair with."""
    m, k = x.shape
    cw = chunk_words(group_size)
    return x.reshape(m, k // (8 * cw), 8, cw).transpose(2, 3).reshape(m, k).contiguous()


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
# Tile kernel: (max M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by token count; BLOCK_N
# is capped by the slot boundaries of merged layers. Decode kernel: (BLOCK_N, BLOCK_W words,
# num_warps). From the H100 sweeps recorded in benchmarks/kernels/README.md.
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

_CONFIGS = [
    (16, 16, 128, 128, 4, 3),
    (32, 32, 64, 128, 8, 3),
    (1 << 62, 64, 128, 128, 4, 3),
]
_MIN_PROGRAMS = 264  # two per SM on an H100: below that, narrower tiles


def pick_config(m: int, n: int, max_block_n: int = 256, group_size: int = 128):
    for max_m, bm, bn, bk, warps, stages in _CONFIGS:
        if m <= max_m:
            break
    bn = min(bn, max_block_n)
    while bn > 16 and triton.cdiv(m, bm) * triton.cdiv(n, bn) < _MIN_PROGRAMS:
        bn //= 2
    return bm, bn, max(bk, group_size), warps, stages


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
    kernel, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the tile kernel."""
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
        config = pick_gemv_config(m, n) if m <= GEMV_MAX_M else pick_config(m, n, max_bn, group_size)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if has_lr:
        ws = lowrank_down(x, down)
        num_splits = ws.shape[0]
    else:
        ws, num_splits = x, 0
    xk = x if len(config) == 4 else permute_x(x, group_size)  # column order the kernel unpacks in
    common = (
        xk, qweight, scales, up if has_lr else x, ws, bias if bias is not None else x, out,
    )
    strides = (
        xk.stride(0), qweight.stride(0), scales.stride(0), up.stride(0) if has_lr else 0,
        ws.stride(0) if has_lr else 0, ws.stride(1) if has_lr else 0, out.stride(0),
    )
    br = max(16, _next_pow2(r)) if has_lr else 16
    if len(config) == 4:
        bm, bn, bw, warps = config
        bn = min(bn, max_bn) if slot_bounds else bn
        _tq_gemv_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            *common, m, n, k, r, b1, b2, num_splits, *strides,
            GROUP=group_size, CHUNK_W=chunk_words(group_size), HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, BLOCK_R=br, num_warps=warps,
        )
        return out
    bm, bn, bk, warps, stages = config
    _tq_gemm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        *common, m, n, k, r, b1, b2, num_splits, *strides,
        GROUP=group_size, HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
        GROUP_M=8, UPCAST=_INTERPRETED, num_warps=warps, num_stages=stages,
    )
    return out


@triton.jit
def _dequant_kernel(qw_ptr, sc_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, NATURAL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """deq(R) in word order (column 8l + j holds nibble j of word l: the columns of
    `permute_x`; a chunk never straddles a group, so word l's scale is group 8l // G), or with
    NATURAL the chunks transposed back in registers to the checkpoint's column order."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_g = pid_k * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    nm = offs_n < N
    p = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_p[None, :], mask=nm[:, None] & (offs_p[None, :] < K // 8), other=0)
    s = tl.load(sc_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=nm[:, None] & (offs_g[None, :] < K // GROUP), other=0.0)
    q = ((p[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF) - 8
    q = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP))
    w = tl.reshape(q * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K)).to(w_ptr.dtype.element_ty)
    if NATURAL:
        w = tl.reshape(w, (BLOCK_N, BLOCK_K // (8 * CHUNK_W), CHUNK_W, 8))
        w = tl.reshape(tl.permute(w, (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w, mask=nm[:, None] & (offs_k[None, :] < K))


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None, natural: bool = True) -> torch.Tensor:
    """deq(R) [N, K] from `repack`ed codes, written into `out[:, :K]` (a new tensor if None), in
    the checkpoint's column order, or with natural=False in `permute_x` order
    (x @ deq(R)^T == permute_x(x) @ dequantize(..., natural=False)^T)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty((n, k), dtype=dtype, device=qweight.device) if out is None else out
    bn, bk = 64, max(128, group_size)
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, w, n, k, qweight.stride(0), scales.stride(0), w.stride(0),
        GROUP=group_size, CHUNK_W=chunk_words(group_size), NATURAL=natural, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=4,
    )
    return w


# Above this many tokens the problem is compute-bound and one transient dense copy of the layer
# fed to cuBLAS beats dequantizing inside every tile (measured: benchmarks/kernels/README.md).
LARGE_M_THRESHOLD = 64


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
    thr = LARGE_M_THRESHOLD if large_m_threshold is None else large_m_threshold
    if m <= thr:
        return tq_gemm(x, qweight, scales, group_size, down, up, bias, slot_bounds)
    n = qweight.shape[0]
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
