"""The Triton kernels against a float64 reference, in Triton's CPU interpreter (small shapes).

Every case draws fresh random data, poisons the output with NaN first, and checks
||out - ref|| / ||ref|| <= 1e-2 (bf16/fp16 operands). The same checks run at full size on
the GPU in benchmarks/kernels/bench_kernels.py. The kernels read the codes after `repack`
(the layout the plugin builds at load); the reference reads the checkpoint layout. (The Gluon
kernels have no interpreter: tests/test_kernels_sm90.py compiles them.)"""

import dataclasses
import os
import sys

import pytest
import torch
from conftest import kernel_layer, kernel_reference

import csrc_triton as ct
from csrc_triton.kernels.gemv import GemvConfig as Gemv
from csrc_triton.kernels.tile import TileConfig as Tile
from vllm_twinquant.format import pack_codes, reference_linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
        rq = ct.repack(qw, g)
        assert rq.shape == qw.shape and rq.dtype == torch.int32
        assert torch.equal(ct.unrepack(rq, g), qw)
        # nibble j of word l of chunk c holds column c*C + j*C/8 + l
        cw = ct.chunk_words(g)
        nib = ((rq[:, :, None] >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF) - 8  # [N, K/8, 8]
        c, l_, j = 1, cw - 1, 5
        assert torch.equal(nib[:, c * cw + l_, j], codes[:, c * 8 * cw + j * cw + l_].int())
    with pytest.raises(ValueError, match="not a multiple"):
        ct.repack(pack_codes(torch.zeros(2, 96, dtype=torch.int8)), 64)


@pytest.mark.parametrize("m,n,k,g,r,bounds,dtype,bias", CASES)
def test_fused_kernels_match_float64(m, n, k, g, r, bounds, dtype, bias):
    torch.manual_seed(m * 1000 + n)
    qw, sc, down, up = kernel_layer(n, k, g, r, len(bounds) + 1, dtype, seed=n + k + r)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    cfg = Gemv(2, 16, 32, 1, 1) if m == 2 else None
    ct.gemm(x, ct.repack(qw, g), sc, g, down, up, b, slot_bounds=bounds, out=out, config=cfg)
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = kernel_reference(x, qw, sc, g, down, up, b, bounds)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, err


@pytest.mark.parametrize("bounds,r", [((), 0), ((), 8), ((64, 128), 8), ((80, 176), 24)])
def test_large_m_path_matches_float64(bounds, r):
    """Above the threshold: one GEMM over transient weights, W = deq(R) + U_s D_s (the fold, rank
    8) or [deq(R) | U_blockdiag] against [x | x D^T] (rank 24: `fold_lowrank` says no)."""
    assert ct.fold_lowrank(9, 192, 8) and not ct.fold_lowrank(9, 192, 24)
    qw, sc, down, up = kernel_layer(192, 576, 64, r, len(bounds) + 1, torch.bfloat16, seed=7)
    x = torch.randn(9, 576).to(torch.bfloat16)
    b = torch.randn(192).to(torch.bfloat16)
    y = ct.linear(x, ct.repack(qw, 64), sc, 64, down, up, b, slot_bounds=bounds, large_m_threshold=0)
    ref = kernel_reference(x, qw, sc, 64, down, up, b, bounds)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("bounds,r", [((), 8), ((64, 288), 8), ((64, 288), 24), ((200,), 0)])
def test_large_m_path_makes_a_wide_layer_in_row_ranges(monkeypatch, bounds, r):
    """A layer whose transient weights exceed TRANSIENT_BYTES (here: every layer) is made and
    multiplied in ranges of 128 rows inside one slot each (a slot of 224 rows in two); every output
    is written and matches float64, folded (rank 8) or concatenated (rank 24), with a bias."""
    from csrc_triton.kernels import base

    monkeypatch.setattr(base, "TRANSIENT_BYTES", 1)
    n, k, m = 320, 576, 17
    assert ct.fold_lowrank(m, n, 8) and not ct.fold_lowrank(m, n, 24)
    qw, sc, down, up = kernel_layer(n, k, 64, r, len(bounds) + 1, torch.bfloat16, seed=11)
    x = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    ct.linear(x, ct.repack(qw, 64), sc, 64, down, up, b, slot_bounds=bounds, large_m_threshold=0, out=out)
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = kernel_reference(x, qw, sc, 64, down, up, b, bounds)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("n,bounds,k", [(320, (), 576), (320, (64, 288), 576), (128256, (), 4096),
                                        (28672, (14336,), 4096), (1000, (130, 131), 256)])
@pytest.mark.parametrize("cap", [1, 1 << 20, 256 << 20])
def test_row_ranges_tile_the_layer_inside_slots_under_the_cap(monkeypatch, n, bounds, k, cap):
    from csrc_triton.kernels import base

    monkeypatch.setattr(base, "TRANSIENT_BYTES", cap)
    b1, b2 = (list(bounds) + [base.NO_BOUNDARY] * 2)[:2]
    a = base.Launch(torch.empty(1, k), torch.empty(n, k // 8, dtype=torch.int32), None, None, None, None, None,
                    None, None, 128, b1, b2, 256, False, lambda: (None, 0))
    ranges = a.row_ranges(2)
    assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]] and ranges[-1][1] == n
    if n * k * 2 <= cap:
        assert ranges == [(0, n)]
        return
    edges = (0, *bounds, n)
    for lo, hi in ranges:
        assert any(e0 <= lo < hi <= e1 for e0, e1 in zip(edges, edges[1:])), (lo, hi, edges)
        assert (hi - lo) * k * 2 <= max(cap, 128 * k * 2)
        assert (hi - lo) % 128 == 0 or hi in edges


