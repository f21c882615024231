"""Format v1: round trip, and a clear error for every kind of bad checkpoint."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_twinquant import format as fmt


def test_pack_roundtrip():
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    packed = fmt.pack_codes(q)
    assert packed.dtype == torch.int32 and packed.shape == (7, 8)
    assert torch.equal(fmt.unpack_codes(packed, 64), q)
    with pytest.raises(fmt.TwinQuantFormatError):
        fmt.pack_codes(torch.full((2, 8), 9, dtype=torch.int8))


def test_checkpoint_roundtrip(tiny_dense, tiny_tq):
    spec = fmt.validate_checkpoint(tiny_tq)
    cfg = json.load(open(os.path.join(tiny_tq, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "twinquant" and cfg["format_version"] == 1
    assert spec.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert spec.rank_for("model.layers.1.mlp.down_proj") == 8
    q = load_file(os.path.join(tiny_tq, "model.safetensors"))
    dense = load_file(os.path.join(tiny_dense, "model.safetensors"))
    for layer in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        w = dense[f"{layer}.weight"].float()
        r = spec.rank_for(layer)
        assert q[f"{layer}.lowrank_down"].shape == (r, w.shape[1])
        assert q[f"{layer}.lowrank_up"].shape == (w.shape[0], r)
        w_hat = fmt.dequantize_residual(q[f"{layer}.weight_packed"], q[f"{layer}.weight_scale"], 64)
        w_hat += q[f"{layer}.lowrank_up"].float() @ q[f"{layer}.lowrank_down"].float()
        rel = ((w_hat - w).norm() / w.norm()).item()
        assert rel < 0.3, (
            f"{layer}: effective weight is {rel:.3f} away from the source"
        )  # GPTQ trades weight error for output error
        assert f"{layer}.weight" not in q
    assert "lm_head.weight" not in q and "model.embed_tokens.weight" in q  # tied, kept dense
    for fn in ("tokenizer.json", "chat_template.jinja"):
        assert os.path.exists(os.path.join(tiny_tq, fn))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(path, fn):
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f)


def _edit_config(path, fn):
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    fn(cfg["quantization_config"])
    json.dump(cfg, open(p, "w"))


NAME = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize(
    "case,edit,expect",
    [
        (
            "missing",
            lambda d: _edit_tensors(d, lambda t: t.pop(f"{NAME}.lowrank_up")),
            f"missing tensor {NAME}.lowrank_up",
        ),
        (
            "shape",
            lambda d: _edit_tensors(
                d, lambda t: t.__setitem__(f"{NAME}.weight_scale", t[f"{NAME}.weight_scale"][:-1].clone())
            ),
            f"tensor {NAME}.weight_scale is",
        ),
        (
            "dtype",
            lambda d: _edit_tensors(
                d, lambda t: t.__setitem__(f"{NAME}.lowrank_down", t[f"{NAME}.lowrank_down"].float())
            ),
            f"tensor {NAME}.lowrank_down is torch.float32",
        ),
        ("version", lambda d: _edit_config(d, lambda q: q.__setitem__("format_version", 7)), "format_version = 7"),
        (
            "group",
            lambda d: _edit_config(d, lambda q: q.__setitem__("group_size", 128)),
            "group_size 128 does not divide in_features 576",
        ),
        (
            "nan",
            lambda d: _edit_tensors(d, lambda t: t[f"{NAME}.weight_scale"].view(-1).__setitem__(3, float("nan"))),
            f"tensor {NAME}.weight_scale has 1 NaN/inf",
        ),
        ("method", lambda d: _edit_config(d, lambda q: q.__setitem__("quant_method", "gptq")), "quant_method = 'gptq'"),
        (
            "unknown key",
            lambda d: _edit_config(d, lambda q: q.__setitem__("zero_points", True)),
            "unknown keys ['zero_points']",
        ),
        (
            "subspace",
            lambda d: _edit_config(
                d,
                lambda q: q.update(
                    activation_bits=4, activation_subspace_channels=576, activation_subspace_modules=["up_proj"]
                ),
            ),
            "activation_subspace_channels 576 is not below in_features 576",
        ),
        (
            "truncated",
            lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(
                os.path.getsize(os.path.join(d, "model.safetensors")) - 100
            ),
            "truncated safetensors file",
        ),
    ],
)
def test_bad_checkpoint(tiny_tq, tmp_path, case, edit, expect):
    d = _copy(tiny_tq, tmp_path / "bad")
    edit(d)
    with pytest.raises(fmt.TwinQuantFormatError) as e:
        fmt.validate_checkpoint(d)
    assert expect in str(e.value), str(e.value)


def test_effective_bits():
    spec = fmt.TwinQuantSpec(group_size=64, rank=16)
    # 4 bits + fp16 scale per 64 + bf16 factors of rank 16
    assert spec.effective_bits(1536, 576, 16) == pytest.approx(4 + 16 / 64 + 16 * 16 * (1536 + 576) / (1536 * 576))
    assert spec.effective_bits(1536, 576, 0) == 4.25


def test_activation_bits_and_online_hadamard_are_validated():
    assert fmt.TwinQuantSpec(activation_bits=4, online_hadamard=["o_proj"]).activation_bits == 4
    with pytest.raises(fmt.TwinQuantFormatError, match="activation_bits = 6"):
        fmt.TwinQuantSpec(activation_bits=6)
    with pytest.raises(fmt.TwinQuantFormatError, match="online_hadamard"):
        fmt.TwinQuantSpec(online_hadamard="o_proj")
    h = fmt.hadamard_matrix(64, torch.float64)
    assert torch.allclose(h @ h, torch.eye(64, dtype=torch.float64)) and torch.equal(h, h.T)
    assert fmt.hadamard_block_size(576) == 64 and fmt.hadamard_block_size(14336) == 2048
    x = torch.randn(3, 4, 576, dtype=torch.float64)
    w = torch.randn(7, 576, dtype=torch.float64)
    assert torch.allclose(fmt.apply_online_hadamard(x) @ fmt.apply_online_hadamard(w).T, x @ w.T)
    xq = fmt.quantize_activations(torch.randn(6, 64), 4)
    assert all(len(torch.unique(r / r.abs().max() * 7).round()) <= 15 for r in xq)


def test_int8_lowrank_rounding_is_balanced_exact_and_close():
    """round_lowrank(int8): U's columns rebalanced to unit RMS, both factors on their per-row
    int8 grid, the product within int8 rounding of the original; lowrank_tensors stores it
    exactly and refuses a factor that is off its grid."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.randn(96, 8, generator=g) * torch.logspace(0, -2, 8)  # spread singular values
    d0 = torch.randn(8, 160, generator=g)
    up, down = fmt.round_lowrank(u0, d0, torch.int8)
    assert up.dtype == down.dtype == torch.float32
    assert torch.allclose(up.pow(2).mean(0).sqrt(), torch.ones(8), rtol=2e-2)
    rel = ((up @ down - u0 @ d0).norm() / (u0 @ d0).norm()).item()
    assert 0 < rel < 1.2e-2, rel  # ~0.8%: 8-bit rows of Gaussian entries
    spec = fmt.TwinQuantSpec(group_size=32, rank=8, lowrank_dtype="int8")
    t = fmt.lowrank_tensors("p", up, down, spec)
    assert t["p.lowrank_down"].dtype == t["p.lowrank_up"].dtype == torch.int8
    assert int(t["p.lowrank_up"].abs().max()) == 127 and t["p.lowrank_up_scale"].shape == (96,)
    assert torch.allclose(fmt.dequantize_lowrank(t["p.lowrank_up"], t["p.lowrank_up_scale"]), up, rtol=1e-6, atol=0)
    assert torch.allclose(
        fmt.dequantize_lowrank(t["p.lowrank_down"], t["p.lowrank_down_scale"]), down, rtol=1e-6, atol=0
    )
    specs = fmt.tensor_specs("p", 96, 160, 8, spec)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {k: specs[k] for k in t}
    assert len(t) == 4 and set(t) < set(specs)
    with pytest.raises(fmt.TwinQuantFormatError, match="p.lowrank_down: factor is not on its int8 grid"):
        fmt.lowrank_tensors("p", up, down * 1.001 + 1e-3, spec)
    # bits: 4 + 16/64 + (8 r (N + K) + 32 (r + N)) / (N K)
    assert fmt.TwinQuantSpec(group_size=64, rank=16, lowrank_dtype="int8").effective_bits(1536, 576, 16) == \
        pytest.approx(4.25 + (8 * 16 * 2112 + 32 * (16 + 1536)) / (1536 * 576))
    with pytest.raises(fmt.TwinQuantFormatError, match="lowrank_dtype = 'int4'"):
        fmt.TwinQuantSpec(lowrank_dtype="int4")


