"""Triton kernels against a float64 reference, in Triton's CPU interpreter (small shapes).

Every case draws fresh random data, poisons the output with NaN first, and checks
||out - ref|| / ||ref|| <= 1e-2 (bf16/fp16 operands). The same checks run at full size on
the GPU in benchmarks/kernels/bench_kernels.py. The kernels read the codes after `tg.repack`
(the layout the plugin builds at load); the reference reads the checkpoint layout."""

import pytest
import torch

from csrc_triton import twinquant_gemm as tg
from vllm_twinquant.format import pack_codes, reference_linear


def _layer(n, k, g, r, slots, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qw = pack_codes(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen))
    sc = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.001).half()
    down = (torch.randn(slots * r, k, generator=gen) * 0.05).to(dtype) if r else None
    up = (torch.randn(n, r, generator=gen) * 0.05).to(dtype) if r else None
    return qw, sc, down, up


def _reference(x, qw, sc, g, down, up, bias, bounds):
    y = reference_linear(x, qw, sc, g, None, None, bias)
    if down is not None:
        r = up.shape[1]
        edges = (0, *bounds, y.shape[1])
        t = x.double() @ down.double().T
        for s in range(len(edges) - 1):
            a, b = edges[s], edges[s + 1]
            y[:, a:b] += t[:, s * r : (s + 1) * r] @ up[a:b].double().T
    return y


CASES = [  # M, N, K, group, rank, slot bounds, dtype, bias
    (1, 64, 128, 32, 0, (), torch.bfloat16, False),  # decode kernel, rank 0
    (1, 576, 1536, 64, 16, (), torch.bfloat16, True),  # decode kernel, 576-wide output
    (1, 960, 576, 64, 8, (576, 768), torch.float16, False),  # decode, merged q/k/v of SmolLM2 shape
    (3, 96, 320, 32, 16, (), torch.bfloat16, True),  # tile kernel, K % BLOCK_K != 0
    (17, 192, 576, 64, 8, (64, 128), torch.bfloat16, True),  # tile kernel, merged, odd M
    (5, 80, 320, 32, 24, (), torch.float16, False),
    (1, 48, 640, 128, 0, (), torch.bfloat16, True),  # decode, K % (BLOCK_W * 8) != 0, group 128
    (2, 40, 384, 128, 4, (), torch.float16, False),  # decode kernel forced at M = 2 below
    (1, 64, 256, 64, 256, (), torch.bfloat16, True),  # rank 256 (the largest the issue names): decode kernel
    (9, 64, 256, 64, 256, (32,), torch.float16, False),  # ... tile kernel MODE 7, two slots of rank 256
    (6, 64, 256, 128, 200, (), torch.bfloat16, False),  # ... MODE 4, rank 200 (BLOCK_R 256, masked ranks)
]


