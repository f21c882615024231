"""Shared fixtures. Triton runs in its CPU interpreter here (set before anything imports it)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")


@pytest.fixture(scope="session")
def tokenizer_dir():
    """SmolLM2's tokenizer and chat template (from the embedded default model)."""
    from offline_quantizer.prepare import make_model

    return make_model(MODELS)


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory, tokenizer_dir):
    """A 2-block Llama with random weights and SmolLM2's tokenizer: dims 576 wide like SmolLM2."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # outliers in a few input channels, as real models have
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(1.0 + 4.0 * (torch.rand(p.shape[1]) < 0.02).to(p.dtype))
    out = tmp_path_factory.mktemp("tiny") / "dense"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    for fn in ("chat_template.jinja", "generation_config.json"):
        src = os.path.join(tokenizer_dir, fn)
        if os.path.exists(src):
            with open(src) as f, open(out / fn, "w") as g:
                g.write(f.read())
    return str(out)


@pytest.fixture(scope="session")
def tiny_tq(tiny_dense, tmp_path_factory):
    """The tiny model quantized: rank 8 (q_proj of block 0 rank 4, to exercise slot padding), g64."""
    from offline_quantizer.quantize import quantize_model

    out = str(tmp_path_factory.mktemp("tq") / "tq")
    quantize_model(
        tiny_dense, out, None, group_size=64, rank=8, nsamples=8, seqlen=64, batch_size=4,
        rank_overrides={"model.layers.0.self_attn.q_proj": 4}, random_calibration=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_tq_int8(tiny_dense, tmp_path_factory):
    """tiny_tq's recipe with int8 low-rank factors (lowrank_dtype "int8")."""
    from offline_quantizer.quantize import quantize_model

    out = str(tmp_path_factory.mktemp("tq8") / "tq8")
    quantize_model(
        tiny_dense, out, None, group_size=64, rank=8, nsamples=8, seqlen=64, batch_size=4, lowrank_dtype="int8",
        rank_overrides={"model.layers.0.self_attn.q_proj": 4}, random_calibration=True,
    )
    return out


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def checkpoint_layer(tensors, prefix, names=("weight_packed", "weight_scale", "lowrank_down", "lowrank_up")):
    """A module holding one quantized layer's checkpoint tensors as the plugin's parameters
    (codes as stored, the rest in float32), for calling a TwinQuant kernel's `apply` directly."""
    layer = torch.nn.Module()
    for n in names:
        t = tensors[f"{prefix}.{n}"]
        setattr(layer, n, torch.nn.Parameter(t if n == "weight_packed" else t.float(), requires_grad=False))
    return layer
