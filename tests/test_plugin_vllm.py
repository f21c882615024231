"""The plugin inside real vLLM (CPU build): config detection, clear errors, and a served
checkpoint whose OpenAI-API logprobs match a pure-torch reference of the same checkpoint."""

import concurrent.futures
import contextlib
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


def test_the_installed_vllm_is_a_supported_release_and_others_get_a_warning():
    import vllm

    import vllm_twinquant

    assert vllm_twinquant.check_vllm_version(vllm.__version__) is None, vllm.__version__
    assert vllm_twinquant.check_vllm_version("0.26.0") is None
    warning = vllm_twinquant.check_vllm_version("0.99.1+cu130")
    assert "0.99.1+cu130" in warning and "0.26.0 (CUDA)" in warning and "0.32.0 (CPU)" in warning


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
    weight U @ D + deq(R) read straight from the TwinQuant checkpoint; a checkpoint with quantized
    activations: the quantizer's float32 model of what it serves (reference.served_model)."""
    from transformers import AutoModelForCausalLM

    from offline_quantizer.reference import served_model

    spec = fmt.load_spec(tiny_tq)
    if spec.activation_bits != 16:
        return served_model(tiny_tq).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32)
    q = load_file(os.path.join(tiny_tq, "model.safetensors"))
    _, unexpected = model.load_state_dict(fmt.effective_weights(q, spec.group_size, spec.online_hadamard), strict=False)
    assert not unexpected
    return model.eval()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(ckpt, tmp_path, *args, **env_vars):
    """`vllm serve CKPT --quantization twinquant [ARGS]` on the CPU; yields the base URL, stops the server after."""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **env_vars)
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", ckpt, "--quantization", "twinquant",
           "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tq", "--enforce-eager", *args]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + log_path.read_text()[-4000:]
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "vllm serve did not come up:\n" + log_path.read_text()[-4000:]
            time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.serve
@pytest.mark.parametrize("ckpt", ["tiny_tq", "tiny_tq_int8", "tiny_tq_fp8"])
def test_vllm_serve_openai_api(tiny_dense, ckpt, request, tmp_path):
    """Served logprobs match the checkpoint's pure-torch reference: bf16 and int8 factors, and W4A8-FP8."""
    tiny_tq = request.getfixturevalue(ckpt)
    with _server(tiny_tq, tmp_path) as base:
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


@pytest.fixture(scope="module")
def tiny_tq_tp(tmp_path_factory, tokenizer_dir):
    """A 2-block Llama whose heads split over 2 ranks (8 query, 4 key/value heads) and whose vocabulary does not
    (49,160 rows: each rank pads its half), quantized: rank 8 (q_proj of block 0 rank 4: slot padding), g64, so
    each rank of down_proj holds 768 input columns (12 groups); "head4": the same with lm_head quantized too."""
    from conftest import small_recipe
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from offline_quantizer import quantize

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=49160, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)).to(torch.bfloat16)
    with torch.no_grad():  # a few outlier input channels, as in tiny_dense
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(1.0 + 4.0 * (torch.rand(p.shape[1]) < 0.02).to(p.dtype))
    root = tmp_path_factory.mktemp("tp")
    model.save_pretrained(root / "dense")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "dense")
    ranks = {"rank_overrides": {"model.layers.0.self_attn.q_proj": 4}}
    for name, stages in (("plain", ()), ("head4", ({"residual": {"modules_to_not_convert": []}},))):
        quantize(str(root / "dense"), small_recipe(*stages, **ranks), "random", str(root / name), device="cpu")
    return {name: str(root / name) for name in ("plain", "head4")}


def _cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers on this machine's allowed CPUs (one each where there are
    enough: vLLM's own binding wants a NUMA node per worker)."""
    cpus = sorted(os.sched_getaffinity(0))
    return "|".join(str(cpus[i % len(cpus)]) for i in range(ranks))