def test_repack_is_a_lossless_column_permutation():
    gen = torch.Generator().manual_seed(0)
    for g in (32, 64, 128):
        codes = torch.randint(-8, 8, (6, 384), dtype=torch.int8, generator=gen)
        qw = pack_codes(codes)
        rq = tg.repack(qw, g)
        assert rq.shape == qw.shape and rq.dtype == torch.int32
        assert torch.equal(tg.unrepack(rq, g), qw)
        # nibble j of word l of chunk c holds column c*C + j*C/8 + l
        cw = tg.chunk_words(g)
        nib = ((rq[:, :, None] >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF) - 8  # [N, K/8, 8]
        c, l_, j = 1, cw - 1, 5
        assert torch.equal(nib[:, c * cw + l_, j], codes[:, c * 8 * cw + j * cw + l_].int())
    with pytest.raises(ValueError, match="not a multiple"):
        tg.repack(pack_codes(torch.zeros(2, 96, dtype=torch.int8)), 64)


@pytest.mark.parametrize("m,n,k,g,r,bounds,dtype,bias", CASES)
def test_tq_gemm_matches_float64(m, n, k, g, r, bounds, dtype, bias):
    torch.manual_seed(m * 1000 + n)
    qw, sc, down, up = _layer(n, k, g, r, len(bounds) + 1, dtype, seed=n + k + r)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    cfg = (2, 16, 32, 1, 1) if m == 2 else None
    tg.tq_gemm(x, tg.repack(qw, g), sc, g, down, up, b, slot_bounds=bounds, out=out, config=cfg)
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = _reference(x, qw, sc, g, down, up, b, bounds)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, err


@pytest.mark.parametrize("bounds,r", [((), 0), ((), 8), ((64, 128), 8), ((80, 176), 24)])
def test_large_m_path_matches_float64(bounds, r):
    """Above the threshold: one GEMM over transient weights, W = deq(R) + U_s D_s (the fold, rank
    8) or [deq(R) | U_blockdiag] against [x | x D^T] (rank 24: `fold_lowrank` says no)."""
    assert tg.fold_lowrank(9, 192, 8) and not tg.fold_lowrank(9, 192, 24)
    qw, sc, down, up = _layer(192, 576, 64, r, len(bounds) + 1, torch.bfloat16, seed=7)
    x = torch.randn(9, 576).to(torch.bfloat16)
    b = torch.randn(192).to(torch.bfloat16)
    y = tg.tq_linear(x, tg.repack(qw, 64), sc, 64, down, up, b, slot_bounds=bounds, large_m_threshold=0)
    ref = _reference(x, qw, sc, 64, down, up, b, bounds)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("bounds,tile,r", [((), (64, 128, 4), 12), ((40, 100), (32, 64, 4), 12),
                                          ((16, 17), (16, 128, 4), 12), ((40,), (64, 64, 4), 80)])
def test_fold_gives_the_effective_weights(bounds, tile, r):
    """dequantize with factors = deq(R) + U_s D_s, row by row, against float64, where the low-rank
    part dominates (so a missing, misplaced or doubled slot product fails), for tiles that hold
    one slot, two, or all three (K = 320: a short last K tile), and rank 80 (two rank slices)."""
    n, k, g = 120, 320, 32
    gen = torch.Generator().manual_seed(len(bounds) + tile[0])
    qw, sc, _, _ = _layer(n, k, g, 0, 1, torch.float32, seed=3)
    down = torch.randn((len(bounds) + 1) * r, k, generator=gen)
    up = torch.randn(n, r, generator=gen)
    deq = reference_linear(torch.eye(k, dtype=torch.float64), qw, sc, g, None, None, None).T
    eff = deq.clone()
    edges = (0, *bounds, n)
    for s in range(len(edges) - 1):
        eff[edges[s] : edges[s + 1]] += up[edges[s] : edges[s + 1]].double() @ down[s * r : (s + 1) * r].double()
    assert (eff - deq).norm() > 5 * deq.norm()
    w = torch.full((n, k), float("nan"))
    tg.dequantize(tg.repack(qw, g), sc, g, torch.float32, out=w, down=down, up=up, slot_bounds=bounds, tile=tile)
    assert not torch.isnan(w).any()
    assert ((w.double() - eff).norm() / eff.norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="do not fit"):
        tg.dequantize(tg.repack(qw, g), sc, g, torch.float32, down=down[:r], up=up, slot_bounds=(40, 100))


def test_block_n_respects_slot_boundaries():
    assert tg.max_block_n_for((960, 576, 768)) == 64
    assert tg.max_block_n_for((6144, 4096, 5120)) == 256
    assert tg.max_block_n_for((100, 36)) == 0
    bm, bn, bk, _, _, split, _ = tg.pick_config(16, 4096, 4096, 256, 128)
    assert 128 % bk == 0 and (4096 // bn) * split >= 132  # split-K fills the GPU at decode sizes
    assert tg.pick_config(16, 576, 576, 64, 32)[2] == 32  # BLOCK_K never spans two groups
    assert tg.pick_config(16, 576, 576, 64, 64)[6] == 7  # MODE 4 needs whole 128-column groups
    assert tg.pick_config(64, 4096, 4096)[6] == 7 and tg.pick_config(256, 28672, 4096)[6] == 7
    x = torch.randn(4, 256).to(torch.bfloat16)
    qw, sc, _, _ = _layer(32, 256, 128, 0, 1, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="MODE 3"):
        tg.tq_gemm(x, tg.repack(qw, 128), sc, 128, config=(16, 32, 128, 4, 2, 1, 3))
    with pytest.raises(ValueError, match="BLOCK_K 256"):
        tg.tq_gemm(x, tg.repack(qw, 128), sc, 128, config=(16, 32, 256, 4, 2, 1, 7))


def test_triton_tile_dispatch_never_picks_the_first_wgmma_kernel():
    """MODE 8/9 runs only when forced: MODE 10 replaced MODE 9 where it was dispatched (129-256
    tokens, N >= 16384), so the Triton tile kernel's table holds MODE 4 and 7 only."""
    for m in (17, 64, 128, 200, 256, 257, 4096):
        for n, k in ((28672, 4096), (4096, 14336), (6144, 4096)):
            assert tg.pick_config(m, n, k, 256, 128)[6] == 7
    assert not tg.wgmma_usable(0)  # no CUDA here: the dispatch never reaches a Gluon kernel


def test_register_operand_tile_fits_the_slots():
    """MODE 10's BLOCK_N (16 * MT * warps) is halved until a tile lies inside one slot: fewer
    16-row tiles per warp first, then fewer warps, never below one warpgroup (64 rows)."""
    assert tg.fit_rs_tile((128, 256, 64, 8, 4, 2, 10), 256) == (128, 256, 64, 8, 4, 2, 10)
    assert tg.fit_rs_tile((128, 256, 64, 8, 4, 2, 10), 128) == (128, 128, 64, 8, 4, 2, 10)  # MT 2 -> 1
    assert tg.fit_rs_tile((64, 128, 64, 4, 3, 1, 10), 64) == (64, 64, 64, 4, 3, 1, 10)
    assert tg.fit_rs_tile((64, 128, 64, 8, 3, 1, 10), 64) == (64, 64, 64, 4, 3, 1, 10)  # 8 warps -> 4
    assert tg.fit_rs_tile((64, 64, 64, 4, 3, 1, 10), 32) is None  # q/k/v slots of 32 rows: another kernel
    for m in (17, 32, 33, 64, 65, 128, 129, 256):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (960, 576), (1536, 576)):
            cfg = tg.pick_rs_config(m, n, k)
            assert cfg is None or (len(cfg) == 7 and cfg[6] == 10 and cfg[2] == 64 and cfg[1] % (16 * cfg[3]) == 0)


def test_dispatch_picks_the_register_operand_kernel_where_measured():
    """MODE 10 for 16 < M <= 256 at the four Llama-3-8B shapes (the H200 sweep,
    benchmarks/results/tile_h200.json), where `rs_usable`: never on the CPU (or off sm_90), so
    there the dispatch and tq_linear's dequantization threshold stay as they were."""
    assert tg.pick_rs_config(32, 28672, 4096) == (32, 128, 64, 4, 4, 1, 10)
    assert tg.pick_rs_config(64, 4096, 14336) == (64, 64, 64, 4, 4, 4, 10)
    assert tg.pick_rs_config(100, 6144, 4096) == (64, 64, 64, 4, 4, 2, 10)
    assert tg.pick_rs_config(200, 4096, 14336) == (256, 128, 64, 8, 4, 4, 10)
    assert tg.pick_rs_config(256, 4096, 4096) == (64, 64, 64, 4, 4, 1, 10)
    assert all(tg.pick_rs_config(m, n, k) is not None for m in (17, 256) for n, k in
               ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)))
    x = torch.randn(40, 256).to(torch.bfloat16)
    assert not tg.rs_usable(x.device, x.dtype, 128) and tg.RS_MIN_M == 16 and tg.RS_MAX_M == 256
    assert tg.split_scratch_tokens(x.device, x.dtype, 128, 256) == 0  # nothing to allocate on the CPU


