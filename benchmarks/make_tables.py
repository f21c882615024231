"""Markdown tables from the committed result files.

    python benchmarks/make_tables.py kernels [benchmarks/results/kernels_h100.json]
    python benchmarks/make_tables.py accuracy [benchmarks/results/accuracy_smollm2.jsonl]
    python benchmarks/make_tables.py accuracy-json [JSONL] [OUT_JSON]   # the records of issue 5
    python benchmarks/make_tables.py readme-accuracy [JSONL]            # README's short table
    python benchmarks/make_tables.py readme-speed [benchmarks/results/e2e_h100.json]   # README's speed table
    python benchmarks/make_tables.py w4a8-kernels | w4a8-sweep [JSON] | w4a8-accuracy [JSONL] | e2e-w4a8 [JSON]
    python benchmarks/make_tables.py e2e JSON | e2e-serve JSON   # one machine's end-to-end run (e2e_h100.py collect)
    python benchmarks/make_tables.py t-in-launch [benchmarks/results/t_in_launch_check_h100.json]
"""

import json
import os
import re
import sys


def kernels(path="benchmarks/results/kernels_h100.json", ms=None, ranks=None):
    d = json.load(open(path))
    m = d["meta"]
    setting = (f"launch table {os.path.basename(m['launch_table'])}" if "launch_table" in m
               else f"large-M threshold {m['large_m_threshold']}")
    print(f"{m['device']}, torch {m['torch']}, Triton {m['triton']}; measured copy {m['copy_gbps']:.0f} GB/s, "
          f"BF16 matmul {m['bf16_peak_tflops']:.0f} TFLOP/s; {setting}; max rel. error {m['max_rel_err']:.1e}\n")
    pdl = any("ms_no_pdl" in r for r in d["records"])
    kern = any("kernel" in r for r in d["records"])
    print(
        "| layer (K→N) | M | rank |"
        + (" kernel |" if kern else "")
        + " TwinQuant µs |"
        + (" without PDL µs |" if pdl else "")
        + " fused kernel µs | dequant+cuBLAS µs | unfused µs | BF16 µs | × vs BF16 | × vs unfused | GB/s | % of floor |"
    )
    print(
        "|---|---|---|"
        + ("---|" if kern else "")
        + "---|"
        + ("---|" if pdl else "")
        + "---|---|---|---|---|---|---|---|"
    )
    for r in d["records"]:
        if (ms and r["M"] not in ms) or (ranks is not None and r["rank"] not in ranks):
            continue
        no_pdl = (f" {r['ms_no_pdl']*1e3:.1f} |" if "ms_no_pdl" in r else " – |") if pdl else ""
        k = f" {r.get('kernel', '')} |" if kern else ""
        print(f"| {r['name']} ({r['K']}→{r['N']}) | {r['M']} | {r['rank']} |{k} {r['ms']*1e3:.1f} |{no_pdl} "
              f"{r['ms_fused_kernel']*1e3:.1f} | {r['ms_dequant_cublas']*1e3:.1f} | {r['ms_unfused']*1e3:.1f} | "
              f"{r['ms_bf16']*1e3:.1f} | {r['speedup_vs_bf16']:.2f} | {r['speedup_vs_unfused']:.2f} | "
              f"{r['gbps']:.0f} | {r['pct_of_floor']:.0f} |")