def test_int8_lowrank_checkpoint(tiny_dense, tiny_tq, tiny_tq_int8, tmp_path):
    """The quantizer's int8-factor checkpoint: valid, smaller, the same function as the bf16
    one up to the factors' rounding, and its tensors checked like every other."""
    spec = fmt.validate_checkpoint(tiny_tq_int8)
    assert spec.lowrank_dtype == "int8"
    bits = {p: fmt.load_spec(p).metadata["effective_bits_per_weight"] for p in (tiny_tq, tiny_tq_int8)}
    assert bits[tiny_tq_int8] < bits[tiny_tq] - 0.1, bits
    q8, q16 = (load_file(os.path.join(p, "model.safetensors")) for p in (tiny_tq_int8, tiny_tq))
    dense = load_file(os.path.join(tiny_dense, "model.safetensors"))
    w8, w16 = fmt.effective_weights(q8, 64), fmt.effective_weights(q16, 64)
    for name in w8:
        w = dense[name].float()
        e8, e16 = ((w8[name] - w).norm() / w.norm()).item(), ((w16[name] - w).norm() / w.norm()).item()
        assert e8 < 1.05 * e16 + 1e-3, (name, e8, e16)
    d = _copy(tiny_tq_int8, tmp_path / "bad")
    _edit_tensors(d, lambda t: t.pop(f"{NAME}.lowrank_up_scale"))
    with pytest.raises(fmt.TwinQuantFormatError, match=f"missing tensor {NAME}.lowrank_up_scale"):
        fmt.validate_checkpoint(d)
    d = _copy(tiny_tq, tmp_path / "stray")
    _edit_tensors(d, lambda t: t.__setitem__(f"{NAME}.lowrank_up_scale", torch.ones(1536)))
    with pytest.raises(
        fmt.TwinQuantFormatError, match=f"{NAME}.lowrank_up_scale present but lowrank_dtype is 'bfloat16'"
    ):
        fmt.validate_checkpoint(d)


