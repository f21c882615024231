"""Triton kernels against a float64 reference, in Triton's CPU interpreter (small shapes).

Every case draws fresh random data, poisons the output with NaN first, and checks
||out - ref|| / ||ref|| <= 1e-2 (bf16/fp16 operands). The same checks run at full size on
the GPU in benchmarks/kernels/bench_kernels.py."""

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
]


@pytest.mark.parametrize("m,n,k,g,r,bounds,dtype,bias", CASES)
def test_tq_gemm_matches_float64(m, n, k, g, r, bounds, dtype, bias):
    torch.manual_seed(m * 1000 + n)
    qw, sc, down, up = _layer(n, k, g, r, len(bounds) + 1, dtype, seed=n + k + r)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    tg.tq_gemm(x, qw, sc, g, down, up, b, slot_bounds=bounds, out=out)
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = _reference(x, qw, sc, g, down, up, b, bounds)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, err


@pytest.mark.parametrize("bounds,r", [((), 0), ((), 8), ((64, 128), 8)])
def test_large_m_path_matches_float64(bounds, r):
    """Above the threshold: transient dequantization + one GEMM over [x | x D^T]."""
    qw, sc, down, up = _layer(192, 576, 64, r, len(bounds) + 1, torch.bfloat16, seed=7)
    x = torch.randn(9, 576).to(torch.bfloat16)
    b = torch.randn(192).to(torch.bfloat16)
    y = tg.tq_linear(x, qw, sc, 64, down, up, b, slot_bounds=bounds, large_m_threshold=0)
    ref = _reference(x, qw, sc, 64, down, up, b, bounds)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_block_n_respects_slot_boundaries():
    assert tg.max_block_n_for((960, 576, 768)) == 64
    assert tg.max_block_n_for((6144, 4096, 5120)) == 256
    assert tg.max_block_n_for((100, 36)) == 0
    bm, bn, bk, _, _ = tg.pick_config(16, 4096, 256, 128)
    assert 4096 // bn >= 256 // 16 and bk % 128 == 0


def test_custom_op_used_by_the_plugin():
    """torch.ops.twinquant.linear (what TritonTwinQuantKernel calls under CUDA graphs and
    torch.compile) dispatches to the same kernels; here on CPU tensors in the interpreter."""
    import vllm_twinquant.kernels  # noqa: F401  (registers the op)

    qw, sc, down, up = _layer(192, 576, 64, 8, 3, torch.bfloat16, seed=3)
    x = torch.randn(2, 576).to(torch.bfloat16)
    y = torch.ops.twinquant.linear(x, qw, sc, down, up, None, 64, [64, 128])
    ref = _reference(x, qw, sc, 64, down, up, None, (64, 128))
    assert y.shape == (2, 192) and ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2
