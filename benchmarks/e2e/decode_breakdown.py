"""Where one batch-1 decode step goes, inside vLLM with its defaults (torch.compile + CUDA graphs): the
GPU kernels of a few hundred steps under torch.profiler, put in buckets by name and, for the TwinQuant
linears, by their place in the block (q/k/v, o, gate/up, down: a Llama block runs them in that order),
plus the time the GPU sat idle between kernels inside a step.

    python benchmarks/e2e/decode_breakdown.py --model CKPT [--quantization twinquant|fp8] --out $OUT
        -> $OUT/decode_breakdown_<label>.json: µs per step for each bucket (its kernels' durations, and the
           time it ran alone), the step's wall time, the idle time (medians over the steps); ms per token of
           the same generation with and without the profiler
        -> $OUT/decode_kernels_<label>.json.gz: the profiled kernels themselves (name, start µs, µs), so that
           `--from-kernels FILE` can redo the arithmetic anywhere (another step marker, other buckets)

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the profiler sees its kernels.
A step is the interval between two launches of the first kernel of the step (the embedding lookup); the
buckets are `BUCKETS`, first match wins. `breakdown()` is the arithmetic (tests/test_results.py checks it
on made-up kernel lists).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import sys
import time

# (bucket, kernel-name pattern), first match wins; TwinQuant's residual kernels get their layer kind after
RESIDUAL = re.compile(r"_tq_|_w4a8_kernel|_quantize_rows_kernel|_codes_to_8bit_kernel|_dequant_kernel")
BUCKETS = [
    ("lowrank_down", re.compile(r"_lowrank_down_kernel")),
    ("twinquant_linear", RESIDUAL),
    ("attention", re.compile(r"flash|fmha|attention|attn|paged", re.I)),
    ("norm", re.compile(r"rms_?norm|layer_?norm", re.I)),
    ("activation", re.compile(r"silu|gelu|act_and_mul", re.I)),
    ("rotary", re.compile(r"rotary|rope", re.I)),
    ("dense_gemm (lm_head, or every linear of a dense model)",
     re.compile(r"gemm|gemv|nvjet|cutlass|xmma|sm90_|sm80_|ampere|cublas|scaled_mm", re.I)),
    ("sampling", re.compile(r"argmax|topk|top_k|softmax|sort|sampl|multinomial|gumbel", re.I)),
    ("copy / cast / embedding", re.compile(r"copy|memcpy|memset|cast|convert|embedding|index|gather", re.I)),
]
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def bucket_of(name: str) -> str:
    return next((b for b, pat in BUCKETS if pat.search(name)), "other")


def _union(intervals) -> float:
    """Length of the union of (start, end) intervals (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def breakdown(kernels: list[tuple[str, float, float]], step_marker: str, layers: int | None = None) -> dict:
    """kernels: (name, start µs, duration µs) on the decode stream, in time order. Steps start at each
    kernel whose name contains step_marker; the last partial step is dropped. Returns the median over steps
    (a step now and then waits on the host; `step_us_mean` shows how much) of:
      step_us, busy_us (the union of the kernels' intervals), idle_us (step - busy);
      buckets: {bucket: the sum of its kernels' durations}; kernels launched early (programmatic dependent
        launch: a residual kernel streams its weights while the low-rank down projection runs) overlap, so
        these sums can exceed busy_us;
      exclusive: {bucket: busy_us minus the union without that bucket's kernels}, the time in which the GPU
        ran nothing else, what the step would lose if the bucket took no time and nothing else moved;
      twinquant_by_kind: {layer kind: its residual kernels' durations}, the kinds taken in block order
        (a W4A8 layer's quantize_rows goes to the layer whose kernel follows it); with `layers` (the model's
        decoder blocks) a TwinQuant layer after the last block's is the quantized lm_head;
      lowrank_down_by_kind: {layer kind: its down projections' durations}, and after_down_by_kind: {layer
        kind: how long its residual kernels ran on after their down projection ended}: where the second is
        short and the first long, the down projection, not the weights, sets the layer's time."""
    starts = [i for i, (n, _, _) in enumerate(kernels) if step_marker in n]
    if len(starts) < 2:
        raise ValueError(f"fewer than two kernels named like {step_marker!r}: no whole step to measure")
    steps = []
    for a, b in zip(starts, starts[1:]):
        ks = [(n, s, s + d, bucket_of(n)) for n, s, d in kernels[a:b]]
        busy = _union((s, e) for _, s, e, _ in ks)
        buckets: dict[str, float] = {}
        kinds: dict[str, float] = {}
        down_kinds: dict[str, float] = {}
        after: dict[str, float] = {}
        i, t_end = 0, None  # t_end: when the latest down projection ended
        for n, s, e, bk in ks:
            buckets[bk] = buckets.get(bk, 0.0) + (e - s)
            kind = KINDS[i % len(KINDS)] if layers is None or i < layers * len(KINDS) else "lm_head"
            if bk == "lowrank_down":
                down_kinds[kind] = down_kinds.get(kind, 0.0) + (e - s)
                t_end = e
            if bk == "twinquant_linear":
                kinds[kind] = kinds.get(kind, 0.0) + (e - s)
                if "quantize_rows" not in n and "codes_to_8bit" not in n:
                    after[kind] = after.get(kind, 0.0) + e - max(s, t_end if t_end is not None else s)
                    i += 1  # the layer's own kernel ends it
                    t_end = None
        exclusive = {bk: busy - _union((s, e) for _, s, e, other in ks if other != bk) for bk in buckets}
        steps.append({"step_us": kernels[b][1] - ks[0][1], "busy_us": busy, "buckets": buckets,
                      "exclusive": exclusive, "kinds": kinds, "down_kinds": down_kinds, "after": after})

    def med(key):
        return round(statistics.median(s[key] for s in steps), 2)

    def med_of(sub):
        names = sorted({k for s in steps for k in s[sub]})
        return {k: round(statistics.median(s[sub].get(k, 0.0) for s in steps), 2) for k in names}

    return {"steps": len(steps), "step_us": med("step_us"),
            "step_us_mean": round(statistics.fmean(s["step_us"] for s in steps), 2), "busy_us": med("busy_us"),
            "idle_us": round(statistics.median(s["step_us"] - s["busy_us"] for s in steps), 2),
            "buckets": med_of("buckets"), "exclusive": med_of("exclusive"), "twinquant_by_kind": med_of("kinds"),
            "lowrank_down_by_kind": med_of("down_kinds"), "after_down_by_kind": med_of("after")}


def profile_decode(model: str, quantization: str | None, steps: int, dtype: str) -> tuple[list, float, float]:
    """(kernels, ms/token under the profiler, ms/token of the same generation just before, unprofiled)"""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kw = {"quantization": quantization} if quantization else {}
    llm = LLM(model=model, dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.5, skip_tokenizer_init=True,
              seed=0, **kw)
    prompt = {"prompt_token_ids": torch.randint(3, 32000, (32,), generator=torch.Generator().manual_seed(0)).tolist()}
    sp = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([prompt], sp, use_tqdm=False)  # warm-up (compile, graphs)
    t0 = time.time()
    out = llm.generate([prompt], sp, use_tqdm=False)
    plain = (time.time() - t0) * 1000 / len(out[0].outputs[0].token_ids)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        out = llm.generate([prompt], sp, use_tqdm=False)
        ms_per_token = (time.time() - t0) * 1000 / len(out[0].outputs[0].token_ids)
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    evs.sort(key=lambda e: e.time_range.start)
    return [(e.name, float(e.time_range.start), float(e.time_range.elapsed_us())) for e in evs], ms_per_token, plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--label", default=None)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--step-marker", default="embedding", help="a kernel that runs once at the start of a step")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the model's config.json)")
    ap.add_argument("--from-kernels", help="a decode_kernels_<label>.json.gz of an earlier run: no GPU, no engine")
    a = ap.parse_args()
    label = a.label or (a.quantization or "bf16")
    os.makedirs(a.out, exist_ok=True)
    if a.from_kernels:
        with gzip.open(a.from_kernels, "rt") as f:
            raw = json.load(f)
        kernels, ms = [tuple(k) for k in raw["kernels"]], raw["bs1_ms_per_token_profiled"]
        plain, command = raw.get("bs1_ms_per_token"), raw.get("command")
    else:
        kernels, ms, plain = profile_decode(a.model, a.quantization, a.steps, a.dtype)
        command = " ".join(sys.argv)
        with gzip.open(os.path.join(a.out, f"decode_kernels_{label}.json.gz"), "wt") as f:
            json.dump({"command": command, "bs1_ms_per_token_profiled": ms, "bs1_ms_per_token": plain,
                       "kernels": kernels}, f)
    names = sorted({n for n, _, _ in kernels if a.step_marker in n})
    print(f"step marker {a.step_marker!r} matches: {names[:5]}", file=sys.stderr)
    layers = a.layers
    if layers is None and os.path.isfile(os.path.join(a.model, "config.json")):
        with open(os.path.join(a.model, "config.json")) as f:
            layers = json.load(f).get("num_hidden_layers")
    rec = breakdown(kernels, a.step_marker, layers)
    rec.update(model=a.model, quantization=a.quantization, bs1_ms_per_token_profiled=round(ms, 3),
               bs1_ms_per_token=round(plain, 3) if plain is not None else None, command=command)
    if a.from_kernels:
        rec["arithmetic"] = " ".join(sys.argv)
    with open(os.path.join(a.out, f"decode_breakdown_{label}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
