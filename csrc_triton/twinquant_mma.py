"""Tensor-core decode kernel for the TwinQuant linear layer (W4A16, 2 <= M <= 128), written in Gluon.

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias        (t = x @ D^T from `lowrank_down`, one slice)

Why: the CUDA-core decode kernel (`twinquant_gemm._tq_gemv_vec_kernel`) spends about 4
instructions per 4-bit code (unpack, convert to fp32, FMA). Here the multiply-adds go to
mma.sync m16n8k16: acc^T [BN, tokens] = deq(R) [BN, K] @ x^T, the weights as the 16-row
register operand A, the tokens (padded to 8, 16, 32 or 64) as the 8-column side. That needs the codes
in registers exactly as the A fragment wants them, with no shared-memory round trip:

* A fragment of m16n8k16 (k_width 2): lane (g, t) = (lane // 4, lane % 4) holds rows g and g + 8
  of each 16-row tile, columns 2t, 2t + 1, 2t + 8, 2t + 9 of each 16-column block.
* `repack` layout (64-column chunks, G >= 64): nibble j of word l holds column 8j + l. Lane t
  takes words 2t and 2t + 1 of every chunk of its rows: nibble j of the pair is columns
  8j + 2t and 8j + 2t + 1 -- one register of the fragment. One PRMT gathers the low (high)
  halves of the two words, LOP3 puts nibble j of both under the exponent of 128 (bf16 0x4300;
  fp16 1024, 0x6400), the pair of floats E + q, and an FMA subtracts E + 8 exactly: 16 codes in
  2 PRMT + 6 shifts + 8 LOP3 + 8 FMA.
* The layout of the word tensor is derived in the kernel from the A fragment's own layout
  (reshaped, nibble bits moved last and split off), so joining the eight nibble planes back
  gives the fragment layout itself: `convert_layout(..., assert_trivial=True)` makes the
  compiler prove that no data moves (compiling fails otherwise).

x for the program's K-slice is copied once into shared memory (16-byte cp.async) and read per
step as the B fragment (ldmatrix). Codes go from global memory straight into registers, two
steps ahead (two steps per loop iteration). One K step is one scale group (G = 64 or 128) for
up to 16 tokens, one 64-column chunk from 32 tokens on (so that the x fragment of a step, which
every warp holds whole, stays at 64 registers); the step's MMA result is scaled in fp32 and
accumulated.
Split over K (so that every SM gets work at decode sizes): each program adds its partial sums
into an fp32 workspace (relaxed reductions), synchronises its CTA and takes a ticket (acq_rel
atomic); the last program of a column tile reads the sum back with exchanges that zero it, adds
the low-rank term (one more MMA) and the bias, stores y and resets the ticket, so the workspace
is all zero again between calls (CUDA graphs stay valid).
A program takes up to 64 tokens (TOK 8, 16, 32 or 64); more run as token tiles along grid
axis 2, each reading the weights again (mostly from L2).
Only compiled for sm_80+ (Gluon has no CPU interpreter); CI compiles it for sm_90, numerics are
checked on the GPU by benchmarks/kernels/bench_mma.py, bench_kernels.py and graph_check.py.
Measured: benchmarks/kernels/README.md (v8: 2-16 tokens, v9: 17-128).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2


# CTA-wide barrier: `thread_barrier` up to Triton 3.6, `barrier` later
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# cp.async global -> shared: `async_copy_global_to_shared` up to Triton 3.6, `async_load` later
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
MAX_M = gl.constexpr(64)  # tokens per program (the MMA's 8-column side, 8 times at most)
MAX_TOKENS = 128  # tokens per launch (programs along grid axis 2 take MAX_M each); sizes the scratch
X_SMEM_MAX = 128 << 10  # bytes of the x K-slice a program keeps in shared memory (at most; the
# configs' SPLIT_K keep the measured decode ones at <= 64 KB; capped by the device's opt-in limit)

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
def _planes(p, EXP: gl.constexpr):
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
def _planes_scaled(p, s, EXP: gl.constexpr):
    """The planes of `_planes` times s (one value per row of p, in the activation dtype), each
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
def _fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """Nibble planes [BN, CH, 4, 2] (plane j: column 64c + 8j + 2t + e) joined into the A
    fragment [BN, BK] of layout A_L; the compiler proves that no data moves."""
    w = gl.join(gl.join(gl.join(v0, v1), gl.join(v2, v3)), gl.join(gl.join(v4, v5), gl.join(v6, v7)))
    w = w.permute((0, 1, 6, 5, 4, 2, 3)).reshape([BN, BK])
    return gl.convert_layout(w, A_L, assert_trivial=True)


