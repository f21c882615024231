"""The end-to-end benchmark's peer checkpoints of one dense model (benchmarks/e2e/e2e_h100.py): the GPTQ W4A16 and
compressed-tensors W4A8-FP8 checkpoints hold the same round-to-nearest codes and scales of the same weights, in the
layouts and with the configs that vLLM's loaders for each read."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))

import e2e_h100  # noqa: E402


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    dense, gptq, ct = (str(root / n) for n in ("bf16", "gptq", "w4a8_ct"))
    e2e_h100.make_dense(dense, layers=1, vocab=64, shape="tiny", device="cpu")
    e2e_h100.write_gptq(dense, gptq, device="cpu")
    e2e_h100.write_ct_w4a8(dense, ct, device="cpu")
    return dense, gptq, ct


def _tensors(path):
    out = {}
    for fn in os.listdir(path):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fn)))
    return out


def test_rtn_codes_reconstruct_each_weight_within_half_a_step_and_keep_the_group_maximum():
    w = torch.randn(48, 256, dtype=torch.float64) * torch.logspace(-2, 1, 48, dtype=torch.float64)[:, None]
    q, s = e2e_h100.rtn_codes(w, group=128)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == (48, 2)
    deq = (q - 8).double().reshape(48, 2, 128) * s.double()[..., None]
    err = (deq - w.reshape(48, 2, 128)).abs()
    assert (err <= s.double()[..., None] * (0.5 + 1e-5)).all()
    assert ((q - 8).abs().reshape(48, 2, 128).amax(-1) == 7).all()  # each group's largest weight on the grid's end


def test_the_w4a8_peer_holds_the_gptq_peers_codes_and_scales_of_the_same_weights(peers):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    dense, gptq, ct = (_tensors(p) for p in peers)
    linears = [n[: -len(".weight")] for n in dense if any(f".{lin}." in n for lin in e2e_h100.LINEARS)]
    assert len(linears) == len(e2e_h100.LINEARS)
    for pre in linears:
        w = dense[pre + ".weight"]
        n, k = w.shape
        q_ct = unpack_from_int32(ct[pre + ".weight_packed"], 4, torch.Size([n, k]))  # int8, -8..7
        words = gptq[pre + ".qweight"].to(torch.int64) & 0xFFFFFFFF  # [K/8, N]
        q_gptq = ((words[:, None, :] >> (4 * torch.arange(8))[None, :, None]) & 0xF).reshape(k, n).t() - 8
        assert torch.equal(q_ct.to(torch.int64), q_gptq)
        assert ct[pre + ".weight_shape"].tolist() == [n, k]
        s_ct, s_gptq = ct[pre + ".weight_scale"].float(), gptq[pre + ".scales"].float().t()
        assert ct[pre + ".weight_scale"].dtype == torch.bfloat16
        torch.testing.assert_close(s_ct, s_gptq, rtol=2**-7, atol=0)  # one fp32 scale, rounded to bf16 and fp16
        deq = q_ct.float().reshape(n, k // 128, 128) * s_ct[..., None]
        assert (deq.reshape(n, k) - w.float()).abs().max() <= s_ct.max() * 0.51
    others = {n for n in dense if not any(n.startswith(p + ".") for p in linears)}
    assert others and all(torch.equal(ct[n], dense[n]) for n in others)  # norms, embedding and lm_head as they were


def test_vllm_reads_the_w4a8_peers_config_as_its_w4a8_fp8_scheme_with_lm_head_dense(peers):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    cfg = json.load(open(os.path.join(peers[2], "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    qc = CompressedTensorsConfig.from_config(cfg)
    scheme = qc.target_scheme_map["Linear"]
    assert CompressedTensorsConfig._is_fp8_w4a8(scheme["weights"], scheme["input_activations"])
    assert scheme["weights"].group_size == 128 and qc.ignore == ["lm_head"]


def test_end_to_end_configs_serve_each_peer_from_its_own_checkpoint_with_the_method_its_config_names(tmp_path):
    assert e2e_h100.engine_args(str(tmp_path), "w4a8_ct") == (str(tmp_path / "w4a8_ct"), {})
    assert e2e_h100.engine_args(str(tmp_path), "gptq") == (str(tmp_path / "gptq"), {})
    assert e2e_h100.engine_args(str(tmp_path), "w4a8_ct_kv8")[1] == {"kv_cache_dtype": "fp8"}
    assert e2e_h100.config_activations("w4a8_ct") == "fp8" and e2e_h100.config_rank("w4a8_ct") is None
