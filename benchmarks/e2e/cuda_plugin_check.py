"""The plugin's CUDA path inside vLLM on a GPU: a Llama with Llama-3-8B layer shapes (2 blocks,
random bf16 weights made on the GPU), quantized on the GPU with `twinquant-quantize`, served by
vLLM with its defaults (torch.compile + CUDA graphs, bf16), prompt logprobs compared with a
float32 transformers model holding the checkpoint's effective weights (U @ D + deq(R)).

    python benchmarks/e2e/cuda_plugin_check.py --workdir /tmp/tqcheck --out $OUT [--lowrank-dtype int8]
        [--head]                        # lm_head quantized too (residual.modules_to_not_convert: [])
        [--activations int8|fp8|int4]   # the checkpoint declared W4A8 (W4A4: 4-bit codes clipped as the
                                        # W4A4 preset's, the online Hadamard transform before o_proj/down_proj);
                                        # the reference quantizes x per token the same way
        [--subspace S]                  # with --activations int4: ResQ's 8-bit subspace on the last S
                                        # inputs of q/k/v and gate/up
Exits non-zero on a mismatch. Needs vLLM (CUDA build) and this package installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: apply_model can see the layers


def make_model(path: str, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)


def effective_model(dense: str, tq: str):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vllm_twinquant import format as fmt

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).cuda().eval()
    spec = fmt.load_spec(tq)
    q = {}
    for fn in sorted(os.listdir(tq)):
        if fn.endswith(".safetensors"):
            q.update(load_file(os.path.join(tq, fn), device="cuda"))
    _, unexpected = model.load_state_dict(fmt.effective_weights(q, spec.group_size, spec.online_hadamard), strict=False)
    assert not unexpected, unexpected
    if spec.activation_bits < 16:  # the residual product on the per-token codes of x, the low-rank term on x
        for key in [k for k in q if k.endswith("." + fmt.WEIGHT_PACKED)]:
            layer = key[: -len(fmt.WEIGHT_PACKED) - 1]
            parent, _, name = layer.rpartition(".")  # lm_head: the model itself is the parent
            res = fmt.dequantize_residual(q[key], q[f"{layer}.{fmt.WEIGHT_SCALE}"], spec.group_size)
            if f"{layer}.{fmt.LOWRANK_UP}" in q:
                t = {n: q.get(f"{layer}.{n}") for n in fmt.LOWRANK_TENSORS}
                lowrank = (fmt.dequantize_lowrank(t[fmt.LOWRANK_UP], t[fmt.LOWRANK_UP_SCALE])
                           @ fmt.dequantize_lowrank(t[fmt.LOWRANK_DOWN], t[fmt.LOWRANK_DOWN_SCALE]))
            else:
                lowrank = torch.zeros_like(res, dtype=torch.float32)
            linear = model.get_submodule(parent).get_submodule(name)
            hadamard = fmt.hadamard_block_size(res.shape[1]) if spec.has_online_hadamard(layer) else 0
            model.get_submodule(parent).register_module(name, ActivationCodesReference(
                lowrank, res, linear.bias, spec.activation_bits, spec.activation_type, spec.activation_clip_ratio,
                hadamard, spec.subspace_channels_for(layer), spec.activation_subspace_bits))
    return model


class ActivationCodesReference(torch.nn.Module):
    """A layer of a checkpoint whose residual product reads per-token activation codes (W4A8, W4A4), in
    float32: x rotated by the online Hadamard transform where the checkpoint names the layer, then
    x @ (U D)^T + (codes * s) @ deq(R)^T + bias, codes and s the format's (format.quantize_activations; with a
    ResQ subspace, the last `subspace` columns at `subspace_bits` with their own scale)."""

    def __init__(self, lowrank, residual, bias, bits: int, kind: str, clip: float, hadamard: int, subspace: int = 0,
                 subspace_bits: int = 8):
        super().__init__()
        self.register_buffer("lowrank", lowrank.float().contiguous())
        self.register_buffer("residual", residual.float().contiguous())
        self.bias = bias
        self.bits, self.kind, self.clip, self.hadamard = bits, kind, clip, hadamard
        self.subspace, self.subspace_bits = subspace, subspace_bits

    def forward(self, x):
        from vllm_twinquant import format as fmt

        if self.hadamard:
            x = fmt.apply_online_hadamard(x, self.hadamard)
        xq = fmt.quantize_activations(x, self.bits, self.clip, self.subspace, self.subspace_bits, self.kind)
        y = x @ self.lowrank.to(x.dtype).T + xq @ self.residual.to(x.dtype).T
        return y if self.bias is None else y + self.bias


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/tqcheck")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lowrank-dtype", default="bfloat16", choices=("bfloat16", "int8"))
    ap.add_argument("--activations", default="bf16", choices=("bf16", "int8", "fp8", "int4"),
                    help="the residual product's input: bf16 (W4A16), or the checkpoint declared W4A8 / W4A4")
    ap.add_argument("--head", action="store_true", help="quantize lm_head too")
    ap.add_argument("--subspace", type=int, default=0,
                    help="with --activations int4: ResQ's 8-bit subspace of this many last inputs of q/k/v, gate/up")
    args = ap.parse_args()
    if args.subspace and args.activations != "int4":
        ap.error("--subspace takes --activations int4")
    os.makedirs(args.workdir, exist_ok=True)
    dense, tq = os.path.join(args.workdir, "dense"), os.path.join(args.workdir, "tq")
    rec = {"layers": args.layers, "rank": args.rank, "group_size": 128, "lowrank_dtype": args.lowrank_dtype,
           "lm_head_quantized": args.head}
    t0 = time.time()
    make_model(dense, args.layers, 0)
    rec["make_model_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "offline_quantizer.cli", "--model", dense, "--output", tq,
                    "--calib", "random", "--recipe", "svd-split", "--nsamples", "32", "--seqlen", "256",
                    "--group-size", "128", "--max-kl", "inf", "--rank", str(args.rank),
                    "--set", f"split.lowrank_dtype={args.lowrank_dtype}", "--device", "cuda"]
                   + (["--set", "residual.modules_to_not_convert=[]"] if args.head else []), check=True)
    rec["quantize_s"] = round(time.time() - t0, 1)
    rec["activations"] = args.activations
    rec["activation_subspace_channels"] = args.subspace
    if args.activations != "bf16":  # W4A8 / W4A4: the same checkpoint declared by its config alone
        from vllm_twinquant.format import declare_activations

        if args.activations == "int4":  # codes for a kernel check (its weights were not quantized rotated)
            from offline_quantizer.recipe import Activations, load_recipe

            clip = load_recipe("twinquant-w4a4-resq").get(Activations).clip  # the W4A4 preset's codes
            sub = dict(activation_subspace_channels=args.subspace, activation_subspace_bits=8,
                       activation_subspace_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
            declare_activations(tq, 4, "int", activation_clip_ratio=clip, online_hadamard=["o_proj", "down_proj"],
                                **(sub if args.subspace else {}))
        else:
            declare_activations(tq, 8, "int" if args.activations == "int8" else "float")

    from importlib.metadata import entry_points

    from vllm import LLM, SamplingParams

    from csrc_triton.kernels import w4a8

    if args.activations != "bf16" and w4a8.check_here(args.activations):  # what this check is for (the engine
        rec["checked_here_first"] = args.activations  # runs in this process)

    eps = [e.name for e in entry_points(group="vllm.general_plugins")]
    rec["plugin_entry_points"] = eps
    if "twinquant" not in eps:  # not pip-installed: register by hand so the check still runs
        import vllm_twinquant

        vllm_twinquant.register()

    t0 = time.time()
    llm = LLM(model=tq, quantization="twinquant", dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5,
              tokenizer=None, skip_tokenizer_init=True)
    rec["engine_start_s"] = round(time.time() - t0, 1)
    try:
        rec["kernels"] = llm.apply_model(
            lambda m: sorted({type(x.twinquant_kernel).__name__ for x in m.modules() if hasattr(x, "twinquant_kernel")})
        )[0]
    except Exception as e:  # noqa: BLE001  (older/newer LLM API)
        rec["kernels"] = f"unknown ({type(e).__name__})"
    gen = torch.Generator().manual_seed(1)
    # three batches: 372 prompt tokens in one step (dequant_cublas: transient weights with the
    # low-rank part folded in + cuBLAS), 230 (wgmma_rs where the plan allows it), 14 (mma_decode);
    # decode steps of 4, 2 and 1 tokens in between (mma_decode and gemv)
    rounds = [(1, 7, 64, 300), (100, 130), (9, 5)]
    sp = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=0, logprobs=0, detokenize=False)
    prompts, outs = [], []
    for lens in rounds:
        batch = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in lens]
        prompts += batch
        outs += llm.generate([{"prompt_token_ids": p} for p in batch], sp)
    import csrc_triton as ct
    act_quant = {"bf16": "none", "int8": "int8", "fp8": "fp8", "int4": "int4"}[args.activations]
    rec["plan_gate_up"] = ct.summary("gate_up_proj", ct.LayerShape(28672, 4096, 128, args.rank, (14336,),
                                                                   act_quant=act_quant),
                                     ct.Device.of(torch.device("cuda")))
    ref_model = effective_model(dense, tq)
    # W4A8: the same reference with its activations rounded to bf16 (as served) shows how far the per-token
    # rounding alone moves the logprobs when its input moves by bf16's rounding
    ref_bf16 = effective_model(dense, tq).to(torch.bfloat16) if args.activations != "bf16" else None
    worst, agree, agree16, total = 0.0, 0, 0, 0
    for p, o in zip(prompts, outs):
        toks = list(o.outputs[0].token_ids)
        seq = p + toks
        with torch.no_grad():
            lp = torch.log_softmax(ref_model(torch.tensor([seq], device="cuda")).logits[0].double(), -1)
            lp16 = (torch.log_softmax(ref_bf16(torch.tensor([seq], device="cuda")).logits[0].double(), -1)
                    if ref_bf16 is not None else None)
        served = [
            (i, d[t].logprob)
            for i, (t, d) in enumerate(zip(seq[1:], (o.prompt_logprobs or [None])[1:] + o.outputs[0].logprobs), start=1)
            if d is not None
        ]
        for i, s in served:
            d = abs(lp[i - 1, seq[i]].item() - s)
            worst = max(worst, d)
            key = "max_abs_logprob_diff_prompt" if i < len(p) else "max_abs_logprob_diff_generated"
            rec[key] = max(rec.get(key, 0.0), d)  # prompt: one pass over all prompt tokens; generated: decode steps
            if lp16 is not None:
                rec["max_abs_logprob_diff_reference_bf16_vs_fp32"] = max(
                    rec.get("max_abs_logprob_diff_reference_bf16_vs_fp32", 0.0),
                    abs(lp[i - 1, seq[i]].item() - lp16[i - 1, seq[i]].item()))
        for j, t in enumerate(toks):
            total += 1
            agree += int(lp[len(p) - 1 + j].argmax().item() == t)
            if lp16 is not None:
                agree16 += int(lp[len(p) - 1 + j].argmax().item() == lp16[len(p) - 1 + j].argmax().item())
    rec.update(max_abs_logprob_diff=worst, greedy_agreement=agree / total, tokens_checked=total)
    if ref_bf16 is not None:
        rec["greedy_agreement_reference_bf16_vs_fp32"] = agree16 / total
    # decode speed of this 2-block model at batch 1 (orientation only)
    t0 = time.time()
    o = llm.generate(
        [{"prompt_token_ids": prompts[1]}],
        SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True, detokenize=False),
    )
    rec["bs1_ms_per_token_2_blocks"] = round((time.time() - t0) * 1000 / len(o[0].outputs[0].token_ids), 3)
    # bf16 activations: fixed bounds. Quantized activations: a code flips where bf16 moves its input across a
    # rounding boundary, so the bounds are the reference's own bf16-vs-fp32 spread on the same tokens (x1.5 for
    # kernels that round at other points) and agreement within 0.1 of the bf16 reference's
    max_diff, min_agree = 0.15, 0.9
    if ref_bf16 is not None:
        max_diff = max(max_diff, 1.5 * rec["max_abs_logprob_diff_reference_bf16_vs_fp32"])
        min_agree = min(min_agree, rec["greedy_agreement_reference_bf16_vs_fp32"] - 0.1)
    rec.update(pass_max_abs_logprob_diff=max_diff, pass_min_greedy_agreement=min_agree)
    ok = worst < max_diff and rec["greedy_agreement"] >= min_agree and rec["kernels"] in (
        ["TritonTwinQuantKernel"],) + ((rec["kernels"],) if str(rec["kernels"]).startswith("unknown") else ())
    rec["passed"] = ok
    print(json.dumps(rec, indent=1))
    os.makedirs(args.out, exist_ok=True)
    suffix = ("" if args.lowrank_dtype == "bfloat16" else f"_{args.lowrank_dtype}") + (
        "" if args.activations == "bf16" else f"_w4a{4 if args.activations == 'int4' else 8}_{args.activations}") + (
        f"_sub{args.subspace}" if args.subspace else "") + ("_head4" if args.head else "")
    with open(os.path.join(args.out, f"cuda_plugin_check{suffix}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    if not ok:
        raise SystemExit(f"MISMATCH: {rec}")
    print("CUDA plugin check passed")


if __name__ == "__main__":
    main()