def test_register_operand_kernel_rejects_bad_configs():
    """launch_rs names what it expects (here reached before any GPU work)."""
    from csrc_triton import twinquant_wgmma as tw

    args = (None, torch.empty(1, 64), 1, 64, 256, 0, 1 << 30, 1 << 30, 0, (0,) * 6)
    with pytest.raises(ValueError, match="group size 32"):
        tw.launch_rs(*args, 32, False, False, False, 64, 64, 4, 3, 1, 16)
    with pytest.raises(ValueError, match="got 300"):
        tw.launch_rs(*args, 128, False, False, False, 300, 64, 4, 3, 1, 16)
    with pytest.raises(ValueError, match="got 96, 4 warps"):
        tw.launch_rs(*args, 128, False, False, False, 64, 96, 4, 3, 1, 16)


@pytest.mark.parametrize("swap,bm,bn,warps,rank,split,dtype,int8,bias,group", [
    (True, 256, 128, 8, 0, 1, "bf16", False, False, 128),  # what the dispatch launches
    (True, 64, 128, 4, 64, 2, "fp16", True, True, 64),
    (False, 128, 128, 8, 32, 1, "bf16", False, True, 128),
])
def test_wgmma_kernel_compiles_for_sm90(swap, bm, bn, warps, rank, split, dtype, int8, bias, group):
    """The Gluon kernel has no CPU interpreter: here it is compiled for sm_90 (no GPU needed) and
    the PTX must hold the pipeline it was written for -- asynchronous wgmma retired one step
    late, cp.async copies. Its numerics are checked on the H100 (bench_kernels.py)."""
    import re

    from compile_sm90 import compile_sm90

    ptrs = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": "*i8" if int8 else f"*{dtype}",
            "us_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": "*fp32" if split > 1 else f"*{dtype}"}
    consts = dict(GROUP=group, HAS_LOWRANK=rank > 0, HAS_US=int8, HAS_BIAS=bias, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_R=max(16, rank), GROUP_M=8, SPLIT_K=split, STAGES=3, SWAP=swap,
                  EXP=0x4300 if dtype == "bf16" else 0x6400, PDL=False)
    ptx = compile_sm90("csrc_triton.twinquant_wgmma", "_tq_gemm_wgmma_kernel", ptrs, consts, warps, gluon=True,
                       aligned_extra=("N", "K", "k_per_split"))
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n%d" % (bm if swap else bn), ptx)
    assert "wgmma.wait_group.sync.aligned 1;" in ptx  # step i - 1 retired while step i runs
    assert "cp.async" in ptx and "fence.proxy.async" in ptx


def _compile_rs(tok, mt, warps, rank, split, dtype="bf16", int8=False, bias=False, group=128, stages=4,
                pdl=False, want_resources=False, rank_chunk=False, want_sass=False):
    """twinquant_wgmma's MODE 10 kernel compiled for sm_90 with the constexprs a launch would pass."""
    from compile_sm90 import compile_sm90

    ptrs = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": "*i8" if int8 else f"*{dtype}",
            "us_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
            "part_ptr": "*fp32", "ticket_ptr": "*i32"}
    consts = dict(GROUP=group, HAS_LOWRANK=rank > 0, HAS_US=int8, HAS_BIAS=bias, MT=mt, TOK=tok,
                  BLOCK_R=max(16, rank), SPLIT=split, STAGES=stages, EXP=0x4300 if dtype == "bf16" else 0x6400,
                  PDL=pdl, RANK_CHUNK=rank_chunk)
    return compile_sm90("csrc_triton.twinquant_wgmma", "_tq_gemm_wgmma_rs_kernel", ptrs, consts, warps, gluon=True,
                        aligned_extra=("N", "K", "k_per_split"), want_resources=want_resources, want_sass=want_sass)