@pytest.mark.parametrize("bounds,tile,r", [((), (64, 128, 4), 12), ((40, 100), (32, 64, 4), 12),
                                          ((16, 17), (16, 128, 4), 12), ((40,), (64, 64, 4), 80)])
def test_fold_gives_the_effective_weights(bounds, tile, r):
    """dequantize with factors = deq(R) + U_s D_s, row by row, against float64, where the low-rank
    part dominates (so a missing, misplaced or doubled slot product fails), for tiles that hold
    one slot, two, or all three (K = 320: a short last K tile), and rank 80 (two rank slices)."""
    n, k, g = 120, 320, 32
    gen = torch.Generator().manual_seed(len(bounds) + tile[0])
    qw, sc, _, _ = kernel_layer(n, k, g, 0, 1, torch.float32, seed=3)
    down = torch.randn((len(bounds) + 1) * r, k, generator=gen)
    up = torch.randn(n, r, generator=gen)
    deq = reference_linear(torch.eye(k, dtype=torch.float64), qw, sc, g, None, None, None).T
    eff = deq.clone()
    edges = (0, *bounds, n)
    for s in range(len(edges) - 1):
        eff[edges[s] : edges[s + 1]] += up[edges[s] : edges[s + 1]].double() @ down[s * r : (s + 1) * r].double()
    assert (eff - deq).norm() > 5 * deq.norm()
    w = torch.full((n, k), float("nan"))
    ct.dequantize(ct.repack(qw, g), sc, g, torch.float32, out=w, down=down, up=up, slot_bounds=bounds, tile=tile)
    assert not torch.isnan(w).any()
    assert ((w.double() - eff).norm() / eff.norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="do not fit"):
        ct.dequantize(ct.repack(qw, g), sc, g, torch.float32, down=down[:r], up=up, slot_bounds=(40, 100))