def accuracy(path="benchmarks/results/accuracy_smollm2.jsonl"):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    base = next((r["ppl"] for r in rows if r["recipe"] == "dense"), None)
    print("| checkpoint | method | group | rank | activations | effective bits/weight | perplexity | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (_act_bits(r) < 16, r["effective_bits"] < 16, r["effective_bits"], -r["ppl"])):
        rel = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base and r["recipe"] != "dense" else ""
        print(f"| {r['label']} | {METHODS.get(r['recipe'], r['recipe'])} | {r['group_size'] or ''} | "
              f"{r['rank'] if r['rank'] is not None else ''} | {_act_label(r)} | "
              f"{r['effective_bits']:.2f} | {r['ppl']:.2f} | {rel} |")


# README's short table: one row per method, the checkpoint that shows it, and the preset that makes it
README_ROWS = [
    ("dense (fp32 compute)", "dense (unquantized)", ""),
    ("rtn-g64", "RTN, group 64", "`rtn`"),
    ("gptq-g64", "GPTQ, group 64", "`gptq`"),
    ("svd4-gptq-g64", "SVD split (rank 4) + GPTQ (LQER / SVDQuant-like)", "`svd-split`"),
    ("tq-attn-tune4-r4-g64-c128", "TwinQuant W4A16", "`twinquant-w4a16`"),
    ("twinquant-w4a16-e2e-h100", "TwinQuant W4A16 + end-to-end tuning (one GPU)", "`twinquant-w4a16-e2e`"),
    ("tq-attn-tune4-sub64-clip0.8-r4-g64-c128-w4a4-gpu-e2e2-n4016-lr2e-3-e2e1s1-lr2e-3-e2e1s2-lr2e-3",
     "TwinQuant W4A4, ResQ 8-bit subspace, + e2e tuning", "`twinquant-w4a4-resq`+e2e"),
    ("twinquant-w4a8-int8", "TwinQuant W4A8-INT8", "`twinquant-w4a8-int8`"),
]


def readme_accuracy(path="benchmarks/results/accuracy_smollm2.jsonl"):
    rows = {r["label"]: r for r in (json.loads(line) for line in open(path) if line.strip())}
    base = rows["dense (fp32 compute)"]["ppl"]
    print("| method | recipe | bits / weight | perplexity | vs dense |")
    print("|---|---|---|---|---|")
    for label, method, recipe in README_ROWS:
        r = rows[label]
        rel = f"{100 * (r['ppl'] / base - 1):+.1f}%" if r["recipe"] != "dense" else ""
        print(f"| {method} | {recipe} | {r['effective_bits']:.2f} | {r['ppl']:.2f} | {rel} |")


def w4a8_kernels(path="benchmarks/results/w4a8_h100.json"):
    """bench_w4a8.py's table: µs per layer call, and W4A8-INT8's ratio to FP8 W8A8 and to W4A16; vLLM's CUTLASS
    W4A8 beside FP8 where the run timed it."""
    d = json.load(open(path))
    m = d["meta"]
    cutlass = any("ms_cutlass_w4a8" in r for r in d["records"])
    print(f"{m['device']}, torch {m['torch']}, Triton {m['triton']}; max rel. error {m['max_rel_err']:.1e}\n")
    print("| layer (K→N) | M | rank | BF16 | FP8 W8A8 (GEMM alone) | "
          + ("CUTLASS W4A8 (GEMM alone) | " if cutlass else "")
          + "W4A16 (kernel) | W4A8-FP8 (kernel) | W4A8-INT8 (kernel) | INT8 × vs FP8 (vs its GEMM alone) | "
          "× vs W4A16 |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cutlass else ""))
    for r in d["records"]:
        cell = (f"{r['ms_cutlass_w4a8'] * 1e3:.1f} ({r['ms_cutlass_w4a8_mm'] * 1e3:.1f}) | "
                if "ms_cutlass_w4a8" in r else "– | ") if cutlass else ""
        print(f"| {r['shape']} ({r['K']}→{r['N']}) | {r['M']} | {r['rank']} | {r['ms_bf16'] * 1e3:.1f} | "
              f"{r['ms_fp8'] * 1e3:.1f} ({r['ms_fp8_mm'] * 1e3:.1f}) | {cell}{r['ms_w4a16'] * 1e3:.1f} "
              f"({r['kernel_w4a16']}) | {r['ms_w4a8_fp8'] * 1e3:.1f} ({r['kernel_w4a8_fp8']}) | "
              f"{r['ms_w4a8_int8'] * 1e3:.1f} ({r['kernel_w4a8_int8']}) | {r['w4a8_int8_vs_fp8']:.2f} "
              f"({r['ms_fp8_mm'] / r['ms_w4a8_int8']:.2f}) | "
              f"{r['ms_w4a16'] / r['ms_w4a8_int8']:.2f} |")


def w4a8_sweep(path="benchmarks/results/sweeps/w4a8_fp8_h100.json"):
    """tune.py sweep-w4a8: per layer and M, the W4A16 plan against the fastest W4A8 candidate (µs)."""
    d = json.load(open(path))
    best: dict = {}
    for r in d["records"]:
        key = (r["class"], r["M"], r["kernel"] == "w4a16_plan")
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    classes = list(dict.fromkeys(r["class"] for r in d["records"]))
    print(f"{d['device']}, {d['act_quant']}, rank {d['rank']}: W4A16 plan µs / fastest W4A8 µs (kernel)\n")
    print("| layer | " + " | ".join(str(m) for m in d["ms"]) + " |")
    print("|---|" + "---|" * len(d["ms"]))
    for c in classes:
        cells = []
        for m in d["ms"]:
            w16, w8 = best[(c, m, True)], best.get((c, m, False))
            name = "" if w8 is None else ("cuBLAS" if w8["kernel"] == "fp8_cublas" else
                                          "Gluon" if w8["kernel"] == "w4a8_rs" else
                                          "Gluon, warp-specialized" if w8["kernel"] == "w4a8_ws" else
                                          "Triton, 8-bit copy" if w8["config"].get("dense") else "Triton")
            cells.append(f"{w16['ms'] * 1e3:.0f} / " + (f"{w8['ms'] * 1e3:.0f} ({name})" if w8 else "–"))
        print(f"| {c} | " + " | ".join(cells) + " |")


def w4a8_accuracy(path="benchmarks/results/accuracy_w4a8_smollm2.jsonl"):
    """Each checkpoint of `w4a8_redeclare.sh` under its three declarations, against its W4A16 one."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| checkpoint (recipe) | served as | perplexity | vs its W4A16 declaration |")
    print("|---|---|---|---|")
    for r in rows:
        name, served = r["label"].rsplit(" as ", 1)
        base = next(b["ppl"] for b in rows if b["label"] == f"{name} as W4A16")
        rel = f"{100 * (r['ppl'] / base - 1):+.1f}%" if served != "W4A16" else ""
        print(f"| {name} (`{r['recipe'].split('+')[0]}`) | {served} | {r['ppl']:.2f} | {rel} |")


def acts_gpu(path="benchmarks/results/accuracy_acts_h100.jsonl"):
    """Checkpoints quantized on the GPU, each scored through the plugin's CUDA kernels (bfloat16) and through the
    format's torch path in float32 (the CPU table's numerics) on the same GPU: the kernels' cost in perplexity."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| checkpoint | CUDA kernels, bfloat16 | torch path, float32 | kernels vs torch path |")
    print("|---|---|---|---|")
    names = list(dict.fromkeys(r["label"].split(" (", 1)[0] for r in rows))
    for name in names:
        kern = next((r["ppl"] for r in rows if r["label"].startswith(f"{name} (bfloat16, triton")), None)
        ref = next((r["ppl"] for r in rows if r["label"].startswith(f"{name} (float32, torch")), None)
        cell = [f"{v:.2f}" if v is not None else "not scored" for v in (kern, ref)]
        rel = f"{100 * (kern / ref - 1):+.2f}%" if kern is not None and ref is not None else ""
        print(f"| {name} | {cell[0]} | {cell[1]} | {rel} |")


SPEED_NAMES = {"bf16": "BF16", "fp8": "FP8 W8A8 (vLLM)", "gptq": "GPTQ W4A16 g128 (Machete)",
               "tq_r0": "TwinQuant W4A16 g128, rank 0", "tq_r64": "TwinQuant W4A16 g128, rank 64",
               "tq_r64_a8": "TwinQuant W4A8-INT8 g128, rank 64 (the rank-64 checkpoint declared W4A8)",
               "tq_r64_f8": "TwinQuant W4A8-FP8 g128, rank 64 (the rank-64 checkpoint declared W4A8-FP8)",
               "tq_r64_h4": "TwinQuant W4A16 g128, rank 64, 4-bit lm_head",
               "tq_r64_h4_f8": "TwinQuant W4A8-FP8 g128, rank 64, 4-bit lm_head (declared W4A8-FP8 by its config)",
               "tq_r64_h4_a8": "TwinQuant W4A8-INT8 g128, rank 64, 4-bit lm_head (declared W4A8-INT8 by its config)",
               "tq_r64_tin": "TwinQuant W4A16 g128, rank 64, t made in the one-token kernel's launch",
               "tq_r64_h4_tin": "TwinQuant W4A16 g128, rank 64, 4-bit lm_head, t made in the one-token kernel's launch",
               "w4a8_ct": "W4A8-FP8 g128 (vLLM, compressed-tensors: CUTLASS W4A8)",
               "fp8_kv8": "FP8 W8A8 (vLLM), FP8 KV cache",
               "tq_r64_f8_kv8": "TwinQuant W4A8-FP8 g128, rank 64, FP8 KV cache"}


def speed_table(path: str, configs: list[str], vs_fp8: bool = False) -> None:
    """End-to-end rows of one run (one machine): batch-1 latency and throughput against its own BF16 (and FP8)."""
    d = json.load(open(path))
    recs = {r["config"]: r for r in d["records"]}
    base, fp8 = recs["bf16"], recs.get("fp8")
    extra = " × FP8 W8A8 |" if vs_fp8 else ""
    print("| config | batch 1, ms / token | × BF16 | 512 prompts, output tok/s | × BF16 |" + extra)
    print("|---|---|---|---|---|" + ("---|" if vs_fp8 else ""))
    for cfg in configs:
        r = recs[cfg]
        print(f"| {SPEED_NAMES[cfg]} | {r['bs1_ms_per_token']:.2f} | "
              f"{base['bs1_ms_per_token'] / r['bs1_ms_per_token']:.2f} | {r['out_tok_s']:,.0f} | "
              f"{r['out_tok_s'] / base['out_tok_s']:.2f} |" + (f" {r['out_tok_s'] / fp8['out_tok_s']:.2f} |"
                                                              if vs_fp8 else ""))


def readme_speed(path="benchmarks/results/e2e_h100.json"):
    speed_table(path, ["bf16", "fp8", "gptq", "tq_r0", "tq_r64"])


def e2e_w4a8(path="benchmarks/results/e2e_w4a8_h100.json"):
    """The end-to-end W4A8 comparison of one machine: each config against BF16 and FP8 of the same run."""
    d = json.load(open(path))
    print(f"{d['device']}, vLLM {d['vllm']}; {d['workload']}\n")
    order = list(SPEED_NAMES)
    speed_table(path, sorted({r["config"] for r in d["records"]}, key=order.index), vs_fp8=True)


def e2e_serve(path):
    """`vllm bench serve` against one OpenAI-API server per config of one machine: median TPOT and TTFT and
    output tok/s at each concurrency, TPOT also against BF16's at the same concurrency (FP8 W8A8's where the run
    has no BF16 server), and p99 TPOT."""
    d = json.load(open(path))
    order = list(SPEED_NAMES)
    runs = {s["config"]: {r["concurrency"]: r for r in s.get("runs", [])} for s in d["serve"]}
    base_cfg = "bf16" if runs.get("bf16") else "fp8"
    base = runs.get(base_cfg, {})
    print(f"| config | concurrency | median TPOT, ms | × {SPEED_NAMES[base_cfg]} | p99 TPOT, ms | median TTFT, ms | "
          "output tok/s |")
    print("|---|---|---|---|---|---|---|")
    for cfg in sorted(runs, key=order.index):
        for c, r in sorted(runs[cfg].items()):
            vs = f"{base[c]['median_tpot_ms'] / r['median_tpot_ms']:.2f}" if c in base else "–"
            p99 = f"{r['p99_tpot_ms']:.2f}" if "p99_tpot_ms" in r else "–"
            print(f"| {SPEED_NAMES[cfg]} | {c} | {r['median_tpot_ms']:.2f} | {vs} | {p99} | "
                  f"{r['median_ttft_ms']:.1f} | {r['output_throughput']:,.0f} |")


def t_in_launch(path="benchmarks/results/t_in_launch_check_h100.json"):
    """t_in_launch_check.py: per layer and M, the plan's way of making t (its own launch, with PDL or after it)
    against t made in the residual launch (K-slices x rows of D per piece), rank 0 beside them (µs)."""
    d = json.load(open(path))
    m = d["meta"]
    variants = [f"in_launch_{s}x{b}" for s, b in m["variants"]]
    print(f"{m['device']}, torch {m['torch']}, Triton {m['triton']}; rank 64, µs per call (CUDA graphs, weights "
          f"beyond L2); every variant matched float32 (rel. error <= "
          f"{max(r['rel_err'] for r in d['records']):.1e}) and left the scratch zero after 100 graph replays\n")
    print("| layer (K→N) | M | kernel | rank 0 | plan (t by `lowrank_down`) | "
          + " | ".join(f"in launch {v.removeprefix('in_launch_')}" for v in variants) + " |")
    print("|---|---|---|---|---|" + "---|" * len(variants))
    cases = {}
    for r in d["records"]:
        cases.setdefault((r["layer"], r["k"], r["n"], r["m"]), []).append(r)
    for (layer, k, n, mm), rs in cases.items():
        by = {r["t"]: r for r in rs}
        plan = next(r for r in rs if not r["t"].startswith("in_launch"))
        cells = " | ".join(f"{by[v]['us']:.1f}" for v in variants)
        print(f"| {layer} ({k}→{n}) | {mm} | {plan['kernel']} | {plan['rank0_us']:.1f} | {plan['us']:.1f} "
              f"({'PDL' if plan['t'] == 'pdl' else 'after it'}) | {cells} |")


def _act_bits(r) -> int:
    """W4A4 checkpoints carry it in their recipe name (quantizer: a4-hadamard-...), W4A8 in their preset's."""
    if r["recipe"].startswith("twinquant-w4a8"):
        return 8
    return 4 if r["recipe"].startswith("a4-") else 16


def _subspace(r) -> int:
    """Channels of ResQ's 8-bit activation subspace (recipe a4-hadamard-subC-...; 0: none)."""
    m = re.match(r"a4-hadamard-sub(\d+)-", r["recipe"])
    return int(m.group(1)) if m else 0


def _act_label(r) -> str:
    if _act_bits(r) == 8:
        return "8 (INT8)" if r["recipe"].endswith("-int8") else "8 (FP8 e4m3)"
    c = _subspace(r)
    return f"4 (8 on {c} of 576 channels in q/k/v, gate/up)" if c else str(_act_bits(r))


METHODS = {  # recipe (quantization_config.recipe) -> method column
    "dense": "BF16 (dense weights)",
    "rtn": "RTN",
    "gptq": "GPTQ",
    "svd-gptq": "SVD split + GPTQ (LQER/SVDQuant-like)",
    "learned-split-gptq": "TwinQuant split only (no transforms)",
    "rot-random-gptq": "random rotation + GPTQ (QuaRot-like)",
    "rot-learned-smooth-gptq": "TwinQuant (rank 0: transforms only)",
    "rot-learned-smooth-learned-split-gptq": "TwinQuant",
    "rot-learned-smooth-svd-gptq": "TwinQuant transforms + SVD split (no refit)",
    "rot-learned-learned-split-gptq": "TwinQuant without smoothing",
    "smooth-learned-split-gptq": "TwinQuant without rotation",
    "rot-learned-smooth-svd-gptq-attn": "TwinQuant transforms + SVD split, attention-aware v_proj",
    "rot-learned-smooth-svd-gptq-attn-tuned": "TwinQuant (transforms, attention-aware GPTQ, block tuning)",
    "a4-hadamard-rot-learned-smooth-learned-split-gptq": "TwinQuant W4A4 (+ online Hadamard)",
    "a4-hadamard-rot-learned-svd-gptq-attn-tuned": "TwinQuant W4A4 (rotation, attention-aware, A4-aware block tuning)",
    "rot-learned-smooth-svd-gptq-attn-tuned-token":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning, per-token loss)",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + end-to-end tuning",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + two rounds of end-to-end tuning",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e-e2e-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + three rounds of end-to-end tuning",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e-e2e-e2e-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + four rounds of end-to-end tuning (the "
        "fourth with `--code-lr`)",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e-e2e-e2e-e2e-codes":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + four rounds of end-to-end tuning (the "
        "fourth with `--code-lr`)",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e-e2e-e2e-e2e-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + five rounds of end-to-end tuning (the "
        "fourth with `--code-lr`)",
    "rot-learned-smooth-svd-gptq-attn-tuned-e2e-e2e-e2e-e2e-codes-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning) + five rounds of end-to-end tuning (the "
        "fourth with `--code-lr`)",
    "a4-hadamard-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e-e2e":
        "TwinQuant W4A4 (as above) + two rounds of end-to-end tuning",
    "a4-hadamard-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e-e2e-e2e":
        "TwinQuant W4A4 (as above) + three rounds of end-to-end tuning",
    "a4-hadamard-sub64-clip0.8-rot-learned-svd-gptq-attn-tuned":
        "TwinQuant W4A4 + ResQ 8-bit subspace (PCA rotation, attention-aware, block tuning with clip 0.8)",
    "a4-hadamard-sub64-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e":
        "TwinQuant W4A4 + ResQ 8-bit subspace (as above) + end-to-end tuning",
    "a4-hadamard-sub64-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e-e2e":
        "TwinQuant W4A4 + ResQ 8-bit subspace (as above) + two rounds of end-to-end tuning",
    "a4-hadamard-sub64-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e-e2e-e2e":
        "TwinQuant W4A4 + ResQ 8-bit subspace (as above) + three rounds of end-to-end tuning",
    "a4-hadamard-sub64-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e-e2e-e2e-e2e":
        "TwinQuant W4A4 + ResQ 8-bit subspace (as above) + four rounds of end-to-end tuning",
    "rot-learned-smooth-svd-gptq-attn-tuned-lrint8":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning), int8 factors",
    "a4-hadamard-rot-learned-svd-gptq-attn-tuned+clip0.8-at-serve":
        "TwinQuant W4A4 (as above) served with activation clip 0.8",
    "a4-hadamard-clip0.8-rot-learned-svd-gptq-attn-tuned":
        "TwinQuant W4A4 (rotation, attention-aware, block tuning with activation clip 0.8)",
    "a4-hadamard-clip0.8-rot-learned-svd-gptq-attn-tuned-e2e": "TwinQuant W4A4 (as above) + end-to-end tuning",
    "rot-learned-smooth-svd-gptq-attn-tuned-lrint8-e2e":
        "TwinQuant (transforms, attention-aware GPTQ, block tuning), int8 factors, + end-to-end tuning",
    "a4-hadamard-rtn": "RTN W4A4 (online Hadamard only)",
    "a4-hadamard-gptq": "GPTQ W4A4 (online Hadamard only)",
    "twinquant-w4a8": "TwinQuant W4A8-FP8 (transforms, attention-aware GPTQ, block tuning with FP8 activations)",
    "twinquant-fast": "TwinQuant fast preset (transforms, SVD split, GPTQ)",
    "twinquant-w4a16-e2e": "TwinQuant W4A16 preset + its three end-to-end rounds, from the recipe file alone (one GPU)",
    "twinquant-w4a8-int8": "TwinQuant W4A8-INT8 (transforms, attention-aware GPTQ, block tuning with INT8 activations)",
}


def accuracy_json(path="benchmarks/results/accuracy_smollm2.jsonl", out="benchmarks/results/accuracy_smollm2.json"):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    base = next(r["ppl"] for r in rows if r["recipe"] == "dense")
    recs = []
    for r in rows:
        dense = r["recipe"] == "dense"
        recs.append({
            "method": METHODS.get(r["recipe"], r["recipe"]), "label": r["label"], "recipe": r["recipe"],
            "weight_bits": 16 if dense else 4, "activation_bits": _act_bits(r),
            "activation_subspace_channels": _subspace(r), "activation_subspace_bits": 8 if _subspace(r) else None,
            "rank": r["rank"] or 0,
            "group_size": r["group_size"], "effective_bits": round(r["effective_bits"], 4),
            "ppl": r["ppl"], "ppl_bf16": base, "tokens": r["tokens"], "compute_dtype": r["dtype"],
        })
    with open(out, "w") as f:
        json.dump(recs, f, indent=1)
    print(f"wrote {out}: {len(recs)} records")


if __name__ == "__main__":
    what = sys.argv[1]
    args = sys.argv[2:]
    if what == "kernels":
        kernels(*args)
    elif what == "kernels-short":
        kernels(*args, ms=[1, 16, 64, 256, 4096], ranks=[0, 64])
    elif what == "accuracy-json":
        accuracy_json(*args)
    elif what == "readme-speed":
        readme_speed(*args)
    elif what == "readme-accuracy":
        readme_accuracy(*args)
    elif what == "w4a8-accuracy":
        w4a8_accuracy(*args)
    elif what == "w4a8-kernels":
        w4a8_kernels(*args)
    elif what == "w4a8-sweep":
        w4a8_sweep(*args)
    elif what in ("e2e", "e2e-w4a8"):
        e2e_w4a8(*args)
    elif what == "e2e-serve":
        e2e_serve(*args)
    elif what == "acts-gpu":
        acts_gpu(*args)
    elif what == "t-in-launch":
        t_in_launch(*args)
    else:
        accuracy(*args)
