"""The low-rank down projection t = x @ D^T for every slot of a (possibly merged) layer at once.

Split over K into a small fp32 workspace [S, M, slots * R] (or, `reduce`, every K-slice adds
into one zeroed slice with fp32 atomics): the residual kernels read t in their epilogue. Why two
launches rather than computing t inside every residual program: t needs the whole K reduction
before the up projection, so a single launch must either re-read all of D in every output tile
(several times the residual's own bytes at decode tile widths) or synchronise the grid. The
rank-r intermediate (M x slots * R fp32, a few KB) goes through L2 instead. On sm_90 the two
overlap (programmatic dependent launch): this kernel lets the residual kernel start (TRIGGER),
and that one waits for t only in its epilogue, after its main loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from csrc_triton.layout import check_factor, next_pow2
from csrc_triton.triton_common import INTERPRETED, dot, operand


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
        acc += dot(x, tl.trans(operand(d, x_ptr.dtype.element_ty, UPCAST)), UPCAST)
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


def lowrank_down(x: torch.Tensor, down: torch.Tensor, num_splits: int | None = None,
                 reduce: bool = False, down_scale: torch.Tensor | None = None, trigger: int = 0,
                 block_r: int | None = None) -> torch.Tensor:
    """Workspace [S, M, RT] fp32 whose sum over S is x @ down^T (int8 `down`: x @ (down *
    down_scale[:, None])^T, down_scale fp32 [RT]). With `reduce` the K-slices add
    into one zeroed slice (S = 1, fp32 atomics): every output tile of the main kernel then
    reads t once instead of once per slice, which is what matters from a few dozen tokens on
    (one extra memset launch, so decode keeps the per-slice workspace). `trigger` (1 or 2): the
    next launch, the residual kernel, is launched with PDL (`pdl_usable`), may start once this
    kernel's programs have all started (1) or finished their loads (2), and waits for t itself
    (`csrc_triton.dispatch.pdl_trigger`). block_r: rows of D per program (16..64, a power of two; default
    up to 64): fewer rows give more programs, each reading fewer bytes, with the same workspace."""
    m, k = x.shape
    rt = down.shape[0]
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    br = min(64, max(16, next_pow2(rt))) if block_r is None else block_r
    if br not in (16, 32, 64):
        raise ValueError(f"lowrank_down: block_r {br}; expected 16, 32 or 64")
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
    check_factor(down, down_scale, rt, "down")
    _lowrank_down_kernel[grid](
        x, down, down_scale if down_scale is not None else x, ws, m, k, rt, k_per_split,
        x.stride(0), down.stride(0), 0 if atomic else ws.stride(0), ws.stride(1),
        BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, ATOMIC=atomic, HAS_DS=down_scale is not None,
        UPCAST=INTERPRETED, TRIGGER=trigger, num_warps=4, num_stages=3,
    )
    return ws

