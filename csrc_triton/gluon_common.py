"""Gluon building blocks shared by the Gluon kernels (mma_decode, wgmma_rs, w4a8_rs): the 4-bit codes
unpacked straight into a tensor-core A fragment, the low-rank epilogue's operands, and the split-K
finish through a scratch buffer.

* `code_ptrs`: pointers to the words a lane needs for its A fragment, in a layout derived from
  the fragment's own (reshaped, nibble bits moved last and split off), so that joining the eight
  nibble planes back (`fragment`) gives the fragment layout itself: `convert_layout(...,
  assert_trivial=True)` makes the compiler prove that no data moves (compiling fails otherwise).
* `planes` / `planes_scaled`: two words of a lane (words 2t and 2t + 1 of a 64-column chunk)
  -> the eight nibble planes as pairs of floats q - 8 (times the row's scale): one PRMT gathers
  the low (high) halves, LOP3 puts nibble j of both under the exponent of 128 (bf16) or 1024
  (fp16), an FMA subtracts E + 8 exactly.
* `split_k_finish` and `scratch`: split over K without a zeroed output. Every program adds its
  partial sums into an fp32 scratch (relaxed reductions), synchronises its CTA and takes a ticket
  (acq_rel atomic); the last program of a tile reads the sum back with exchanges that zero it and
  resets the ticket, so the scratch is all zero between calls (CUDA graphs stay valid).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from vllm_twinquant import envs

# CTA-wide barrier: `thread_barrier` up to Triton 3.6, `barrier` later
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# cp.async global -> shared: `async_copy_global_to_shared` up to Triton 3.6, `async_load` later
cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


# Two words a (lanes' word 2t) and b (word 2t + 1) -> nibble planes 0-7 as pairs (a, b) of
# floats q - 8, exact (SCALED: times the pair of scales s, rounded once). $0-$7 out (plane j),
# $8 $9 the words, $10 (SCALED) the scale pair.
def _planes_ptx(kind: str, scaled: bool) -> str:
    one, off, exp = {"bf16x2": ("0x3F803F80", "0xC308C308", "0x43004300"),
                     "f16x2": ("0x3C003C00", "0xE408E408", "0x64006400")}[kind]
    body = ""
    for j in range(8):
        src = "lo" if j < 4 else "hi"
        if j % 4:
            body += f"shr.u32 t, {src}, {4 * (j % 4)};\nlop3.b32 t, t, 0x000F000F, {exp}, 0xEA;\n"
        else:
            body += f"lop3.b32 t, {src}, 0x000F000F, {exp}, 0xEA;\n"
        if scaled:
            body += f"fma.rn.{kind} t, t, one, off;\nmul.rn.{kind} ${j}, t, $10;\n"
        else:
            body += f"fma.rn.{kind} ${j}, t, one, off;\n"
    return ("\n{\n.reg .b32 lo, hi, t, one, off;\n"
            f"mov.b32 one, {one};\nmov.b32 off, {off};\n"
            "prmt.b32 lo, $8, $9, 0x5410;\nprmt.b32 hi, $8, $9, 0x7632;\n" + body + "}\n")


_PLANES_BF16 = gl.constexpr(_planes_ptx("bf16x2", False))
_PLANES_FP16 = gl.constexpr(_planes_ptx("f16x2", False))
_PLANES_BF16_SCALED = gl.constexpr(_planes_ptx("bf16x2", True))
_PLANES_FP16_SCALED = gl.constexpr(_planes_ptx("f16x2", True))


@gluon.jit
def planes(p, EXP: gl.constexpr):
    """The eight nibble planes of the word pairs of p (pairs along the last dimension)."""
    C: gl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r,r,r"
    if EXP == 0x4300:
        v = gl.inline_asm_elementwise(_PLANES_BF16, C, [p], dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16,
                                      gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                      is_pure=True, pack=2)
    else:
        v = gl.inline_asm_elementwise(_PLANES_FP16, C, [p], dtype=(gl.float16, gl.float16, gl.float16,
                                      gl.float16, gl.float16, gl.float16, gl.float16, gl.float16),
                                      is_pure=True, pack=2)
    return v


@gluon.jit
def planes_scaled(p, s, EXP: gl.constexpr):
    """The planes of `planes` times s (one value per row of p, in the activation dtype), each
    product rounded once."""
    s = gl.broadcast(gl.expand_dims(gl.expand_dims(gl.expand_dims(s, 1), 2), 3), p)[0]
    C: gl.constexpr = "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r"
    if EXP == 0x4300:
        v = gl.inline_asm_elementwise(_PLANES_BF16_SCALED, C, [p, s], dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16,
                                      gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                                      is_pure=True, pack=2)
    else:
        v = gl.inline_asm_elementwise(_PLANES_FP16_SCALED, C, [p, s], dtype=(gl.float16, gl.float16, gl.float16,
                                      gl.float16, gl.float16, gl.float16, gl.float16, gl.float16),
                                      is_pure=True, pack=2)
    return v


@gluon.jit
def fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """Nibble planes [BN, CH, 4, 2] (plane j: column 64c + 8j + 2t + e) joined into the A
    fragment [BN, BK] of layout A_L; the compiler proves that no data moves."""
    w = gl.join(gl.join(gl.join(v0, v1), gl.join(v2, v3)), gl.join(gl.join(v4, v5), gl.join(v6, v7)))
    w = w.permute((0, 1, 6, 5, 4, 2, 3)).reshape([BN, BK])
    return gl.convert_layout(w, A_L, assert_trivial=True)


@gluon.jit
def code_ptrs(qw_ptr, off_n, N, stride_qn, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """Pointers [BN, CH, 4 (t), 2 (e)] to the words of rows off_n + n (rows past N read row N - 1,
    never stored) that a lane needs for its A fragment (layout A_L) of the BK-column step at
    word 0: word 8c + 2t + e of the step. Their layout is A's on [BN, BK] seen as
    [BN, CH, 2 (j2), 2 (j1), 2 (j0), 4 (t), 2 (e)] (column 64c + 8j + 2t + e, word 8c + 2t + e,
    nibble j), the nibble bits moved last and split off, so that `fragment` of their planes is
    A's layout itself."""
    CH: gl.constexpr = BK // 64  # 64-column chunks per step
    w7 = gl.full([BN, BK], 0, gl.int32, A_L).reshape([BN, CH, 2, 2, 2, 4, 2]).permute((0, 1, 5, 6, 4, 3, 2))
    w6, _ = gl.split(w7)
    w5, _ = gl.split(w6)
    w4, _ = gl.split(w5)
    P_L: gl.constexpr = w4.type.layout  # [BN, CH, 4 (t), 2 (e)]
    n4 = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, P_L))))
    c4 = gl.arange(0, CH, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, P_L))))
    t4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, P_L))))
    e4 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, P_L))))
    rows4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.minimum(off_n + n4, N - 1), 1), 2), 3)
    word4 = (gl.expand_dims(gl.expand_dims(gl.expand_dims(c4 * 8, 0), 2), 3)
             + gl.expand_dims(gl.expand_dims(gl.expand_dims(t4 * 2, 0), 1), 3)
             + gl.expand_dims(gl.expand_dims(gl.expand_dims(e4, 0), 1), 2))
    return qw_ptr + rows4 * stride_qn + word4


