"""The Hopper tile kernel for 17-256 tokens (W4A16, sm_90), written in Gluon: the 4-bit codes
dequantized straight into wgmma's register operand.

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias        (t = x @ D^T from `lowrank_down`)

wgmma's A operand may come from registers, so the dequantized weights never touch shared
memory: acc^T [BN, TOK] = w [BN, K] @ x^T with the tokens on wgmma's N side (swap AB), w made
in registers straight in the A-fragment layout (`gluon_common.code_ptrs` / `fragment`), x^T read
by wgmma from shared memory. x and the codes arrive through one STAGES-deep cp.async ring, the
scales four steps ahead in registers; each step's fragment is made while the previous step's
asynchronous wgmma runs. Split-K sums meet in the scratch that the last program of a tile
finishes (`gluon_common.split_k_finish`). Group sizes 64 and 128 (one 64-column chunk per K step).

Only compiled for sm_90 (Gluon has no CPU interpreter); CI compiles it for sm_90 without a GPU,
numerics are checked on the GPU by benchmarks/kernels/bench_kernels.py and graph_check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from csrc_triton.gluon_common import (
    code_ptrs,
    cp_async,
    cta_barrier,
    fragment,
    hopper_refusal,
    lowrank_operands,
    planes_scaled,
    register_smem_mma,
    scratch,
    split_k_finish,
)
from csrc_triton.kernels.base import Device, Kernel, Launch, LayerShape
from csrc_triton.layout import next_pow2

MIN_M, MAX_TOKENS = 16, 256  # the plan gives this kernel MIN_M < M <= MAX_TOKENS
MEASURED_TRITON = ("3.6",)  # Triton versions it was written and measured with


@dataclass(frozen=True)
class RsConfig:
    tokens: int  # per program: wgmma's N side, a multiple of 8 up to 256
    block_n: int  # weight rows per program: 16 * MT * warps
    warps: int  # 4 or 8 (one or two warpgroups)
    stages: int  # depth of the cp.async ring, >= 3
    split_k: int


# -- MODE 10: the weights as wgmma's register operand ------------------------------------------
@gluon.jit
def _rs_step(i, acc, w, s_1, s_2, s_3, x_bufs, q_bufs, x_ptrs, x_all, q_ptrs, q_all, s_ptrs, k_lo, k_last, n_steps,
             BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr, EXP: gl.constexpr,
             A_L: gl.constexpr, P_L: gl.constexpr):
    """Step i of MODE 10's main loop: acc += w @ x_i^T started, the copies of step i + STAGES - 1
    issued, step i + 1's fragment made (scale s_1) while the wgmma runs, then the wgmma retired.
    Returns (acc, step i + 1's fragment, the scales of steps i + 2 .. i + 4)."""
    acc = warpgroup_mma(w, x_bufs.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    s_4 = gl.load(s_ptrs + gl.minimum(k_lo + (i + 4) * BK, k_last) // GROUP)
    async_copy.wait_group(STAGES - 3)  # step i + 1's x and codes have landed (this thread's copies) ...
    p = q_bufs.index((i + 1) % STAGES).load(P_L)  # (read before the barrier: one barrier less)
    fence_async_shared()
    cta_barrier()  # ... everyone's; and every warpgroup has retired its wgmma of step i - 1
    nxt = i + STAGES - 1  # into the slot of step i - 1
    cp_async(x_bufs.index(nxt % STAGES), x_ptrs + nxt * BK, mask=x_all & (nxt < n_steps))
    cp_async(q_bufs.index(nxt % STAGES), q_ptrs + nxt * (BK // 8), mask=q_all & (nxt < n_steps))
    async_copy.commit_group()
    v0, v1, v2, v3, v4, v5, v6, v7 = planes_scaled(p, s_1.to(w.dtype), EXP)
    w_next = fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN, BK, A_L)
    acc, w = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w))  # w is read until the wgmma retires
    return acc, w_next, s_2, s_3, s_4


@gluon.jit
def _lowrank_epilogue_rs(acc, ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_ws_s,
                         stride_ws_m, stride_un, TOK: gl.constexpr, BN: gl.constexpr, BLOCK_R: gl.constexpr,
                         HAS_US: gl.constexpr, PDL: gl.constexpr, act: gl.constexpr,
                         MMA: gl.constexpr, num_warps: gl.constexpr):
    """acc^T [BN, TOK] + U [BN, BLOCK_R] @ t^T, all ranks at once."""
    t, u = lowrank_operands(ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
                             stride_ws_s, stride_ws_m, stride_un, TOK, BN, BLOCK_R, HAS_US, PDL, num_warps, 0)
    return register_smem_mma(u.to(act), t.to(act), acc, MMA)

@gluon.jit
def _tq_gemm_wgmma_rs_kernel(
    x_ptr, qw_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, part_ptr, ticket_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, k_per_split,
    stride_xm, stride_qn, stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr,
    MT: gl.constexpr, TOK: gl.constexpr, BLOCK_R: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    EXP: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr,
):
    """Program (pid % token tiles, pid // token tiles; pid_k): tokens [m0, +TOK) x weight rows
    [off_n, +BN) (BN = 16 * MT * num_warps) over the K-slice pid_k. acc^T [BN, TOK] = w [BN, K] @ x^T
    with w = (q - 8) * s made in registers straight in wgmma's A-fragment layout, and x^T read by
    wgmma from shared memory. x and the codes (in the order `gluon_common.code_ptrs` derives)
    come through one STAGES-deep cp.async ring, the scales four steps ahead in registers. The
    wgmma of step i runs while step i + 1 is dequantized (`_rs_step`, two steps per iteration)."""
    act: gl.constexpr = x_ptr.dtype.element_ty
    BK: gl.constexpr = 64
    BN: gl.constexpr = 16 * MT * num_warps
    pid = gl.program_id(0)
    pid_k = gl.program_id(1)
    tiles_m = gl.cdiv(M, TOK)
    pid_m = pid % tiles_m  # the token tiles of a row tile run side by side (its codes are read once from HBM)
    pid_n = pid // tiles_m
    m0 = pid_m * TOK
    off_n = pid_n * BN
    k_lo = pid_k * k_per_split
    k_hi = gl.minimum(k_lo + k_per_split, K)
    n_steps = gl.cdiv(k_hi - k_lo, BK)

    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, TOK, 16])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    q_ptrs = code_ptrs(qw_ptr, off_n, N, stride_qn, BN, BK, A_L)
    P_L: gl.constexpr = q_ptrs.type.layout
    sn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, P_L))))
    s_ptrs = sc_ptr + gl.minimum(sn, N - 1) * stride_sn

    # one ring of STAGES slots, filled by cp.async a step per commit group: x [TOK, BK] (16-byte
    # copies; padding tokens copy row M - 1, finite, never stored) and the step's codes, each
    # thread copying the 8-byte word pairs it later reads itself (so only x needs the barrier)
    X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TOK, BK], act)
    x_bufs = gl.allocate_shared_memory(act, [STAGES, TOK, BK], X_SMEM)
    CX: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    xm = gl.arange(0, TOK, layout=gl.SliceLayout(1, CX))
    xk = gl.arange(0, BK, layout=gl.SliceLayout(0, CX))
    x_ptrs = x_ptr + gl.expand_dims(gl.minimum(m0 + xm, M - 1), 1) * stride_xm + gl.expand_dims(k_lo + xk, 0)
    x_all = gl.expand_dims(xm >= 0, 1) & gl.expand_dims(xk >= 0, 0)
    Q_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[3, 2, 1, 0])
    q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 1, 4, 2], Q_SMEM)
    q_ptrs = q_ptrs + k_lo // 8
    q_all = gl.full([BN, 1, 4, 2], 1, gl.int1, P_L)
    for st in gl.static_range(STAGES - 1):
        cp_async(x_bufs.index(st), x_ptrs + st * BK, mask=x_all & (st < n_steps))
        cp_async(q_bufs.index(st), q_ptrs + st * (BK // 8), mask=q_all & (st < n_steps))
        async_copy.commit_group()

    # the scales of steps i + 1 .. i + 4 in registers as loaded (converted where used: a
    # conversion next to its load would wait for it); steps past the slice re-read the last one
    k_last = k_hi - BK  # slices are whole groups, so whole steps
    s_1 = gl.load(s_ptrs + k_lo // GROUP)
    s_2 = gl.load(s_ptrs + gl.minimum(k_lo + BK, k_last) // GROUP)
    s_3 = gl.load(s_ptrs + gl.minimum(k_lo + 2 * BK, k_last) // GROUP)
    s_4 = gl.load(s_ptrs + gl.minimum(k_lo + 3 * BK, k_last) // GROUP)
    async_copy.wait_group(STAGES - 2)  # step 0's x and codes
    fence_async_shared()
    cta_barrier()
    v0, v1, v2, v3, v4, v5, v6, v7 = planes_scaled(q_bufs.index(0).load(P_L), s_1.to(act), EXP)
    w = fragment(v0, v1, v2, v3, v4, v5, v6, v7, BN, BK, A_L)
    s_1, s_2, s_3 = s_2, s_3, s_4
    acc = gl.zeros([BN, TOK], gl.float32, layout=MMA)
    # two steps per iteration, their fragments in two variables: with one, carried around the
    # loop, ptxas gives the next step's fragment the registers the running wgmma still reads
    # and waits for it before the dequantization instead of after (no overlap at all)
    for j in range(n_steps // 2):
        acc, w_b, s_1, s_2, s_3 = _rs_step(2 * j, acc, w, s_1, s_2, s_3, x_bufs, q_bufs, x_ptrs, x_all, q_ptrs,
                                           q_all, s_ptrs, k_lo, k_last, n_steps, BN, BK, STAGES, GROUP, EXP, A_L, P_L)
        acc, w, s_1, s_2, s_3 = _rs_step(2 * j + 1, acc, w_b, s_1, s_2, s_3, x_bufs, q_bufs, x_ptrs, x_all, q_ptrs,
                                         q_all, s_ptrs, k_lo, k_last, n_steps, BN, BK, STAGES, GROUP, EXP, A_L, P_L)
    if n_steps % 2:  # the last step (its x waited for by the last iteration)
        acc = warpgroup_mma(w, x_bufs.index((n_steps - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, w = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w))
    async_copy.wait_group(0)

    om = m0 + gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
    on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    om2 = gl.expand_dims(om, 0)
    on2 = gl.expand_dims(on, 1)
    out_mask = (om2 < M) & (on2 < N)
    last = True
    if SPLIT:  # the last of the programs along K of this (row, token) tile finishes it
        acc, last = split_k_finish(acc, part_ptr + om2 * N + on2, out_mask, ticket_ptr + pid, gl.num_programs(1))
    if last:
        if HAS_LOWRANK:  # acc^T += U [BN, BR] @ t^T
            acc = _lowrank_epilogue_rs(acc, ws_ptr, up_ptr, us_ptr, m0, off_n, M, N, R, SLOT_B1, SLOT_B2,
                                       NUM_SPLITS, stride_ws_s, stride_ws_m, stride_un, TOK, BN, BLOCK_R, HAS_US,
                                       PDL, act, MMA, num_warps)
        if HAS_BIAS:
            bias = gl.load(bias_ptr + on, mask=on < N, other=0.0).to(gl.float32)
            acc += gl.expand_dims(bias, 1)
        gl.store(y_ptr + om2 * stride_ym + on2, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def fit(config: RsConfig, max_bn: int) -> RsConfig | None:
    """The config with BLOCK_N = 16 * MT * warps halved (MT first, then warps down to one
    warpgroup) until it divides the slot bounds (`max_bn`); None if even 64 rows do not."""
    bn, warps = config.block_n, config.warps
    while bn > max_bn and bn > 16 * warps:
        bn //= 2  # fewer 16-row tiles per warp
    while bn > max_bn and warps > 4:
        bn, warps = bn // 2, warps // 2
    return RsConfig(config.tokens, bn, warps, config.stages, config.split_k) if bn <= max_bn else None


class WgmmaRsKernel(Kernel):
    name = "wgmma_rs"

    def can_implement(self, shape: LayerShape, device: Device) -> tuple[bool, str | None]:
        if self.disabled():
            return False, self.disabled()
        why = hopper_refusal(shape, device, MEASURED_TRITON)
        if why:
            return False, why
        if shape.group_size not in (64, 128) or shape.k % shape.group_size:
            return False, f"group size {shape.group_size}: the kernel steps over 64-column chunks (G 64 or 128)"
        return True, None

    def choose(self, m: int, shape: LayerShape, tables) -> RsConfig | None:
        if not MIN_M < m <= MAX_TOKENS:
            return None
        cfg = tables.wgmma_rs.lookup(m, shape.n, shape.k)
        return fit(cfg, shape.max_block_n) if cfg is not None else None

    def launch(self, a: Launch, cfg: RsConfig) -> None:
        m, n, k = a.m, a.n, a.k
        p = launch_params(m, n, k, a.group_size, cfg, a.max_block_n)
        ws, num_splits = a.make_t()
        part, ticket = scratch(a.out.device, n, MAX_TOKENS)
        assert p.split == 1 or (p.tiles <= ticket.numel() and m * n <= part.numel())
        _tq_gemm_wgmma_rs_kernel[(p.tiles, p.split)](
            *a.operands(ws), a.out, part, ticket, m, n, k, a.rank, a.slot_b1, a.slot_b2, num_splits, p.k_per_split,
            *a.strides(ws), a.out.stride(0),
            **constexprs(p, a.group_size, a.rank, a.has_us, a.bias is not None, a.x.dtype, a.pdl),
            num_warps=p.warps, launch_pdl=a.pdl,
        )


@dataclass(frozen=True)
class LaunchParams:
    tok: int
    mt: int
    warps: int
    stages: int
    split: int  # programs along K
    k_per_split: int
    tiles: int


def launch_params(m: int, n: int, k: int, group_size: int, cfg: RsConfig, max_block_n: int) -> LaunchParams:
    """How `cfg` launches for this layer and M (what the launch and the sm_90 compile checks use)."""
    tok, bn, warps, stages, split = cfg.tokens, min(cfg.block_n, max_block_n), cfg.warps, cfg.stages, cfg.split_k
    if group_size not in (64, 128) or k % group_size:
        raise ValueError(f"wgmma_rs steps over 64-column chunks: group size {group_size} must be 64 or 128 "
                         f"and divide K = {k}")
    if tok % 8 or not 8 <= tok <= MAX_TOKENS or bn % (16 * warps) or warps % 4 or stages < 3:
        raise ValueError(f"wgmma_rs config: tokens per program a multiple of 8 up to {MAX_TOKENS} (got {tok}), "
                         f"block_n a multiple of 16 * warps (got {bn}, {warps} warps; warps 4 or 8), stages >= 3 "
                         f"(got {stages})")
    groups = k // group_size
    split = max(1, min(split, groups))
    k_per_split = triton.cdiv(groups, split) * group_size
    split = triton.cdiv(k, k_per_split)
    if split > 1 and m > MAX_TOKENS:
        split, k_per_split = 1, k
    return LaunchParams(tok, bn // (16 * warps), warps, stages, split, k_per_split,
                        triton.cdiv(m, tok) * triton.cdiv(n, bn))


def constexprs(p: LaunchParams, group_size: int, rank: int, int8: bool, bias: bool, dtype: torch.dtype,
               pdl: bool) -> dict:
    return dict(GROUP=group_size, HAS_LOWRANK=rank > 0, HAS_US=int8, HAS_BIAS=bias, MT=p.mt, TOK=p.tok,
                BLOCK_R=max(16, next_pow2(rank)) if rank else 16, SPLIT=p.split > 1, STAGES=p.stages,
                EXP=0x4300 if dtype == torch.bfloat16 else 0x6400, PDL=pdl)


KERNEL = WgmmaRsKernel()
