"""The decomposition math on random data with a realistic (correlated, outlier) input distribution."""

import pytest
import torch

from offline_quantizer.decompose import decompose, quantize_gptq, quantize_rtn, top_singular_triplets


def _data(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(4096, k, generator=g) @ mix
    x[:, :4] *= 20  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    h = 2 * x.T @ x / x.shape[0]
    return w, x, h


def _out_err(w_hat, w, x):
    return ((w_hat - w) @ x.T).norm().item() / (w @ x.T).norm().item()


def test_codes_and_scales_are_in_range():
    w, _, h = _data()
    for codes, scales in (quantize_rtn(w, 64, torch.float16), quantize_gptq(w, h, 64, torch.float16)):
        assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
        assert scales.shape == (96, 4) and scales.dtype == torch.float16 and bool((scales > 0).all())


def test_gptq_beats_rtn_on_output_error():
    w, x, h = _data()
    rtn = decompose(w, 0, 64, torch.float16, torch.bfloat16, h, "rtn")
    gptq = decompose(w, 0, 64, torch.float16, torch.bfloat16, h, "gptq")
    assert gptq.down is None and gptq.up is None  # rank 0 is plain GPTQ
    assert _out_err(gptq.dequantized(), w, x) < 0.8 * _out_err(rtn.dequantized(), w, x)


def test_lowrank_reduces_error_and_is_deterministic():
    w, x, h = _data()
    w = w + 0.5 * torch.randn(96, 1) @ torch.randn(1, 256)  # a strong rank-1 component
    e0 = _out_err(decompose(w, 0, 64, torch.float16, torch.bfloat16, h).dequantized(), w, x)
    d = decompose(w, 16, 64, torch.float16, torch.bfloat16, h)
    assert d.down.shape == (16, 256) and d.up.shape == (96, 16) and d.down.dtype == torch.bfloat16
    assert _out_err(d.dequantized(), w, x) < 0.7 * e0
    d2 = decompose(w, 16, 64, torch.float16, torch.bfloat16, h)
    assert torch.equal(d.codes, d2.codes) and torch.equal(d.up, d2.up)
    for weighting in ("none", "hessian"):
        dw = decompose(w, 16, 64, torch.float16, torch.bfloat16, h, weighting=weighting)
        assert _out_err(dw.dequantized(), w, x) < e0


@pytest.mark.parametrize("shape,rank", [((48, 160), 8), ((160, 48), 8), ((40, 24), 64)])
def test_top_singular_triplets_match_a_full_svd(shape, rank):
    g = torch.Generator().manual_seed(3)
    # a decaying spectrum, as trained weights have, so the kept subspace is well defined
    a = (
        torch.randn(*shape, generator=g)
        @ torch.diag(torch.logspace(0, -2, shape[1]))
        @ torch.randn(shape[1], shape[1], generator=g)
    )
    u, s, vh = top_singular_triplets(a, rank)
    u0, s0, vh0 = torch.linalg.svd(a.double(), full_matrices=False)
    r = min(rank, min(shape))
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    assert torch.allclose(s.double(), s0[:r], rtol=1e-5, atol=1e-6 * float(s0[0]))
    best = (u0[:, :r] * s0[:r]) @ vh0[:r]
    assert float(((u * s) @ vh).double().sub(best).norm() / best.norm()) < 1e-5
    assert torch.allclose(u.t() @ u, torch.eye(r), atol=1e-4)


def test_attention_mixed_gram_is_the_attention_output_error_metric():
    """tr(ΔW G ΔWᵀ) with G = attention_mixed_gram equals the squared error that a value-projection
    error ΔW causes in the attention output (causal softmax attention, GQA), summed over heads."""
    from offline_quantizer.decompose import attention_mixed_gram

    gen = torch.Generator().manual_seed(0)
    b, t, kdim, h, kv, d = 2, 7, 24, 4, 2, 8
    x = torch.randn(b, t, kdim, generator=gen, dtype=torch.float64)
    q = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv, t, d, generator=gen, dtype=torch.float64)
    dw = torch.randn(kv * d, kdim, generator=gen, dtype=torch.float64)  # rows: kv heads x head_dim
    g, n = attention_mixed_gram(x, q, k)
    assert n == b * h * t
    # direct: the error values of each kv head, attended by the query heads of its group
    dv = (x @ dw.t()).view(b, t, kv, d).transpose(1, 2)  # [b, kv, t, d]
    err = 0.0
    for head in range(h):
        s = (q[:, head] @ k[:, head // (h // kv)].transpose(-1, -2)) / d**0.5
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        a = torch.softmax(s, dim=-1)
        # each query head sees all rows of its own kv head only; the Gram form sums over all rows
        err += float(((a @ dv[:, head // (h // kv)]) ** 2).sum())
    full = float(torch.sum((dw @ g.double()) * dw))
    # G is shared by all kv heads: it weighs every row of dW with every query head, so the
    # direct sum restricted to a head's own group is bounded by it, and equal when kv == 1
    assert err <= full * (1 + 1e-9)
    g1, _ = attention_mixed_gram(x, q, k[:, :1])
    dv1 = (x @ dw[:d].t())[:, None]
    err1 = 0.0
    for head in range(h):
        s = (q[:, head] @ k[:, 0].transpose(-1, -2)) / d**0.5
        a = torch.softmax(s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")), dim=-1)
        err1 += float(((a @ dv1[:, 0]) ** 2).sum())
    assert (
        abs(err1 - float(torch.sum((dw[:d] @ g1.double()) * dw[:d]))) <= 1e-5 * err1
    )  # the Gram is accumulated in float32