@gluon.jit
def _code_ptrs(qw_ptr, off_n, N, stride_qn, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
    """Pointers [BN, CH, 4 (t), 2 (e)] to the words of rows off_n + n (rows past N read row N - 1,
    never stored) that a lane needs for its A fragment (layout A_L) of the BK-column step at
    word 0: word 8c + 2t + e of the step. Their layout is A's on [BN, BK] seen as
    [BN, CH, 2 (j2), 2 (j1), 2 (j0), 4 (t), 2 (e)] (column 64c + 8j + 2t + e, word 8c + 2t + e,
    nibble j), the nibble bits moved last and split off, so that `_fragment` of their planes is
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
def _split_k_finish(acc, part_ptrs, out_mask, tk):
    """Split-K without a zeroed output: every program along grid axis 1 adds its partial sums
    into the scratch (`scratch`) and takes the tile's ticket tk; the last one gets the total
    back (leaving zeros) and resets the ticket. Returns (acc, whether this program is that one)."""
    gl.atomic_add(part_ptrs, acc, mask=out_mask, sem="relaxed")
    _cta_barrier()  # every thread's partial sums are in before the ticket is taken (release)
    ticket = gl.atomic_add(tk, 1, sem="acq_rel")
    last = ticket == gl.num_programs(1) - 1
    if last:
        acc = gl.atomic_xchg(part_ptrs, gl.zeros_like(acc), mask=out_mask, sem="relaxed")
        gl.atomic_xchg(tk, 0, sem="relaxed")
    return acc, last


@gluon.jit
def _mma_step(p, xb, s, acc, BN: gl.constexpr, BK: gl.constexpr, TOK: gl.constexpr, A_L: gl.constexpr,
              MMA: gl.constexpr, EXP: gl.constexpr):
    """acc + s * (deq(codes p) [BN, BK] @ xb [BK, TOK]) for one group-wide K step."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _planes(p, EXP)  # plane j: column 64c + 8j + 2t + e
    w = _fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN, BK, A_L)
    part = mma_v2(w, xb, gl.zeros([BN, TOK], gl.float32, layout=MMA))
    return acc + part * gl.expand_dims(s, 1)