@pytest.mark.parametrize("tok,mt,warps,rank,split,dtype,int8,bias,group", [
    (128, 1, 8, 0, False, "bf16", False, False, 128),
    (64, 2, 4, 64, True, "bf16", False, True, 128),
    (256, 1, 4, 128, False, "fp16", True, False, 64),
    (32, 1, 8, 16, True, "fp16", False, False, 64),
])
def test_register_operand_wgmma_kernel_compiles_for_sm90(tok, mt, warps, rank, split, dtype, int8, bias, group):
    """MODE 10 (no CPU interpreter either): compiling proves that the unpacked, scaled codes
    land in wgmma's register A fragment without data movement (`convert_layout(...,
    assert_trivial=True)`). The PTX must hold the m64nTOK wgmma with its A operand in registers,
    retired each step (`wait_group 0`) after the next step's codes are unpacked, cp.async for x,
    16 codes' LOP3s per 16-row tile and step (the prologue's and the loop's two steps), one
    rounding multiply by the scale per pair of codes, no local memory, and (split) the ticket."""
    import re

    for chunk in (False, True) if rank else (False,):  # the low-rank epilogue all at once, or rank-chunked
        ptx = _compile_rs(tok, mt, warps, rank, split, dtype, int8, bias, group, rank_chunk=chunk)
        kind = "bf16" if dtype == "bf16" else "f16"
        # register A: the accumulator's brace group is followed by a second one (not a descriptor)
        wg = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{tok}k16\.f32\.{kind}\.{kind}\s+\{{[^}}]*\}},\s*\{{",
                        ptx)
        assert len(wg) >= 4 * mt  # 4 k16 slices of the 64-column step per 64-row warpgroup tile
        assert "wgmma.wait_group.sync.aligned 0;" in ptx
        assert "cp.async" in ptx and "fence.proxy.async" in ptx
        exp = "0x43004300" if dtype == "bf16" else "0x64006400"
        # 16 codes' LOP3s per 16-row tile and step: the prologue's step and the loop's two
        assert ptx.count(f"0x000F000F, {exp}, 0xEA;") == 3 * 16 * mt
        assert ptx.count(f"mul.rn.{kind}x2") == 3 * 16 * mt
        assert ".local" not in ptx
        assert (".acq_rel.add" in ptx) == split


def test_custom_op_used_by_the_plugin():
    """torch.ops.twinquant.linear (what TritonTwinQuantKernel calls under CUDA graphs and
    torch.compile) dispatches to the same kernels; here on CPU tensors in the interpreter."""
    import vllm_twinquant.kernels  # noqa: F401  (registers the op)

    qw, sc, down, up = _layer(192, 576, 64, 8, 3, torch.bfloat16, seed=3)
    x = torch.randn(2, 576).to(torch.bfloat16)
    y = torch.ops.twinquant.linear(x, tg.repack(qw, 64), sc, down, up, None, 64, [64, 128])
    ref = _reference(x, qw, sc, 64, down, up, None, (64, 128))
    assert y.shape == (2, 192) and ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_triton_kernel_class_repacks_at_load_and_matches_torch_kernel():
    """What the plugin does on CUDA: TritonTwinQuantKernel.process_weights_after_loading
    reorders the codes once, then apply() goes through torch.ops.twinquant.linear. Checked
    against TorchTwinQuantKernel on the same layer (interpreter; can_implement needs CUDA,
    so the instance is built without it)."""
    from vllm_twinquant import kernels as K

    qw, sc, down, up = _layer(192, 576, 64, 8, 3, torch.bfloat16, seed=11)
    c = K.TwinQuantLayerConfig(in_features=576, slot_sizes=(64, 64, 64), rank=8, group_size=64,
                               act_dtype=torch.bfloat16)
    layer = torch.nn.Module()
    for name, t in (("weight_packed", qw), ("weight_scale", sc), ("lowrank_down", down), ("lowrank_up", up)):
        setattr(layer, name, torch.nn.Parameter(t.clone(), requires_grad=False))
    ref_kernel = K.TorchTwinQuantKernel(c)
    x = torch.randn(3, 1, 576).to(torch.bfloat16)
    ref = ref_kernel.apply(layer, x.float().to(torch.bfloat16), None).double()
    tk = object.__new__(K.TritonTwinQuantKernel)
    tk.config = c
    tk.process_weights_after_loading(layer)
    assert not torch.equal(layer.weight_packed, qw)  # reordered ...
    assert torch.equal(tg.unrepack(layer.weight_packed.data, 64), qw)  # ... losslessly
    y = tk.apply(layer, x, None)
    assert y.shape == (3, 1, 192)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("m,cfg", [(1, (1, 16, 16, 1, 1)), (3, (2, 16, 16, 1, 1)), (5, (2, 16, 32, 1, 0))])
def test_decode_kernel_row_blocking(m, cfg):
    """The decode kernel with 1 or 2 token rows per program (rows past M masked)."""
    qw, sc, down, up = _layer(48, 384, 128, 8, 1, torch.bfloat16, seed=m)
    x = torch.randn(m, 384).to(torch.bfloat16)
    out = torch.full((m, 48), float("nan"), dtype=torch.bfloat16)
    tg.tq_gemm(x, tg.repack(qw, 128), sc, 128, down, up, out=out, config=cfg)
    assert not torch.isnan(out).any()
    ref = _reference(x, qw, sc, 128, down, up, None, ())
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("m,n,k,g,r,bounds,cfg,dtype,bias", [
    (1, 64, 1024, 128, 0, (), (1, 8, 128, 1, 1), torch.bfloat16, False),  # EVEN: no masks on codes/scales
    (1, 576, 1536, 64, 16, (), (1, 8, 128, 1, 1), torch.bfloat16, True),  # K % (8 BLOCK_W) != 0, 576 rows
    (1, 960, 576, 64, 8, (576, 768), (1, 8, 32, 1, 1), torch.float16, False),  # merged q/k/v, fp16
    (2, 100, 640, 32, 8, (), (2, 8, 64, 2, 1), torch.bfloat16, True),  # two token rows, N % BLOCK_N != 0, G 32
    (1, 96, 1024, 128, 8, (), (2, 4, 64, 2, 1), torch.bfloat16, False),  # BLOCK_M 2 with one token
    (2, 64, 512, 64, 4, (), (1, 4, 64, 1, 0), torch.bfloat16, False),  # UNPACK 0 (v = 1 + q/16)
    (1, 64, 1024, 128, 16, (), (1, 8, 32, 1, 1, 1), torch.bfloat16, False),  # PREFETCH, EVEN, 4 steps
    (1, 576, 1536, 64, 16, (), (1, 8, 128, 1, 1, 1), torch.bfloat16, True),  # PREFETCH, masked last step
    (1, 40, 384, 128, 8, (), (1, 8, 64, 1, 1, 1), torch.float16, False),  # PREFETCH, one (masked) step only
    (3, 100, 640, 32, 8, (), (2, 8, 32, 2, 1, 1), torch.bfloat16, True),  # PREFETCH, two token rows, M odd
    (1, 960, 576, 64, 40, (576, 768), (1, 8, 32, 1, 0, 1), torch.float16, False),  # PREFETCH, UNPACK 0, slots
    (1, 576, 1536, 64, 16, (), (1, 8, 128, 1, 2, 1), torch.bfloat16, True),  # UNPACK 2 (planes 1, 3, 5, 7 x16)
    (2, 100, 640, 32, 8, (), (2, 8, 32, 2, 2, 0), torch.float16, False),  # UNPACK 2, two token rows
])
def test_vector_decode_kernel(m, n, k, g, r, bounds, cfg, dtype, bias):
    """The 16-byte-vector decode kernel (5- or 6-field config) in all three unpack modes, with
    and without prefetch, both row counts, masked and unmasked steps, against float64; the PTX
    nibble conversion is replaced by plain Triton here (its sm_90 code is checked in
    test_vector_decode_kernel_ptx)."""
    qw, sc, down, up = _layer(n, k, g, r, len(bounds) + 1, dtype, seed=m * 1000 + n + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    tg.tq_gemm(x, tg.repack(qw, g), sc, g, down, up, b, slot_bounds=bounds, out=out, config=cfg)
    assert not torch.isnan(out).any()
    ref = _reference(x, qw, sc, g, down, up, b, bounds)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_dispatch_picks_the_mma_decode_kernel_only_where_measured_and_usable():
    """The tensor-core decode kernel (twinquant_mma.py) for 2 <= M <= 128 by layer shape where the
    H200 sweeps measured it faster (benchmarks/results/kernels_h200_mma*.json), never at M = 1 (the
    vector kernel measured faster), and never without CUDA, under the interpreter, for G = 32 or
    fp32 activations."""
    assert tg.pick_mma_config(1, 28672, 4096) is None
    assert tg.pick_mma_config(2, 4096, 14336) == (1, 8, 8)  # down
    assert tg.pick_mma_config(8, 6144, 4096) == (1, 8, 8)  # q/k/v
    assert tg.pick_mma_config(4, 28672, 4096) == (2, 8, 2)  # gate/up
    assert tg.pick_mma_config(16, 4096, 14336) == (2, 8, 16)
    assert tg.pick_mma_config(16, 28672, 4096) == (2, 8, 4)
    assert tg.pick_mma_config(32, 6144, 4096) == (1, 4, 4, 32)  # 17-32 tokens: 32 per program
    assert tg.pick_mma_config(64, 4096, 14336) == (2, 4, 16, 64)
    assert tg.pick_mma_config(64, 28672, 4096) is None  # the tile kernel was as fast or faster
    assert tg.pick_mma_config(100, 4096, 4096) == (2, 8, 4, 64)  # o only
    assert tg.pick_mma_config(128, 4096, 14336) is None
    assert tg.MMA_MAX_M == 128
    assert not tg.mma_usable(torch.device("cpu"), torch.bfloat16, 128, 4096)  # no CUDA here (and the interpreter is on)
    assert tg.fit_mma_tile((1, 8, 8), 256) == (1, 8, 8)
    assert tg.fit_mma_tile((2, 8, 2), 64) == (1, 4, 2)  # SmolLM2's q/k/v slots: 64-row tiles at most
    assert tg.fit_mma_tile((1, 1, 4), 0) is None
    assert tg.fit_mma_tile((2, 8, 4, 64), 64) == (1, 4, 4, 64)  # tokens per program kept
    from csrc_triton import twinquant_mma as tm
    assert tm.plan(24, 4096, 128, 1, 64) == (32, 64, 2, 2048)  # 32 tokens x 2048 columns x 2 B = 128 KB
    assert tm.plan(100, 14336, 128, 16, 64) == (64, 64, 16, 896)  # 2 token tiles of 64, 112 KB each
    assert tm.plan(4, 4096, 128, 8, 64) == (8, 128, 8, 512)


def _compile_mma(mt, warps, tok, bk, ks, group, rank, split, tiled, dtype="bf16", int8=False, bias=False,
                 want_resources=False, pdl=False, rank_chunk=False, want_sass=False):
    """twinquant_mma's kernel compiled for sm_90 with the constexprs a launch would pass."""
    from compile_sm90 import compile_sm90

    ptrs = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": "*i8" if int8 else f"*{dtype}",
            "us_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
            "part_ptr": "*fp32", "ticket_ptr": "*i32"}
    consts = dict(KS=ks, GROUP=group, BK=bk, HAS_LOWRANK=rank > 0, HAS_US=int8, HAS_BIAS=bias, MT=mt, TOK=tok,
                  BLOCK_R=max(16, rank), SPLIT=split, EXP=0x4300 if dtype == "bf16" else 0x6400, TILED=tiled, PDL=pdl,
                  RANK_CHUNK=rank_chunk)
    return compile_sm90("csrc_triton.twinquant_mma", "_tq_decode_mma_kernel", ptrs, consts, warps, gluon=True,
                        aligned_extra=("N", "K"), want_resources=want_resources, want_sass=want_sass)


@pytest.mark.parametrize("mt,warps,tok,rank,split,dtype,int8,bias,group,ks", [
    (1, 8, 8, 0, True, "bf16", False, False, 128, 512),  # the dispatch's q/k/v, o and down configs
    (2, 8, 8, 64, True, "bf16", False, True, 128, 2048),  # gate/up
    (2, 4, 16, 64, True, "fp16", True, True, 64, 576),  # M 9-16, int8 factors, SmolLM2-wide K
    (1, 1, 8, 4, False, "bf16", False, False, 64, 576),
    (1, 8, 64, 128, True, "bf16", False, True, 128, 512),  # 33-128 tokens: 64-column steps, ranks 16 at a time
    (2, 4, 32, 4, False, "fp16", True, False, 64, 576),
])
def test_mma_decode_kernel_compiles_for_sm90(mt, warps, tok, rank, split, dtype, int8, bias, group, ks):
    """The Gluon tensor-core decode kernel has no CPU interpreter: here it is compiled for sm_90.
    Compiling proves the layout claim the kernel is built on -- its `convert_layout(...,
    assert_trivial=True)` of the unpacked codes into the MMA's A fragment (and of x into the B
    fragment) fails to compile if any data would move. The PTX must hold mma.sync m16n8k16 with
    two codes per LOP3 in the main loop, no local memory, and (split) the ticket atomics.
    Numerics are checked on the GPU (benchmarks/kernels/bench_mma.py, bench_kernels.py)."""
    import re

    from csrc_triton import twinquant_mma as tm

    bk = tm.step_k(tok, group)
    for chunk in (False, True) if rank and tok <= 16 else (False,):  # the epilogue all at once, or rank-chunked
        ptx = _compile_mma(mt, warps, tok, bk, ks, group, rank, split, tm.token_offset_runtime(tok, tok), dtype,
                           int8, bias, rank_chunk=chunk)
        kind = "bf16" if dtype == "bf16" else "f16"
        assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{kind}\.{kind}\.f32", ptx)
        exp = "0x43004300" if dtype == "bf16" else "0x64006400"
        # two steps per loop iteration; per step and 64-column chunk a lane unpacks 2 words of each of
        # its 2 rows per 16-row tile: 16 codes, 8 LOP3s
        assert ptx.count(f"0x000F000F, {exp}, 0xEA;") == 2 * mt * 2 * (bk // 64) * 8
        assert ".local" not in ptx
        assert (".acq_rel.add" in ptx) == split  # the ticket (the partial sums go in as relaxed reductions)


_RESIDUAL_PTRS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": "*bf16", "us_ptr": "*fp32",
                  "ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"}  # the residual kernels' pointers


def test_vector_decode_kernel_ptx():
    """On sm_90 the vector decode kernel reads each thread's codes as 16-byte vectors and makes
    two nibbles per LOP3 (UNPACK 1); up to its last nibble conversion (the main loop) there is
    no shared memory, shuffle or local memory: layouts need no conversion there. With PREFETCH
    two steps of codes are loaded before the first nibble conversion; UNPACK 2 makes four
    nibbles from two LOP3s."""
    from compile_sm90 import compile_sm90

    for unpack, prefetch in ((1, 0), (1, 1), (2, 1)):
        # UNPACK 2: each LOP3 below also has a twin with mask 0x00F000F0 (planes one nibble up)
        lop3 = "lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;" if unpack == 1 else \
            "lop3.b32 a, t, 0x000F000F, 0x64006400, 0xEA;"
        consts = dict(GROUP=128, CHUNK_W=8, HAS_LOWRANK=False, HAS_US=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8,
                      BLOCK_W=128, BLOCK_R=16, BLOCK_S=1, EVEN=True, UNPACK=unpack, PREFETCH=prefetch, ASM=True,
                      PDL=False)
        ptx = compile_sm90("csrc_triton.twinquant_gemm", "_tq_gemv_vec_kernel", _RESIDUAL_PTRS, consts, 1,
                           aligned_extra=("N", "K"))
        code_load = "ld.global.v4.b32" if "ld.global.v4.b32" in ptx else "ld.global.v4.u32"
        # one step: 8 rows x 4 words per thread, 4 plane pairs per word (8 nibbles from 4 LOP3s);
        # with PREFETCH the step is written twice (the loop, then the last step after it)
        assert ptx.count(lop3) == 8 * 4 * (4 if unpack == 1 else 2) * (1 + prefetch)
        if unpack == 2:
            assert ptx.count("lop3.b32 b, t, 0x00F000F0, 0x64006400, 0xEA;") == ptx.count(lop3)
        assert ptx[: ptx.index(lop3)].count(code_load) == 8 * (1 + prefetch)  # 8 rows, one 16-byte load each
        loop = ptx[: ptx.rindex("0x64006400")]
        assert not any(op in loop for op in ("ld.shared", "st.shared", "shfl.sync", ".local")), "layout conversion in the loop"


_PDL_KERNELS = {  # kernel -> (module, gluon, warps, constexprs at rank 64, the main loop's last MMA/unpack)
    "_tq_gemv_vec_kernel": ("csrc_triton.twinquant_gemm", False, 1, dict(
        GROUP=128, CHUNK_W=8, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=8, BLOCK_W=128,
        BLOCK_R=64, BLOCK_S=8, EVEN=True, UNPACK=1, PREFETCH=1, ASM=True),
        "0x64006400, 0xEA;"),
    "_tq_gemm_kernel": ("csrc_triton.twinquant_gemm", False, 8, dict(
        GROUP=128, CHUNK_W=8, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128,
        BLOCK_R=64, GROUP_M=8, SPLIT_K=1, MODE=7, EXP=0x4300, ASM=True, UPCAST=False), "wgmma.mma_async"),
    "_tq_gemm_wgmma_kernel": ("csrc_triton.twinquant_wgmma", True, 8, dict(
        GROUP=128, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, BLOCK_M=256, BLOCK_N=128, BLOCK_R=64, GROUP_M=8,
        SPLIT_K=1, STAGES=3, SWAP=True, EXP=0x4300), "wgmma.mma_async"),
    "_tq_gemm_wgmma_rs_kernel": ("csrc_triton.twinquant_wgmma", True, 8, dict(
        GROUP=128, HAS_LOWRANK=True, HAS_US=False, HAS_BIAS=False, MT=1, TOK=128, BLOCK_R=64, SPLIT=False, STAGES=4,
        EXP=0x4300), "wgmma.mma_async"),
}


@pytest.mark.parametrize("kernel,rank_chunk", [*((k, False) for k in _PDL_KERNELS), ("_tq_gemm_wgmma_rs_kernel", True),
                                               ("_tq_decode_mma_kernel", False), ("_tq_decode_mma_kernel", True)])
def test_residual_kernels_wait_for_the_down_projection_after_their_main_loop(kernel, rank_chunk):
    """With PDL the residual kernel is launched while the down projection still runs; its
    `griddepcontrol.wait` must exist (a t read without it is a race) and come after the main
    loop's tensor-core / unpacking work (else PDL overlaps nothing). Without PDL: no wait at all.
    With the rank-chunked epilogue (rank 64: four chunks), still exactly one wait.
    That the wait holds at run time is checked on the GPU by benchmarks/kernels/pdl_check.py."""
    from compile_sm90 import compile_sm90

    for pdl in (True, False):
        if kernel == "_tq_decode_mma_kernel":
            ptx = _compile_mma(1, 8, 8, 128, 512, 128, 64, True, False, pdl=pdl, rank_chunk=rank_chunk)
            loop_op = "mma.sync.aligned"
        else:
            module, gluon, warps, consts, loop_op = _PDL_KERNELS[kernel]
            if kernel == "_tq_gemm_wgmma_rs_kernel":
                consts = {**consts, "RANK_CHUNK": rank_chunk}
            ptx = compile_sm90(module, kernel, _RESIDUAL_PTRS, {**consts, "PDL": pdl}, warps, gluon=gluon,
                               aligned_extra=("N", "K", "k_per_split"))
        waits = ptx.count("griddepcontrol.wait")
        if not pdl:
            assert waits == 0
            continue
        assert waits == 1
        assert ptx.index("griddepcontrol.wait") > ptx.index(loop_op), "the wait comes before the main loop"
        assert "griddepcontrol.launch_dependents" not in ptx  # the residual kernel lets nothing start early


def test_down_projection_lets_the_residual_kernel_start_early():
    from compile_sm90 import compile_sm90

    ptrs = {"x_ptr": "*bf16", "d_ptr": "*bf16", "ds_ptr": "*fp32", "ws_ptr": "*fp32"}
    for pdl in (True, False):
        consts = dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=128, ATOMIC=False, HAS_DS=False, UPCAST=False, TRIGGER=int(pdl))
        ptx = compile_sm90("csrc_triton.twinquant_gemm", "_lowrank_down_kernel", ptrs, consts, 4, aligned_extra=("K",))
        trigger = ptx.find("griddepcontrol.launch_dependents")
        assert (trigger >= 0) == pdl
        if pdl:  # at the top, before its K loop's first load
            assert trigger < ptx.index("ld.global")