def test_custom_op_used_by_the_plugin():
    """torch.ops.twinquant.linear (what TritonTwinQuantKernel calls under CUDA graphs and
    torch.compile) dispatches to the same kernels; here on CPU tensors in the interpreter."""
    import vllm_twinquant.kernels  # noqa: F401  (registers the op)

    qw, sc, down, up = kernel_layer(192, 576, 64, 8, 3, torch.bfloat16, seed=3)
    x = torch.randn(2, 576).to(torch.bfloat16)
    y = torch.ops.twinquant.linear(x, ct.repack(qw, 64), sc, down, up, None, 64, [64, 128])
    ref = kernel_reference(x, qw, sc, 64, down, up, None, (64, 128))
    assert y.shape == (2, 192) and ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_triton_kernel_class_repacks_at_load_and_matches_torch_kernel():
    """What the plugin does on CUDA: TritonTwinQuantKernel.process_weights_after_loading
    reorders the codes once, then apply() goes through torch.ops.twinquant.linear. Checked
    against TorchTwinQuantKernel on the same layer (interpreter; can_implement needs CUDA,
    so the instance is built without it)."""
    from vllm_twinquant import kernels as K

    qw, sc, down, up = kernel_layer(192, 576, 64, 8, 3, torch.bfloat16, seed=11)
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
    assert torch.equal(ct.unrepack(layer.weight_packed.data, 64), qw)  # ... losslessly
    y = tk.apply(layer, x, None)
    assert y.shape == (3, 1, 192)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("m,cfg", [(1, Gemv(1, 16, 16, 1, 1)), (3, Gemv(2, 16, 16, 1, 1)), (5, Gemv(2, 16, 32, 1, 0))])
