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
        assert rel < 0.3, f"{layer}: effective weight is {rel:.3f} away from the source"  # GPTQ trades weight error for output error
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
        ("missing", lambda d: _edit_tensors(d, lambda t: t.pop(f"{NAME}.lowrank_up")), f"missing tensor {NAME}.lowrank_up"),
        ("shape", lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{NAME}.weight_scale", t[f"{NAME}.weight_scale"][:-1].clone())),
         f"tensor {NAME}.weight_scale is"),
        ("dtype", lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{NAME}.lowrank_down", t[f"{NAME}.lowrank_down"].float())),
         f"tensor {NAME}.lowrank_down is torch.float32"),
        ("version", lambda d: _edit_config(d, lambda q: q.__setitem__("format_version", 7)), "format_version = 7"),
        ("group", lambda d: _edit_config(d, lambda q: q.__setitem__("group_size", 128)), "group_size 128 does not divide in_features 576"),
        ("nan", lambda d: _edit_tensors(d, lambda t: t[f"{NAME}.weight_scale"].view(-1).__setitem__(3, float("nan"))),
         f"tensor {NAME}.weight_scale has 1 NaN/inf"),
        ("method", lambda d: _edit_config(d, lambda q: q.__setitem__("quant_method", "gptq")), "quant_method = 'gptq'"),
        ("unknown key", lambda d: _edit_config(d, lambda q: q.__setitem__("zero_points", True)), "unknown keys ['zero_points']"),
        ("truncated", lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(
            os.path.getsize(os.path.join(d, "model.safetensors")) - 100), "truncated safetensors file"),
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
    with pytest.raises(fmt.TwinQuantFormatError, match="activation_bits = 8"):
        fmt.TwinQuantSpec(activation_bits=8)
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
