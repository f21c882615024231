"""W4A8-INT8 on Hopper, warp-specialized: a TMA producer warp and two consumer warpgroups.

    y = s_x * sum_g (s_w[:, g] / 16) * ((16 q_g) @ xq_g^T) + (x @ D^T) @ U^T + bias

The numerics and the fragment are w4a8_rs's (16 q made from the 4-bit codes with one LOP3 per four
codes, exact int32 sums per scale group promoted into fp32 with the group scales, x's codes in
`perm_columns` order), the schedule is that of block-scaled FP8 GEMMs on Hopper:

* one CTA computes 128 weight rows x TOK tokens (or, `warpgroups=1`, 64 rows, two CTAs per SM); a
  producer warp (few registers) streams, per scale group, x's codes [TOK, group] and each
  warpgroup's words [64, group / 8] by TMA into a STAGES-deep ring, signalling a `ready` barrier
  with the bytes it expects;
* each consumer warpgroup (its own partition, registers moved to it) waits for its group, makes its
  int8 fragment from the words, runs wgmma s8 into int32 sums and, while it runs, reads the next
  group's words and scales (ptxas places the fragment's LOP3s after the wait); then releases the
  slot (`empty`, one arrival per warpgroup) and promotes the sums. The two warpgroups are not
  synchronised with each other, so one's promotion runs beside the other's MMA; with `overlap` a
  warpgroup takes groups in pairs and promotes the first one's sums while the second one's wgmma runs
  (two int32 sums in registers: at 64 tokens; nothing in flight between pairs, which ptxas needs to keep
  the wgmmas asynchronous);
* tiles are rastered in bands of BAND row tiles, token tiles inner: a band's codes stay in L2 while
  x streams past it, and x is read once per band. A CTA takes one tile, or (`persistent`) every
  num_programs-th tile with one CTA per SM: the ring runs on across tiles, so the producer loads the
  next tile's first groups while the consumers finish the last one's epilogue.

The epilogue (per warpgroup) multiplies by the token scales, adds t U^T (t from `lowrank_down`) and
the bias. Only compiled for sm_90 (Gluon has no CPU interpreter): CI compiles it without a GPU;
on the GPU `benchmarks/kernels/tune.py sweep-w4a8` checks every config against the float reference of
the W4A8 numerics before timing it, and the plan takes it only where the device's table names a config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from csrc_triton.kernels.base import Launch, LayerShape
from csrc_triton.kernels.w4a8 import CONVERTS, quantize_rows
from csrc_triton.kernels.w4a8_rs import (
    IntegerCodesKernel,
    epilogue,
    fragment_view,
    int8_fragment,
    int8_operand,
    promote,
)
from csrc_triton.layout import next_pow2

MEASURED_TRITON = ("3.6",)  # Triton versions it was written and measured with
WG_ROWS = 64  # weight rows per consumer warpgroup; a CTA has one or two of them
_WG_ROWS = gl.constexpr(WG_ROWS)
# registers per thread a launch asks for, by consumer warpgroups: two of them and the producer's warp (padded to a
# warpgroup) take the 64K of an SM; one of them takes half, so that two CTAs share an SM. Either way the producer
# keeps PRODUCER_REGS and each consumer gets CONSUMER_REGS.
MAXNREG = {2: 168, 1: 128}
CTAS_PER_SM = {2: 1, 1: 2}  # what those registers let share an SM, by consumer warpgroups
CONSUMER_REGS = gl.constexpr(232)
PRODUCER_REGS = gl.constexpr(24)

# TMA global -> shared: `async_copy_global_to_shared` up to Triton 3.6, `async_load` later
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# a shared buffer seen with another shape and layout: `_reinterpret` up to Triton 3.6, `reinterpret` later
_NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))


@dataclass(frozen=True)
class W4a8WsConfig:
    tokens: int  # per CTA: wgmma's N side, 64 or 128
    stages: int  # depth of the TMA ring, >= 2
    band: int = 16  # row tiles per raster band (token tiles inner)
    persistent: bool = False  # one CTA per SM looping over the tiles (else one CTA per tile)
    warpgroups: int = 2  # consumer warpgroups per CTA (64 weight rows each): 2, or 1 with two CTAs per SM
    convert: str = "cvt"  # int32 -> fp32 of a group's sums (w4a8.CONVERTS)
    overlap: bool = False  # a warpgroup promotes a group's sums while its next group's wgmma runs (64 tokens only)


@gluon.jit
def _tile(tile, M, N, TOK: gl.constexpr, WGS: gl.constexpr, BAND: gl.constexpr):
    """(first token, first weight row) of a tile of 64 WGS rows: bands of BAND row tiles, token tiles inner."""
    tiles_m = gl.cdiv(M, TOK)
    tiles_n = gl.cdiv(N, WGS * _WG_ROWS)
    per_band = BAND * tiles_m
    first_n = (tile // per_band) * BAND
    rows_here = gl.minimum(tiles_n - first_n, BAND)
    local = tile % per_band
    return (local // rows_here) * TOK, (first_n + local % rows_here) * (WGS * _WG_ROWS)


@gluon.jit
def _producer(x_desc, q_desc, x_bufs, q_bufs0, q_bufs1, ready, empty, M, N, K, GROUP: gl.constexpr,
              TOK: gl.constexpr, STAGES: gl.constexpr, WGS: gl.constexpr, BAND: gl.constexpr):
    """Per tile of this CTA and scale group (`it` counts them through the ring): wait for the slot to be
    released by every consumer warpgroup, then x's codes and each warpgroup's words by TMA, completing
    `ready` with their bytes. The next tile's first groups load while the consumers finish a tile."""
    nbytes: gl.constexpr = x_desc.block_type.nbytes + WGS * q_desc.block_type.nbytes
    tiles = gl.cdiv(M, TOK) * gl.cdiv(N, WGS * _WG_ROWS)
    it = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        m0, off_n = _tile(tile, M, N, TOK, WGS, BAND)
        for g in range(K // GROUP):
            st = it % STAGES
            mbarrier.wait(empty.index(st), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(st)
            mbarrier.expect(bar, nbytes)
            _tma_load(x_desc, [m0, g * GROUP], bar, x_bufs.index(st))
            _tma_load(q_desc, [off_n, g * (GROUP // 8)], bar, q_bufs0.index(st))
            if WGS == 2:
                _tma_load(q_desc, [off_n + _WG_ROWS, g * (GROUP // 8)], bar, q_bufs1.index(st))
            it += 1


@gluon.jit
def _words_view(q_bufs, STAGES: gl.constexpr, BK: gl.constexpr):
    """The ring of one warpgroup's words [STAGES, 64, BK / 8] (row-major, as TMA writes it) seen as
    [STAGES, 64, CH, 4 (t), 2 (h)]: word 8 c + 2 t + h of a row (a stage permuted to w4a8_rs's word
    order [64, CH, 2 (h), 4 (t)] is what a lane loads for its fragment)."""
    CH: gl.constexpr = BK // 64
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[3, 2, 1, 0])  # a stage's, row-major
    if _NEW_REINTERPRET:
        v = q_bufs.reinterpret(gl.int32, [STAGES, _WG_ROWS, CH, 4, 2], PLAIN)
    else:
        v = q_bufs._reinterpret(gl.int32, [STAGES, _WG_ROWS, CH, 4, 2], PLAIN)
    return v


@gluon.jit
def _landed_fragment(words, ready, it, landed, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                     A_L: gl.constexpr, W_L: gl.constexpr):
    """Ring step it's words, once landed (waited for where `landed`), made into its int8 fragment."""
    st = it % STAGES
    mbarrier.wait(ready.index(st), (it // STAGES) & 1, pred=landed)
    return int8_fragment(words.index(st).permute((0, 1, 3, 2)).load(W_L), BN, BK, A_L)


@gluon.jit
def _group(acc, part, w, s_cur, it, has_next, s_ptrs, g_next, x_bufs, words, ready, empty, BN: gl.constexpr,
           BK: gl.constexpr, STAGES: gl.constexpr, A_L: gl.constexpr, W_L: gl.constexpr, BIAS_CVT: gl.constexpr):
    """Ring step `it`: its wgmma (fragment w) started; the next group's words (once landed, where has_next)
    read and made into its fragment and its scales (group g_next) loaded; the wgmma retired, the slot
    released (one arrival for this warpgroup) and the sums promoted with s_cur. Returns (acc, the sums,
    the next fragment, the next scales, it + 1)."""
    st = it % STAGES
    part = warpgroup_mma(int8_operand(w, BN, BK, A_L), x_bufs.index(st).permute((1, 0)), part, use_acc=False,
                         is_async=True)
    w_next = _landed_fragment(words, ready, it + 1, has_next, BN, BK, STAGES, A_L, W_L)
    s_next = gl.load(s_ptrs + g_next)
    part, acc = warpgroup_mma_wait(num_outstanding=0, deps=(part, acc))
    fence_async_shared()  # this warpgroup's reads of the slot are ordered before the producer's next TMA
    mbarrier.arrive(empty.index(st), count=1)
    acc = promote(acc, part, s_cur, BIAS_CVT)
    return acc, part, w_next, s_next, it + 1


@gluon.jit
def _pair_overlapped(acc, part_a, part_b, w_a, s_a, it, g_b, has_next, s_ptrs, g_next, x_bufs, words, ready, empty,
                     BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, A_L: gl.constexpr, W_L: gl.constexpr,
                     BIAS_CVT: gl.constexpr):
    """Ring steps it and it + 1 (`overlap`): with nothing in flight and step it's fragment w_a and scales s_a
    made, step it's wgmma issued, step it + 1's fragment made and its wgmma issued too; step it retired (one
    wgmma left in flight), its slot released and its sums promoted while step it + 1's runs; the fragment and
    scales of the group after (g_next, its words once landed where has_next) made; step it + 1 (group g_b) retired,
    released and promoted. Nothing is in flight between pairs. Returns (acc, the sums, the next fragment and
    scales, it + 2)."""
    st0 = it % STAGES
    st1 = (it + 1) % STAGES
    part_a = warpgroup_mma(int8_operand(w_a, BN, BK, A_L), x_bufs.index(st0).permute((1, 0)), part_a, use_acc=False,
                           is_async=True)
    w_b = _landed_fragment(words, ready, it + 1, True, BN, BK, STAGES, A_L, W_L)
    s_b = gl.load(s_ptrs + g_b)
    part_b = warpgroup_mma(int8_operand(w_b, BN, BK, A_L), x_bufs.index(st1).permute((1, 0)), part_b, use_acc=False,
                           is_async=True)
    part_a, w_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a, w_a))
    fence_async_shared()  # this warpgroup's reads of the slot are ordered before the producer's next TMA
    mbarrier.arrive(empty.index(st0), count=1)
    acc = promote(acc, part_a, s_a, BIAS_CVT)
    w_next = _landed_fragment(words, ready, it + 2, has_next, BN, BK, STAGES, A_L, W_L)
    s_next = gl.load(s_ptrs + g_next)
    part_b, w_b = warpgroup_mma_wait(num_outstanding=0, deps=(part_b, w_b))
    fence_async_shared()
    mbarrier.arrive(empty.index(st1), count=1)
    acc = promote(acc, part_b, s_b, BIAS_CVT)
    return acc, part_a, part_b, w_next, s_next, it + 2


@gluon.jit
def _consumer(WG: gl.constexpr, x_ptr, xs_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, x_bufs, q_bufs,
              ready, empty, M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_sn, stride_un, stride_ws_s,
              stride_ws_m, stride_ym, GROUP: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr,
              HAS_BIAS: gl.constexpr, TOK: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr,
              WGS: gl.constexpr, BAND: gl.constexpr, BIAS_CVT: gl.constexpr, OVERLAP: gl.constexpr,
              PDL: gl.constexpr):
    """Warpgroup WG: for each tile of this CTA, rows off_n + 64 WG .. + 64 over all of K, then its epilogue."""
    BK: gl.constexpr = GROUP
    BN: gl.constexpr = _WG_ROWS
    n_groups = K // GROUP
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TOK, 32])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4)
    # the words a lane needs for its fragment: w4a8_rs's word layout [BN, CH, 2 (h), 4 (t)]
    W_L: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(5, fragment_view(BN, BK, A_L).type.layout))
    words = _words_view(q_bufs, STAGES, BK)
    tiles = gl.cdiv(M, TOK) * gl.cdiv(N, WGS * _WG_ROWS)
    it = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        m0, off_n = _tile(tile, M, N, TOK, WGS, BAND)
        off_n = off_n + WG * _WG_ROWS
        sn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        s_ptrs = sc_ptr + gl.minimum(sn, N - 1) * stride_sn
        acc = gl.zeros([BN, TOK], gl.float32, layout=MMA)
        part = gl.zeros([BN, TOK], gl.int32, layout=MMA)
        w_a = _landed_fragment(words, ready, it, True, BN, BK, STAGES, A_L, W_L)
        s_cur = gl.load(s_ptrs)
        if OVERLAP:
            # two groups per iteration, the first one's promotion beside the second one's wgmma
            part_b = part
            for j in range(n_groups // 2):
                acc, part, part_b, w_a, s_cur, it = _pair_overlapped(
                    acc, part, part_b, w_a, s_cur, it, 2 * j + 1, 2 * j + 2 < n_groups, s_ptrs,
                    gl.minimum(2 * j + 2, n_groups - 1), x_bufs, words, ready, empty, BN, BK, STAGES, A_L, W_L,
                    BIAS_CVT)
        else:
            # two groups per iteration, their fragments in two variables (no copy of one into the other)
            for j in range(n_groups // 2):
                acc, part, w_b, s_cur, it = _group(acc, part, w_a, s_cur, it, 2 * j + 1 < n_groups, s_ptrs,
                                                   gl.minimum(2 * j + 1, n_groups - 1), x_bufs, words, ready, empty,
                                                   BN, BK, STAGES, A_L, W_L, BIAS_CVT)
                acc, part, w_a, s_cur, it = _group(acc, part, w_b, s_cur, it, 2 * j + 2 < n_groups, s_ptrs,
                                                   gl.minimum(2 * j + 2, n_groups - 1), x_bufs, words, ready, empty,
                                                   BN, BK, STAGES, A_L, W_L, BIAS_CVT)
        if n_groups % 2:  # the last group of an odd count, alone
            acc, part, w_b, s_cur, it = _group(acc, part, w_a, s_cur, it, False, s_ptrs, n_groups - 1, x_bufs, words,
                                               ready, empty, BN, BK, STAGES, A_L, W_L, BIAS_CVT)
        epilogue(acc, m0, off_n, x_ptr, xs_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, M, N, R, SLOT_B1, SLOT_B2,
                 NUM_SPLITS, stride_un, stride_ws_s, stride_ws_m, stride_ym, HAS_LOWRANK, HAS_US, HAS_BIAS, TOK, BN,
                 BLOCK_R, PDL, MMA, 4)


@gluon.jit
def _tq_w4a8_ws_kernel(
    x_ptr, x_desc, xs_ptr, q_desc, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS,
    stride_sn, stride_un, stride_ws_s, stride_ws_m, stride_ym,
    GROUP: gl.constexpr, HAS_LOWRANK: gl.constexpr, HAS_US: gl.constexpr, HAS_BIAS: gl.constexpr,
    TOK: gl.constexpr, BLOCK_R: gl.constexpr, STAGES: gl.constexpr, WGS: gl.constexpr, BAND: gl.constexpr,
    BIAS_CVT: gl.constexpr, OVERLAP: gl.constexpr, PDL: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Tiles of tokens [m0, +TOK) x weight rows [off_n, +64 WGS) (`_tile`), this CTA's every
    num_programs-th, in WGS + 1 partitions (module docstring). x_desc: x's codes [M, K] int8
    (`perm_columns` order); q_desc: the words [N, K / 8] int32, 64-row boxes. x_ptr (the unquantized
    input) gives the dtype of the low-rank product."""
    x_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, TOK, GROUP], x_desc.layout)
    q_bufs0 = gl.allocate_shared_memory(gl.int32, [STAGES, _WG_ROWS, GROUP // 8], q_desc.layout)
    q_bufs1 = gl.allocate_shared_memory(gl.int32, [STAGES if WGS == 2 else 1, _WG_ROWS, GROUP // 8], q_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=WGS)  # one arrival per consumer warpgroup
    fence_async_shared()
    if WGS == 2:
        gl.warp_specialize([
            (_consumer, (0, x_ptr, xs_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, x_bufs, q_bufs0, ready,
                         empty, M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_sn, stride_un, stride_ws_s,
                         stride_ws_m, stride_ym, GROUP, HAS_LOWRANK, HAS_US, HAS_BIAS, TOK, BLOCK_R, STAGES, WGS, BAND,
                         BIAS_CVT, OVERLAP, PDL)),
            (_consumer, (1, x_ptr, xs_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, x_bufs, q_bufs1, ready,
                         empty, M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_sn, stride_un, stride_ws_s,
                         stride_ws_m, stride_ym, GROUP, HAS_LOWRANK, HAS_US, HAS_BIAS, TOK, BLOCK_R, STAGES, WGS, BAND,
                         BIAS_CVT, OVERLAP, PDL)),
            (_producer, (x_desc, q_desc, x_bufs, q_bufs0, q_bufs1, ready, empty, M, N, K, GROUP, TOK, STAGES, WGS,
                         BAND)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, x_ptr, xs_ptr, sc_ptr, up_ptr, us_ptr, ws_ptr, bias_ptr, y_ptr, x_bufs, q_bufs0, ready,
                         empty, M, N, K, R, SLOT_B1, SLOT_B2, NUM_SPLITS, stride_sn, stride_un, stride_ws_s,
                         stride_ws_m, stride_ym, GROUP, HAS_LOWRANK, HAS_US, HAS_BIAS, TOK, BLOCK_R, STAGES, WGS, BAND,
                         BIAS_CVT, OVERLAP, PDL)),
            (_producer, (x_desc, q_desc, x_bufs, q_bufs0, q_bufs1, ready, empty, M, N, K, GROUP, TOK, STAGES, WGS,
                         BAND)),
        ], [1], [PRODUCER_REGS])


# -- host side --------------------------------------------------------------------------------
def smem_layouts(cfg_tokens: int, group: int) -> tuple:
    """The TMA boxes' shared layouts: x's codes swizzled for wgmma's B operand, the words unswizzled
    (the consumers read them in their fragment's own order)."""
    x_l = gl.NVMMASharedLayout.get_default_for([cfg_tokens, group], gl.int8)
    q_l = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return x_l, q_l


def descriptors(xq: torch.Tensor, qweight: torch.Tensor, cfg: W4a8WsConfig, group: int):
    x_l, q_l = smem_layouts(cfg.tokens, group)
    return (TensorDescriptor.from_tensor(xq, [cfg.tokens, group], x_l),
            TensorDescriptor.from_tensor(qweight, [WG_ROWS, group // 8], q_l))


def launch_check(m: int, n: int, k: int, group_size: int, cfg: W4a8WsConfig) -> None:
    """Raise ValueError where `cfg` cannot launch for this layer (what can_implement does not know)."""
    if group_size not in (64, 128) or k % group_size:
        raise ValueError(f"w4a8_ws steps over whole groups of 64 or 128 columns: group size {group_size}, K = {k}")
    if (cfg.tokens not in (64, 128) or cfg.stages < 2 or cfg.band < 1 or cfg.convert not in CONVERTS
            or cfg.warpgroups not in MAXNREG or (cfg.overlap and cfg.tokens != 64)):
        raise ValueError(f"w4a8_ws config {cfg}: tokens 64 or 128, stages >= 2, band >= 1, convert one of "
                         f"{CONVERTS}, warpgroups one of {sorted(MAXNREG)}; overlap (two int32 sums per warpgroup) "
                         "at 64 tokens only")


def constexprs(cfg: W4a8WsConfig, group_size: int, rank: int, int8_factors: bool, bias: bool, pdl: bool) -> dict:
    return dict(GROUP=group_size, HAS_LOWRANK=rank > 0, HAS_US=int8_factors, HAS_BIAS=bias, TOK=cfg.tokens,
                BLOCK_R=max(16, next_pow2(rank)) if rank else 16, STAGES=cfg.stages, WGS=cfg.warpgroups, BAND=cfg.band,
                BIAS_CVT=cfg.convert == "bias", OVERLAP=cfg.overlap, PDL=pdl)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid(m: int, n: int, cfg: W4a8WsConfig, sms: int) -> tuple[int]:
    """One CTA per tile, or (persistent) at most as many as fit the SMs at once, each taking every
    grid-th tile."""
    tiles = triton.cdiv(m, cfg.tokens) * triton.cdiv(n, WG_ROWS * cfg.warpgroups)
    return (min(tiles, sms * CTAS_PER_SM[cfg.warpgroups]) if cfg.persistent else tiles,)


class W4a8WsKernel(IntegerCodesKernel):
    name = "w4a8_ws"
    measured_triton = MEASURED_TRITON

    def choose(self, m: int, shape: LayerShape, tables) -> W4a8WsConfig | None:
        if m * shape.k >= 2**31:  # TMA coordinates and the codes' offsets are int32
            return None
        return tables.w4a8_ws.lookup(m, shape.n, shape.k)

    def launch(self, a: Launch, cfg: W4a8WsConfig) -> None:
        m, n, k, group = a.m, a.n, a.k, a.group_size
        launch_check(m, n, k, group, cfg)
        xq, xs, _ = quantize_rows(a.x, a.act_quant, group, mma_order=True, clip_ratio=a.act_clip)
        ws, num_splits = a.make_t()
        _, _, sc, up, us, ws_arg, bias = a.operands(ws)
        x_desc, q_desc = descriptors(xq, a.qweight, cfg, group)
        _tq_w4a8_ws_kernel[grid(m, n, cfg, _sm_count(a.x.device.index or 0))](
            a.x, x_desc, xs, q_desc, sc, up, us, ws_arg, bias, a.out, m, n, k, a.rank, a.slot_b1, a.slot_b2,
            num_splits, *a.strides(ws)[2:], a.out.stride(0),
            **constexprs(cfg, group, a.rank, a.has_us, a.bias is not None, a.pdl),
            num_warps=4, maxnreg=MAXNREG[cfg.warpgroups], launch_pdl=a.pdl,
        )


KERNEL = W4a8WsKernel()
