"""W4A8: the residual product on 8-bit tensor cores, for layers whose checkpoint declares 8-bit
activations (format: `activation_bits: 8`; `activation_type: float` is FP8 e4m3, `int` is INT8).

    y[m, n] = s_x[m] * sum_g s_w[n, g] * (xq[m, group g] . (c[n, group g] - 8)) + t[m] . U[n] + bias[n]

Two launches after the low-rank down projection (which reads x unquantized, as in W4A16):
`quantize_rows` makes the per-token codes xq and scales s_x of `format.per_token_codes`, bit for
bit, then `_w4a8_kernel` runs the product. A step of its main loop is one scale group, whose
MMAs start from zero: FP8 turns the stored codes c into q = c - 8 (integers -8..7, exact in e4m3)
and gets an fp32 result, so Hopper's reduced-precision FP8 accumulation spans one group only;
INT8 multiplies the codes c (0..15) as they are, exactly in int32, and subtracts 8 times the
group's sum of activation codes (from `quantize_rows`). The step's result is multiplied by the
group's scales and added into the fp32 accumulator, as block-scaled FP8 GEMMs promote their
partial sums. The epilogue multiplies by s_x and adds the low-rank term and the bias. Split over
K where the grid is small (fp32 atomics into a zeroed y).

Below the table's first M the plan gives a W4A8 layer to the W4A16 kernels with x unquantized
(`dispatch.plan`): decoding is bandwidth-bound, and there the 16-bit product is the faster one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from csrc_triton.kernels import base
from csrc_triton.kernels.base import Kernel, Launch, LayerShape
from csrc_triton.layout import chunk_words, next_pow2
from csrc_triton.triton_common import INTERPRETED, dot_acc, operand, pdl_wait, slot_of, tile_of

# the residual product's input precision -> its codes' storage; "int4" (W4A4): codes within +-7, exact in int8, on
# the INT8 kernels (their tables' rows are int8's: the same instructions)
ACT_QUANTS = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.int8}
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (8, 0), "int4": (8, 0)}
CODE_MAX = {"int8": 127.0, "int4": 7.0}  # symmetric integer codes: format.per_token_codes's qmax
# Activation precisions whose kernels have been compiled and checked on a GPU (benchmarks/kernels/run_w4a8.sh; int4:
# tune.py sweep-w4a8 --act-quant int4); others run in the interpreter and compile for sm_90 here, unplanned on a GPU.
CHECKED_ON_GPU = ("fp8", "int8", "int4")
FP8_E4M3_MAX = 448.0
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: x + M - M rounds |x| < 2^22 to the nearest integer, ties to even
# M's bits: an int32 v with |v| <= 2^22 added to them reads as the float M + v exactly, so (v + bits) as float - M
# converts v with an integer add and a float subtract instead of I2F ("bias" conversion; a group's sums are
# below 2^22: 8 * 127 * 128 here, 128 * 127 * 128 in w4a8_rs)
ROUND_MAGIC_BITS = 0x4B400000
_MAGIC_BITS = tl.constexpr(ROUND_MAGIC_BITS)
_MAGIC = tl.constexpr(ROUND_MAGIC)
CONVERTS = ("cvt", "bias")  # int32 group sums -> fp32: cvt.rn.f32.s32, or the bias conversion above


def check_here(act_quant: str) -> bool:
    """For the scripts that check a precision's codes on a GPU (tune.py sweep-w4a8, cuda_plugin_check.py): this
    process's plan takes them as if checked. True if they were not in CHECKED_ON_GPU before."""
    global CHECKED_ON_GPU
    if act_quant in CHECKED_ON_GPU:
        return False
    CHECKED_ON_GPU = (*CHECKED_ON_GPU, act_quant)
    return True


def table_key(act_quant: str) -> str:
    """The launch-table rows a precision's layers use: int4 codes run int8's instructions."""
    return "int8" if act_quant == "int4" else act_quant


@dataclass(frozen=True)
class W4a8Config:
    block_m: int
    block_n: int
    warps: int
    stages: int
    split_k: int = 1
    block_k: int = 128  # columns unpacked per MMA: the group in pieces of this (capped at the group)
    # the codes first made 8-bit for the whole layer (a transient [N, K] copy), then read as is; a layer whose copy
    # would exceed base.TRANSIENT_BYTES reads its 4-bit codes instead (the same products)
    dense: bool = False
    convert: str = "cvt"  # integer codes: how a group's int32 sums become fp32 (CONVERTS)