@gluon.jit
def _tq_decode_mma_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    KS: gl.constexpr, GROUP: gl.constexpr, BK: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr,
    MT: gl.constexpr, TOK: gl.constexpr, BLOCK_R: gl.constexpr, SPLIT: gl.constexpr, EXP: gl.constexpr,
    TILED: gl.constexpr, PDL: gl.constexpr, RANK_CHUNK: gl.constexpr, num_warps: gl.constexpr,
):
    """Program (pid_n, pid_k, pid_m): weight rows [pid_n * BN, +BN) (BN = 16 * MT * num_warps)
    over the K-slice pid_k, for tokens [pid_m * TOK, +TOK) (TOK 8-64). acc^T [BN, TOK] = deq(R) [BN, BK] @ x^T: the
    weights are the MMA's register A operand (16 rows per tile), the tokens its 8-column side.
    A step of BK columns (64 or GROUP) lies in one scale group."""
    act: gl.constexpr = x_ptr.dtype.element_ty
    BN: gl.constexpr = 16 * MT * num_warps
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    # token tiles along grid axis 2 (M > TOK). Else m0 is the constant 0: at 8-16 tokens that
    # saves registers (gate/up (2, 8, 4): 128 instead of 148, two programs per SM), while at 64
    # tokens the constant made (2, 4, 16) spill (80 bytes of stack) and run 52.6 instead of 41.9 us
    # on down at M = 64, so from 32 tokens per program the launch always passes TILED.
    if TILED:
        m0 = gl.program_id(2) * TOK
    else:
        m0 = 0
    off_n = pid_n * BN
    k_lo = pid_k * KS
    k_hi = gl.minimum(k_lo + KS, K)
    n_steps = gl.cdiv(k_hi - k_lo, BK)

    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    # the codes go straight from global memory into registers, in the layout A's fragment needs
    q_ptrs = _code_ptrs(qw_ptr, off_n, N, stride_qn, BN, BK, A_L)
    # the K-slice of x, [steps, TOK, BK], copied once into shared memory (16-byte cp.async of the
    # M real tokens; the padding rows' MMA columns are never stored) and read per step as the B
    # fragment (ldmatrix)
    VX: gl.constexpr = BK // 8  # 16-byte vectors per x row of a step
    CX: gl.constexpr = gl.BlockedLayout([1, 8], [32 // VX, VX], [num_warps, 1], [1, 0])
    x_smem = gl.allocate_shared_memory(act, [KS // BK, TOK, BK], gl.NVMMASharedLayout.get_default_for([TOK, BK], act))
    xm = gl.arange(0, TOK, layout=gl.SliceLayout(1, CX))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, CX))
    x_ptrs = x_ptr + gl.expand_dims(gl.minimum(m0 + xm, M - 1), 1) * stride_xm + gl.expand_dims(k_lo + xk, 0)
    x_rows = gl.expand_dims(m0 + xm < M, 1) & gl.expand_dims(xk >= 0, 0)  # only real tokens are copied
    for st in range(n_steps):
        _cp_async(x_smem.index(st), x_ptrs + st * BK, mask=x_rows)
    async_copy.commit_group()
    # scales [BN] along the accumulator's rows
    sn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    s_ptrs = sc_ptr + gl.minimum(sn, N - 1) * stride_sn
    s_nmask = sn < N

    # Two steps per iteration; the codes of the next two are loaded at its top (two steps of
    # loads in flight per warp). Steps past the slice re-read its last codes (clamped address)
    # with a zero scale.
    k_last = k_hi - BK  # slices are whole groups, so whole steps
    p_a = gl.load(q_ptrs + k_lo // 8)
    p_b = gl.load(q_ptrs + gl.minimum(k_lo + BK, k_last) // 8)
    s_a = gl.load(s_ptrs + k_lo // GROUP).to(gl.float32)
    s_b = gl.load(s_ptrs + (k_lo + BK) // GROUP, mask=s_nmask & (k_lo + BK < k_hi), other=0.0).to(gl.float32)
    acc = gl.zeros([BN, TOK], gl.float32, layout=MMA)
    async_copy.wait_group(0)
    _cta_barrier()
    for j in range(gl.cdiv(n_steps, 2)):
        kn = k_lo + (2 * j + 2) * BK
        p_a2 = gl.load(q_ptrs + gl.minimum(kn, k_last) // 8)
        p_b2 = gl.load(q_ptrs + gl.minimum(kn + BK, k_last) // 8)
        s_a2 = gl.load(s_ptrs + kn // GROUP, mask=s_nmask & (kn < k_hi), other=0.0).to(gl.float32)
        s_b2 = gl.load(s_ptrs + (kn + BK) // GROUP, mask=s_nmask & (kn + BK < k_hi), other=0.0).to(gl.float32)
        xb = x_smem.index(2 * j).permute((1, 0)).load(B_L)
        acc = _mma_step(p_a, xb, s_a, acc, BN, BK, TOK, A_L, MMA, EXP)
        xb = x_smem.index(gl.minimum(2 * j + 1, n_steps - 1)).permute((1, 0)).load(B_L)
        acc = _mma_step(p_b, xb, s_b, acc, BN, BK, TOK, A_L, MMA, EXP)
        p_a = p_a2
        p_b = p_b2
        s_a = s_a2
        s_b = s_b2

    om = m0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
    om2 = gl.expand_dims(om, 0)
    on2 = gl.expand_dims(sn, 1)
    out_mask = (om2 < M) & (on2 < N)
    last = True
    if SPLIT:  # the last of the gl.num_programs(1) programs of this column tile finishes it
        tk = ticket_ptr + pid_n
        if TILED:
            tk += gl.program_id(2) * gl.num_programs(0)
        acc, last = _split_k_finish(acc, part_ptr + om2 * N + on2, out_mask, tk)
    if last:
        if HAS_LOWRANK:
            slot = (off_n >= SLOT_B1).to(gl.int32) + (off_n >= SLOT_B2).to(gl.int32)
            # acc^T += U [BN, BR] @ t^T [BR, TOK] (t: the sum of the down projection's K-slices),
            # RC ranks at a time: 16 from 32 tokens on (so that t's fragment stays small), and with
            # RANK_CHUNK also below, where all BLOCK_R at once raises the registers of the whole
            # kernel with the rank (Triton 3.6, ptxas sm_90: (1, 8, 8) 64 -> 85 at rank 64, 159 at
            # 128; (2, 8, 4) 128 -> 168, 255; with RANK_CHUNK they stay at 64 and 128 at every rank)
            RC: gl.constexpr = BLOCK_R if TOK <= 16 and not RANK_CHUNK else 16
            un = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, A_L))
            if HAS_US:  # int8 codes: scaled and rounded once, as a float factor is stored
                us = gl.load(us_ptr + un, mask=un < N, other=0.0)
            tm = m0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, B_L))
            if PDL:  # t is the down projection's, launched just before this kernel
                tl.extra.cuda.gdc_wait()
            for r0 in gl.static_range(0, BLOCK_R, RC):
                ur = r0 + gl.arange(0, RC, layout=gl.SliceLayout(0, A_L))
                u_mask = gl.expand_dims(un < N, 1) & gl.expand_dims(ur < R, 0)
                u = gl.load(up_ptr + gl.expand_dims(un, 1) * stride_un + gl.expand_dims(ur, 0), mask=u_mask, other=0)
                if HAS_US:
                    u = u.to(gl.float32) * gl.expand_dims(us, 1)
                tr = r0 + gl.arange(0, RC, layout=gl.SliceLayout(1, B_L))
                t_mask = gl.expand_dims(tr < R, 1) & gl.expand_dims(tm < M, 0)
                t_ptrs = ws_ptr + gl.expand_dims(tm, 0) * stride_ws_m + slot * R + gl.expand_dims(tr, 1)
                t = gl.zeros([RC, TOK], gl.float32, layout=B_L)
                for sp in range(NUM_SPLITS):
                    t += gl.load(t_ptrs + sp * stride_ws_s, mask=t_mask, other=0.0)
                acc = mma_v2(u.to(act), t.to(act), acc)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + sn, mask=s_nmask, other=0.0).to(gl.float32)
            acc += gl.expand_dims(bias, 1)
        gl.store(y_ptr + om2 * stride_ym + on2, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# -- launch ---------------------------------------------------------------------------------------
_SCRATCH: dict = {}


def scratch(device: torch.device, n: int, tokens: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace of a device for layers up to n outputs and `tokens` tokens (this
    kernel's MAX_TOKENS; twinquant_wgmma's MODE 10 takes up to RS_MAX_TOK): fp32 partial sums
    [tokens, n] and one ticket per (16-row column tile, 8-token tile), all zero between calls
    (the kernels leave them so). Shared by the layers of a device, which vLLM runs one after
    another on one stream; allocated at layer load (vllm_twinquant/kernels.py), not in a capture."""
    key = (device.type, device.index)
    part, ticket = _SCRATCH.get(key, (None, None))
    tickets = triton.cdiv(n, 16) * triton.cdiv(tokens, 8)
    if part is None or part.numel() < tokens * n or ticket.numel() < tickets:
        size = max(tokens * n, 0 if part is None else part.numel())
        part = torch.zeros(size, dtype=torch.float32, device=device)
        ticket = torch.zeros(max(tickets, 0 if ticket is None else ticket.numel()), dtype=torch.int32, device=device)
        _SCRATCH[key] = (part, ticket)
    return part, ticket


def usable(m: int, group_size: int, k: int) -> bool:
    """Shapes this kernel takes: M <= MAX_TOKENS, G 64 or 128 (whole 64-column chunks of the
    `repack` layout per group), K whole groups."""
    return m <= MAX_TOKENS and group_size in (64, 128) and k % group_size == 0


@functools.lru_cache(maxsize=None)
def _smem_optin(device_index: int) -> int:
    """Shared memory a program may opt into on this device (227 KB on an H100, 99 KB on sm_86/89)."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 48 << 10)


def step_k(tok: int, group_size: int) -> int:
    """Columns per K step for `tok` tokens per program: one scale group up to 16 tokens, one
    64-column chunk from 32 on (the x fragment every warp holds stays at 64 registers)."""
    return group_size if tok <= 16 else 64


def token_offset_runtime(m: int, tok: int) -> bool:
    """The kernel's TILED: the token offset is a runtime value when M spans several token tiles,
    and always from 32 tokens per program (there the compile-time 0 made (2, 4, 16) spill)."""
    return m > tok or tok >= 32


def plan(m: int, k: int, group_size: int, split: int, max_tok: int = MAX_M.value,
         device_index: int | None = None) -> tuple[int, int, int, int]:
    """(tokens per program, K step, programs along K, K per program) of a launch asked for
    `split` programs along K and at most `max_tok` tokens per program (8-64, a power of two): more
    programs along K where the x K-slice would not fit in X_SMEM_MAX bytes (or the device's limit)."""
    if max_tok not in (8, 16, 32, 64):
        raise ValueError(f"tokens per program must be 8, 16, 32 or 64, got {max_tok}")
    tok = min(max_tok, max(8, 1 << (m - 1).bit_length()))
    bk = step_k(tok, group_size)
    groups = k // group_size
    split = max(1, min(split, groups))
    budget = X_SMEM_MAX
    if torch.cuda.is_available():
        dev = torch.cuda.current_device() if device_index is None else device_index
        budget = min(budget, _smem_optin(dev) - (8 << 10))
    while triton.cdiv(groups, split) * group_size * tok * 2 > budget and split < groups:
        split += 1  # the K-slice of x must fit in shared memory
    k_per_split = triton.cdiv(groups, split) * group_size
    return tok, bk, triton.cdiv(k, k_per_split), k_per_split


def launch(operands, y, m, n, k, r, b1, b2, num_splits, strides, group_size, has_lr, has_us, has_bias,
           mt, warps, split, br, max_tok=MAX_M.value, pdl=False, rank_chunk=False):
    """Launch on prepared operands (see `twinquant_gemm.tq_gemm`, which dispatches here)."""
    if not usable(m, group_size, k):
        raise ValueError(f"the mma decode kernel takes M <= {MAX_TOKENS}, group size 64 or 128 and K a multiple "
                         f"of it; got M={m}, G={group_size}, K={k}")
    bn = 16 * mt * warps
    tiles = triton.cdiv(n, bn)
    tok, bk, split, k_per_split = plan(m, k, group_size, split, max_tok, y.device.index)
    part, ticket = scratch(y.device, n)
    assert tiles * triton.cdiv(m, tok) <= ticket.numel() and m * n <= part.numel()
    exp = 0x4300 if operands[0].dtype == torch.bfloat16 else 0x6400
    _tq_decode_mma_kernel[(tiles, split, triton.cdiv(m, tok))](
        *operands, y, part, ticket, m, n, k, r, b1, b2, num_splits, *strides, y.stride(0),
        KS=k_per_split, GROUP=group_size, BK=bk, HAS_LOWRANK=has_lr, HAS_US=has_us, HAS_BIAS=has_bias, MT=mt, TOK=tok,
        BLOCK_R=br, SPLIT=split > 1, EXP=exp, TILED=token_offset_runtime(m, tok), PDL=pdl,
        RANK_CHUNK=rank_chunk and has_lr, num_warps=warps, launch_pdl=pdl,
    )