def test_pdl_is_off_in_the_interpreter_and_by_env(monkeypatch):
    assert not tg.pdl_usable(0)  # TRITON_INTERPRET=1 (the test suite) or no CUDA device
    monkeypatch.setenv("TWINQUANT_PDL", "0")
    tg.pdl_usable.cache_clear()
    try:
        assert not tg.pdl_usable(0)
    finally:
        tg.pdl_usable.cache_clear()


def test_dequantize_returns_checkpoint_column_order():
    for g in (32, 64, 128):
        qw, sc, _, _ = _layer(16, 384, g, 0, 1, torch.float32, seed=g)
        w = tg.dequantize(tg.repack(qw, g), sc, g, torch.float32)
        ref = reference_linear(torch.eye(384, dtype=torch.float64), qw, sc, g, None, None, None).T
        assert torch.equal(w.double(), ref)


@pytest.mark.parametrize("cfg,k,g", [
    ((16, 32, 64, 4, 2, 1, 7), 576, 64),  # MODE 7: words spread over their chunk by broadcast + reshape,
    ((16, 16, 32, 4, 2, 4, 7), 576, 32),  # scaled before the dot (PTX replaced by plain Triton here); split-K, group 32
    ((32, 64, 128, 4, 2, 3, 7), 640, 128),  # ... with a short last slice
    ((16, 64, 128, 4, 2, 1, 4), 640, 128),  # MODE 4: swapped operands, nibble-plane dots (its PTX
    ((16, 64, 128, 4, 2, 2, 4), 640, 128),  # conversion replaced by plain Triton here), split-K
    ((32, 64, 128, 4, 2, 3, 4), 640, 128),  # ... with a short last slice
])
def test_tile_kernel_variants(cfg, k, g):
    m, n = 5, 192
    qw, sc, down, up = _layer(n, k, g, 8, 3, torch.bfloat16, seed=cfg[5] * 10 + cfg[6])
    x = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    tg.tq_gemm(x, tg.repack(qw, g), sc, g, down, up, b, slot_bounds=(64, 128), out=out, config=cfg)
    assert not torch.isnan(out).any()
    ref = _reference(x, qw, sc, g, down, up, b, (64, 128))
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("reduce", [False, True])
def test_lowrank_down_workspace(reduce):
    """x @ D^T from the split-K workspace: per-slice partial sums, or (reduce) one slice that
    every K-slice adds into with fp32 atomics."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 640, generator=g).to(torch.bfloat16)
    d = torch.randn(24, 640, generator=g).to(torch.bfloat16)
    ws = tg.lowrank_down(x, d, num_splits=5, reduce=reduce)
    assert ws.shape[0] == (1 if reduce else 5)
    ref = x.double() @ d.double().T
    assert ((ws.sum(0).double() - ref).norm() / ref.norm()).item() <= 1e-5


def _int8_factor(rows, cols, gen):
    """int8 codes and fp32 row scales whose product has entries of ~0.2, so the low-rank term
    outweighs the residual's (~0.05) and a wrongly applied scale fails the check."""
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen)
    return q, torch.rand(rows, generator=gen) * 0.004 + 0.002


