"""W4A8-INT8 on Hopper, in Gluon: the 4-bit codes as int8 straight into wgmma's register operand,
and each scale group's exact int32 sums promoted into fp32 with the group scales.

    y = s_x * sum_g (s_w[:, g] / 16) * ((16 q_g) @ xq_g^T) + (x @ D^T) @ U^T + bias

The product is swapped as in wgmma_rs: acc^T [BN, TOK] = w [BN, K] @ xq^T, the weights on wgmma's
M side (64 rows per warpgroup) as the register operand, the tokens' INT8 codes read by wgmma from
shared memory. A code c (0..15) becomes the int8 16 q = 16 (c - 8) with one LOP3 per four codes:
the nibble in the high half of a byte, its top bit flipped, is q's two's complement times 16.
Products 16 q xq summed over a group stay within int32 exactly, so the group scale (divided by 16,
a power of two) applies to exact sums, as block-scaled GEMMs promote theirs.

A fragment register holds four consecutive columns of the MMA's K; the four bytes one LOP3 makes
come from the even (or odd) nibbles of one word, which the `repack` layout gives columns 16 apart.
Rather than shuffle registers, the MMA runs over the columns of each 64-column chunk in the order
`perm_columns` gives (a permutation of K changes no dot product) and `quantize_rows` writes the
activation codes in that order. Step = one group (64 or 128 columns): its wgmma starts from zero
into an int32 accumulator and, while it runs, the next group's fragment is made; its sums are
scaled into the fp32 accumulator after it retires, or (`overlap`: two int32 accumulators, more
registers) while the next group's wgmma runs. x's codes and the words arrive through
one STAGES-deep cp.async ring. The epilogue multiplies by the token scales, adds t U^T (t from
`lowrank_down`, bf16 as in W4A16) and the bias.

Only compiled for sm_90 (Gluon has no CPU interpreter): CI compiles it for sm_90 without a GPU and
checks its byte arithmetic and column order in torch; on the GPU every config the sweep times is first
checked against the float reference of the W4A8 numerics (benchmarks/kernels/tune.py sweep-w4a8), and
the plan takes it only where the device's table, written from that sweep, names a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from csrc_triton.gluon_common import cp_async, cta_barrier, hopper_refusal, lowrank_operands, register_smem_mma
from csrc_triton.kernels.base import Device, Kernel, Launch, LayerShape
from csrc_triton.kernels.w4a8 import CONVERTS, ROUND_MAGIC, ROUND_MAGIC_BITS, quantize_rows
from csrc_triton.layout import next_pow2

MEASURED_TRITON = ("3.6",)  # Triton versions it was written and measured with


@dataclass(frozen=True)
class W4a8RsConfig:
    tokens: int  # per program: wgmma's N side, 64, 128 or 256
    warps: int  # 4 or 8 (one or two warpgroups): 16 * warps weight rows per program
    stages: int  # depth of the cp.async ring, >= 3
    overlap: bool = True  # two int32 accumulators, a group promoted beside the next one's wgmma (else after its own)
    convert: str = "cvt"  # int32 -> fp32 of a group's sums: "cvt" (cvt.rn.f32.s32) or "bias" (w4a8.CONVERTS)


# |a group's sum| <= 128 (16 q) * 127 (xq) * 128 (columns) < 2^21: the "bias" conversion of w4a8.ROUND_MAGIC_BITS
# (an integer add and one float subtract, two full-rate instructions where cvt.rn.f32.s32 issues on the slower
# conversion pipe) is exact for it
BIAS_BITS = gl.constexpr(ROUND_MAGIC_BITS)
BIAS_VALUE = gl.constexpr(ROUND_MAGIC)
BIAS_EXACT_BELOW = 2**22


def perm_columns(k: int) -> torch.Tensor:
    """The column order the kernel's MMA runs over: position f of each 64-column chunk holds column
    16 i + 8 b + 2 t + h of the chunk, for f = 32 b + 16 h + 4 t + i (b, h < 2; t, i < 4): register
    (b, h) of lane t holds the even (b = 0) or odd nibbles of word 2 t + h (`repack` puts column
    8 j + l in nibble j of word l), byte i being nibble 2 i + b."""
    f = torch.arange(64)
    b, h, t, i = f // 32, (f // 16) % 2, (f // 4) % 4, f % 4
    within = 16 * i + 8 * b + 2 * t + h
    return (torch.arange(0, k, 64)[:, None] + within[None, :]).reshape(-1)


# Four codes of a word's even (odd) nibbles -> four int8 16 q in one register: the nibble moved into
# the high half of its byte (even nibbles: a shift by 4, odd: by 0), the rest masked, the top bit
# flipped. $0 out; $1 the word, $2 the shift.
_INT8X16_PTX = gl.constexpr("""
{
.reg .b32 t;
shl.b32 t, $1, $2;
lop3.b32 $0, t, 0xF0F0F0F0, 0x80808080, 0x6A;
}
""")


@gluon.jit
def fragment_view(BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """A zero tensor [BN, CH, 2 (b), 2 (h), 4 (t), 4 (i)]: A's 8-bit fragment [BN, BK] seen by
    position 64 c + 32 b + 16 h + 4 t + i (its layout is A's, reshaped)."""
    return gl.full([BN, BK], 0, gl.int32, A_L).reshape([BN, BK // 64, 2, 2, 4, 4])


@gluon.jit
def _word_offsets(off_n, N, stride_qn, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """Offsets [BN, CH, 2 (h), 4 (t)] (int32, in words) of word 8 c + 2 t + h of rows off_n + n (rows
    past N read row N - 1, never stored), for the step at word 0, in the layout of `fragment_view`
    without its dimensions b and i: a lane loads the words its own fragment needs."""
    W_L: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(5, fragment_view(BN, BK, A_L).type.layout))
    CH: gl.constexpr = BK // 64
    n4 = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, W_L))))
    c4 = gl.arange(0, CH, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, W_L))))
    h4 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, W_L))))
    t4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, W_L))))
    rows = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.minimum(off_n + n4, N - 1), 1), 2), 3)
    word = (gl.expand_dims(gl.expand_dims(gl.expand_dims(c4 * 8, 0), 2), 3)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(h4, 0), 1), 3)
            + gl.expand_dims(gl.expand_dims(gl.expand_dims(t4 * 2, 0), 1), 2))
    return rows * stride_qn + word


