"""Triton kernels for the TwinQuant dual-component linear layer (W4A16).

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias

They read the checkpoint's tensors as stored (codes int32 [N, K/8], scales [N, K/G],
D [slots*R, K], U [N, R]); nothing is repacked or re-quantized at load.

* ``lowrank_down``: t = x @ D^T for every slot of a (possibly merged) layer at once, split
  over K into a small fp32 workspace [S, M, slots*R]; it reads x and D once.
* ``tq_gemm``: the residual product with the low-rank up projection, bias and store in one
  epilogue. Decode (M <= GEMV_MAX_M) uses a one-row-per-program kernel that streams whole
  int32 words; larger M a tensor-core tile kernel that dequantizes tiles in registers.
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
    """Tensor-core tile kernel (M > GEMV_MAX_M): acc[BM, BN] += x[BM, BK] @ deq(R)[BN, BK]^T."""
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
def _tq_gemv_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, ws_ptr, bias_ptr, y_ptr,
    N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Decode kernel (M <= GEMV_MAX_M): one token row per program, BLOCK_N output rows; each
    thread streams whole int32 words of codes (vectorized along K) and reduces in fp32,
    applying a word's group scale after its 8-code partial dot."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    nib = tl.arange(0, 8)
    kw = K // 8
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, kw, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_mask = offs_w < kw
        p = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :],
                    mask=n_mask[:, None] & w_mask[None, :], other=0)
        s = tl.load(sc_ptr + offs_n[:, None] * stride_sn + (offs_w * 8 // GROUP)[None, :],
                    mask=n_mask[:, None] & w_mask[None, :], other=0.0)
        xv = tl.load(x_ptr + m * stride_xm + offs_w[:, None] * 8 + nib[None, :],
                     mask=w_mask[:, None], other=0.0).to(tl.float32)  # [BW, 8]
        q = ((p[:, :, None] >> (nib * 4)[None, None, :]) & 0xF) - 8  # [BN, BW, 8]
        acc += tl.sum(q.to(tl.float32) * xv[None, :, :], axis=2) * s.to(tl.float32)
    y = tl.sum(acc, axis=1)
    if HAS_LOWRANK:
        n0 = pid_n * BLOCK_N
        slot = (n0 >= SLOT_B1).to(tl.int32) + (n0 >= SLOT_B2).to(tl.int32)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
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
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


# -- launch configuration ---------------------------------------------------------------------
# Tile kernel: (max M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by token count; BLOCK_N
# is capped by the slot boundaries of merged layers. Decode kernel: (BLOCK_N, BLOCK_W words,
# num_warps). From the H100 sweeps recorded in benchmarks/kernels/README.md.
GEMV_MAX_M = 1
GEMV_CONFIG = (8, 128, 4)
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

    qweight int32 [N, K/8] and scales [N, K/G] exactly as the checkpoint stores them;
    down [slots*R, K] and up [N, R] in x's dtype (None for rank 0). slot_bounds: first
    output row of slots 1 and 2 of a merged layer (empty for a plain layer). `config`
    overrides the launch configuration (a 3-tuple selects the decode kernel)."""
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
        config = GEMV_CONFIG if m <= GEMV_MAX_M else pick_config(m, n, max_bn, group_size)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if has_lr:
        ws = lowrank_down(x, down)
        num_splits = ws.shape[0]
    else:
        ws, num_splits = x, 0
    common = (
        x, qweight, scales, up if has_lr else x, ws, bias if bias is not None else x, out,
    )
    strides = (
        x.stride(0), qweight.stride(0), scales.stride(0), up.stride(0) if has_lr else 0,
        ws.stride(0) if has_lr else 0, ws.stride(1) if has_lr else 0, out.stride(0),
    )
    br = max(16, _next_pow2(r)) if has_lr else 16
    if len(config) == 3:
        bn, bw, warps = config
        bn = min(bn, max_bn) if slot_bounds else bn
        _tq_gemv_kernel[(triton.cdiv(n, bn), m)](
            *common, n, k, r, b1, b2, num_splits, *strides,
            GROUP=group_size, HAS_LOWRANK=has_lr, HAS_BIAS=bias is not None,
            BLOCK_N=bn, BLOCK_W=bw, BLOCK_R=br, num_warps=warps,
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
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w, mask=nm[:, None] & (offs_k[None, :] < K))


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """deq(R) [N, K] written into `out[:, :K]` (a new tensor if None)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty((n, k), dtype=dtype, device=qweight.device) if out is None else out
    bn, bk = 64, max(128, group_size)
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, w, n, k, qweight.stride(0), scales.stride(0), w.stride(0),
        GROUP=group_size, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
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