INT8_CASES = [  # M, N, K, group, rank, slot bounds, forced config
    (1, 576, 1536, 64, 16, (), None),  # decode kernel
    (2, 40, 384, 128, 4, (), (2, 8, 32, 1, 1)),  # decode kernel, two rows per program
    (17, 192, 576, 64, 8, (64, 128), None),  # tile kernel MODE 7, merged
    (5, 192, 640, 128, 8, (64, 128), (16, 64, 128, 4, 2, 2, 4)),  # MODE 4, split-K
]


@pytest.mark.parametrize("m,n,k,g,r,bounds,cfg", INT8_CASES)
def test_int8_lowrank_factors_match_float64(m, n, k, g, r, bounds, cfg):
    """int8 factors with fp32 row scales (format: lowrank_dtype int8), read by every path."""
    gen = torch.Generator().manual_seed(m + n + k)
    qw, sc, _, _ = _layer(n, k, g, 0, 1, torch.bfloat16, seed=m)
    qd, ds = _int8_factor((len(bounds) + 1) * r, k, gen)
    qu, us = _int8_factor(n, r, gen)
    down_ref, up_ref = qd.double() * ds.double()[:, None], qu.double() * us.double()[:, None]
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    ref = _reference(x, qw, sc, g, down_ref, up_ref, None, bounds)
    lowrank_only = ref - _reference(x, qw, sc, g, None, None, None, bounds)
    assert lowrank_only.norm() > 1.5 * (ref - lowrank_only).norm()  # the factors dominate

    def run(d_scale, u_scale):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        tg.tq_gemm(x, tg.repack(qw, g), sc, g, qd, qu, slot_bounds=bounds, out=out, config=cfg,
                   down_scale=d_scale, up_scale=u_scale)
        assert not torch.isnan(out).any()
        return ((out.double() - ref).norm() / ref.norm()).item()

    assert run(ds, us) <= 1e-2
    assert run(ds, us * 1.1) > 3e-2  # the up scale is applied ...
    assert run(ds * 1.1, us) > 3e-2  # ... and the down scale
    y = tg.tq_linear(x, tg.repack(qw, g), sc, g, qd, qu, None, slot_bounds=bounds, large_m_threshold=0,
                     down_scale=ds, up_scale=us)  # the dequantize + one GEMM path
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2
    with pytest.raises(ValueError, match="int8 factors need a up_scale"):
        tg.tq_gemm(x, tg.repack(qw, g), sc, g, qd, qu, slot_bounds=bounds, down_scale=ds)