@pytest.mark.serve
@pytest.mark.parametrize("ckpt,activations", [("plain", "W4A16"), ("plain", "W4A8-INT8"), ("head4", "W4A16")])
def test_a_checkpoint_served_on_two_tensor_parallel_ranks_gives_the_logprobs_of_its_reference_at_that_size(
        tiny_tq_tp, ckpt, activations, tmp_path):
    """`vllm serve --tensor-parallel-size 2` (two CPU workers, sharded loading of the merged and row-parallel
    layers, the all-reduce of their partial products; head4: the 4-bit lm_head vocabulary-parallel, each rank's
    rows padded): prompt and generated logprobs match the checkpoint's float32 reference. W4A8: the row-parallel
    layers quantize each rank's input columns per token on their own (docs/format.md), so the reference at
    tensor-parallel size 2 is the one the served logprobs follow, not size 1's."""
    from offline_quantizer.reference import served_model

    ckpt = tiny_tq_tp[ckpt]
    if activations != "W4A16":
        src, ckpt = ckpt, str(tmp_path / "w4a8")
        shutil.copytree(src, ckpt)
        fmt.declare_activations(ckpt, 8, "int")
    prompt = list(range(1000, 1012))
    with _server(ckpt, tmp_path, "--tensor-parallel-size", "2", VLLM_CPU_OMP_THREADS_BIND=_cpu_binding(2)) as base:
        r = requests.post(base + "/v1/completions", timeout=300, json={
            "model": "tq", "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "logprobs": 1, "echo": True,
            "return_tokens_as_token_ids": True,
        })
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    ids = [int(t.split(":")[1]) for t in lp["tokens"]]
    assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 6
    served = torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64)
    diff = {}
    for size in (1, 2):
        with torch.no_grad():
            logits = served_model(ckpt, tensor_parallel_size=size).eval()(torch.tensor([ids])).logits[0].double()
        ref = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        diff[size] = (served - ref).abs()
    assert diff[2].max().item() < (1e-4 if activations == "W4A16" else 2e-3), diff[2]
    if activations == "W4A16":  # nothing depends on the size
        assert torch.equal(diff[1], diff[2])
    else:  # the per-rank scales are what is served
        assert diff[2].mean().item() < diff[1].mean().item() / 4, (diff[1].mean().item(), diff[2].mean().item())


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tq", "prompt": [1, 2', "/v1/completions"),
    "not UTF-8": (b'{"model": "tq", "prompt": "\xff\xfe"}', "/v1/completions"),
    "unknown model": ({"model": "nope", "prompt": [1, 2], "max_tokens": 2}, "/v1/completions"),
    "max_tokens -1": ({"model": "tq", "prompt": [1, 2], "max_tokens": -1}, "/v1/completions"),
    "max_tokens 1e9": ({"model": "tq", "prompt": [1, 2], "max_tokens": 10**9}, "/v1/completions"),
    "prompt beyond max_model_len": ({"model": "tq", "prompt": [7] * 100_000, "max_tokens": 2}, "/v1/completions"),
    "logprobs 100": ({"model": "tq", "prompt": [1, 2], "max_tokens": 2, "logprobs": 100}, "/v1/completions"),
    "empty prompt": ({"model": "tq", "prompt": "", "max_tokens": 2}, "/v1/completions"),
    "temperature -5": ({"model": "tq", "prompt": [1, 2], "max_tokens": 2, "temperature": -5}, "/v1/completions"),
    "chat without messages": ({"model": "tq", "max_tokens": 2}, "/v1/chat/completions"),
}


@pytest.mark.serve
def test_served_checkpoint_answers_concurrent_requests_and_refuses_bad_ones_without_falling_over(tiny_tq, tmp_path):
    """96 requests at concurrency 8 (completions and streaming chat) all answered; each bad request a JSON 4xx
    with the server healthy after it; greedy output identical when asked twice."""
    with _server(tiny_tq, tmp_path) as base:
        def one(i):
            if i % 2:
                r = requests.post(base + "/v1/completions", timeout=300, json={
                    "model": "tq", "prompt": [100 + i, 200, 300], "max_tokens": 8, "temperature": 0.0})
                return r.status_code == 200 and len(r.json()["choices"][0]["text"]) >= 0
            r = requests.post(base + "/v1/chat/completions", timeout=300, stream=True, json={
                "model": "tq", "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8,
                "stream": True})
            chunks = [line for line in r.iter_lines() if line.startswith(b"data: ")]
            return r.status_code == 200 and chunks[-1] == b"data: [DONE]" and len(chunks) > 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(one, range(96))) == 96

        for name, (body, path) in BAD_REQUESTS.items():
            kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {
                "json": body}
            r = requests.post(base + path, timeout=120, **kw)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
            assert isinstance(r.json(), dict), name
            assert requests.get(base + "/health", timeout=10).status_code == 200, f"unhealthy after {name}"

        ask = {"model": "tq", "prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0.0}
        first, second = (requests.post(base + "/v1/completions", timeout=120, json=ask).json() for _ in range(2))
        assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_the_plugins_switches_are_part_of_vllms_compile_cache_key(monkeypatch):
    """A layer's kernel (TWINQUANT_DISABLED_KERNELS) decides what vLLM's compiled graph calls, so after
    `register()` vLLM's compile-cache factors change with every switch of vllm_twinquant.envs: a graph compiled
    for the CUDA kernels is not reused by a run that disables them."""
    import vllm.envs

    import vllm_twinquant
    from vllm_twinquant import envs

    vllm_twinquant.register()
    for name in envs.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    base = vllm.envs.compile_factors()
    for name, value in [("TWINQUANT_DISABLED_KERNELS", "triton"), ("TWINQUANT_CONFIG_DIR", "/tmp/tables"),
                        ("TWINQUANT_GLUON_ANY_TRITON", "1")]:
        monkeypatch.setenv(name, value)
        assert vllm.envs.compile_factors() != base, name
        monkeypatch.delenv(name)
    assert vllm.envs.compile_factors() == base
    assert set(envs.SWITCHES) == {n for n in vllm.envs.environment_variables if n.startswith("TWINQUANT_")}
