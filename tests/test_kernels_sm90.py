"""The CUDA kernels compiled for sm_90 without a GPU (csrc_triton/compile.py): the Gluon kernels
have no CPU interpreter, so their layout claims are proven by compiling (a `convert_layout(...,
assert_trivial=True)` that would move data fails to compile), and the PTX must hold the pipeline
each kernel was written for. Every launch the plan makes on an H100 compiles and fits the device.
Numerics on the GPU: benchmarks/kernels/bench_kernels.py and graph_check.py."""

import re

import pytest
import torch

from csrc_triton import Device, LayerShape, plan
from csrc_triton.compile import compile_sm90
from csrc_triton.kernels import mma_decode, tile, wgmma_rs
from csrc_triton.kernels.mma_decode import MmaConfig
from csrc_triton.kernels.wgmma_rs import RsConfig

H100 = Device.named("NVIDIA H100 80GB HBM3")
LLAMA3_8B = {"qkv_proj": (6144, 4096, (4096, 5120)), "o_proj": (4096, 4096, ()),
             "gate_up_proj": (28672, 4096, (14336,)), "down_proj": (4096, 14336, ())}
RESIDUAL_PTRS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": "*bf16", "us_ptr": "*fp32",
                 "ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"}
GLUON_PTRS = {**RESIDUAL_PTRS, "part_ptr": "*fp32", "ticket_ptr": "*i32", "d_ptr": "*bf16", "ds_ptr": "*fp32",
              "sync_ptr": "*i32"}


def _ptrs(dtype, int8, gluon=True):
    base = GLUON_PTRS if gluon else RESIDUAL_PTRS
    return {**base, "x_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
            "up_ptr": "*i8" if int8 else f"*{dtype}", "d_ptr": "*i8" if int8 else f"*{dtype}"}


def compile_mma(m, n, k, cfg, rank=0, dtype="bf16", int8=False, bias=False, group=128, pdl=False, t_block_r=0, **kw):
    """mma_decode's kernel compiled as a launch of `cfg` for this layer and M would make it (t_block_r > 0: with t
    made in the launch, that many rows of D per piece)."""
    p = mma_decode.launch_params(m, n, k, group, cfg, 256, H100.smem_optin)
    consts = mma_decode.constexprs(p, group, rank, int8, bias, torch.bfloat16 if dtype == "bf16" else torch.float16,
                                   pdl, t_block_r=t_block_r, int8_down=int8 and t_block_r > 0)
    return compile_sm90("csrc_triton.kernels.mma_decode", "_tq_decode_mma_kernel", _ptrs(dtype, int8), consts,
                        p.warps, gluon=True, aligned_extra=("N", "K"), **kw), p


def compile_rs(m, n, k, cfg, rank=0, dtype="bf16", int8=False, bias=False, group=128, pdl=False, **kw):
    """wgmma_rs's kernel compiled as a launch of `cfg` for this layer and M would make it."""
    p = wgmma_rs.launch_params(m, n, k, group, cfg, 256)
    consts = wgmma_rs.constexprs(p, group, rank, int8, bias, torch.bfloat16 if dtype == "bf16" else torch.float16, pdl)
    return compile_sm90("csrc_triton.kernels.wgmma_rs", "_tq_gemm_wgmma_rs_kernel", _ptrs(dtype, int8), consts,
                        p.warps, gluon=True, aligned_extra=("N", "K", "k_per_split"), **kw), p


def planned_gluon_launches():
    """Every distinct launch of the Gluon kernels the plan makes for Llama-3-8B's layers on an H100
    (2-256 tokens): (kernel, M, N, K, config), one per distinct compiled form."""
    seen, out = set(), []
    for n, k, slots in LLAMA3_8B.values():
        for m in range(2, 257):
            p = plan(LayerShape(n, k, 128, 64, slots), m, H100)
            if p.kernel == "mma_decode":
                lp = mma_decode.launch_params(m, n, k, 128, p.config, 256, H100.smem_optin)
                key = ("mma_decode", lp.mt, lp.warps, lp.tok, lp.bk, lp.k_per_split, lp.split > 1, lp.tiled)
            elif p.kernel == "wgmma_rs":
                lp = wgmma_rs.launch_params(m, n, k, 128, p.config, 256)
                key = ("wgmma_rs", lp.tok, lp.mt, lp.warps, lp.stages, lp.split > 1)
            else:
                continue
            if key not in seen:
                seen.add(key)
                out.append((p.kernel, m, n, k, p.config))
    return out