def _mma_dispatch_launches():
    """(m, n, k, config) for every MMA_CONFIGS row that picks the mma kernel: its largest M on a
    layer shape the row covers (Llama-3-8B's down, q/k/v or gate/up)."""
    out = []
    for max_m, max_n, min_k, cfg in tg.MMA_CONFIGS:
        if cfg is None:
            continue
        n = 28672 if max_n > 8192 else (6144 if max_n == 8192 else 4096)
        k = 14336 if min_k >= 8192 else 4096
        out.append((max_m, n, k, cfg))
    return out


@pytest.mark.parametrize("m,n,k,cfg", _mma_dispatch_launches())
def test_mma_dispatch_configs_do_not_spill(m, n, k, cfg):
    """Every launch the dispatch makes of the mma kernel compiles for sm_90 with no local memory
    and at most a small stack frame (<= 32 bytes), at rank 0 and rank 64. A coarse guard: frame
    sizes depend on the Triton/ptxas version. With Triton 3.6 (the GPU image) the 64-token MT 2
    configs keep 16 bytes at rank 64 and (1, 4, 8) 8 bytes (all measured by the sweeps), while
    the variant that cost 25% on down at 64 tokens had 80 (benchmarks/kernels/README.md, v9);
    this CI's newer Triton gives 24 bytes for the committed configs and 32 for that variant."""
    from csrc_triton import twinquant_mma as tm

    mt, warps, split, *tok = cfg
    tok_, bk, split, ks = tm.plan(m, k, 128, split, *tok)
    for rank in (0, 64):
        _, res = _compile_mma(mt, warps, tok_, bk, ks, 128, rank, split > 1, tm.token_offset_runtime(m, tok_),
                              want_resources=True)
        assert res["STACK"] <= 32 and res["LOCAL"] == 0, (m, n, k, cfg, rank, res)


