"""quantize() with TwinQuant's stages on the 576-wide tiny Llama: each recipe writes a valid
checkpoint that records what was done, computes the dense model as closely as the plain split,
and serves (torch path) exactly what it stores; block tuning on its own."""

import json
import os

import pytest
import torch
from conftest import checkpoint_layer, small_recipe
from safetensors.torch import load_file

from offline_quantizer import quantize
from offline_quantizer.decompose import decompose
from vllm_twinquant import format as fmt


def logit_errors(dense_dir, **ckpts) -> dict[str, float]:
    """‖logits − dense logits‖ / ‖dense logits‖ of each checkpoint as served (reference.served_model),
    on two fixed random 24-token prompts."""
    from transformers import AutoModelForCausalLM

    from offline_quantizer.reference import served_model

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        return {name: float((served_model(ckpt)(input_ids=ids).logits - ref).norm() / ref.norm())
                for name, ckpt in ckpts.items()}


def test_twinquant_stages_write_a_checkpoint_that_computes_the_model(tiny_dense, tiny_tq, tmp_path):
    """Rotation, smoothing and the refined split: valid checkpoint, lm_head untied and stored,
    the recipe and transforms recorded, and the served function as close to the dense model as
    the plain SVD recipe's (a broken fold gives O(1) errors). The end-to-end check inside the
    run measures the checkpoint as the reference model serves it."""
    from offline_quantizer.calibration import Windows
    from offline_quantizer.pipeline import check_checkpoint

    out = str(tmp_path / "tq-learned")
    recipe = small_recipe({"rotation": {"kind": "learned", "steps": 2}}, {"smoothing": {"steps": 5}},
                          method="refined", refine_iters=1)
    result = quantize(tiny_dense, recipe, "random", out, device="cpu")
    fmt.validate_checkpoint(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tie_word_embeddings"] is False
    stored = load_file(os.path.join(out, "model.safetensors"))
    assert "lm_head.weight" in stored  # the rotation folds the final norm into it: stored untied
    meta = cfg["quantization_config"]["metadata"]
    assert meta["recipe"]["name"] == "test" and meta["transforms"]["rotation"]["kind"] == "learned"
    assert [b["transforms"] for b in map(vars, result.blocks)] == [["norm folding", "rotation", "smoothing"]] * 2
    assert all(b.transform_error < 1e-3 for b in result.blocks)

    errs = logit_errors(tiny_dense, learned=out, svd=tiny_tq)
    assert errs["learned"] < 0.5 and errs["learned"] < 2 * errs["svd"], errs
    # the run's own check (streams through the blocks it quantized) = the written checkpoint's
    windows = Windows(torch.zeros(1, 64, dtype=torch.long), _heldout_windows(tiny_dense, 64, 2), "random-tokens")
    again = check_checkpoint(out, tiny_dense, windows, "cpu")
    assert again.ppl_quantized == pytest.approx(result.check.ppl_quantized, rel=1e-4)
    assert again.mean_kl == pytest.approx(result.check.mean_kl, rel=1e-3, abs=1e-6)


def test_a_quantized_lm_head_is_stored_untied_and_computes_what_the_run_measured(tiny_dense, tiny_tq, tmp_path):
    """residual.modules_to_not_convert without lm_head: the (tied) head is decomposed as a linear from the final
    norm's output, stored untied next to the dense embeddings, counted in the bits, named in the card; the written
    checkpoint computes what the run's own check measured, and a tied config or a skip list that disagrees with
    the tensors is refused by name."""
    from offline_quantizer.calibration import Windows
    from offline_quantizer.pipeline import check_checkpoint

    out = str(tmp_path / "tq-head")
    result = quantize(tiny_dense, small_recipe({"residual": {"modules_to_not_convert": []}}), "random", out,
                      device="cpu")
    spec = fmt.validate_checkpoint(out)
    assert spec.modules_to_not_convert == []
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tie_word_embeddings"] is False
    stored = load_file(os.path.join(out, "model.safetensors"))
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].shape == (49152, 576)
    assert stored["lm_head.weight_packed"].shape == (49152, 576 // 8) and stored["lm_head.lowrank_down"].shape[0] == 8
    assert result.quantized_layers == 2 * 7 + 1
    assert "lm_head is quantized" in open(os.path.join(out, "README.md")).read()
    windows = Windows(torch.zeros(1, 64, dtype=torch.long), _heldout_windows(tiny_dense, 64, 2), "random-tokens")
    again = check_checkpoint(out, tiny_dense, windows, "cpu")
    assert again.mean_kl == pytest.approx(result.check.mean_kl, rel=1e-3, abs=1e-6)
    errs = logit_errors(tiny_dense, head=out, svd=tiny_tq)
    assert errs["svd"] < errs["head"] < 2 * errs["svd"] + 0.05, errs  # the head's own error adds, boundedly

    cfg_path = os.path.join(out, "config.json")
    json.dump({**cfg, "tie_word_embeddings": True}, open(cfg_path, "w"))
    with pytest.raises(fmt.TwinQuantFormatError, match="tie_word_embeddings is true, but lm_head is quantized"):
        fmt.validate_checkpoint(out)
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(fmt.TwinQuantFormatError, match=r"lm_head\.weight_packed is quantized, but quantization_config"
                                                          r"\.modules_to_not_convert \['lm_head'\] keeps lm_head"):
        fmt.validate_checkpoint(out)


def test_a_checkpoint_whose_skip_list_leaves_a_dense_lm_head_out_is_refused(tiny_tq, tmp_path):
    import shutil

    out = shutil.copytree(tiny_tq, tmp_path / "tq")
    cfg = json.load(open(out / "config.json"))
    cfg["quantization_config"]["modules_to_not_convert"] = []
    json.dump(cfg, open(out / "config.json", "w"))
    with pytest.raises(fmt.TwinQuantFormatError, match=r"leaves lm_head out, so it is served quantized, but the "
                                                          r"checkpoint has no tensor lm_head\.weight_packed"):
        fmt.validate_checkpoint(str(out))


def _heldout_windows(dense_dir, seqlen, n):
    """The held-out windows quantize() draws for random calibration (seed 0), as it draws them."""
    from transformers import AutoConfig

    from offline_quantizer.calibration import make_windows

    vocab = AutoConfig.from_pretrained(dense_dir).vocab_size
    return make_windows("random", None, 8, seqlen, n, 0, vocab).heldout


def test_w4a4_checkpoint_rotates_online_and_quantizes_the_residual_input(tiny_dense, tiny_tq, tmp_path):
    """activations bits 4: o_proj/down_proj weights are stored for H x (block Hadamard), the served
    function is close to the dense model, and the torch kernel rotates the input and quantizes the
    residual's input per token."""
    from vllm_twinquant.kernels import TorchTwinQuantKernel, TritonTwinQuantKernel, TwinQuantLayerConfig

    out = str(tmp_path / "tq-a4")
    quantize(tiny_dense, small_recipe({"rotation": {"kind": "random"}}, {"smoothing": {"steps": 5}},
                                      {"activations": {"bits": 4, "clip": 0.9}}), "random", out, device="cpu")
    fmt.validate_checkpoint(out)
    spec = fmt.load_spec(out)
    assert spec.activation_bits == 4 and spec.online_hadamard == ["o_proj", "down_proj"]
    assert spec.activation_clip_ratio == 0.9

    errs = logit_errors(tiny_dense, a4=out, svd=tiny_tq)
    assert errs["a4"] < 0.6, errs  # a missing or wrong fold of H gives O(1)

    q = load_file(os.path.join(out, "model.safetensors"))
    pre = "model.layers.1.mlp.down_proj"
    layer = checkpoint_layer(q, pre)
    c = TwinQuantLayerConfig(in_features=1536, slot_sizes=(576,), rank=8, group_size=64, act_dtype=torch.float32,
                             activation_bits=4, activation_clip=0.9, online_hadamard=fmt.hadamard_block_size(1536))
    assert c.online_hadamard == 512 and not TritonTwinQuantKernel.can_implement(c)[0]
    x = torch.randn(5, 1536)
    y = TorchTwinQuantKernel(c).apply(layer, x, None).double()
    xh = fmt.apply_online_hadamard(x.double())
    deq = fmt.dequantize_residual(q[f"{pre}.weight_packed"], q[f"{pre}.weight_scale"], 64, torch.float64)
    low = xh @ q[f"{pre}.lowrank_down"].double().T @ q[f"{pre}.lowrank_up"].double().T
    want = fmt.quantize_activations(xh, 4, 0.9) @ deq.T + low
    assert ((y - want).norm() / want.norm()).item() < 1e-5
    unquantized = x.double() @ fmt.effective_weights(q, 64, spec.online_hadamard)[f"{pre}.weight"].double().T
    rel = ((y - unquantized).norm() / unquantized.norm()).item()
    assert 1e-3 < rel < 0.3, rel  # 4-bit inputs change the output, but only by quantization noise


def test_w4a8_fp8_checkpoint_declares_fp8_activations_without_online_rotation(tiny_dense, tiny_tq, tmp_path):
    """activations bits 8 type float: the same residual and factors as W4A16, no online Hadamard, the
    declaration in the checkpoint and its card; served (torch path), the residual reads e4m3 codes per
    token; and the checkpoint re-declared W4A16 by config alone is a valid W4A16 checkpoint."""
    from vllm_twinquant.kernels import TorchTwinQuantKernel, TwinQuantLayerConfig

    out = str(tmp_path / "tq-a8")
    quantize(tiny_dense, small_recipe({"rotation": {"kind": "random"}}, {"activations": {"bits": 8, "type": "float"}}),
             "random", out, device="cpu")
    spec = fmt.validate_checkpoint(out)
    assert (spec.activation_bits, spec.activation_type, spec.online_hadamard) == (8, "float", [])
    with open(os.path.join(out, "README.md")) as f:
        assert "FP8 e4m3 per token" in f.read()
    errs = logit_errors(tiny_dense, a8=out, svd=tiny_tq)
    assert errs["a8"] < 0.6, errs

    q = load_file(os.path.join(out, "model.safetensors"))
    pre = "model.layers.0.mlp.down_proj"
    c = TwinQuantLayerConfig(in_features=1536, slot_sizes=(576,), rank=8, group_size=64, act_dtype=torch.float32,
                             activation_bits=8, activation_type="float")
    assert c.act_quant == "fp8"
    x = torch.randn(5, 1536) * torch.logspace(-2, 1, 5)[:, None]
    y = TorchTwinQuantKernel(c).apply(checkpoint_layer(q, pre), x, None).double()
    codes, scale = fmt.per_token_codes(x, 8, "float")
    deq = fmt.dequantize_residual(q[f"{pre}.weight_packed"], q[f"{pre}.weight_scale"], 64, torch.float64)
    low = x.double() @ q[f"{pre}.lowrank_down"].double().T @ q[f"{pre}.lowrank_up"].double().T
    want = (codes.double() * scale.double()) @ deq.T + low
    assert ((y - want).norm() / want.norm()).item() < 1e-5

    fmt.declare_activations(out, 16, "int")
    assert fmt.validate_checkpoint(out).activation_bits == 16


def _tiny_llama(seed=0):
    """A 2-block float64 Llama (hidden 128, GQA 4/2 heads) with non-trivial norm weights, so that folding the
    norms into the next layers matters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                      rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(0.5 + torch.rand_like(p))
    return model


def _tuning_case():
    """Block 0 of a tiny Llama (weights scaled so the block matters next to the residual
    stream), random inputs, its dense outputs, and an RTN rank-4 split of every linear layer."""
    model = _tiny_llama().float()
    block = model.model.layers[0]
    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data *= 8
    for n in ("input_layernorm", "post_attention_layernorm"):  # stored in bf16, as in a checkpoint
        block.get_submodule(n).weight.data = block.get_submodule(n).weight.data.bfloat16().float()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 16, 128, generator=gen) for _ in range(4)]
    kw = {"position_embeddings": model.model.rotary_emb(xs[0], torch.arange(16)[None])}
    with torch.no_grad():
        targets = [block(x, **kw) for x in xs]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    ds = {n: decompose(m.weight.data, 4, 32, torch.float16, torch.bfloat16, residual="rtn", weighting="none")
          for n, m in linears.items()}
    for n, m in linears.items():
        m.weight.data = ds[n].dequantized()
    return block, ds, xs, targets, kw, linears


NORMS = {"input_layernorm": 0.0, "post_attention_layernorm": 0.0}


def test_block_tuning_lowers_the_heldout_error_and_serves_what_it_stores():
    """tune_block after an RTN split: codes untouched, stored dtypes kept, the held-out
    block-output error never rises and here falls, and the block afterwards computes exactly
    with the stored (rounded) scales, factors and norm weights."""
    from offline_quantizer.tune import tune_block

    block, ds, xs, targets, kw, linears = _tuning_case()
    codes = {n: d.codes.clone() for n, d in ds.items()}
    res = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=8, lr=1e-3, norms=NORMS, norm_dtype=torch.bfloat16)
    assert res.steps == 8 * 3
    assert res.heldout_end < 0.98 * res.heldout_start, res
    for n, d in ds.items():
        assert torch.equal(d.codes, codes[n])
        assert d.scales.dtype == torch.float16 and d.up.dtype == d.down.dtype == torch.bfloat16
        assert torch.equal(linears[n].weight.data, d.dequantized())
    for n in NORMS:
        g = block.get_submodule(n).weight.data
        assert torch.equal(g, g.bfloat16().float())  # what the checkpoint can hold
    with torch.no_grad():
        out = block(xs[-1], **kw)
        out = out[0] if isinstance(out, tuple) else out
    err = float(torch.mean((out - targets[-1]) ** 2) / torch.mean(targets[-1] ** 2))
    assert abs(err - res.heldout_end) <= 1e-5 * res.heldout_end + 1e-9, (err, res)
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        tune_block(block, ds, xs[:1], targets[:1], [kw], epochs=1)


def test_block_tuning_tunes_a_gemma_norm_through_its_offset():
    """A norm that scales by 1 + w is tuned as a multiple of 1 + w: from w = 0 it can still move
    (a plain multiple of w could not), and the block computes with the stored value."""
    from offline_quantizer.tune import tune_block

    block, ds, xs, targets, kw, _ = _tuning_case()
    norm = block.get_submodule("input_layernorm")
    # the Llama norm scales by w; emulate a 1 + w norm at w = 0 by an offset of 1 on a weight of 1
    res = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=4, lr=1e-2, norms={"input_layernorm": 1.0},
                     norm_dtype=torch.float32)
    assert res.heldout_end <= res.heldout_start
    assert not torch.equal(norm.weight.data, torch.ones_like(norm.weight.data))


def test_block_tuning_with_fp8_activations_sees_the_fp8_rounding_in_the_loop():
    """activation_bits 8, type float: the held-out error starts above W4A16's (the e4m3 rounding of the
    residual's input is in the loop) but far below 4-bit activations', and tuning does not raise it."""
    from offline_quantizer.tune import tune_block

    block, ds, xs, targets, kw, _ = _tuning_case()
    a16 = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=0, norms=NORMS)
    a4 = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=0, norms=NORMS,
                    activation_bits=dict.fromkeys(ds, 4))
    a8 = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=2, norms=NORMS,
                    activation_bits=dict.fromkeys(ds, 8), activation_type="float")
    assert a16.heldout_start < a8.heldout_start < a4.heldout_start, (a16, a8, a4)
    assert a8.heldout_end <= a8.heldout_start


def test_block_tuning_with_4_bit_activations_quantizes_the_residual_input_in_the_loop():
    """activation_bits 4: the held-out error includes the per-token activation quantization
    (larger than W4A16's from the same start) and tuning against it does not raise it."""
    from offline_quantizer.tune import tune_block

    block, ds, xs, targets, kw, _ = _tuning_case()
    a16 = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=0, norms=NORMS)
    a4 = tune_block(block, ds, xs, targets, [kw] * len(xs), epochs=4, norms=NORMS,
                    activation_bits=dict.fromkeys(ds, 4))
    assert a4.heldout_start > 1.5 * a16.heldout_start, (a4, a16)
    assert a4.heldout_end <= a4.heldout_start


def test_tuned_recipe_records_the_tuning_and_computes_the_model(tiny_dense, tmp_path):
    """block_tuning with the attention-aware statistic: valid checkpoint, tuning recorded per
    block, and the served function as close to the dense model as the same recipe without the
    tuning (same calibration, same split). The tuning guarantees only the per-block held-out error
    (the best epoch is kept); end to end it moves this random-weight model by a few percent either
    way, while a wrongly stored tuned tensor gives O(1) errors."""
    common = dict(nsamples=12, rank_overrides={"model.layers.0.self_attn.q_proj": 4})
    out, untuned = str(tmp_path / "tq-tuned"), str(tmp_path / "tq-untuned")
    aware = {"residual": {"attention_aware": True}}
    tuned_res = quantize(tiny_dense, small_recipe(aware, {"block_tuning": {"epochs": 4}}, **common), "random", out,
                         device="cpu")
    quantize(tiny_dense, small_recipe(aware, **common), "random", untuned, device="cpu")
    fmt.validate_checkpoint(out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    stages = [next(iter(s)) for s in qc["metadata"]["recipe"]["stages"]]
    assert stages == ["split", "residual", "block_tuning"]
    assert all("block tuning" in b.transforms for b in tuned_res.blocks)

    errs = logit_errors(tiny_dense, tuned=out, untuned=untuned)
    assert errs["tuned"] <= 1.10 * errs["untuned"], errs


def test_an_end_to_end_stage_keeps_each_rounds_better_rate_and_names_the_checkpoint_by_its_recipe(
    tiny_dense, tmp_path
):
    """The recipe's end_to_end stage: two rates in the first round, the second round reuses the kept one;
    the checkpoint records both rounds, is named by the recipe alone (finetune's "-e2e" suffix is for
    rounds run after a recipe), and is checked end to end after the last round."""
    rounds = [{"epochs": 1, "lrs": [1e-4, 1e-3], "nsamples": 8, "batch_size": 4, "eval_every": 1, "seed": 0},
              {"epochs": 1, "lrs": [], "lr_from_previous": True, "nsamples": 8, "batch_size": 4, "eval_every": 1,
               "seed": 1}]
    out = str(tmp_path / "tq-e2e")
    res = quantize(tiny_dense, small_recipe({"end_to_end": {"rounds": rounds}}), "random", out, device="cpu")
    fmt.validate_checkpoint(out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["recipe"] == "test"
    tuned = qc["metadata"]["e2e_tuning"]
    assert len(tuned) == 2 and tuned[1]["lr"] == tuned[0]["lr"] and tuned[1]["calibration"]["seed"] == 1
    assert all(r["kept_kl"] <= min(v for _, v in r["heldout_kl"]) + 1e-9 for r in tuned)  # its best point is kept
    assert qc["metadata"]["end_to_end_check"]["mean_kl"] == round(res.check.mean_kl, 6)  # stored to 6 places


def test_w4a4_subspace_checkpoint_serves_its_residual_stream_readers_with_8_bit_principal_channels(
    tiny_dense, tmp_path
):
    """activations.subspace C: the checkpoint records it for q/k/v and gate/up only, the stored
    function still computes the model, the torch kernel quantizes the last C inputs apart, and the
    vLLM config hands the fused qkv / gate_up layers the same subspace."""
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_twinquant.config import TwinQuantConfig
    from vllm_twinquant.kernels import TorchTwinQuantKernel, TwinQuantLayerConfig

    out = str(tmp_path / "tq-a4-sub")
    quantize(tiny_dense, small_recipe({"rotation": {"kind": "learned", "steps": 2}},
                                      {"activations": {"bits": 4, "clip": 0.8, "subspace": 64}},
                                      {"block_tuning": {"epochs": 1}}), "random", out, device="cpu")
    fmt.validate_checkpoint(out)
    spec = fmt.load_spec(out)
    assert spec.activation_subspace_channels == 64 and spec.activation_subspace_bits == 8
    assert spec.subspace_channels_for("model.layers.0.mlp.up_proj") == 64
    assert spec.subspace_channels_for("model.layers.0.mlp.down_proj") == 0
    info = spec.metadata["transforms"]["activation_subspace"]
    assert info["channels"] == 64 and 0 < info["energy_share"] < 1
    assert logit_errors(tiny_dense, a4=out)["a4"] < 0.6  # the PCA rotation is folded exactly

    q = load_file(os.path.join(out, "model.safetensors"))
    pre = "model.layers.1.self_attn.q_proj"
    c = TwinQuantLayerConfig(in_features=576, slot_sizes=(576,), rank=8, group_size=64, act_dtype=torch.float64,
                             activation_bits=4, activation_clip=0.8, activation_subspace=64)
    x = torch.randn(5, 576, dtype=torch.float64)
    y = TorchTwinQuantKernel(c).apply(checkpoint_layer(q, pre), x, None).double()
    deq = fmt.dequantize_residual(q[f"{pre}.weight_packed"], q[f"{pre}.weight_scale"], 64, torch.float64)
    low = x @ q[f"{pre}.lowrank_down"].double().T @ q[f"{pre}.lowrank_up"].double().T
    want = fmt.quantize_activations(x, 4, 0.8, 64, 8) @ deq.T + low
    assert ((y - want).norm() / want.norm()).item() < 1e-6

    cfg = TwinQuantConfig(spec)
    layer = LinearBase.__new__(LinearBase)
    assert cfg.get_quant_method(layer, "model.layers.0.self_attn.qkv_proj").activation_subspace == 64
    assert cfg.get_quant_method(layer, "model.layers.0.mlp.gate_up_proj").activation_subspace == 64
    assert cfg.get_quant_method(layer, "model.layers.0.mlp.down_proj").activation_subspace == 0
