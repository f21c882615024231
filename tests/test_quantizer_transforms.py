"""TwinQuant's learned transforms and split: the folds are exact, the manifolds are respected,
and the learned objectives improve on their starting points."""

import pytest
import torch
from conftest import FAMILIES, tiny_family_model

from offline_quantizer import transforms as tf
from offline_quantizer.decompose import decompose, decompose_refined, output_error


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_transform_folds_exactly_into_every_family(kind, monkeypatch):
    """Norm folding, the residual-stream rotation (where the family allows it) and smoothing with
    a random positive diagonal leave every family's logits unchanged (float64 weights; transformers
    normalises in float32, hence 1e-5)."""
    from offline_quantizer.families import family_for

    model = tiny_family_model(kind).double()
    fam = family_for(model.config)
    ids = torch.randint(3, 512, (2, 19))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        rotate = fam.rotation_refusal() is None
        tf.fold_norms(model, include_head=rotate)
        for name, p in model.named_parameters():  # every pre-norm is at unit scale now
            if any(name.endswith(f"{g.norm}.weight") for g in fam.pre_norms):
                assert float((p + fam.norm_offset - 1).abs().max()) == 0, name
        if rotate:
            tf.rotate_residual_stream(model, tf.random_orthogonal(128, seed=3))
        gen = torch.Generator().manual_seed(1)
        monkeypatch.setattr(tf, "learn_smoothing", lambda ws, *a, **k: 0.5 + torch.rand(ws[0].shape[1], generator=gen,
                                                                                    dtype=torch.float64))
        for block in model.model.layers:
            hess = {n: torch.eye(m.in_features, dtype=torch.float64) for n, m in block.named_modules()
                    if isinstance(m, torch.nn.Linear)}
            done = tf.smooth_block(block, fam, hess, 32, torch.float64)
            assert set(done) == set(fam.linears) - set(fam.writers[:1])  # every reader group and down_proj
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_rotation_is_refused_where_it_cannot_fold():
    """Gemma 2 and 3 apply norms to the attention and MLP outputs; a rotation of the stream does
    not commute with them. The rotation unties lm_head, which vLLM 0.26's Gemma 1 and 2 refuse.
    Those families refuse it, each with its reason."""
    from offline_quantizer.families import FAMILIES as ROWS

    refused = {f.name: f.rotation_refusal() for f in ROWS if f.rotation_refusal()}
    assert set(refused) == {"gemma", "gemma2", "gemma3"}
    assert "always ties" in refused["gemma"] and "post_attention_layernorm" in refused["gemma3"]
    gemma3 = next(f for f in ROWS if f.name == "gemma3")
    with pytest.raises(ValueError, match="post_attention_layernorm"):
        tf.rotate_block(torch.nn.Module(), gemma3, torch.eye(4))


def test_learned_rotation_stays_orthogonal_and_lowers_the_quantization_error():
    g = torch.Generator().manual_seed(0)
    readers = [torch.randn(96, 128, generator=g) * (1 + 8 * (torch.rand(128, generator=g) < 0.03)) for _ in range(3)]
    writers = [torch.randn(128, 64, generator=g) for _ in range(2)]
    q, hist = tf.learn_rotation(readers, writers, 32, init="random", steps=25, lr=0.05, seed=1)
    assert torch.allclose(q.double() @ q.double().T, torch.eye(128, dtype=torch.float64), atol=1e-4)
    assert min(hist) < hist[0]  # the Riemannian steps improve on the random start
    q2, hist2 = tf.learn_rotation(readers, writers, 32, init="random", steps=25, lr=0.05, seed=1)
    assert torch.equal(q, q2) and hist == hist2  # deterministic with a seed
    _, ident = tf.learn_rotation(readers, writers, 32, init="identity", steps=0)
    assert hist[0] < ident[0]  # a random rotation already flattens the outlier channels


def test_learned_smoothing_is_positive_and_not_worse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    x[:, :3] *= 25
    h = 2 * x.T @ x / x.shape[0]
    ws = [torch.randn(64, 128, generator=g) * 0.02 for _ in range(2)]
    s = tf.learn_smoothing(ws, h, 32, steps=40)
    assert s.shape == (128,) and bool((s > 0).all())
    assert abs(float(torch.log(s).mean())) < 1e-5

    def err(scale):
        tot = 0.0
        for w in ws:
            d = decompose(w * scale[None, :], 0, 32, torch.float16, torch.bfloat16, None, "rtn")
            tot += output_error(w, d.dequantized() / scale[None, :], h) / output_error(w, 0 * w, h)
        return tot

    assert err(s) <= err(torch.ones(128)) * 1.0001


def test_refined_split_is_never_worse_than_svd_and_usually_better():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 192, generator=g) * torch.linspace(0.2, 3, 192)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(128, 192, generator=g) * 0.02
    w[:, :6] *= 10
    d, errs = decompose_refined(w, 8, 64, torch.float16, torch.bfloat16, h, iters=3)
    assert errs[0] == pytest.approx(
        output_error(w, decompose_refined(w, 8, 64, torch.float16, torch.bfloat16, h, 0)[0].dequantized(), h)
    )
    assert output_error(w, d.dequantized(), h) == pytest.approx(min(errs))
    assert min(errs) < 0.95 * errs[0]
    assert d.down.shape == (8, 192) and d.up.shape == (128, 8) and d.down.dtype == torch.bfloat16


def test_subspace_rotation_puts_the_principal_directions_last_and_learning_keeps_them_there():
    """ResQ's start Q = U blockdiag(R_l, R_h): orthogonal, its last c columns span the top-c
    eigenvectors of the covariance; the block-constrained Cayley steps lower the RTN error and
    keep that span, which unconstrained steps do not."""
    g = torch.Generator().manual_seed(0)
    d, c = 128, 16
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ torch.diag(torch.logspace(0, 3, d, dtype=torch.float64)) @ a.T
    q, share = tf.subspace_rotation_init(cov, c, seed=1)
    assert torch.allclose(q.T @ q, torch.eye(d, dtype=torch.float64), atol=1e-10)
    _, u = torch.linalg.eigh(cov)
    top = u[:, -c:] @ u[:, -c:].T
    proj = lambda m: m[:, -c:].double() @ m[:, -c:].double().T  # noqa: E731
    assert (proj(q) - top).norm() < 1e-8
    ev = torch.linalg.eigvalsh(cov)
    assert share == pytest.approx(float(ev[-c:].sum() / ev.sum()))
    readers = [torch.randn(96, d, generator=g) * (1 + 8 * (torch.rand(d, generator=g) < 0.03)) for _ in range(3)]
    writers = [torch.randn(d, 64, generator=g)]
    ql, hist = tf.learn_rotation(readers, writers, 32, init=q, steps=20, lr=0.05, blocks=(d - c, c))
    assert min(hist) < hist[0]
    assert torch.allclose(ql.double().T @ ql.double(), torch.eye(d, dtype=torch.float64), atol=1e-4)
    assert (proj(ql) - top).norm() < 1e-3
    qf, _ = tf.learn_rotation(readers, writers, 32, init=q, steps=20, lr=0.05)
    assert (proj(qf) - top).norm() > 0.05  # without the constraint the subspace moves
    with pytest.raises(ValueError, match="do not partition"):
        tf.learn_rotation(readers, writers, 32, init=q, steps=1, blocks=(100, 16))