def _chunked_epilogue_launches():
    """Every distinct launch the dispatch makes of the two Gluon kernels whose epilogue
    `rank_chunked` changes: the mma decode kernel up to 16 tokens per program, and MODE 10."""
    from csrc_triton import twinquant_mma as tm

    out = {}
    for m, n, k, cfg in _mma_dispatch_launches():
        mt, warps, split, *tok = cfg
        tok_, bk, split, ks = tm.plan(m, k, 128, split, *tok)
        if tok_ <= 16:
            out.setdefault(("mma", mt, warps, tok_, bk, ks, split > 1, tm.token_offset_runtime(m, tok_)), cfg)
    for _, _, _, cfg in tg.RS_CONFIGS:
        tok, bn, _, warps, stages, split, _ = cfg
        out.setdefault(("rs", tok, bn // (16 * warps), warps, stages, split > 1), cfg)
    return list(out)


def compile_launch(launch, rank, **kw):
    """A launch as `_chunked_epilogue_launches` names it, compiled for sm_90 at `rank` (group 128;
    kw as `_compile_mma` / `_compile_rs` take them)."""
    if launch[0] == "mma":
        _, mt, warps, tok, bk, ks, split, tiled = launch
        return _compile_mma(mt, warps, tok, bk, ks, 128, rank, split, tiled, **kw)
    _, tok, mt, warps, stages, split = launch
    return _compile_rs(tok, mt, warps, rank, split, stages=stages, **kw)


@pytest.mark.parametrize("launch", _chunked_epilogue_launches(), ids=str)
def test_rank_chunked_epilogues_keep_the_rank0_registers(launch):
    """With TWINQUANT_RANK_CHUNK=1 the low-rank epilogue takes 16 ranks at a time, so a rank-256
    layer compiles (sm_90) to about the registers of rank 0 and spills no more: registers are
    allocated for the kernel's peak, so an epilogue holding all of t and U lowered the occupancy
    of the main loop (Triton 3.6: the mma kernel (1, 8, 8) 64 -> 254 registers at rank 256, MODE 10
    (64, 64, 64, 4, 4, 4) 128 -> 255 plus 240 bytes of stack; benchmarks/results/
    rank_chunk_registers_sm90.json). Bounds leave room for ptxas versions (+32 registers, stack
    +64 bytes or +50%)."""
    r0, r256 = (compile_launch(launch, rank, rank_chunk=True, want_resources=True)[1] for rank in (0, 256))
    assert r256["LOCAL"] == 0
    assert r256["REG"] <= r0["REG"] + 32, (r0, r256)
    assert r256["STACK"] <= r0["STACK"] + max(64, r0["STACK"] // 2), (r0, r256)


def test_loop_histogram_finds_the_main_loop():
    """registers_sm90.py --loop (the static profile in benchmarks/kernels/README.md, v14) counts the
    SASS of a kernel's main loop: for MODE 10 that is two 64-column steps per iteration, each four
    k16 wgmmas per 64-row warpgroup tile and 16 codes' LOP3s per 16-row tile."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "kernels"))
    from registers_sm90 import loop_histogram

    for mt in (1, 2):
        _, res = _compile_rs(64, mt, 4, 0, False, want_sass=True)
        total, kinds = loop_histogram(res["SASS"])
        assert kinds["HGMMA (wgmma)"] == 2 * 4 * mt
        assert kinds["LOP3 (nibbles; addresses)"] >= 2 * 16 * mt
        assert kinds["branch"] == 1 and total > 2 * 16 * 3 * mt