@gluon.jit
def register_smem_mma(a, b, acc, MMA: gl.constexpr):
    """acc + a @ b^T with a [R1, K] as the register operand and b [R2, K] staged in shared memory."""
    B_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for(b.shape, b.dtype)
    b_buf = gl.allocate_shared_memory(b.dtype, b.shape, B_SMEM)
    b_buf.store(b)
    fence_async_shared()
    cta_barrier()
    a_op = gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
    return warpgroup_mma(a_op, b_buf.permute((1, 0)), acc)


@gluon.jit
def lowrank_operands(ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_ws_s,
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
def split_k_finish(acc, part_ptrs, out_mask, tk, splits):
    """Split-K without a zeroed output: each of the tile's `splits` programs adds its partial sums
    into the scratch (`scratch`) and takes the tile's ticket tk; the last one gets the total
    back (leaving zeros) and resets the ticket. Returns (acc, whether this program is that one)."""
    gl.atomic_add(part_ptrs, acc, mask=out_mask, sem="relaxed")
    cta_barrier()  # every thread's partial sums are in before the ticket is taken (release)
    ticket = gl.atomic_add(tk, 1, sem="acq_rel")
    last = ticket == splits - 1
    if last:
        acc = gl.atomic_xchg(part_ptrs, gl.zeros_like(acc), mask=out_mask, sem="relaxed")
        gl.atomic_xchg(tk, 0, sem="relaxed")
    return acc, last



# -- host side --------------------------------------------------------------------------------
def hopper_refusal(shape, device, measured_triton: tuple[str, ...]) -> str | None:
    """Why a Hopper Gluon kernel (wgmma, fp16/bf16 activations, written against the Triton versions
    `measured_triton`) cannot run a layer on a device, or None."""
    if not device.cuda or device.capability != (9, 0):
        return "needs sm_90 (wgmma) and no Triton interpreter"
    if shape.dtype not in (torch.bfloat16, torch.float16):
        return f"activations in {shape.dtype}; the kernel takes bf16/fp16"
    if not device.triton.startswith(measured_triton) and not envs.gluon_any_triton():
        return f"Triton {device.triton}: measured with {measured_triton} only (TWINQUANT_GLUON_ANY_TRITON=1 allows it)"
    return None


# -- the split-K scratch (host side) --------------------------------------------------------------
_SCRATCH: dict = {}


def scratch(device: torch.device, n: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace of a device for layers up to n outputs and `tokens` tokens (the
    mma_decode kernel takes up to 128, wgmma_rs up to 256): fp32 partial sums [tokens, n] and
    one ticket per (16-row column tile, 8-token tile), all zero between calls (the kernels leave
    them so). Shared by the layers of a device, which vLLM runs one after another on one stream;
    allocated at layer load (`csrc_triton.dispatch.scratch_tokens`), not inside a CUDA-graph capture."""
    key = (device.type, device.index)
    part, ticket = _SCRATCH.get(key, (None, None))
    tickets = triton.cdiv(n, 16) * triton.cdiv(tokens, 8)
    if part is None or part.numel() < tokens * n or ticket.numel() < tickets:
        size = max(tokens * n, 0 if part is None else part.numel())
        part = torch.zeros(size, dtype=torch.float32, device=device)
        ticket = torch.zeros(max(tickets, 0 if ticket is None else ticket.numel()), dtype=torch.int32, device=device)
        _SCRATCH[key] = (part, ticket)
    return part, ticket