def test_decode_kernel_row_blocking(m, cfg):
    """The decode kernel with 1 or 2 token rows per program (rows past M masked)."""
    qw, sc, down, up = kernel_layer(48, 384, 128, 8, 1, torch.bfloat16, seed=m)
    x = torch.randn(m, 384).to(torch.bfloat16)
    out = torch.full((m, 48), float("nan"), dtype=torch.bfloat16)
    ct.gemm(x, ct.repack(qw, 128), sc, 128, down, up, out=out, config=cfg)
    assert not torch.isnan(out).any()
    ref = kernel_reference(x, qw, sc, 128, down, up, None, ())
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("m,n,k,g,r,bounds,cfg,dtype,bias", [
    (1, 64, 1024, 128, 0, (), Gemv(1, 8, 128, 1, 1), torch.bfloat16, False),  # EVEN: no masks on codes/scales
    (1, 576, 1536, 64, 16, (), Gemv(1, 8, 128, 1, 1), torch.bfloat16, True),  # K % (8 BLOCK_W) != 0, 576 rows
    (1, 960, 576, 64, 8, (576, 768), Gemv(1, 8, 32, 1, 1), torch.float16, False),  # merged q/k/v, fp16
    (2, 100, 640, 32, 8, (), Gemv(2, 8, 64, 2, 1), torch.bfloat16, True),  # two token rows, N % BLOCK_N != 0, G 32
    (1, 96, 1024, 128, 8, (), Gemv(2, 4, 64, 2, 1), torch.bfloat16, False),  # BLOCK_M 2 with one token
    (2, 64, 512, 64, 4, (), Gemv(1, 4, 64, 1, 0), torch.bfloat16, False),  # UNPACK 0 (v = 1 + q/16)
    (1, 64, 1024, 128, 16, (), Gemv(1, 8, 32, 1, 1, 1), torch.bfloat16, False),  # PREFETCH, EVEN, 4 steps
    (1, 576, 1536, 64, 16, (), Gemv(1, 8, 128, 1, 1, 1), torch.bfloat16, True),  # PREFETCH, masked last step
    (1, 40, 384, 128, 8, (), Gemv(1, 8, 64, 1, 1, 1), torch.float16, False),  # PREFETCH, one (masked) step only
    (3, 100, 640, 32, 8, (), Gemv(2, 8, 32, 2, 1, 1), torch.bfloat16, True),  # PREFETCH, two token rows, M odd
    (1, 960, 576, 64, 40, (576, 768), Gemv(1, 8, 32, 1, 0, 1), torch.float16, False),  # PREFETCH, UNPACK 0, slots
    (1, 576, 1536, 64, 16, (), Gemv(1, 8, 128, 1, 2, 1), torch.bfloat16, True),  # UNPACK 2 (planes 1, 3, 5, 7 x16)
    (2, 100, 640, 32, 8, (), Gemv(2, 8, 32, 2, 2, 0), torch.float16, False),  # UNPACK 2, two token rows
])
def test_vector_decode_kernel(m, n, k, g, r, bounds, cfg, dtype, bias):
    """The 16-byte-vector decode kernel (5- or 6-field config) in all three unpack modes, with
    and without prefetch, both row counts, masked and unmasked steps, against float64; the PTX
    nibble conversion is replaced by plain Triton here (its sm_90 code is checked in
    test_vector_decode_kernel_ptx)."""
    qw, sc, down, up = kernel_layer(n, k, g, r, len(bounds) + 1, dtype, seed=m * 1000 + n + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    ct.gemm(x, ct.repack(qw, g), sc, g, down, up, b, slot_bounds=bounds, out=out, config=cfg)
    assert not torch.isnan(out).any()
    ref = kernel_reference(x, qw, sc, g, down, up, b, bounds)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_dequantize_returns_checkpoint_column_order():
    for g in (32, 64, 128):
        qw, sc, _, _ = kernel_layer(16, 384, g, 0, 1, torch.float32, seed=g)
        w = ct.dequantize(ct.repack(qw, g), sc, g, torch.float32)
        ref = reference_linear(torch.eye(384, dtype=torch.float64), qw, sc, g, None, None, None).T
        assert torch.equal(w.double(), ref)


@pytest.mark.parametrize(
    "cfg,k,g",
    [
        (Tile(16, 32, 64, 4, 2, 1, 7), 576, 64),  # MODE 7: words spread over their chunk by broadcast + reshape,
        (
            Tile(16, 16, 32, 4, 2, 4, 7),
            576,
            32,
        ),  # scaled before the dot (PTX replaced by plain Triton here); split-K, group 32
        (Tile(32, 64, 128, 4, 2, 3, 7), 640, 128),  # ... with a short last slice
        (Tile(16, 64, 128, 4, 2, 1, 4), 640, 128),  # MODE 4: swapped operands, nibble-plane dots (its PTX
        (Tile(16, 64, 128, 4, 2, 2, 4), 640, 128),  # conversion replaced by plain Triton here), split-K
        (Tile(32, 64, 128, 4, 2, 3, 4), 640, 128),  # ... with a short last slice
    ],
)
def test_tile_kernel_variants(cfg, k, g):
    m, n = 5, 192
    qw, sc, down, up = kernel_layer(n, k, g, 8, 3, torch.bfloat16, seed=cfg.split_k * 10 + cfg.mode)
    x = torch.randn(m, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    ct.gemm(x, ct.repack(qw, g), sc, g, down, up, b, slot_bounds=(64, 128), out=out, config=cfg)
    assert not torch.isnan(out).any()
    ref = kernel_reference(x, qw, sc, g, down, up, b, (64, 128))
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


@pytest.mark.parametrize("reduce,block_r", [(False, None), (True, None), (False, 16), (True, 32)])
def test_lowrank_down_workspace(reduce, block_r):
    """x @ D^T from the split-K workspace: per-slice partial sums, or (reduce) one slice that
    every K-slice adds into with fp32 atomics; block_r rows of D per program (more programs) change
    the launch, not the workspace."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 640, generator=g).to(torch.bfloat16)
    d = torch.randn(72, 640, generator=g).to(torch.bfloat16)  # 72 rows: a partial last block at any block_r
    ws = ct.lowrank_down(x, d, num_splits=5, reduce=reduce, block_r=block_r)
    assert ws.shape == (1 if reduce else 5, 20, 72)
    ref = x.double() @ d.double().T
    assert ((ws.sum(0).double() - ref).norm() / ref.norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="block_r 8"):
        ct.lowrank_down(x, d, num_splits=5, block_r=8)


def _int8_factor(rows, cols, gen):
    """int8 codes and fp32 row scales whose product has entries of ~0.2, so the low-rank term
    outweighs the residual's (~0.05) and a wrongly applied scale fails the check."""
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen)
    return q, torch.rand(rows, generator=gen) * 0.004 + 0.002


INT8_CASES = [  # M, N, K, group, rank, slot bounds, forced config
    (1, 576, 1536, 64, 16, (), None),  # decode kernel
    (2, 40, 384, 128, 4, (), Gemv(2, 8, 32, 1, 1)),  # decode kernel, two rows per program
    (17, 192, 576, 64, 8, (64, 128), None),  # tile kernel MODE 7, merged
    (5, 192, 640, 128, 8, (64, 128), Tile(16, 64, 128, 4, 2, 2, 4)),  # MODE 4, split-K
]


@pytest.mark.parametrize("m,n,k,g,r,bounds,cfg", INT8_CASES)
def test_int8_lowrank_factors_match_float64(m, n, k, g, r, bounds, cfg):
    """int8 factors with fp32 row scales (format: lowrank_dtype int8), read by every path."""
    gen = torch.Generator().manual_seed(m + n + k)
    qw, sc, _, _ = kernel_layer(n, k, g, 0, 1, torch.bfloat16, seed=m)
    qd, ds = _int8_factor((len(bounds) + 1) * r, k, gen)
    qu, us = _int8_factor(n, r, gen)
    down_ref, up_ref = qd.double() * ds.double()[:, None], qu.double() * us.double()[:, None]
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    ref = kernel_reference(x, qw, sc, g, down_ref, up_ref, None, bounds)
    lowrank_only = ref - kernel_reference(x, qw, sc, g, None, None, None, bounds)
    assert lowrank_only.norm() > 1.5 * (ref - lowrank_only).norm()  # the factors dominate

    def run(d_scale, u_scale):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        ct.gemm(x, ct.repack(qw, g), sc, g, qd, qu, slot_bounds=bounds, out=out, config=cfg,
                   down_scale=d_scale, up_scale=u_scale)
        assert not torch.isnan(out).any()
        return ((out.double() - ref).norm() / ref.norm()).item()

    assert run(ds, us) <= 1e-2
    assert run(ds, us * 1.1) > 3e-2  # the up scale is applied ...
    assert run(ds * 1.1, us) > 3e-2  # ... and the down scale
    y = ct.linear(x, ct.repack(qw, g), sc, g, qd, qu, None, slot_bounds=bounds, large_m_threshold=0,
                     down_scale=ds, up_scale=us)  # the dequantize + one GEMM path
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2
    with pytest.raises(ValueError, match="int8 factors need a up_scale"):
        ct.gemm(x, ct.repack(qw, g), sc, g, qd, qu, slot_bounds=bounds, down_scale=ds)


T_IN_CASES = [  # M, N, K, group, rank, slot bounds, int8 factors, bias, config, t's K-slices, rows of D per piece
    (1, 576, 1536, 64, 16, (), False, True, Gemv(1, 8, 32, 2, 1), 8, 64),
    (1, 960, 576, 64, 8, (576, 768), False, False, Gemv(1, 16, 32, 1, 2, 1), 3, 16),  # merged: 24 rows of D
    (3, 96, 640, 128, 24, (), True, True, Gemv(2, 16, 32, 1, 1), 4, 16),  # two token tiles, int8 factors
    (4, 64, 352, 32, 32, (32,), False, False, Gemv(1, 16, 8, 1, 0), 5, 32),  # K not a multiple of 64
]


@pytest.mark.parametrize("m,n,k,g,r,bounds,int8,bias,cfg,splits,block_r", T_IN_CASES)
def test_gemv_making_t_in_its_own_launch_matches_float64_and_leaves_its_scratch_zero(
        m, n, k, g, r, bounds, int8, bias, cfg, splits, block_r):
    """The gemv launch's first programs make t (K-slices x row blocks of D, fp32 atomics into the scratch), the
    others wait for them before their epilogue; the last one zeroes the scratch and the counters, so a second
    call (a CUDA-graph replay) finds them as the first did and gives the same output."""
    from csrc_triton.dispatch import KernelPlan, LowrankPlan
    from csrc_triton.kernels.base import t_pieces, t_scratch
    from csrc_triton.layer import run

    gen = torch.Generator().manual_seed(m + n + k)
    slots = len(bounds) + 1
    qw, sc, down, up = kernel_layer(n, k, g, r, slots, torch.bfloat16, seed=n + r)
    ds = us = None
    if int8:
        (down, ds), (up, us) = _int8_factor(slots * r, k, gen), _int8_factor(n, r, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    ref = kernel_reference(x, qw, sc, g, down.double() * (ds.double()[:, None] if int8 else 1),
                           up.double() * (us.double()[:, None] if int8 else 1), b, bounds)
    residual_only = kernel_reference(x, qw, sc, g, None, None, b, bounds)
    assert (ref - residual_only).norm() > 0.1 * ref.norm()  # a missing or partial t fails the check
    assert t_pieces(k, slots * r, splits, block_r)[0] > 1
    p = KernelPlan("gemv", cfg, LowrankPlan(splits, False, block_r, True), 0)
    t, sync = t_scratch(x.device)
    outs = []
    for _ in range(2):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        run(p, x, ct.repack(qw, g), sc, g, down, up, b, bounds, ds, us, out=out)
        assert not torch.isnan(out).any(), "some outputs were never written"
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2
        assert not t.any() and not sync.any(), "the launch left t or its counters non-zero"
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_triton_kernel_class_serves_w4a4_with_the_online_hadamard_as_the_torch_kernel_does(monkeypatch):
    """W4A4 on the CUDA path: the online Hadamard transform in apply(), then the layer's 4-bit codes ("int4",
    clipped) on the INT8 kernel through torch.ops.twinquant.linear; against TorchTwinQuantKernel, the path
    that simulates W4A4 (interpreter, more tokens than a W4A8 layer keeps on the W4A16 kernels), and against the
    float32 reference module of the GPU plugin check (benchmarks/e2e/cuda_plugin_check.py), which must agree too."""
    from vllm_twinquant import format as fmt
    from vllm_twinquant import kernels as K

    qw, sc, down, up = kernel_layer(192, 576, 64, 8, 1, torch.bfloat16, seed=5)
    c = K.TwinQuantLayerConfig(in_features=576, slot_sizes=(192,), rank=8, group_size=64, act_dtype=torch.bfloat16,
                               activation_bits=4, activation_clip=0.9, online_hadamard=fmt.hadamard_block_size(576))
    assert c.act_quant == "int4" and c.online_hadamard == 64
    layer = torch.nn.Module()
    for name, t in (("weight_packed", qw), ("weight_scale", sc), ("lowrank_down", down), ("lowrank_up", up)):
        setattr(layer, name, torch.nn.Parameter(t.clone(), requires_grad=False))
    x = (torch.randn(2, 72, 576) * torch.rand(2, 72, 1) * 3).to(torch.bfloat16)
    ref = K.TorchTwinQuantKernel(c).apply(layer, x, None).double()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    from cuda_plugin_check import ActivationCodesReference

    module = ActivationCodesReference(up.float() @ down.float(), fmt.dequantize_residual(qw, sc, 64), None, 4, "int",
                                      0.9, 64)
    mod = module(x).double()  # in x's dtype, as the check's bf16 twin runs it (in float32 codes flip elsewhere)
    assert ((mod - ref).norm() / ref.norm()).item() <= 1e-2
    # the same layer without the 4-bit codes (W4A16 on the rotated x), to show they are in the kernel's output
    w16 = K.TorchTwinQuantKernel(dataclasses.replace(c, activation_bits=16, activation_clip=1.0)).apply(
        layer, x, None).double()
    tk = object.__new__(K.TritonTwinQuantKernel)
    tk.config = c
    tk.process_weights_after_loading(layer)
    y = tk.apply(layer, x, None)
    assert y.shape == (2, 72, 192)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, err
    assert (y.double() - ref).norm() < (w16 - ref).norm()


@pytest.mark.parametrize("int8_factors", [False, True])
def test_triton_kernel_class_serves_a_resq_subspace_layer_as_the_torch_kernel_does(int8_factors):
    """W4A4 with ResQ's 8-bit subspace on the CUDA path: the first K - S columns' 4-bit codes on the INT8 kernel,
    the last S at 8 bits and the low-rank term in one GEMM after it. Against TorchTwinQuantKernel (the format's
    simulation) on a merged q/k/v-shaped layer whose last 64 inputs carry the outliers the subspace is for; the
    same layer read as plain W4A4 (one scale over every column) is far off, so the split is in the output."""
    from vllm_twinquant import format as fmt
    from vllm_twinquant import kernels as K

    qw, sc, down, up = kernel_layer(192, 576, 64, 8, 3, torch.bfloat16, seed=7)
    c = K.TwinQuantLayerConfig(in_features=576, slot_sizes=(64, 96, 32), rank=8, group_size=64,
                               act_dtype=torch.bfloat16, activation_bits=4, activation_clip=0.9,
                               activation_subspace=64, int8_lowrank=int8_factors)
    layer = torch.nn.Module()
    tensors = {"weight_packed": qw, "weight_scale": sc, "lowrank_down": down, "lowrank_up": up}
    if int8_factors:
        for name in ("lowrank_down", "lowrank_up"):
            t = tensors[name].float()
            s = t.abs().amax(1) / 127
            tensors[name] = torch.round(t / s[:, None]).to(torch.int8)
            tensors[name + "_scale"] = s
    for name, t in tensors.items():
        setattr(layer, name, torch.nn.Parameter(t.clone(), requires_grad=False))
    x = torch.randn(2, 72, 576) * torch.rand(2, 72, 1) * 3
    x[..., -64:] *= 40
    x = x.to(torch.bfloat16)
    assert K.TritonTwinQuantKernel.shape(type("T", (), {"config": c})()).k == 512
    ref = K.TorchTwinQuantKernel(c).apply(layer, x, None).double()
    plain = K.TorchTwinQuantKernel(dataclasses.replace(c, activation_subspace=0)).apply(layer, x, None).double()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    from cuda_plugin_check import ActivationCodesReference  # the GPU check's float32 reference agrees

    fd, fu = (fmt.dequantize_lowrank(tensors[n], tensors.get(n + "_scale")) for n in ("lowrank_down", "lowrank_up"))
    lowrank = torch.cat([fu[a:b] @ fd[i * 8:(i + 1) * 8] for i, (a, b) in enumerate([(0, 64), (64, 160), (160, 192)])])
    mod = ActivationCodesReference(lowrank, fmt.dequantize_residual(qw, sc, 64), None, 4, "int", 0.9, 0, 64, 8)
    assert ((mod(x).double() - ref).norm() / ref.norm()).item() <= 1e-2
    tk = object.__new__(K.TritonTwinQuantKernel)
    tk.config = c
    tk.process_weights_after_loading(layer)
    assert layer.weight_packed.shape == (192, 512 // fmt.PACK_FACTOR) and layer.subspace_up.shape == (192, 3 * 8 + 64)
    y = tk.apply(layer, x, None)
    assert y.shape == (2, 72, 192)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, err
    assert (y.double() - ref).norm() * 5 < (plain - ref).norm()


def test_a_subspace_that_does_not_start_at_a_group_boundary_stays_on_the_torch_kernel(monkeypatch):
    from vllm_twinquant import kernels as K

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    c = K.TwinQuantLayerConfig(in_features=4096, slot_sizes=(4096,), rank=64, group_size=128,
                               act_dtype=torch.bfloat16, activation_bits=4, activation_subspace=64)
    ok, why = K.TritonTwinQuantKernel.can_implement(c)
    assert not ok and "subspace of 64 of 4096 input columns" in why and "group 128" in why