def test_activation_clip_ratio():
    """activation_clip_ratio c: per-token scale c * max|x| / 7, entries beyond it saturate; only
    with 4-bit activations, and the reader's kernel applies it."""
    from vllm_twinquant.kernels import TorchTwinQuantKernel, TwinQuantLayerConfig

    assert fmt.TwinQuantSpec(activation_bits=4, activation_clip_ratio=0.8).activation_clip_ratio == 0.8
    for bad in (0, 1.5, "0.8"):
        with pytest.raises(fmt.TwinQuantFormatError, match="activation_clip_ratio"):
            fmt.TwinQuantSpec(activation_bits=4, activation_clip_ratio=bad)
    with pytest.raises(fmt.TwinQuantFormatError, match="needs activation_bits 4"):
        fmt.TwinQuantSpec(activation_clip_ratio=0.9)
    x = torch.randn(5, 64, dtype=torch.float64)
    xq = fmt.quantize_activations(x, 4, 0.5)
    step = 0.5 * x.abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(xq, (x / step).round().clamp(-7, 7) * step)
    assert (xq.abs().amax(-1) < 0.51 * x.abs().amax(-1)).all()  # the largest entries saturate
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    layer.weight_packed = fmt.pack_codes(torch.randint(-8, 8, (16, 64), dtype=torch.int8, generator=g))
    layer.weight_scale = torch.rand(16, 2, generator=g).double()
    c = TwinQuantLayerConfig(in_features=64, slot_sizes=(16,), rank=0, group_size=32, act_dtype=torch.float64,
                             activation_bits=4, activation_clip=0.5)
    y = TorchTwinQuantKernel(c).apply(layer, x, None)
    w = fmt.dequantize_residual(layer.weight_packed, layer.weight_scale, 32, torch.float64)
    assert torch.allclose(y, xq @ w.T)


