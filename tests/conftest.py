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


def small_recipe(*stages, rank=8, nsamples=8, seqlen=64, batch_size=4, heldout=2, **split):
    """A recipe sized for the tests: `stages` (dicts) around an SVD split of `rank` and GPTQ g64."""
    from offline_quantizer.recipe import recipe_from_dict

    body = [{"split": {"rank": rank, **split}}, {"residual": {"group_size": 64}}]
    order = ["rotation", "smoothing", "activations", "split", "residual", "block_tuning", "end_to_end"]
    merged = {}
    for st in list(stages) + body:
        (name, values), = st.items()
        merged.setdefault(name, {}).update(values)
    return recipe_from_dict({"name": "test", "calibration": {"nsamples": nsamples, "seqlen": seqlen,
                                                            "batch_size": batch_size, "heldout": heldout},
                             "stages": [{n: merged[n]} for n in order if n in merged]})


@pytest.fixture(scope="session")
def tiny_tq(tiny_dense, tmp_path_factory):
    """The tiny model quantized: rank 8 (q_proj of block 0 rank 4, to exercise slot padding), g64."""
    from offline_quantizer import quantize

    out = str(tmp_path_factory.mktemp("tq") / "tq")
    quantize(tiny_dense, small_recipe(rank_overrides={"model.layers.0.self_attn.q_proj": 4}), "random", out,
             device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_tq_int8(tiny_dense, tmp_path_factory):
    """tiny_tq's recipe with int8 low-rank factors (lowrank_dtype "int8")."""
    from offline_quantizer import quantize

    out = str(tmp_path_factory.mktemp("tq8") / "tq8")
    quantize(tiny_dense, small_recipe(lowrank_dtype="int8", rank_overrides={"model.layers.0.self_attn.q_proj": 4}),
             "random", out, device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_tq_fp8(tiny_tq, tmp_path_factory):
    """tiny_tq re-declared W4A8-FP8 by its config alone (activation_bits 8, activation_type float)."""
    import shutil

    out = str(tmp_path_factory.mktemp("tqfp8") / "tqfp8")
    shutil.copytree(tiny_tq, out)
    cfg = read_config(out)
    cfg["quantization_config"].update(activation_bits=8, activation_type="float")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
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


# tiny random models of every supported family (offline_quantizer/families.py)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


def tiny_family_model(kind: str, seed: int = 0, layers: int = 2, peaked: bool = True):
    """A 2-block model of family `kind` (hidden 128) with random weights, norm weights away from
    their neutral value (so a wrong fold shows) and, with `peaked`, an output layer scaled so the
    next-token distributions are far from flat (so logprob comparisons mean something). Gemma 3's
    blocks are one sliding-window and one global layer (their rotary frequencies differ)."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    extra = {
        "gemma2": dict(sliding_window=16, query_pre_attn_scalar=32),
        "gemma3": dict(sliding_window=16, query_pre_attn_scalar=32,
                       layer_types=["sliding_attention", "full_attention"][:layers] if layers == 2 else None),
        "qwen2": dict(tie_word_embeddings=True),
    }.get(kind, {})
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config,
           "gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "gemma3": T.Gemma3TextConfig,
           "phi3": T.Phi3Config}[kind]
    cfg = cls(**common, **{k: v for k, v in extra.items() if v is not None})
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    offset = 1.0 if kind.startswith("gemma") else 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p) - offset)
            elif name.endswith("proj.weight"):  # a few outlier input channels, as real models have
                p.mul_(1.0 + 4.0 * (torch.rand(p.shape[1]) < 0.03).to(p.dtype))
        if peaked:  # logits a few units apart, and not dominated by the input token (tied embeddings)
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(128.0 if cfg.tie_word_embeddings else 8.0)
                elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")) \
                        and kind in ("gemma2", "gemma3"):  # post-norms set the size of the blocks' updates
                    p.add_(7.0)
            head = model.get_output_embeddings().weight
            head.mul_((0.2 if cfg.tie_word_embeddings else 0.35) / head.std())
    return model


def save_family_model(kind: str, path, dtype=torch.bfloat16, tokenizer_dir=None, **kw) -> str:
    model = tiny_family_model(kind, **kw).to(dtype)
    model.save_pretrained(path)
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def kernel_layer(n, k, g, r, slots, dtype, seed):
    """A random layer for the kernel tests: codes in the checkpoint layout, fp16 scales, factors (None at rank 0)."""
    from vllm_twinquant.format import pack_codes

    gen = torch.Generator().manual_seed(seed)
    qw = pack_codes(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen))
    sc = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.001).half()
    down = (torch.randn(slots * r, k, generator=gen) * 0.05).to(dtype) if r else None
    up = (torch.randn(n, r, generator=gen) * 0.05).to(dtype) if r else None
    return qw, sc, down, up


def kernel_reference(x, qw, sc, g, down, up, bias, bounds, act_quant=None, act_clip=1.0):
    """float64 of the layer; act_quant "fp8"/"int8"/"int4": the residual reads the format's per-token codes of x
    (int4: W4A4's, at scale act_clip * max|x| / 7)."""
    from vllm_twinquant.format import per_token_codes, reference_linear

    xr = x.double()
    if act_quant is not None:
        bits, kind = {"fp8": (8, "float"), "int8": (8, "int"), "int4": (4, "int")}[act_quant]
        q, s = per_token_codes(x, bits, kind, act_clip)
        xr = q.double() * s.double()
    y = reference_linear(xr, qw, sc, g, None, None, bias)
    if down is not None:
        r = up.shape[1]
        edges = (0, *bounds, y.shape[1])
        t = x.double() @ down.double().T
        for i in range(len(edges) - 1):
            a, b = edges[i], edges[i + 1]
            y[:, a:b] += t[:, i * r : (i + 1) * r] @ up[a:b].double().T
    return y