@pytest.mark.parametrize("kernel,m,n,k,cfg", planned_gluon_launches(),
                         ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_every_planned_gluon_launch_compiles_and_fits_an_h100(kernel, m, n, k, cfg):
    """At rank 0 and 64: no local memory, registers and shared memory within sm_90's limits, and
    mma_decode without a stack frame worth the name (<= 32 bytes: its variant that spilled 80 bytes
    ran 25% slower on down at 64 tokens). (wgmma_rs's 256-token config on down_proj does keep a
    stack frame: 88 bytes at rank 0 with the GPU image's Triton 3.6, 680 at rank 64 with this CI's
    newer ptxas; it was measured the fastest there all the same. registers_sm90.py records it.)"""
    for rank in (0, 64):
        compile_ = compile_mma if kernel == "mma_decode" else compile_rs
        (_, res), _ = compile_(m, n, k, cfg, rank=rank, want_resources=True)
        assert res["LOCAL"] == 0 and res["REG"] <= 255 and res["SMEM"] <= H100.smem_optin, (kernel, cfg, rank, res)
        if kernel == "mma_decode":
            assert res["STACK"] <= 32, (cfg, rank, res)


@pytest.mark.parametrize("cfg,m,k,rank,dtype,int8,bias,group", [
    (MmaConfig(1, 8, 8), 8, 4096, 0, "bf16", False, False, 128),  # q/k/v, o and down at 2-8 tokens
    (MmaConfig(2, 8, 4), 8, 4096, 64, "bf16", False, True, 128),  # gate/up
    (MmaConfig(2, 4, 8), 16, 576, 64, "fp16", True, True, 64),  # 9-16 tokens, int8 factors, SmolLM2-wide K
    (MmaConfig(1, 8, 2, 64), 64, 4096, 128, "bf16", False, True, 128),  # 33-128 tokens: 64-column steps
])
def test_mma_decode_unpacks_codes_into_the_mma_fragment(cfg, m, k, rank, dtype, int8, bias, group):
    """Compiling proves that the unpacked codes land in mma.sync's A fragment without data movement
    (and x in the B fragment). The PTX must hold mma.sync m16n8k16 with two codes per LOP3 in the
    main loop (two steps per iteration), no local memory, and (split) the ticket atomics."""
    ptx, p = compile_mma(m, 4096, k, cfg, rank, dtype, int8, bias, group)
    kind = "bf16" if dtype == "bf16" else "f16"
    assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{kind}\.{kind}\.f32", ptx)
    exp = "0x43004300" if dtype == "bf16" else "0x64006400"
    # per step and 64-column chunk a lane unpacks 2 words of each of its 2 rows per 16-row tile: 16 codes, 8 LOP3s
    assert ptx.count(f"0x000F000F, {exp}, 0xEA;") == 2 * p.mt * 2 * (p.bk // 64) * 8
    assert ".local" not in ptx
    assert (".acq_rel.add" in ptx) == (p.split > 1)


@pytest.mark.parametrize("cfg,m,rank,dtype,int8,bias,group", [
    (RsConfig(128, 128, 8, 4, 1), 128, 0, "bf16", False, False, 128),
    (RsConfig(64, 128, 4, 4, 2), 64, 64, "bf16", False, True, 128),
    (RsConfig(256, 64, 4, 4, 1), 256, 128, "fp16", True, False, 64),
    (RsConfig(32, 64, 4, 4, 4), 32, 16, "fp16", False, False, 64),
])
def test_wgmma_rs_unpacks_codes_into_the_register_operand(cfg, m, rank, dtype, int8, bias, group):
    """The m64nTOK wgmma with its A operand in registers, retired each step (`wait_group 0`) after
    the next step's codes are unpacked, cp.async for x, 16 codes' LOP3s per 16-row tile and step
    (the prologue's step and the loop's two), one rounding multiply by the scale per pair of codes,
    no local memory, and (split) the ticket."""
    ptx, p = compile_rs(m, 4096, 4096, cfg, rank, dtype, int8, bias, group)
    kind = "bf16" if dtype == "bf16" else "f16"
    wg = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{p.tok}k16\.f32\.{kind}\.{kind}\s+\{{[^}}]*\}},\s*\{{", ptx)
    assert len(wg) >= 4 * p.mt  # 4 k16 slices of the 64-column step per 64-row warpgroup tile
    assert "wgmma.wait_group.sync.aligned 0;" in ptx
    assert "cp.async" in ptx and "fence.proxy.async" in ptx
    exp = "0x43004300" if dtype == "bf16" else "0x64006400"
    assert ptx.count(f"0x000F000F, {exp}, 0xEA;") == 3 * 16 * p.mt
    assert ptx.count(f"mul.rn.{kind}x2") == 3 * 16 * p.mt
    assert ".local" not in ptx
    assert (".acq_rel.add" in ptx) == (p.split > 1)


def test_gemv_reads_16_byte_code_vectors_and_unpacks_in_registers():
    """The one-token kernel reads each thread's codes as 16-byte vectors and makes two nibbles per
    LOP3 (UNPACK 1); up to its last nibble conversion (the main loop) there is no shared memory,
    shuffle or local memory. With PREFETCH two steps of codes are loaded before the first nibble
    conversion; UNPACK 2 makes four nibbles from two LOP3s."""
    for unpack, prefetch in ((1, 0), (1, 1), (2, 1)):
        lop3 = "lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;" if unpack == 1 else \
            "lop3.b32 a, t, 0x000F000F, 0x64006400, 0xEA;"
        consts = dict(GROUP=128, CHUNK_W=8, HAS_LOWRANK=False, HAS_US=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8,
                      BLOCK_W=128, BLOCK_R=16, BLOCK_S=1, EVEN=True, UNPACK=unpack, PREFETCH=prefetch, ASM=True,
                      PDL=False, T_IN=False, BLOCK_RT=16, HAS_DS=False)
        ptx = compile_sm90("csrc_triton.kernels.gemv", "_tq_gemv_vec_kernel", RESIDUAL_PTRS, consts, 1,
                           aligned_extra=("N", "K"))
        code_load = "ld.global.v4.b32" if "ld.global.v4.b32" in ptx else "ld.global.v4.u32"
        # one step: 8 rows x 4 words per thread, 4 plane pairs per word; with PREFETCH the step is written twice
        assert ptx.count(lop3) == 8 * 4 * (4 if unpack == 1 else 2) * (1 + prefetch)
        if unpack == 2:
            assert ptx.count("lop3.b32 b, t, 0x00F000F0, 0x64006400, 0xEA;") == ptx.count(lop3)
        assert ptx[: ptx.index(lop3)].count(code_load) == 8 * (1 + prefetch)
        loop = ptx[: ptx.rindex("0x64006400")]
        assert not any(op in loop for op in ("ld.shared", "st.shared", "shfl.sync", ".local")), "layout conversion"


def _makes_t_in_its_launch(ptx: str, plain: str, lop3: str) -> None:
    """The PTX of a residual kernel making t in its own launch, against `plain` (the same launch without): the
    same nibble conversions (lop3, the main loop's), no PDL wait, a relaxed ticket, the pieces' relaxed fp32
    additions and their release count, an acquire after the last conversion, and t read past L1 after it."""
    assert ptx.count(lop3) == plain.count(lop3) > 0
    assert "griddepcontrol" not in ptx
    assert re.search(r"(atom|red)\.global\.gpu\.relaxed\.add\.u32", ptx), "the ticket"
    assert re.search(r"(atom|red)\.global\.gpu\.relaxed\.add\.f32", ptx), "the pieces add into t"
    assert re.search(r"(atom|red)\.global\.gpu\.release\.add\.u32", ptx), "a piece counted done"
    acquire = re.search(r"(ld|atom)\.global\.gpu\.acquire\.", ptx)
    assert acquire and acquire.start() > ptx.rindex(lop3), "the wait for t comes after the main loop"
    t_load = re.search(r"ld\.global\.cg\.\w+", ptx)
    assert t_load and t_load.start() > acquire.start()


@pytest.mark.parametrize("int8", [False, True])
def test_gemv_making_t_itself_waits_for_its_pieces_after_the_main_loop_and_reads_t_from_l2(int8):
    """t made in the gemv launch (kernels/gemv.py): a relaxed ticket, the pieces' fp32 additions and their release
    count, the waiting programs' acquire loop after the main loop (the last nibble conversion) and before t is
    read, t read past L1 (`.cg`: other SMs wrote it), no PDL wait; the main loop is the same as without it, and
    the pieces take no more registers than the residual programs (occupancy) and no stack."""
    consts = dict(GROUP=128, CHUNK_W=8, HAS_LOWRANK=True, HAS_US=int8, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8,
                  BLOCK_W=256, BLOCK_R=64, BLOCK_S=1, EVEN=True, UNPACK=1, PREFETCH=0, ASM=True, PDL=False,
                  BLOCK_RT=64, HAS_DS=int8)
    ptrs = {**RESIDUAL_PTRS, "d_ptr": "*i8" if int8 else "*bf16", "ds_ptr": "*fp32", "sync_ptr": "*i32",
            "up_ptr": "*i8" if int8 else "*bf16"}
    ptx, res = compile_sm90("csrc_triton.kernels.gemv", "_tq_gemv_vec_kernel", ptrs, {**consts, "T_IN": True}, 2,
                            aligned_extra=("N", "K"), want_resources=True)
    plain, plain_res = compile_sm90("csrc_triton.kernels.gemv", "_tq_gemv_vec_kernel", ptrs,
                                    {**consts, "T_IN": False}, 2, aligned_extra=("N", "K"), want_resources=True)
    _makes_t_in_its_launch(ptx, plain, "0x64006400, 0xEA;")
    assert res["STACK"] == 0 and res["REG"] <= plain_res["REG"] + 8, (res, plain_res)


@pytest.mark.parametrize("cfg,m,k,int8,block_r", [
    (MmaConfig(1, 8, 8), 4, 14336, False, 64),  # down at 2-8 tokens
    (MmaConfig(2, 8, 16), 16, 4096, True, 16),  # q/k/v at 9-16 tokens, int8 factors
    (MmaConfig(1, 4, 8), 16, 4096, False, 32),  # o: 4 warps
])
def test_mma_decode_making_t_itself_waits_for_its_pieces_before_the_epilogue_and_reads_t_from_l2(cfg, m, k, int8,
                                                                                                  block_r):
    """t made in the mma_decode launch (kernels/mma_decode.py): a relaxed ticket, the pieces' fp32 additions and
    their release count, the tile-finishing program's acquire loop after the main loop (the last nibble
    conversion) and before t is read past L1 (`.cg`), no PDL wait; the main loop is the same as without it, and
    the pieces cost the residual programs no registers (occupancy: <= +8) and no stack beyond the kernel's own."""
    (ptx, res), _ = compile_mma(m, 4096, k, cfg, 64, "bf16", int8, False, 128, t_block_r=block_r,
                                want_resources=True)
    (plain, plain_res), _ = compile_mma(m, 4096, k, cfg, 64, "bf16", int8, False, 128, want_resources=True)
    _makes_t_in_its_launch(ptx, plain, "0x000F000F, 0x43004300, 0xEA;")
    assert res["LOCAL"] == 0 and res["STACK"] <= max(plain_res["STACK"], 32), (res, plain_res)
    assert res["REG"] <= plain_res["REG"] + 8, (res, plain_res)
    assert not re.search(r"ld\.global\.cg", plain) and "acquire" not in plain


def _wait_after_loop(ptx: str, loop_op: str, pdl: bool) -> None:
    waits = ptx.count("griddepcontrol.wait")
    if not pdl:
        assert waits == 0
        return
    assert waits == 1
    assert ptx.index("griddepcontrol.wait") > ptx.index(loop_op), "the wait comes before the main loop"
    assert "griddepcontrol.launch_dependents" not in ptx  # the residual kernel lets nothing start early


@pytest.mark.parametrize("kernel", ["gemv", "tile", "mma_decode", "wgmma_rs"])
def test_residual_kernels_wait_for_the_down_projection_after_their_main_loop(kernel):
    """With PDL the residual kernel is launched while the down projection still runs; its
    `griddepcontrol.wait` must exist (a t read without it is a race) and come after the main loop's
    tensor-core / unpacking work (else PDL overlaps nothing). Without PDL: no wait at all. That the
    wait holds at run time is checked on the GPU by benchmarks/kernels/pdl_check.py."""
    for pdl in (True, False):
        if kernel == "mma_decode":
            ptx, _ = compile_mma(8, 4096, 4096, MmaConfig(1, 8, 8), rank=64, pdl=pdl)
            _wait_after_loop(ptx, "mma.sync.aligned", pdl)
        elif kernel == "wgmma_rs":
            ptx, _ = compile_rs(128, 4096, 4096, RsConfig(128, 128, 8, 4, 1), rank=64, pdl=pdl)
            _wait_after_loop(ptx, "wgmma.mma_async", pdl)
        elif kernel == "gemv":
            consts = dict(GROUP=128, CHUNK_W=8, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8,
                          BLOCK_W=128, BLOCK_R=64, BLOCK_S=8, EVEN=True, UNPACK=1, PREFETCH=1, ASM=True, PDL=pdl,
                          T_IN=False, BLOCK_RT=16, HAS_DS=False)
            ptx = compile_sm90("csrc_triton.kernels.gemv", "_tq_gemv_vec_kernel", RESIDUAL_PTRS, consts, 1,
                               aligned_extra=("N", "K"))
            _wait_after_loop(ptx, "0x64006400, 0xEA;", pdl)
        else:
            consts = dict(GROUP=128, CHUNK_W=8, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64,
                          BLOCK_K=128, BLOCK_R=64, GROUP_M=8, SPLIT_K=1, MODE=7, EXP=0x4300, ASM=True, UPCAST=False,
                          PDL=pdl)
            ptx = compile_sm90("csrc_triton.kernels.tile", "_tq_gemm_kernel", RESIDUAL_PTRS, consts, 8,
                               aligned_extra=("N", "K", "k_per_split"))
            _wait_after_loop(ptx, "wgmma.mma_async", pdl)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", tile.MODES)
def test_the_tile_kernel_compiles_its_inline_ptx_for_both_activation_dtypes(mode, dtype):
    """The CPU interpreter runs the plain-Triton branch, so only a compile reaches the inline PTX of each
    activation dtype (a constant missing from one branch would otherwise surface at the first fp16 launch on a
    GPU)."""
    consts = dict(GROUP=128, CHUNK_W=8, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64,
                  BLOCK_K=128, BLOCK_R=64, GROUP_M=8, SPLIT_K=1, MODE=mode, EXP=0x4300 if dtype == "bf16" else 0x6400,
                  ASM=True, UPCAST=False, PDL=False)
    ptx = compile_sm90("csrc_triton.kernels.tile", "_tq_gemm_kernel", _ptrs(dtype, False, gluon=False), consts, 8,
                       aligned_extra=("N", "K", "k_per_split"))
    assert re.search(r"lop3\.b32[^;]*0xEA;", ptx, re.I)  # a nibble put under a float exponent in one LOP3
    if mode == 7:  # the nibble under the dtype's exponent, then (q - 8) * s in the dtype's packed FMA
        assert re.search(r"lop3\.b32[^;]*0x" + ("4300" if dtype == "bf16" else "6400"), ptx, re.I)
        assert ("fma.rn.bf16x2" if dtype == "bf16" else "fma.rn.f16x2") in ptx


def test_down_projection_lets_the_residual_kernel_start_early():
    ptrs = {"x_ptr": "*bf16", "d_ptr": "*bf16", "ds_ptr": "*fp32", "ws_ptr": "*fp32"}
    for pdl in (True, False):
        consts = dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=128, ATOMIC=False, HAS_DS=False, UPCAST=False, TRIGGER=int(pdl))
        ptx = compile_sm90("csrc_triton.kernels.lowrank_down", "_lowrank_down_kernel", ptrs, consts, 4,
                           aligned_extra=("K",))
        trigger = ptx.find("griddepcontrol.launch_dependents")
        assert (trigger >= 0) == pdl
        if pdl:  # at the top, before its K loop's first load
            assert trigger < ptx.index("ld.global")


def test_loop_histogram_finds_the_main_loop():
    """registers_sm90.py --loop counts the SASS of a kernel's main loop: for wgmma_rs that is two
    64-column steps per iteration, each four k16 wgmmas per 64-row warpgroup tile and 16 codes'
    LOP3s per 16-row tile."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "kernels"))
    from registers_sm90 import loop_histogram

    for mt in (1, 2):
        (_, res), p = compile_rs(64, 4096, 4096, RsConfig(64, 64 * mt, 4, 4, 1), want_sass=True)
        total, kinds = loop_histogram(res["SASS"])
        assert p.mt == mt and kinds["HGMMA (wgmma)"] == 2 * 4 * mt
        assert kinds["LOP3 (nibbles; addresses)"] >= 2 * 16 * p.mt
        assert kinds["branch"] == 1 and total > 2 * 16 * 3 * p.mt
