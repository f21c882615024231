"""Triton building blocks shared by the Triton kernels (gemv, tile, dequant, lowrank_down):
slot lookup, the PDL wait, dots that upcast under the interpreter, and the PTX that turns 4-bit
codes into floats (two at a time, with one LOP3: the nibble under the exponent of 128 (bf16)
or 1024 (fp16) is the float E + q, exactly).

INTERPRETED (TRITON_INTERPRET=1, the CPU tests): Triton's interpreter computes bf16 dots on raw
bit patterns and has no PTX, so there the operands are upcast to fp32 first (UPCAST) and the
PTX is replaced by the same values in plain Triton (ASM off). Compiled kernels never do either.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_twinquant import envs

INTERPRETED = envs.triton_interpreted()


@triton.jit
def slot_of(n, B1, B2):
    """Slot of output row(s) n in a merged layer: 0 below B1, 1 from B1, 2 from B2."""
    return (n >= B1).to(tl.int32) + (n >= B2).to(tl.int32)


@triton.jit
def tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid, in groups of GROUP_M row tiles that walk the columns
    together (neighbouring programs share their x rows and weight columns in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the down projection (the launch this one depends on) has finished and its
    writes are visible; a no-op unless launched with PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def operand(v, act, UPCAST: tl.constexpr):
    """A factor tile (float or int8 codes) as a tensor-core operand in the activation dtype.
    (The interpreter mishandles int8 -> bf16, so there it goes to fp32, as _dot would anyway.)"""
    if UPCAST:
        return v.to(tl.float32)
    return v.to(act)


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
def plane_pair(p, J: tl.constexpr, EXP: tl.constexpr, ASM: tl.constexpr, act: tl.constexpr):
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


LOW_PTX_BF16 = tl.constexpr(_LOW_NIBBLE_SCALED_PTX.replace("TYPE", "bf16x2").replace(
    "ONE2", "0x3F803F80").replace("OFFSET2", "0xC308C308").replace("EXP1", "0x4300"))
LOW_PTX_FP16 = tl.constexpr(_LOW_NIBBLE_SCALED_PTX.replace("TYPE", "f16x2").replace(
    "ONE2", "0x3C003C00").replace("OFFSET2", "0xE408E408").replace("EXP1", "0x6400"))


@triton.jit
def scaled_low_nibble(p, s, EXP: tl.constexpr, ASM: tl.constexpr, act: tl.constexpr):
    """(q - 8) * s in the activation dtype for q = bits 0-3 of every word of p; s (already in
    that dtype) broadcasts against p. One rounding, as a dequantized weight."""
    if ASM:
        s = tl.broadcast_to(s, p.shape)
        if EXP == 0x4300:
            w = tl.inline_asm_elementwise(LOW_PTX_BF16, "=r,r,r,r", [p, s], dtype=tl.bfloat16,
                                          is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise(LOW_PTX_FP16, "=r,r,r,r", [p, s], dtype=tl.float16,
                                          is_pure=True, pack=2)
    else:
        w = (((p & 0xF) - 8).to(tl.float32) * s.to(tl.float32)).to(act)
    return w

