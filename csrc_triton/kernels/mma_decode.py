"""The tensor-core decode kernel (W4A16, 2 <= M <= 128), written in Gluon: mma.sync m16n8k16.

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias        (t = x @ D^T from `lowrank_down`, one slice,
                                                      or made in this launch: below)

Why: the CUDA-core decode kernel (`gemv.py`) spends about 4
instructions per 4-bit code (unpack, convert to fp32, FMA). Here the multiply-adds go to
mma.sync m16n8k16: acc^T [BN, tokens] = deq(R) [BN, K] @ x^T, the weights as the 16-row
register operand A, the tokens (padded to 8, 16, 32 or 64) as the 8-column side. That needs the codes
in registers exactly as the A fragment wants them, with no shared-memory round trip:

* A fragment of m16n8k16 (k_width 2): lane (g, t) = (lane // 4, lane % 4) holds rows g and g + 8
  of each 16-row tile, columns 2t, 2t + 1, 2t + 8, 2t + 9 of each 16-column block.
* `layout.repack` layout (64-column chunks, G >= 64): nibble j of word l holds column 8j + l. Lane t
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
Split over K (so that every SM gets work at decode sizes) through the scratch of
`gluon_common.split_k_finish`; the program that finishes a column tile adds the low-rank term
(one more MMA) and the bias and stores y.
A program takes up to 64 tokens (TOK 8, 16, 32 or 64); more run as token tiles along grid
axis 2, each reading the weights again (mostly from L2).
Up to 16 tokens t can be made inside the launch (`Launch.t_splits`, the table's `mma_decode_t_splits` rows
with `in_kernel`), as the one-token kernel does (gemv.py): every program takes a ticket as it starts; the
first T_PROGS tickets compute t's pieces (a K-slice of a block of D's rows for every token, CUDA cores,
added into the zeroed `base.t_scratch` with fp32 atomics) and count themselves done; the others run the
residual product, and the program that finishes a column tile waits for that count before its epilogue.
Programs that hold a ticket are running, so no wait can deadlock; the last residual program zeroes t and
the counters again. No down-projection launch, and no launch gap.
Only compiled for sm_80+ (Gluon has no CPU interpreter); CI compiles it for sm_90, numerics are
checked on the GPU by benchmarks/kernels/bench_kernels.py and graph_check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from csrc_triton.gluon_common import code_ptrs, cp_async, cta_barrier, fragment, planes, scratch, split_k_finish
from csrc_triton.kernels.base import Device, Kernel, Launch, LayerShape
from csrc_triton.layout import next_pow2

MAX_M = gl.constexpr(64)  # tokens per program (the MMA's 8-column side, 8 times at most)
T_TOKENS = 16  # tokens for which the launch can make t itself (`Launch.t_splits`)
MAX_TOKENS = 128  # tokens per launch (programs along grid axis 2 take MAX_M each); sizes the scratch
X_SMEM_MAX = 128 << 10  # bytes of the x K-slice a program keeps in shared memory (at most; the
# configs' SPLIT_K keep the measured decode ones at <= 64 KB; capped by the device's opt-in limit)


@dataclass(frozen=True)
class MmaConfig:
    mt: int  # 16-row tiles per warp
    warps: int
    split_k: int  # programs along K asked for (more where the x slice would not fit in shared memory)
    max_tokens: int = 64  # tokens per program: 8, 16, 32 or 64


@gluon.jit
def _mma_step(p, xb, s, acc, BN: gl.constexpr, BK: gl.constexpr, TOK: gl.constexpr, A_L: gl.constexpr,
              MMA: gl.constexpr, EXP: gl.constexpr):
    """acc + s * (deq(codes p) [BN, BK] @ xb [BK, TOK]) for one group-wide K step."""
    v0, v1, v2, v3, v4, v5, v6, v7 = planes(p, EXP)  # plane j: column 64c + 8j + 2t + e
    w = fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN, BK, A_L)
    part = mma_v2(w, xb, gl.zeros([BN, TOK], gl.float32, layout=MMA))
    return acc + part * gl.expand_dims(s, 1)


@gluon.jit
def _t_piece(j, x_ptr, d_ptr, ds_ptr, t_ptr, M, K, RT, k_per, stride_xm, stride_dr,
             BLOCK_RT: gl.constexpr, HAS_DS: gl.constexpr, num_warps: gl.constexpr):
    """Piece j of t = x D^T made inside the launch: rows [rb BLOCK_RT, +BLOCK_RT) of D over the K-slice
    [ks k_per, +k_per) (j = ks * row blocks + rb), for each of the M token rows, added into t (fp32, RT per
    token row) with relaxed atomics; int8 D: times its row scales. CUDA cores, 16-byte loads; D's slice is
    read again for each further token row, from L1 (at most 64 rows x k_per columns)."""
    # a warp takes BLOCK_RT / num_warps rows, 8 columns a thread: each thread holds 8 elements of D per step
    RW: gl.constexpr = BLOCK_RT // num_warps
    PL: gl.constexpr = gl.BlockedLayout([1, 8], [RW, 32 // RW], [num_warps, 1], [1, 0])
    BKT: gl.constexpr = 8 * (32 // RW)
    n_rb = gl.cdiv(RT, BLOCK_RT)
    rb = j % n_rb
    k_lo = (j // n_rb) * k_per
    k_hi = gl.minimum(k_lo + k_per, K)
    offs_r = rb * BLOCK_RT + gl.arange(0, BLOCK_RT, layout=gl.SliceLayout(1, PL))
    offs_k = gl.arange(0, BKT, layout=gl.SliceLayout(0, PL))
    r_mask = offs_r < RT
    d_rows = d_ptr + gl.expand_dims(offs_r, 1) * stride_dr
    for mm in range(M):
        acc = gl.zeros([BLOCK_RT, BKT], gl.float32, layout=PL)
        for k0 in range(k_lo, k_hi, BKT):
            kk = k0 + offs_k
            k_mask = kk < k_hi
            d = gl.load(d_rows + gl.expand_dims(kk, 0), mask=gl.expand_dims(r_mask, 1) & gl.expand_dims(k_mask, 0),
                        other=0).to(gl.float32)
            xk = gl.load(x_ptr + mm * stride_xm + kk, mask=k_mask, other=0.0).to(gl.float32)
            acc += d * gl.expand_dims(xk, 0)
        t = gl.sum(acc, axis=1)
        if HAS_DS:
            t *= gl.load(ds_ptr + offs_r, mask=r_mask, other=0.0)
        gl.atomic_add(t_ptr + mm * RT + offs_r, t, mask=r_mask, sem="relaxed")


@gluon.jit
def _tq_decode_mma_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr, d_ptr, ds_ptr, sync_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, N_TILES, N_SPLIT, RT, T_PROGS, k_per_t,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym, stride_dr,
    KS: gl.constexpr, GROUP: gl.constexpr, BK: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    MT: gl.constexpr, TOK: gl.constexpr, BLOCK_R: gl.constexpr, SPLIT: gl.constexpr, EXP: gl.constexpr,
    TILED: gl.constexpr, PDL: gl.constexpr, T_IN: gl.constexpr, BLOCK_RT: gl.constexpr, HAS_DS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """One program of the launch (`_mma_program`). T_IN (module docstring): a 1-D grid of T_PROGS pieces of t,
    then the residual programs (column tile fastest, then K-slice, then token tile), each role taken by
    ticket (sync_ptr: tickets, pieces done, residual programs done); t in ws_ptr [M, RT] fp32. Else a 3-D grid
    of residual programs (column tiles, K-slices, token tiles)."""
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    residual = True
    if T_IN:
        ticket = gl.atomic_add(sync_ptr, 1, sem="relaxed")
        if ticket < T_PROGS:
            _t_piece(ticket, x_ptr, d_ptr, ds_ptr, ws_ptr, M, K, RT, k_per_t, stride_xm, stride_dr, BLOCK_RT, HAS_DS,
                     num_warps)
            cta_barrier()  # every thread's additions are in before the count says so (release)
            gl.atomic_add(sync_ptr + 1, 1, sem="release")
        residual = ticket >= T_PROGS
        pid_n = (ticket - T_PROGS) % N_TILES
        pid_k = (ticket - T_PROGS) // N_TILES % N_SPLIT
        pid_m = (ticket - T_PROGS) // (N_TILES * N_SPLIT)
    if residual:
        _mma_program(
            pid_n, pid_k, pid_m, x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr,
            sync_ptr, M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, N_TILES, N_SPLIT, T_PROGS, stride_xm, stride_qn,
            stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym, KS, GROUP, BK, HAS_LOWRANK, HAS_US, HAS_BIAS,
            MT, TOK, BLOCK_R, SPLIT, EXP, TILED, PDL, T_IN, num_warps)


@gluon.jit
def _mma_program(
    pid_n, pid_k, pid_m, x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr,
    sync_ptr, M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, N_TILES, N_SPLIT, T_PROGS,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    KS: gl.constexpr, GROUP: gl.constexpr, BK: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    MT: gl.constexpr, TOK: gl.constexpr, BLOCK_R: gl.constexpr, SPLIT: gl.constexpr, EXP: gl.constexpr,
    TILED: gl.constexpr, PDL: gl.constexpr, T_IN: gl.constexpr, num_warps: gl.constexpr,
):
    """Program (pid_n, pid_k, pid_m): weight rows [pid_n * BN, +BN) (BN = 16 * MT * num_warps)
    over the K-slice pid_k, for tokens [pid_m * TOK, +TOK) (TOK 8-64). acc^T [BN, TOK] = deq(R) [BN, BK] @ x^T: the
    weights are the MMA's register A operand (16 rows per tile), the tokens its 8-column side.
    A step of BK columns (64 or GROUP) lies in one scale group."""
    act: gl.constexpr = x_ptr.dtype.element_ty
    BN: gl.constexpr = 16 * MT * num_warps
    # token tiles along grid axis 2 (M > TOK). Else m0 is the constant 0: at 8-16 tokens that
    # saves registers (gate/up (2, 8, 4): 128 instead of 148, two programs per SM), while at 64
    # tokens the constant made (2, 4, 16) spill (80 bytes of stack) and run 52.6 instead of 41.9 us
    # on down at M = 64, so from 32 tokens per program the launch always passes TILED.
    if TILED:
        m0 = pid_m * TOK
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
    q_ptrs = code_ptrs(qw_ptr, off_n, N, stride_qn, BN, BK, A_L)
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
        cp_async(x_smem.index(st), x_ptrs + st * BK, mask=x_rows)
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
    cta_barrier()
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
            tk += pid_m * N_TILES
        acc, last = split_k_finish(acc, part_ptr + om2 * N + on2, out_mask, tk, N_SPLIT)
    if last:
        if HAS_LOWRANK:
            slot = (off_n >= SLOT_B1).to(gl.int32) + (off_n >= SLOT_B2).to(gl.int32)
            # acc^T += U [BN, BR] @ t^T [BR, TOK] (t: the sum of the down projection's K-slices),
            # RC ranks at a time: all at once up to 16 tokens, 16 from 32 tokens on (so that t's
            # fragment stays small)
            RC: gl.constexpr = BLOCK_R if TOK <= 16 else 16
            un = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, A_L))
            if HAS_US:  # int8 codes: scaled and rounded once, as a float factor is stored
                us = gl.load(us_ptr + un, mask=un < N, other=0.0)
            tm = m0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, B_L))
            if PDL:  # t is the down projection's, launched just before this kernel
                tl.extra.cuda.gdc_wait()
            if T_IN:  # t's pieces: made by programs that hold their tickets, so running (module docstring)
                done = gl.atomic_add(sync_ptr + 1, 0, sem="acquire")
                while done < T_PROGS:
                    done = gl.atomic_add(sync_ptr + 1, 0, sem="acquire")
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
                    t += gl.load(t_ptrs + sp * stride_ws_s, mask=t_mask, other=0.0,
                                 cache_modifier=".cg" if T_IN else "")  # T_IN: written by other SMs
                acc = mma_v2(u.to(act), t.to(act), acc)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + sn, mask=s_nmask, other=0.0).to(gl.float32)
            acc += gl.expand_dims(bias, 1)
        gl.store(y_ptr + om2 * stride_ym + on2, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if T_IN:  # the last residual program zeroes t and the three counters (the readers of t are done by then)
        cta_barrier()
        finished = gl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if finished == N_TILES * N_SPLIT * gl.cdiv(M, TOK) - 1:
            ZL: gl.constexpr = gl.BlockedLayout([4], [32], [num_warps], [0])
            offs = gl.arange(0, 1024, layout=ZL)
            for z0 in range(0, M * stride_ws_m, 1024):
                gl.store(ws_ptr + z0 + offs, gl.zeros([1024], gl.float32, layout=ZL), mask=z0 + offs < M * stride_ws_m)
            gl.store(sync_ptr + gl.arange(0, 4, layout=ZL), gl.zeros([4], gl.int32, layout=ZL))



# -- launch ---------------------------------------------------------------------------------------
def usable(m: int, group_size: int, k: int) -> bool:
    """Shapes this kernel takes: M <= MAX_TOKENS, G 64 or 128 (whole 64-column chunks of the
    `repack` layout per group), K whole groups."""
    return m <= MAX_TOKENS and group_size in (64, 128) and k % group_size == 0


def step_k(tok: int, group_size: int) -> int:
    """Columns per K step for `tok` tokens per program: one scale group up to 16 tokens, one
    64-column chunk from 32 on (the x fragment every warp holds stays at 64 registers)."""
    return group_size if tok <= 16 else 64


def token_offset_runtime(m: int, tok: int) -> bool:
    """The kernel's TILED: the token offset is a runtime value when M spans several token tiles,
    and always from 32 tokens per program (there the compile-time 0 made (2, 4, 16) spill)."""
    return m > tok or tok >= 32


def launch_shape(
    m: int, k: int, group_size: int, split: int, max_tok: int, smem_optin: int
) -> tuple[int, int, int, int]:
    """(tokens per program, K step, programs along K, K per program) of a launch asked for
    `split` programs along K and at most `max_tok` tokens per program (8-64, a power of two): more
    programs along K where the x K-slice would not fit in X_SMEM_MAX bytes or the device's opt-in
    shared memory (227 KB on an H100, 99 KB on sm_86/89) less 8 KB."""
    if max_tok not in (8, 16, 32, 64):
        raise ValueError(f"tokens per program must be 8, 16, 32 or 64, got {max_tok}")
    tok = min(max_tok, max(8, 1 << (m - 1).bit_length()))
    bk = step_k(tok, group_size)
    groups = k // group_size
    split = max(1, min(split, groups))
    budget = min(X_SMEM_MAX, smem_optin - (8 << 10))
    while triton.cdiv(groups, split) * group_size * tok * 2 > budget and split < groups:
        split += 1  # the K-slice of x must fit in shared memory
    k_per_split = triton.cdiv(groups, split) * group_size
    return tok, bk, triton.cdiv(k, k_per_split), k_per_split


def fit(config: MmaConfig, max_bn: int) -> MmaConfig | None:
    """The config with fewer 16-row tiles (MT first, then warps) until a program's 16 * MT * warps
    rows divide the slot bounds (`max_bn`); None if even 16 rows do not."""
    mt, warps = config.mt, config.warps
    while 16 * mt * warps > max_bn and (mt > 1 or warps > 1):
        mt, warps = (mt // 2, warps) if mt > 1 else (mt, warps // 2)
    return MmaConfig(mt, warps, config.split_k, config.max_tokens) if 16 * mt * warps <= max_bn else None


class MmaDecodeKernel(Kernel):
    name = "mma_decode"
    t_tokens = T_TOKENS

    def can_implement(self, shape: LayerShape, device: Device) -> tuple[bool, str | None]:
        if self.disabled():
            return False, self.disabled()
        if not device.cuda or device.capability < (8, 0):
            return False, "needs a CUDA device of sm_80 or newer (and no Triton interpreter)"
        if shape.dtype not in (torch.bfloat16, torch.float16):
            return False, f"activations in {shape.dtype}; the kernel takes bf16/fp16"
        if shape.group_size not in (64, 128) or shape.k % shape.group_size:
            return False, f"group size {shape.group_size}: the kernel steps over whole 64-column chunks (G 64 or 128)"
        return True, None

    def choose(self, m: int, shape: LayerShape, tables) -> MmaConfig | None:
        cfg = tables.mma_decode.lookup(m, shape.n, shape.k) if m <= MAX_TOKENS else None
        return fit(cfg, shape.max_block_n) if cfg is not None else None

    def launch(self, a: Launch, cfg: MmaConfig) -> None:
        m, n, k = a.m, a.n, a.k
        p = launch_params(m, n, k, a.group_size, cfg, a.max_block_n, Device.of(a.x.device).smem_optin)
        part, ticket = scratch(a.out.device, n, MAX_TOKENS)
        m_tiles = triton.cdiv(m, p.tok)
        assert p.tiles * m_tiles <= ticket.numel() and m * n <= part.numel()
        ts = a.t_source(self.name, T_TOKENS)
        grid = (ts.t_progs + p.tiles * p.split * m_tiles,) if ts.in_launch else (p.tiles, p.split, m_tiles)
        x, qw, sc, up, us, ws_arg, bias = a.operands(ts.ws)
        _tq_decode_mma_kernel[grid](
            x, qw, sc, up, us, ws_arg, bias, a.out, part, ticket, ts.down, ts.down_scale, ts.sync, m, n, k, a.rank,
            a.slot_b1, a.slot_b2, ts.num_splits, p.tiles, p.split, ts.rt, ts.t_progs, ts.k_per, *a.strides(None)[:4],
            *ts.ws_strides, a.out.stride(0), ts.stride_dr,
            **constexprs(p, a.group_size, a.rank, a.has_us, a.bias is not None, a.x.dtype, a.pdl and not ts.in_launch,
                         t_block_r=a.t_block_r if ts.in_launch else 0,
                         int8_down=ts.in_launch and a.down_scale is not None),
            num_warps=p.warps, launch_pdl=a.pdl and not ts.in_launch,
        )


@dataclass(frozen=True)
class LaunchParams:
    mt: int
    warps: int
    tok: int  # tokens per program
    bk: int  # K step
    split: int  # programs along K
    k_per_split: int
    tiles: int  # column tiles
    tiled: bool  # the token offset is a runtime value


def launch_params(m: int, n: int, k: int, group_size: int, cfg: MmaConfig, max_block_n: int,
                  smem_optin: int) -> LaunchParams:
    """How `cfg` launches for this layer and M (what the launch and the sm_90 compile checks use)."""
    if not usable(m, group_size, k):
        raise ValueError(f"the mma decode kernel takes M <= {MAX_TOKENS}, group size 64 or 128 and K a multiple "
                         f"of it; got M={m}, G={group_size}, K={k}")
    fitted = fit(cfg, max_block_n)  # a tile never straddles two slots
    if fitted is None:
        raise ValueError(f"mma decode config {cfg}: 16 * mt * warps rows must divide the slot bounds")
    tok, bk, split, k_per_split = launch_shape(m, k, group_size, fitted.split_k, fitted.max_tokens, smem_optin)
    return LaunchParams(fitted.mt, fitted.warps, tok, bk, split, k_per_split,
                        triton.cdiv(n, 16 * fitted.mt * fitted.warps), token_offset_runtime(m, tok))


def constexprs(p: LaunchParams, group_size: int, rank: int, int8: bool, bias: bool, dtype: torch.dtype,
               pdl: bool, t_block_r: int = 0, int8_down: bool = False) -> dict:
    """The kernel's constexprs; t_block_r > 0: t made in the launch, that many rows of D per piece."""
    return dict(KS=p.k_per_split, GROUP=group_size, BK=p.bk, HAS_LOWRANK=rank > 0, HAS_US=int8, HAS_BIAS=bias,
                MT=p.mt, TOK=p.tok, BLOCK_R=max(16, next_pow2(rank)) if rank else 16, SPLIT=p.split > 1,
                EXP=0x4300 if dtype == torch.bfloat16 else 0x6400, TILED=p.tiled, PDL=pdl, T_IN=t_block_r > 0,
                BLOCK_RT=t_block_r or 16, HAS_DS=int8_down)


KERNEL = MmaDecodeKernel()
