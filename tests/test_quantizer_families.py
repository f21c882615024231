"""Every supported family end to end: a tiny random model quantized (plain GPTQ, and the TwinQuant
stages) is served by vLLM (CPU build, plugin) with the logprobs of a transformers model holding
what the checkpoint stores; what the quantizer cannot handle is refused by name."""

import gc
import os

import pytest
import torch
from conftest import FAMILIES, save_family_model, small_recipe

from offline_quantizer import quantize
from offline_quantizer.families import UnsupportedModelError, check_block, family_for

RECIPES = {
    "gptq": lambda: small_recipe(rank=0, nsamples=8, seqlen=48),
    "twinquant": lambda: small_recipe({"rotation": {"kind": "learned", "steps": 3}}, {"smoothing": {"steps": 5}},
                                      {"residual": {"attention_aware": True}}, {"block_tuning": {"epochs": 1}},
                                      rank=8, nsamples=8, seqlen=48, method="refined", refine_iters=1),
}


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {k: save_family_model(k, root / k) for k in FAMILIES}


def _vllm_prompt_logprobs(ckpt: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=ckpt, quantization="twinquant", dtype="float32", max_model_len=128, enforce_eager=True,
              skip_tokenizer_init=True, gpu_memory_utilization=0.3, seed=0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False))
        return [torch.tensor([lp[p[i]].logprob for i, lp in enumerate(o.prompt_logprobs) if i > 0], dtype=torch.float64)
                for p, o in zip(prompts, outs)]
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_is_served_by_vllm_as_its_checkpoint_computes(kind, recipe, dense_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from offline_quantizer.reference import served_model

    out = str(tmp_path / "tq")
    result = quantize(dense_models[kind], RECIPES[recipe](), "random", out, device="cpu", max_kl=None)
    c = result.check
    assert c.finite and c.mean_kl < 2.0, c  # 4 bits on a random, peaked model; a broken fold gives tens of nats
    refuses = family_for(_config(dense_models[kind])).rotation_refusal() is not None
    assert ("rotation" in {s["stage"] for s in result.skipped}) == (recipe == "twinquant" and refuses)

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (40, 17)]
    served = _vllm_prompt_logprobs(out, prompts)
    ref_model = served_model(out)
    dense = AutoModelForCausalLM.from_pretrained(dense_models[kind], dtype=torch.float32).eval()
    assert ref_model.config.model_type == dense.config.model_type
    for p, s in zip(prompts, served):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(input_ids=ids).logits[0].double(), -1)
            dref = torch.log_softmax(dense(input_ids=ids).logits[0].double(), -1)
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        assert (s - want).abs().max() < 2e-3, (kind, recipe, float((s - want).abs().max()))
        # peaked predictions (so the comparison means something), and quantization moved them
        assert float(ref.max(-1).values.exp().mean()) > 0.1 and float(dref.max(-1).values.exp().mean()) > 0.1
        assert (ref - dref).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2's tiny model ties its embeddings
def test_a_quantized_lm_head_is_served_by_vllm_as_its_checkpoint_computes(kind, dense_models, tmp_path):
    from offline_quantizer.reference import served_model

    out = str(tmp_path / "tq")
    recipe = small_recipe({"residual": {"modules_to_not_convert": []}}, rank=8, nsamples=8, seqlen=48)
    quantize(dense_models[kind], recipe, "random", out, device="cpu", max_kl=None)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (33, 9)]
    served = _vllm_prompt_logprobs(out, prompts)
    ref_model = served_model(out)
    assert type(ref_model.lm_head).__name__ == "ServedLinear"
    for p, s in zip(prompts, served):
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(input_ids=torch.tensor([p])).logits[0].double(), -1)
        want = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        assert (s - want).abs().max() < 2e-3, (kind, float((s - want).abs().max()))


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_a_quantized_lm_head_is_refused_for_families_whose_vllm_model_ties_it(kind, dense_models, tmp_path):
    from offline_quantizer.recipe import RecipeError

    recipe = small_recipe({"residual": {"modules_to_not_convert": []}}, rank=0, nsamples=8, seqlen=48)
    with pytest.raises(RecipeError, match=r"residual\.modules_to_not_convert leaves lm_head out, but a quantized "
                                          r"lm_head is stored untied .* always ties them"):
        quantize(dense_models[kind], recipe, "random", str(tmp_path / "tq"), device="cpu")
    assert not os.path.exists(tmp_path / "tq")


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("config_cls,match", [
    ("MixtralConfig", "mixture-of-experts"), ("Qwen2MoeConfig", "mixture-of-experts"),
    ("Qwen3MoeConfig", "mixture-of-experts"), ("Gemma3Config", "multimodal"), ("GPT2Config", "not supported"),
])
def test_models_the_quantizer_cannot_handle_are_refused_by_name(config_cls, match, tmp_path):
    import transformers as T

    cfg = getattr(T, config_cls)()
    with pytest.raises(UnsupportedModelError, match=match) as err:
        family_for(cfg)
    assert repr(cfg.model_type) in str(err.value)


def test_a_block_part_the_family_does_not_know_is_refused_by_name():
    """A parameter outside the family's linears and norms (an MoE router, an extra projection)
    would otherwise be left out of every transform: the block is refused, naming the module."""
    from conftest import tiny_family_model

    model = tiny_family_model("llama", peaked=False)
    block = model.model.layers[0]
    check_block(family_for(model.config), block, "model.layers.0")
    block.mlp.extra_proj = torch.nn.Linear(4, 4)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.extra_proj \(Linear\)"):
        check_block(family_for(model.config), block, "model.layers.0")


def test_a_source_folder_without_safetensors_is_refused_before_anything_runs(tmp_path):
    from conftest import tiny_family_model

    tiny_family_model("llama", peaked=False).save_pretrained(tmp_path / "m")
    for f in os.listdir(tmp_path / "m"):
        if f.endswith(".safetensors"):
            os.rename(tmp_path / "m" / f, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(found \['pytorch_model.bin'\]\)"):
        quantize(str(tmp_path / "m"), small_recipe(rank=0), "random", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