def test_activation_subspace_is_quantized_as_its_own_group():
    """activation_subspace_channels c: the last c input columns are one per-token group at
    activation_subspace_bits with their own scale, the rest is quantized as without them;
    the spec refuses it without 4-bit activations, on online-Hadamard layers, or at 4 bits."""
    spec = fmt.TwinQuantSpec(activation_bits=4, online_hadamard=["o_proj"], activation_subspace_channels=16,
                             activation_subspace_modules=["q_proj", "gate_proj"])
    assert spec.subspace_channels_for("model.layers.3.self_attn.q_proj") == 16
    assert spec.subspace_channels_for("model.layers.3.self_attn.o_proj") == 0
    for kw, msg in [({}, "needs activation_bits 4"),
                    ({"activation_bits": 4, "online_hadamard": ["q_proj"]}, "both online_hadamard"),
                    ({"activation_bits": 4, "activation_subspace_bits": 4}, "activation_subspace_bits = 4")]:
        with pytest.raises(fmt.TwinQuantFormatError, match=msg):
            fmt.TwinQuantSpec(activation_subspace_channels=16, activation_subspace_modules=["q_proj"], **kw)
    with pytest.raises(fmt.TwinQuantFormatError, match="activation_subspace_modules"):
        fmt.TwinQuantSpec(activation_bits=4, activation_subspace_channels=16)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 80, generator=g, dtype=torch.float64)
    x[:, -16:] *= 50  # the high-variance directions, as the rotation puts them there
    xq = fmt.quantize_activations(x, 4, 0.8, subspace=16, subspace_bits=8)
    assert torch.equal(xq[:, :64], fmt.quantize_activations(x[:, :64], 4, 0.8))
    hi_step = x[:, -16:].abs().amax(-1, keepdim=True) / 127
    assert ((xq[:, -16:] - x[:, -16:]).abs() <= hi_step / 2 + 1e-12).all()
    assert torch.equal(fmt.quantize_activations(x, 4, 0.8, 16, 16)[:, -16:], x[:, -16:])
    plain = fmt.quantize_activations(x, 4, 0.8)
    err = lambda y: float((y[:, :64] - x[:, :64]).norm())  # noqa: E731
    assert err(xq) < 0.2 * err(plain)  # the large channels no longer set the small ones' step (plain: all 0)
    with pytest.raises(ValueError, match="80-wide"):
        fmt.quantize_activations(x, 4, 1.0, subspace=80)