def device_supports(act_quant: str, capability: tuple[int, int] | None) -> tuple[bool, str | None]:
    """Whether a GPU of this compute capability has the tensor cores of `act_quant`."""
    if act_quant not in ACT_QUANTS:
        return False, f"activations {act_quant!r}: the W4A8 kernel takes {sorted(ACT_QUANTS)}"
    need = MIN_CAPABILITY[act_quant]
    if act_quant not in CHECKED_ON_GPU:
        return False, f"{act_quant} activation codes on the W4A8 kernels have not been checked on a GPU yet"
    if capability is None or tuple(capability) < need:
        cap = "no GPU" if capability is None else f"sm_{capability[0]}{capability[1]}"
        return False, (f"{act_quant} activations need {act_quant.upper()} tensor cores (sm_{need[0]}{need[1]}+); "
                       f"this device is {cap}")
    return True, None


@triton.jit
def _e4m3_grid(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, in exact fp32 arithmetic
    (scaling by powers of two, the round-to-integer of fp32 addition). The cast of the result to e4m3
    is then exact whichever way the compiler converts (a conversion through fp16 rounds twice), and
    the interpreter's own cast, which misrounds where the mantissa carries into the exponent
    (125.1 -> 64), never rounds."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3  # e4m3 step 2^e, subnormal < 2^-6
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return ((v * inv + _MAGIC) - _MAGIC) * step


@triton.jit
def _quantize_rows_kernel(x_ptr, xq_ptr, xs_ptr, xsum_ptr, K, clip, stride_xm, stride_qm, stride_sm,
                          BLOCK_K: tl.constexpr, GROUP: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr,
                          XSUM: tl.constexpr, MMA_ORDER: tl.constexpr):
    """One token per program, its whole row at once (BLOCK_K >= K): its scale s = max(clip * max|x| / QMAX,
    1e-12) (xs_ptr; each operation rounded as format.per_token_codes's float32 ones), then codes e4m3(x / s)
    or round_half_even(x / s) clamped to +-QMAX, the division correctly rounded; XSUM (integer codes): also
    the sum of the codes of every GROUP columns (xsum, int32), for the kernel's -8 term. MMA_ORDER: the
    codes stored in the column order of w4a8_rs (`w4a8_rs.perm_columns`: column 16 i + 8 b + 2 t + h of a
    64-column chunk at 32 b + 16 h + 4 t + i)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)  # exact (a maximum of values)
    s = tl.maximum(tl.div_rn(amax * clip, QMAX), 1e-12)
    tl.store(xs_ptr + row, s)
    v = tl.div_rn(x, tl.zeros_like(x) + s)
    if FP8:
        q = _e4m3_grid(v).to(tl.float8e4nv)
    else:
        v = tl.minimum(tl.maximum((v + _MAGIC) - _MAGIC, -QMAX), QMAX)
        q = v.to(tl.int8)
        if XSUM:
            sums = tl.sum(tl.reshape(v.to(tl.int32), (BLOCK_K // GROUP, GROUP)), axis=1)
            g = tl.arange(0, BLOCK_K // GROUP)
            tl.store(xsum_ptr + row * stride_sm + g, sums, mask=g < K // GROUP)
    dest = offs
    if MMA_ORDER:
        c = offs % 64
        dest = offs - c + 32 * ((c // 8) % 2) + 16 * (c % 2) + 4 * ((c // 2) % 4) + c // 16
    tl.store(xq_ptr + row * stride_qm + dest, q, mask=mask)


def quantize_rows(x: torch.Tensor, act_quant: str, group_size: int = 128, mma_order: bool = False,
                  clip_ratio: float = 1.0):
    """x [M, K] (fp16/bf16/fp32) -> (codes [M, K] e4m3 or int8, scales [M] fp32, and for integer codes
    the codes' sums over every group_size columns [M, K / group_size] int32, else None), as
    format.per_token_codes: "int4" codes within +-7 at scale clip_ratio * max|x| / 7 (W4A4). mma_order
    (integer codes): in w4a8_rs's column order (`w4a8_rs.perm_columns`), without the sums."""
    m, k = x.shape
    fp8 = act_quant == "fp8"
    if mma_order and (fp8 or k % 64):
        raise ValueError(f"mma_order takes integer codes of rows a multiple of 64 wide (got {act_quant}, K = {k})")
    if clip_ratio != 1.0 and act_quant != "int4":
        raise ValueError(f"clip_ratio {clip_ratio} clips 4-bit activation codes only (got {act_quant})")
    xq = torch.empty((m, k), dtype=ACT_QUANTS[act_quant], device=x.device)
    # the scale as format.per_token_codes computes it, made in the kernel from the row it holds (one launch)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    xsum = None if fp8 or mma_order else torch.empty((m, k // group_size), dtype=torch.int32, device=x.device)
    bk = max(group_size, next_pow2(k))
    _quantize_rows_kernel[(m,)](x, xq, xs, xs if xsum is None else xsum, k, float(clip_ratio), x.stride(0),
                                xq.stride(0), 0 if xsum is None else xsum.stride(0), BLOCK_K=bk, GROUP=group_size,
                                FP8=fp8, QMAX=FP8_E4M3_MAX if fp8 else CODE_MAX[act_quant], XSUM=xsum is not None,
                                MMA_ORDER=mma_order, num_warps=max(4, min(16, bk // 1024)))
    return xq, xs, xsum


@triton.jit
def _unpacked(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_W: tl.constexpr, FP8: tl.constexpr):
    """Words [BLOCK_N, BLOCK_K / 8] of the `repack` layout -> their codes in natural column order,
    spread by a broadcast and a reshape (nibble j of word l of chunk c is column c*C + j*CHUNK_W + l):
    FP8: q = c - 8 in e4m3 (c under fp16's exponent of 1024 is the float 1024 + c, exactly); INT8:
    c (0..15) as it is."""
    CHUNK: tl.constexpr = 8 * CHUNK_W
    p = tl.reshape(p, (BLOCK_N, BLOCK_K // CHUNK, 1, CHUNK_W))
    p = (p >> (tl.arange(0, 8) * 4)[None, None, :, None]) & 0xF
    c = tl.reshape(p, (BLOCK_N, BLOCK_K))
    if FP8:
        w = ((c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0).to(tl.float8e4nv)
    else:
        w = c.to(tl.int8)
    return w


@triton.jit
def _codes_to_8bit_kernel(qw_ptr, out_ptr, N, stride_qn, stride_on, CHUNK_W: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    p = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
                mask=offs_n[:, None] < N, other=0)
    tl.store(out_ptr + offs_n[:, None] * stride_on + (k0 + tl.arange(0, BLOCK_K))[None, :],
             _unpacked(p, BLOCK_N, BLOCK_K, CHUNK_W, FP8), mask=offs_n[:, None] < N)


def codes_to_8bit(qweight: torch.Tensor, group_size: int, act_quant: str) -> torch.Tensor:
    """The layer's codes (`repack` layout) as the W4A8 kernel's 8-bit operand [N, K] in natural column
    order: e4m3 of q = c - 8 (FP8), or c itself (INT8)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty((n, k), dtype=ACT_QUANTS[act_quant], device=qweight.device)
    _codes_to_8bit_kernel[(triton.cdiv(n, 64), k // group_size)](
        qweight, out, n, qweight.stride(0), out.stride(0), CHUNK_W=chunk_words(group_size), BLOCK_N=64,
        BLOCK_K=group_size, FP8=act_quant == "fp8", num_warps=4)
    return out


@triton.jit
def _w4a8_kernel(
    x_ptr, xq_ptr, xs_ptr, xsum_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, k_per_split,
    stride_xm, stride_sm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: tl.constexpr, CHUNK_W: tl.constexpr, FP8: tl.constexpr, DENSE: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_US: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    BIAS_CVT: tl.constexpr,
):
    """y[BM, BN] = s_x * sum over groups of s_w * (xq . (c - 8)) + t U^T + bias (module docstring).
    The words of a group are loaded once and their nibbles spread over the columns of their chunk
    (`repack` layout) by a broadcast and a reshape, as the tile kernel's MODE 7 does; DENSE: qw_ptr
    is the layer's 8-bit copy [N, K] (`codes_to_8bit`), read as it is. x_ptr (the unquantized
    input) gives the activation dtype of the low-rank product; it is not read."""
    pid_m, pid_n = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    act = x_ptr.dtype.element_ty
    WORDS: tl.constexpr = BLOCK_K // 8
    q_rows = qw_ptr + offs_n[:, None] * stride_qn
    x_rows = xq_ptr + offs_m[:, None] * stride_xm
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, GROUP):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):  # the group in BLOCK_K-column pieces, one MMA chain
            xk = tl.load(x_rows + (k0 + kk + tl.arange(0, BLOCK_K))[None, :], mask=m_mask[:, None], other=0.0)
            if DENSE:
                w = tl.load(q_rows + (k0 + kk + tl.arange(0, BLOCK_K))[None, :], mask=n_mask[:, None], other=0.0)
            else:
                w = _unpacked(tl.load(q_rows + ((k0 + kk) // 8 + tl.arange(0, WORDS))[None, :], mask=n_mask[:, None],
                                      other=0), BLOCK_N, BLOCK_K, CHUNK_W, FP8)
            part = tl.dot(xk, tl.trans(w), part, out_dtype=tl.float32 if FP8 else tl.int32)
        if not FP8:
            part -= 8 * tl.load(xsum_ptr + offs_m * stride_sm + k0 // GROUP, mask=m_mask, other=0)[:, None]
        s = tl.load(sc_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        if BIAS_CVT and not FP8:
            acc += ((part + _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC) * s[None, :]
        else:
            acc += part.to(tl.float32) * s[None, :]
    acc *= tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]

    if pid_k == 0:
        if HAS_LOWRANK:
            slot = slot_of(pid_n * BLOCK_N, SLOT_B1, SLOT_B2)
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            pdl_wait(PDL)
            for sp in range(0, NUM_SPLITS):
                t += tl.load(ws_ptr + sp * stride_ws_s + offs_m[:, None] * stride_ws_m + slot * R + offs_r[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0)
            if HAS_US:  # int8 U: scaled and rounded to the activation dtype, as a float factor is stored
                u = u.to(tl.float32) * tl.load(us_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
            acc = dot_acc(t.to(act), tl.trans(operand(u, act, UPCAST)), acc, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


class W4a8Kernel(Kernel):
    """The W4A8 product for layers with 8-bit activation codes (`LayerShape.act_quant` fp8/int8, and int4:
    W4A4's codes)."""

    name = "w4a8"

    def can_implement(self, shape: LayerShape, device) -> tuple[bool, str | None]:
        why = self.disabled()
        if why:
            return False, why
        if shape.act_quant not in ACT_QUANTS:
            return False, "the layer's activations are not 8-bit (W4A16 checkpoint)"
        if not device.interpreted:
            ok, why = device_supports(shape.act_quant, device.capability if device.cuda else None)
            if not ok:
                return False, why
        if shape.dtype not in (torch.float16, torch.bfloat16):
            return False, f"activations in {shape.dtype}; the kernel takes fp16/bf16"
        return True, None

    def choose(self, m: int, shape: LayerShape, tables) -> W4a8Config | None:
        cfg = tables.w4a8[table_key(shape.act_quant)].lookup(m, shape.n, shape.k)
        if cfg is not None and cfg.dense and shape.n * shape.k > base.TRANSIENT_BYTES:
            cfg = replace(cfg, dense=False)  # the plan names what runs: no 8-bit copy over the cap
        return cfg

    def launch(self, a: Launch, cfg: W4a8Config) -> None:
        m, n, k, group = a.m, a.n, a.k, a.group_size
        bn = min(cfg.block_n, a.max_block_n)  # a tile never straddles two slots
        if bn < 16:
            raise ValueError(f"slot bounds allow output tiles of {a.max_block_n} rows; the W4A8 kernel needs 16")
        if cfg.convert not in CONVERTS:
            raise ValueError(f"W4a8Config.convert {cfg.convert!r}: expected one of {CONVERTS}")
        bk = min(cfg.block_k, group)
        if group % bk or bk % (8 * chunk_words(group)) or bk < 32:
            raise ValueError(f"block_k {bk} must divide the group size {group}, span whole "
                             f"{8 * chunk_words(group)}-column chunks and be at least 32 (the 8-bit MMA's K)")
        xq, xs, xsum = quantize_rows(a.x, a.act_quant, group, clip_ratio=a.act_clip)
        dense = cfg.dense and n * k <= base.TRANSIENT_BYTES
        qw = codes_to_8bit(a.qweight, group, a.act_quant) if dense else a.qweight
        k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), group) * group
        split = triton.cdiv(k, k_per_split)
        y = a.out if split == 1 else torch.zeros((m, n), dtype=torch.float32, device=a.x.device)
        br = max(16, next_pow2(a.rank)) if a.has_lr else 16
        ws, num_splits = a.make_t()
        _, _, sc, up, us, ws_arg, bias = a.operands(ws)
        _w4a8_kernel[(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, bn), split)](
            a.x, xq, xs, xs if xsum is None else xsum, qw, sc, up, us, ws_arg, bias, y, m, n, k, a.rank, a.slot_b1,
            a.slot_b2, num_splits, k_per_split, xq.stride(0), 0 if xsum is None else xsum.stride(0),
            qw.stride(0), *a.strides(ws)[2:], y.stride(0), GROUP=group, CHUNK_W=chunk_words(group),
            FP8=a.act_quant == "fp8", DENSE=dense, HAS_LOWRANK=a.has_lr, HAS_US=a.has_us,
            HAS_BIAS=a.bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8, SPLIT_K=split, UPCAST=INTERPRETED,
            PDL=a.pdl, BIAS_CVT=cfg.convert == "bias", num_warps=cfg.warps, num_stages=cfg.stages, launch_pdl=a.pdl,
        )
        if split > 1:
            a.out.copy_(y)


KERNEL = W4a8Kernel()