@gluon.jit
def int8_fragment(p, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """Words [BN, CH, 2, 4] (`_word_offsets`' layout) -> the registers of the int8 A fragment of 16 q,
    [BN, CH, 2 (b), 2 (h), 4 (t)] int32 in `perm_columns` order: byte i of register (b, h) of lane t
    is nibble 2 i + b of word 2 t + h. Kept as int32 (what the loop carries; `int8_operand` views it as
    the fragment). Not pure: it stays ahead of the wgmma wait."""
    R_L: gl.constexpr = gl.SliceLayout(5, fragment_view(BN, BK, A_L).type.layout)
    f = gl.full([BN, BK // 64, 2, 2, 4], 0, gl.int32, R_L)
    p = gl.broadcast(gl.expand_dims(p, 2), f)[0]
    b = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, R_L)))))
    shift = gl.broadcast(gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(4 - 4 * b, 0), 1), 3), 4),
                         f)[0]
    return gl.inline_asm_elementwise(_INT8X16_PTX, "=r,r,r", [p, shift], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def int8_operand(w, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """The fragment registers of `int8_fragment` as the int8 tensor [BN, BK] in layout A_L that wgmma
    takes: each register's four bytes are the four consecutive elements of one pack (a move that
    ptxas drops); the compiler proves that no data moves between lanes."""
    w = gl.broadcast(gl.expand_dims(w, 5), fragment_view(BN, BK, A_L))[0]
    w = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [w], dtype=gl.int8, is_pure=True, pack=4)
    return gl.convert_layout(w.reshape([BN, BK]), A_L, assert_trivial=True)


# A store of the register that never runs (there is always an SM): after the wait, it keeps the
# fragment's registers live until the wgmma that reads them has retired, so ptxas makes the next
# fragment in other registers while that wgmma runs instead of waiting for it first. ($0 unused.)
_HOLD_PTX = gl.constexpr("""
{
.reg .pred p;
.reg .b32 n;
mov.u32 n, %nsmid;
setp.eq.u32 p, n, 0;
@p st.shared.b32 [n], $1;
}
""")


@gluon.jit
def _hold(w):
    """Read w's registers after the wait of the wgmma that reads them (`_HOLD_PTX`)."""
    gl.inline_asm_elementwise(_HOLD_PTX, "=r,r", [w], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def promote(acc, part, s, BIAS_CVT: gl.constexpr):
    """acc + part * s / 16: a group's exact sums times its scales (one per weight row)."""
    if BIAS_CVT:
        f = (part + BIAS_BITS).to(gl.float32, bitcast=True) - BIAS_VALUE
    else:
        f = part.to(gl.float32)
    return acc + f * gl.expand_dims(s.to(gl.float32) * 0.0625, 1)


@gluon.jit
def _group_step(g, acc, part_new, part_old, w, s_old, s_cur, x_bufs, q_bufs, xq_ptr, x_offs, x_all, qw_ptr, q_offs,
                q_all, s_ptrs, n_groups, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, A_L: gl.constexpr,
                W_L: gl.constexpr, OVERLAP: gl.constexpr, BIAS_CVT: gl.constexpr):
    """Group g: its wgmma (fragment w, sums from zero into part_new) started; while it runs, group
    g + STAGES - 1's copies issued into group g - 1's slot, group g + 1's fragment made and, with
    OVERLAP, group g - 1's sums (part_old) promoted with its scales s_old; then it is retired, and
    without OVERLAP its own sums promoted. Returns (acc, group g's sums, group g + 1's fragment, the
    scales of groups g and g + 1)."""
    part_new = warpgroup_mma(int8_operand(w, BN, BK, A_L), x_bufs.index(g % STAGES).permute((1, 0)), part_new,
                             use_acc=False, is_async=True)
    s_next = gl.load(s_ptrs + gl.minimum(g + 1, n_groups - 1))
    async_copy.wait_group(STAGES - 3)  # group g + 1's x and words have landed (this thread's copies) ...
    p = q_bufs.index((g + 1) % STAGES).load(W_L)
    fence_async_shared()
    cta_barrier()  # ... everyone's; and every warpgroup has retired group g - 1's wgmma
    nxt = g + STAGES - 1
    cp_async(x_bufs.index(nxt % STAGES), xq_ptr + (x_offs + nxt * BK), mask=x_all & (nxt < n_groups))
    cp_async(q_bufs.index(nxt % STAGES), qw_ptr + (q_offs + nxt * (BK // 8)), mask=q_all & (nxt < n_groups))
    async_copy.commit_group()
    if OVERLAP:
        acc = promote(acc, part_old, s_old, BIAS_CVT)
    w_next = int8_fragment(p, BN, BK, A_L)
    # acc among the deps and the fragment's asm not pure: the promotion and the fragment stay before the wait
    part_new, acc = warpgroup_mma_wait(num_outstanding=0, deps=(part_new, acc))
    _hold(w)
    if not OVERLAP:
        acc = promote(acc, part_new, s_cur, BIAS_CVT)
    return acc, part_new, w_next, s_cur, s_next


@gluon.jit
def epilogue(acc, m0, off_n, x_ptr, xs_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, M, N, R, SLOT_B1, SLOT_B2,
             NUM_SPLITS, stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK: gl.constexpr,
             HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr, TOK: gl.constexpr, BN: gl.constexpr,
             BLOCK_R: gl.constexpr, PDL: gl.constexpr, MMA: gl.constexpr, num_warps: gl.constexpr):
    """The integer kernels' epilogue (w4a8_rs, w4a8_ws): acc^T [BN weight rows, TOK tokens] times the token scales,
    plus t U^T (on 16-bit wgmma) and the bias, stored into y [tokens, N]. x_ptr gives the low-rank dtype."""
    act: gl.constexpr = x_ptr.dtype.element_ty
    om = m0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    acc *= gl.expand_dims(gl.load(xs_ptr + om, mask=om < M, other=0.0), 0)
    if HAS_LOWRANK:  # acc^T += U [BN, BR] @ t^T, on 16-bit tensor cores
        MMA_F: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, TOK, 16])
        t, u = lowrank_operands(ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
                                stride_ws_s, stride_ws_m, stride_un, TOK, BN, BLOCK_R, HAS_US, PDL, num_warps, 0)
        acc = register_smem_mma(u.to(act), t.to(act), gl.convert_layout(acc, MMA_F, assert_trivial=True), MMA_F)
        acc = gl.convert_layout(acc, MMA, assert_trivial=True)
    om2 = gl.expand_dims(om, 0)
    on2 = gl.expand_dims(on, 1)
    if HAS_BIAS:
        acc += gl.expand_dims(gl.load(bias_ptr + on, mask=on < N, other=0.0).to(gl.float32), 1)
    gl.store(y_ptr + om2 * stride_ym + on2, acc.to(y_ptr.dtype.element_ty), mask=(om2 < M) & (on2 < N))


@gluon.jit
def _tq_w4a8_rs_kernel(
    x_ptr, xq_ptr, xs_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr,
    TOK: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, BIAS_CVT: gl.constexpr,
    PDL: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Program pid: tokens [m0, +TOK) (pid % token tiles) x weight rows [off_n, +BN) (pid // token
    tiles, BN = 16 * num_warps) over all of K (module docstring). x_ptr (the unquantized input)
    gives the dtype of the low-rank product; it is not read."""
    BK: gl.constexpr = GROUP
    BN: gl.constexpr = 16 * num_warps
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, TOK)
    m0 = (pid % tiles_m) * TOK  # the token tiles of a row tile run side by side (its codes read once from HBM)
    off_n = (pid // tiles_m) * BN
    n_groups = K // GROUP

    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, TOK, 32])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4)
    # int32 offsets, not pointers, carried through the loop (half the registers)
    q_offs = _word_offsets(off_n, N, stride_qn, BN, BK, A_L)
    W_L: gl.constexpr = q_offs.type.layout
    sn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    s_ptrs = sc_ptr + gl.minimum(sn, N - 1) * stride_sn

    X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TOK, BK], gl.int8)
    x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, TOK, BK], X_SMEM)
    CX: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BK, BK // 16], [num_warps, 1], [1, 0])
    xm = gl.arange(0, TOK, layout=gl.SliceLayout(1, CX))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, CX))
    x_offs = gl.expand_dims(gl.minimum(m0 + xm, M - 1), 1) * stride_xm + gl.expand_dims(xk, 0)
    x_all = gl.expand_dims(xm >= 0, 1) & gl.expand_dims(xk >= 0, 0)
    Q_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[3, 2, 1, 0])
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BN, BK // 64, 2, 4], Q_SMEM)
    q_all = gl.full([BN, BK // 64, 2, 4], 1, gl.int1, W_L)
    for st in gl.static_range(STAGES - 1):
        cp_async(x_bufs.index(st), xq_ptr + (x_offs + st * BK), mask=x_all & (st < n_groups))
        cp_async(q_bufs.index(st), qw_ptr + (q_offs + st * (BK // 8)), mask=q_all & (st < n_groups))
        async_copy.commit_group()

    s_old = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, MMA)).to(sc_ptr.dtype.element_ty)  # no group -1
    s_cur = gl.load(s_ptrs)
    part_a = gl.zeros([BN, TOK], gl.int32, layout=MMA)
    part_b = gl.zeros([BN, TOK], gl.int32, layout=MMA)
    acc = gl.zeros([BN, TOK], gl.float32, layout=MMA)
    async_copy.wait_group(STAGES - 2)  # group 0's x and words
    fence_async_shared()
    cta_barrier()
    w_a = int8_fragment(q_bufs.index(0).load(W_L), BN, BK, A_L)
    # two groups per iteration, their fragments in two variables (and with OVERLAP their sums): while group
    # g's wgmma runs, group g + 1's fragment is made and (OVERLAP) group g - 1's sums are promoted
    for j in range(n_groups // 2):
        acc, part_a, w_b, s_old, s_cur = _group_step(
            2 * j, acc, part_a, part_b, w_a, s_old, s_cur, x_bufs, q_bufs, xq_ptr, x_offs, x_all, qw_ptr, q_offs,
            q_all, s_ptrs, n_groups, BN, BK, STAGES, A_L, W_L, OVERLAP, BIAS_CVT)
        if OVERLAP:
            acc, part_b, w_a, s_old, s_cur = _group_step(
                2 * j + 1, acc, part_b, part_a, w_b, s_old, s_cur, x_bufs, q_bufs, xq_ptr, x_offs, x_all, qw_ptr,
                q_offs, q_all, s_ptrs, n_groups, BN, BK, STAGES, A_L, W_L, OVERLAP, BIAS_CVT)
        else:
            acc, part_a, w_a, s_old, s_cur = _group_step(
                2 * j + 1, acc, part_a, part_a, w_b, s_old, s_cur, x_bufs, q_bufs, xq_ptr, x_offs, x_all, qw_ptr,
                q_offs, q_all, s_ptrs, n_groups, BN, BK, STAGES, A_L, W_L, OVERLAP, BIAS_CVT)
    if n_groups % 2:  # the last group of an odd count
        acc, part_a, w_b, s_old, s_cur = _group_step(
            n_groups - 1, acc, part_a, part_b, w_a, s_old, s_cur, x_bufs, q_bufs, xq_ptr, x_offs, x_all, qw_ptr,
            q_offs, q_all, s_ptrs, n_groups, BN, BK, STAGES, A_L, W_L, OVERLAP, BIAS_CVT)
        if OVERLAP:
            acc = promote(acc, part_a, s_old, BIAS_CVT)
    elif OVERLAP:
        acc = promote(acc, part_b, s_old, BIAS_CVT)
    async_copy.wait_group(0)

    epilogue(acc, m0, off_n, x_ptr, xs_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, M, N, R, SLOT_B1, SLOT_B2,
             NUM_SPLITS, stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_US, HAS_BIAS, TOK, BN,
             BLOCK_R, PDL, MMA, num_warps)


def launch_check(m: int, n: int, k: int, group_size: int, cfg: W4a8RsConfig) -> None:
    """Raise ValueError where `cfg` cannot launch for this layer (what can_implement does not know)."""
    if group_size not in (64, 128) or k % group_size:
        raise ValueError(f"w4a8_rs steps over whole groups of 64 or 128 columns: group size {group_size}, K = {k}")
    if cfg.tokens not in (64, 128, 256) or cfg.warps not in (4, 8) or cfg.stages < 3 or cfg.convert not in CONVERTS:
        raise ValueError(f"w4a8_rs config {cfg}: tokens 64, 128 or 256, warps 4 or 8, stages >= 3, convert one of "
                         f"{CONVERTS}")


def constexprs(cfg: W4a8RsConfig, group_size: int, rank: int, int8_factors: bool, bias: bool, pdl: bool) -> dict:
    return dict(GROUP=group_size, HAS_LOWRANK=rank > 0, HAS_US=int8_factors, HAS_BIAS=bias, TOK=cfg.tokens,
                BLOCK_R=max(16, next_pow2(rank)) if rank else 16, STAGES=cfg.stages, OVERLAP=cfg.overlap,
                BIAS_CVT=cfg.convert == "bias", PDL=pdl)


def integer_refusal(shape: LayerShape, device: Device, measured_triton: tuple[str, ...]) -> str | None:
    """Why an integer-code Hopper kernel (w4a8_rs, w4a8_ws: 64-row warpgroup tiles over whole scale groups)
    cannot run a layer on a device, or None."""
    if shape.act_quant not in ("int8", "int4"):
        return "the layer's activation codes are not integers (INT8, or W4A4's 4-bit codes)"
    why = hopper_refusal(shape, device, measured_triton)
    if why:
        return why
    if shape.group_size not in (64, 128) or shape.k % shape.group_size:
        return f"group size {shape.group_size}: the kernel steps over whole groups of 64 or 128 columns"
    if shape.max_block_n < 64:
        return f"slot bounds allow output tiles of {shape.max_block_n} rows; the kernel's warpgroups take 64"
    return None


class IntegerCodesKernel(Kernel):
    """A Gluon kernel of layers with integer activation codes on Hopper (`LayerShape.act_quant` int8, or int4:
    W4A4's codes), written against the Triton versions `measured_triton`."""

    measured_triton: tuple[str, ...] = MEASURED_TRITON

    def can_implement(self, shape: LayerShape, device: Device) -> tuple[bool, str | None]:
        why = self.disabled() or integer_refusal(shape, device, self.measured_triton)
        return why is None, why


class W4a8RsKernel(IntegerCodesKernel):
    name = "w4a8_rs"

    def choose(self, m: int, shape: LayerShape, tables) -> W4a8RsConfig | None:
        if m * shape.k >= 2**31:  # the kernel's offsets into x's codes are int32
            return None
        cfg = tables.w4a8_rs.lookup(m, shape.n, shape.k)
        if cfg is not None and 16 * cfg.warps > shape.max_block_n:  # one warpgroup: 64 rows, inside one slot
            cfg = dataclasses.replace(cfg, warps=4)
        return cfg

    def launch(self, a: Launch, cfg: W4a8RsConfig) -> None:
        m, n, k, group = a.m, a.n, a.k, a.group_size
        launch_check(m, n, k, group, cfg)
        xq, xs, _ = quantize_rows(a.x, a.act_quant, group, mma_order=True, clip_ratio=a.act_clip)
        ws, num_splits = a.make_t()
        _, _, sc, up, us, ws_arg, bias = a.operands(ws)
        bn = 16 * cfg.warps
        _tq_w4a8_rs_kernel[(triton.cdiv(m, cfg.tokens) * triton.cdiv(n, bn),)](
            a.x, xq, xs, a.qweight, sc, up, us, ws_arg, bias, a.out, m, n, k, a.rank, a.slot_b1, a.slot_b2,
            num_splits, xq.stride(0), *a.strides(ws)[1:], a.out.stride(0),
            **constexprs(cfg, group, a.rank, a.has_us, a.bias is not None, a.pdl),
            num_warps=cfg.warps, launch_pdl=a.pdl,
        )


KERNEL = W4a8RsKernel()