@pytest.mark.parametrize("bits,kind", [(8, "float"), (8, "int"), (4, "int")])
def test_a_row_parallel_layers_ranks_quantize_their_own_input_columns_per_token(bits, kind):
    """shards (tensor-parallel ranks of o_proj/down_proj): each part of the columns gets its own per-token scale,
    so (integer codes) a part whose tokens are small is not quantized on the step of another part's large values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g)
    x[:, 48:] *= 30  # the second rank's columns are larger
    parts = fmt.quantize_activations(x, bits, kind=kind, shards=2)
    assert torch.equal(parts, torch.cat([fmt.quantize_activations(x[:, :48], bits, kind=kind),
                                         fmt.quantize_activations(x[:, 48:], bits, kind=kind)], -1))
    whole = fmt.quantize_activations(x, bits, kind=kind)
    assert torch.equal(parts[:, 48:], whole[:, 48:])  # the part that holds each token's maximum: the same step
    if kind == "int":  # integer codes: a finer step (FP8's relative error hardly depends on the scale)
        assert (parts[:, :48] - x[:, :48]).norm() < 0.5 * (whole[:, :48] - x[:, :48]).norm()
    assert not torch.equal(parts[:, :48], whole[:, :48])
    for bad, why in [(dict(shards=5), "96 input columns in 5"), (dict(shards=2, subspace=16), "subspace")]:
        with pytest.raises(ValueError, match=why):
            fmt.quantize_activations(x, bits, kind=kind, **bad)


def test_w4a8_declarations_are_validated_by_name():
    assert fmt.TwinQuantSpec(activation_bits=8, activation_type="float").to_dict()["activation_type"] == "float"
    assert fmt.TwinQuantSpec(activation_bits=8).activation_type == "int"
    bad = [
        (dict(activation_bits=4, activation_type="float"), "activation_type = 'float' needs activation_bits 8"),
        (dict(activation_bits=8, activation_type="fp8"), r"activation_type = 'fp8': expected one of \['int', 'fl"),
        (dict(activation_bits=8, activation_clip_ratio=0.9), "activation_clip_ratio = 0.9 needs activation_bits 4"),
        (dict(activation_bits=8, activation_subspace_channels=8, activation_subspace_modules=["q_proj"]),
         "activation_subspace_channels = 8 needs activation_bits 4"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(fmt.TwinQuantFormatError, match=msg):
            fmt.TwinQuantSpec(**kwargs)


def test_per_token_codes_are_the_formats_fp8_and_int8_grids():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g, dtype=torch.float64) * torch.tensor([1e-4, 1, 50, 1e3, 0.0])[:, None].double()
    q8, s8 = fmt.per_token_codes(x, 8, "float")
    assert torch.equal(q8, q8.to(torch.float8_e4m3fn).float())  # on the e4m3 grid
    assert torch.allclose(q8.abs().amax(1)[:4], torch.full((4,), 448.0))  # the largest entry maps to e4m3's max
    assert (q8[4] == 0).all() and s8[4] == 1e-12
    rel = ((q8 * s8 - x).abs() / x.abs().clamp_min(1e-30))[:4]
    assert rel[x[:4].abs() / x[:4].abs().amax(1, keepdim=True) > 2**-6].max() <= 2**-4  # 3 mantissa bits, half a step
    qi, si = fmt.per_token_codes(x, 8, "int")
    assert torch.equal(qi, qi.round()) and qi.abs().max() == 127 and ((qi * si - x).abs() <= si / 2 + 1e-12).all()
    # the fake quantization the torch path and the quantizer's loops use is the same numbers in x's dtype
    assert torch.equal(fmt.quantize_activations(x.float(), 8, kind="float"), (q8 * s8).float())
    with pytest.raises(ValueError, match="FP8 e4m3"):
        fmt.per_token_codes(x, 4, "float")


def test_the_per_token_scale_is_the_correctly_rounded_float32_quotient():
    # torch on CUDA divides by a Python number as a product with its rounded reciprocal, one ulp off for about
    # half of all inputs; the kernels divide correctly rounded, so the format must too, on every device
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4096, 64, generator=g) * torch.logspace(-3, 3, 4096)[:, None]
    amax = x.abs().amax(1).double()
    for bits, kind, clip, qmax in ((8, "float", 1.0, 448.0), (8, "int", 1.0, 127.0), (4, "int", 0.9, 7.0)):
        _, s = fmt.per_token_codes(x, bits, kind, clip)
        product = (amax.float() * clip).double()  # c * max|x| rounded to float32 first, then the quotient
        assert torch.equal(s[:, 0], (product / qmax).float()), (bits, kind)
        assert not torch.equal((amax.float() * clip) * (1 / qmax), (product / qmax).float())  # the test can fail


def test_a_checkpoint_is_redeclared_by_its_config_alone_and_only_to_declarations_the_format_has(tiny_tq, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_tq, d)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "config.json"}
    fmt.declare_activations(str(d), 8, "float")
    spec = fmt.load_spec(str(d))
    assert (spec.activation_bits, spec.activation_type) == (8, "float")
    assert json.loads((d / "config.json").read_text())["quantization_config"]["recipe"].endswith("+declared-a8-float")
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != "config.json"} == files
    before = (d / "config.json").read_text()
    for bits, kind, fields in [(6, "int", {}), (4, "float", {}), (8, "bf16", {}),
                               (8, "int", {"activation_clip_ratio": 0.9}),  # clipping is 4-bit only
                               (4, "int", {"group_size": 64})]:  # not an activation field
        with pytest.raises(fmt.TwinQuantFormatError):
            fmt.declare_activations(str(d), bits, kind, **fields)
    assert (d / "config.json").read_text() == before  # a refused declaration leaves the file as it was
    fmt.declare_activations(str(d), 4, "int", activation_clip_ratio=0.9, online_hadamard=["o_proj", "down_proj"])
    spec = fmt.load_spec(str(d))
    assert (spec.activation_bits, spec.activation_clip_ratio) == (4, 0.9)
    assert spec.has_online_hadamard("model.layers.0.mlp.down_proj") and not spec.has_online_hadamard("q_proj")
