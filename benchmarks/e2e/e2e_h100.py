"""End-to-end serving benchmark on one GPU through vLLM: BF16, FP8, GPTQ (W4A16 g128), vLLM's W4A8-FP8
(compressed-tensors, its CUTLASS W4A8 kernel on Hopper) and TwinQuant on a Llama with Llama-3-8B shapes
(32 blocks, vocab 128256, random bf16 weights made on the GPU; never zeros).

    # 1. checkpoints: dense bf16, its GPTQ-format and compressed-tensors W4A8 peers (same weights, the same RTN
    #    g128 sym codes), TwinQuant
    python benchmarks/e2e/e2e_h100.py make  --workdir W --ranks 0 64 --out $OUT
    # 2. one engine per config, each in its own process
    python benchmarks/e2e/e2e_h100.py bench --workdir W --configs bf16 fp8 gptq w4a8_ct tq_r0 tq_r64 --out $OUT
           [--profile tq_r64]      # + torch.profiler table of 64 batch-1 decode steps
    (tq_r<R>_a8 / _f8: tq_r<R> declared W4A8-INT8 / W4A8-FP8 by its config alone, the weights linked;
     tq_r<R>_h4: rank R with lm_head quantized too, made with `make --head-ranks R`; a trailing _kv8 on any
     config, e.g. tq_r64_f8_kv8 or fp8_kv8: the same checkpoint with --kv-cache-dtype fp8)
    # 3. `vllm serve` + `vllm bench serve` (OpenAI API) at concurrency 1, 16, 64, 256
    python benchmarks/e2e/e2e_h100.py serve --workdir W --configs bf16 tq_r64 --out $OUT

Per config: engine start time; batch-1 decode latency (median of 3 runs of 256 tokens after a
warm-up); offline throughput, 512 prompts x 512 random input tokens, 256 output tokens,
ignore_eos, vLLM defaults (torch.compile + CUDA graphs). Records go to $OUT/e2e_<config>.json.
Serving: one OpenAI-API server per config; `vllm bench serve` with random 512-token prompts,
256 output tokens, ignore_eos, at each concurrency (4 x concurrency prompts, at least 8): TTFT,
TPOT, output tokens/s ($OUT/serve_<config>.json). The checkpoints carry a synthetic word-level
tokenizer (token i <-> the word "t<i>"), so random prompts keep their exact token counts.
The TwinQuant checkpoints are made with `twinquant-quantize --recipe rtn --set split.weighting=none
--max-kl inf` and 8 x 128 random calibration tokens: speed depends on the format, not on the values,
and GPTQ's Hessian pass over 32 blocks does not fit the device time (its time on 6 blocks is
in e2e_partial_h100.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
GROUP = 128
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


SHAPES = {  # hidden, MLP, heads, kv heads, head dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "tiny": (256, 512, 4, 2, 64),  # a CPU smoke test of this script
}


def write_word_tokenizer(path: str, vocab: int) -> None:
    """A word-level tokenizer whose token i is the word "t<i>": decode + encode of any id list is
    the identity, so `vllm bench serve`'s random prompts keep their exact lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(path)


def make_dense(path: str, layers: int, vocab: int, shape: str = "llama3-8b", device: str = "cuda") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden, mlp, heads, kv, head_dim = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    write_word_tokenizer(path, vocab)


def rtn_codes(w, group: int = GROUP):
    """Round-to-nearest symmetric 4-bit codes of a weight [N, K] per group of `group` columns: codes c in 0..15
    (the value c - 8) [N, K] int64 and scales s = max|w| / 7 [N, K / group] float32, w ~ s (c - 8)."""
    import torch

    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    s = (wg.abs().amax(-1) / 7.0).clamp_min(1e-8)
    return (torch.round(wg / s[..., None]).clamp(-8, 7) + 8).reshape(n, k).to(torch.int64), s


def _write_quantized(dense: str, out: str, device: str, linear_tensors, quantization_config: dict) -> None:
    """A copy of the dense checkpoint with each linear's weight replaced by linear_tensors(prefix, weight) (a dict
    of tensors) and config.json's quantization_config set."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out, exist_ok=True)
    for fn in sorted(os.listdir(dense)):
        src = os.path.join(dense, fn)
        if not fn.endswith(".safetensors"):
            if os.path.isfile(src) and fn != "config.json":
                subprocess.run(["cp", src, os.path.join(out, fn)], check=True)
            continue
        res = {}
        for name, w in load_file(src, device=device).items():
            if name.endswith(".weight") and any(f".{lin}." in name for lin in LINEARS):
                res.update(linear_tensors(name[: -len(".weight")], w))
            else:
                res[name] = w
        save_file({a: b.contiguous().cpu() for a, b in res.items()}, os.path.join(out, fn), metadata={"format": "pt"})
    with open(os.path.join(dense, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def write_gptq(dense: str, out: str, device: str = "cuda") -> None:
    """GPTQ-format (v1, sym, desc_act=False) W4A16 g128 checkpoint of the same weights, RTN (`rtn_codes`)."""
    import torch

    shifts = 4 * torch.arange(8, device=device, dtype=torch.int64)

    def tensors(pre, w):
        n, k = w.shape
        q, s = rtn_codes(w)
        packed = (q.t().reshape(k // 8, 8, n) << shifts[None, :, None]).sum(1)  # [K/8, N], row k's code at 4 (k % 8)
        return {pre + ".qweight": torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32),
                pre + ".scales": s.t().half(),
                pre + ".qzeros": torch.full((k // GROUP, n // 8), 0x77777777, dtype=torch.int32, device=device),
                pre + ".g_idx": torch.arange(k, device=device, dtype=torch.int32) // GROUP}  # qzeros: 8, stored 8 - 1

    _write_quantized(dense, out, device, tensors, {
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "static_groups": False})


def ct_w4a8_quantization_config() -> dict:
    """compressed-tensors' W4A8-FP8 scheme, as llm-compressor writes it: 4-bit symmetric integer weights per
    group of 128 (pack-quantized), FP8 activations with a dynamic per-token scale, lm_head left dense."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP,
                                 dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True))
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status="compressed", ignore=["lm_head"]).model_dump(exclude_none=True)


def write_ct_w4a8(dense: str, out: str, device: str = "cuda") -> None:
    """vLLM's W4A8-FP8 peer (compressed-tensors pack-quantized, served by its CUTLASS W4A8 kernel on Hopper) of the
    same weights and the same RTN codes and scales as `write_gptq` (scales in bf16, the checkpoint's dtype)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    def tensors(pre, w):
        q, s = rtn_codes(w)
        return {pre + ".weight_packed": pack_to_int32((q - 8).to(torch.int8), 4),
                pre + ".weight_scale": s.to(torch.bfloat16),
                pre + ".weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}

    _write_quantized(dense, out, device, tensors, ct_w4a8_quantization_config())


def cmd_make(a) -> None:
    os.makedirs(a.out, exist_ok=True)
    dense = os.path.join(a.workdir, "bf16")
    rec = {"layers": a.layers, "vocab": a.vocab}
    t0 = time.time()
    if not os.path.exists(os.path.join(dense, "config.json")):
        make_dense(dense, a.layers, a.vocab, a.shape, a.device)
    rec["make_dense_s"] = round(time.time() - t0, 1)
    procs = {}
    for r, head in [(r, False) for r in a.ranks] + [(r, True) for r in a.head_ranks]:
        name = f"tq_r{r}" + ("_h4" if head else "")  # quantize each concurrently with the GPTQ conversion
        log = open(os.path.join(a.out, f"quantize_{name}.log"), "w")
        procs[name] = (time.time(), subprocess.Popen(
            [sys.executable, "-m", "offline_quantizer.cli", "--model", dense, "--output",
             os.path.join(a.workdir, name), "--calib", "random", "--recipe", "rtn", "--nsamples", "8",
             "--seqlen", "128", "--set", "split.weighting=none", "--group-size", str(GROUP), "--rank", str(r),
             "--max-kl", "inf", "--device", a.device]
            + (["--set", "residual.modules_to_not_convert=[]"] if head else []),
            stdout=log, stderr=subprocess.STDOUT))
    t0 = time.time()
    write_gptq(dense, os.path.join(a.workdir, "gptq"), a.device)
    rec["write_gptq_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    write_ct_w4a8(dense, os.path.join(a.workdir, "w4a8_ct"), a.device)
    rec["write_w4a8_ct_s"] = round(time.time() - t0, 1)
    for name, (t0, p) in procs.items():
        if p.wait():
            raise SystemExit(f"quantization of {name} failed: see {a.out}/quantize_{name}.log")
        rec[f"quantize_{name}_s (concurrent)"] = round(time.time() - t0, 1)
    print(json.dumps(rec))
    with open(os.path.join(a.out, "e2e_make.json"), "w") as f:
        json.dump(rec, f, indent=1)


def random_prompts(gen, n: int, length: int) -> list[dict]:
    import torch

    return [{"prompt_token_ids": torch.randint(3, 32000, (length,), generator=gen).tolist()} for _ in range(n)]


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)


def bs1_ms_per_token(llm, prompt: dict) -> float:
    """Batch-1 decode: median of 3 runs of 256 tokens after one warm-up run."""
    sp = _greedy(256)
    llm.generate([prompt], sp, use_tqdm=False)
    ts = []
    for _ in range(3):
        t0 = time.time()
        o = llm.generate([prompt], sp, use_tqdm=False)
        ts.append((time.time() - t0) * 1000 / len(o[0].outputs[0].token_ids))
    return round(statistics.median(ts), 3)


def offline_throughput(llm, prompts: list[dict]) -> dict:
    """All prompts at once, 256 output tokens each, ignore_eos."""
    t0 = time.time()
    outs = llm.generate(prompts, _greedy(256), use_tqdm=False)
    dt = time.time() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p["prompt_token_ids"]) for p in prompts)
    return {
        "out_tok_s": round(n_out / dt, 1),
        "total_tok_s": round((n_out + n_in) / dt, 1),
        "throughput_s": round(dt, 1),
    }


def decode_profile_table(llm, prompt: dict, row_limit: int = 25, width: int = 80) -> str:
    """torch.profiler table (by device time) of 64 batch-1 decode steps; the engine must run in
    this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) for its kernels to show."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], _greedy(64), use_tqdm=False)
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=row_limit, max_name_column_width=width)


def config_rank(cfg: str) -> int | None:
    return int(cfg[4:].split("_")[0]) if cfg.startswith("tq_") else None


CHECKPOINTS = ("gptq", "w4a8_ct")  # configs served from their own checkpoint, the method named by its config.json
KV8 = "_kv8"  # config suffix: the same engine with an FP8 KV cache
DECLARED = {"_a8": ("int", "int8"), "_f8": ("float", "fp8")}  # suffix -> (activation_type, act. precision)


def _split(cfg: str) -> tuple[str, bool]:
    """A config without its _kv8 suffix, and whether it had one."""
    return (cfg[: -len(KV8)], True) if cfg.endswith(KV8) else (cfg, False)


def _declared(base: str) -> str | None:
    """The W4A8 declaration suffix (a key of DECLARED) of a TwinQuant config without _kv8, if it has one."""
    return base[-3:] if base.startswith("tq_") and base[-3:] in DECLARED else None


def config_activations(cfg: str) -> str:
    """The residual product's input: `tq_r<R>_a8` (`_f8`) is tq_r<R> declared W4A8-INT8 (W4A8-FP8)."""
    base, _ = _split(cfg)
    if base in ("fp8", "w4a8_ct"):
        return "fp8"
    suffix = _declared(base)
    return DECLARED[suffix][1] if suffix else "bf16"


def declare_w4a8(src: str, dst: str, activation_type: str = "int") -> None:
    """dst: the checkpoint src declared W4A8 (INT8 or FP8 activations) by config alone (its other files linked)."""
    from vllm_twinquant.format import declare_activations

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "config.json" and not os.path.exists(os.path.join(dst, name)):
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
    shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    declare_activations(dst, 8, activation_type)


def engine_args(workdir: str, cfg: str) -> tuple[str, dict]:
    """Checkpoint folder and extra engine arguments of one config."""
    base, kv8 = _split(cfg)
    path = os.path.join(workdir, base if base in CHECKPOINTS or base.startswith("tq_") else "bf16")
    suffix = _declared(base)
    if suffix and not os.path.exists(os.path.join(path, "config.json")):
        declare_w4a8(path[: -len(suffix)], path, DECLARED[suffix][0])
    kw = {"fp8": {"quantization": "fp8"}, "bf16": {}, **{c: {} for c in CHECKPOINTS}}.get(
        base, {"quantization": "twinquant"})
    return path, {**kw, "kv_cache_dtype": "fp8"} if kv8 else kw


def cmd_one(a) -> None:
    import torch
    from vllm import LLM

    cfg = a.config
    path, kw = engine_args(a.workdir, cfg)
    t0 = time.time()
    llm = LLM(model=path, dtype=a.dtype, max_model_len=1024, gpu_memory_utilization=a.gpu_memory_utilization,
              skip_tokenizer_init=True, seed=0, **kw)
    rec = {"config": cfg + a.suffix, "rank": config_rank(cfg), "activations": config_activations(cfg),
           "startup_s": round(time.time() - t0, 1)}
    if a.suffix:  # the same checkpoint under other plugin switches (a launch table's folder, say)
        rec["switches"] = {k: v for k, v in os.environ.items() if k.startswith("TWINQUANT_")}
    g = torch.Generator().manual_seed(0)
    p1 = random_prompts(g, 1, 32)[0]
    rec["bs1_ms_per_token"] = bs1_ms_per_token(llm, p1)
    rec.update(offline_throughput(llm, random_prompts(g, 512, 512)))
    if a.profile is not None:  # `one --profile` (an empty list): the engine runs in this process then
        with open(os.path.join(a.out, f"profile_decode_{cfg}.txt"), "w") as f:
            f.write(decode_profile_table(llm, p1))
    print("RECORD " + json.dumps(rec), flush=True)


def logged_kernels(log: str) -> list[str]:
    """The linear kernels an engine's log names, first seen first: vLLM's own choice ("Using X for ..." /
    "Selected X for ...") and the plugin's one line per layer shape ("twinquant: qkv_proj 4096->6144 r64: ...")."""
    found = re.findall(r"(?:Using|Selected) (\w*Kernel\w*) for|twinquant: (\S.*?)\s*$", log, re.M)
    return list(dict.fromkeys(a or b for a, b in found))


def cmd_bench(a) -> None:
    os.makedirs(a.out, exist_ok=True)
    for cfg in a.configs:
        args = [
            sys.executable,
            os.path.abspath(__file__),
            "one",
            "--workdir",
            a.workdir,
            "--config",
            cfg,
            "--out",
            a.out,
            "--dtype",
            a.dtype,
            "--gpu-memory-utilization",
            str(a.gpu_memory_utilization),
            "--suffix",
            a.suffix,
        ]
        env = dict(os.environ)
        if cfg in (a.profile or []):
            args.append("--profile")
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # so the profiler sees the engine's kernels
        p = subprocess.run(args, capture_output=True, text=True, env=env)
        log = p.stdout + p.stderr
        with open(os.path.join(a.out, f"e2e_{cfg}{a.suffix}.log"), "w") as f:
            f.write(log)
        m = re.search(r"^RECORD (.*)$", log, re.M)
        if p.returncode or not m:
            print(f"{cfg}: FAILED (rc {p.returncode}); tail:\n{log[-3000:]}", flush=True)
            continue
        rec = json.loads(m.group(1))
        rec["linear_kernels_logged"] = logged_kernels(log)
        print(json.dumps(rec), flush=True)
        with open(os.path.join(a.out, f"e2e_{cfg}{a.suffix}.json"), "w") as f:
            json.dump(rec, f, indent=1)


def _wait_ready(url: str, proc, timeout_s: float) -> None:
    import urllib.request

    t_end = time.time() + timeout_s
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def bench_serve(base_url: str, model: str, concurrency: int, n_prompts: int, in_len: int, out_len: int,
                result_dir: str, name: str) -> dict:
    """`vllm bench serve` (its module, so it also runs where the `vllm` console script does not)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser

    p = FlexibleArgumentParser()
    add_cli_args(p)
    args = p.parse_args(["--backend", "vllm", "--base-url", base_url, "--model", model, "--dataset-name", "random",
                         "--random-input-len", str(in_len), "--random-output-len", str(out_len),
                         "--num-prompts", str(n_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
                         "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                         "--save-result", "--result-dir", result_dir, "--result-filename", name, "--disable-tqdm"])
    serve_main(args)
    with open(os.path.join(result_dir, name)) as f:
        r = json.load(f)
    keep = ("completed", "duration", "total_output_tokens", "output_throughput", "total_token_throughput",
            "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_itl_ms", "median_e2el_ms")
    return {"concurrency": concurrency, "num_prompts": n_prompts, **{k: r[k] for k in keep if k in r}}


def cmd_serve(a) -> None:
    """One `vllm serve` per config (OpenAI API server, vLLM defaults), `vllm bench serve` at each
    concurrency against it."""
    os.makedirs(a.out, exist_ok=True)
    for i, cfg in enumerate(a.configs):
        path, kw = engine_args(a.workdir, cfg)
        port = 8000 + i
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--port", str(port),
               "--dtype", a.dtype, "--max-model-len", "1024", "--gpu-memory-utilization", str(a.gpu_memory_utilization),
               "--seed", "0"]
        if "quantization" in kw:
            cmd += ["--quantization", kw["quantization"]]
        if "kv_cache_dtype" in kw:
            cmd += ["--kv-cache-dtype", kw["kv_cache_dtype"]]
        log_path = os.path.join(a.out, f"serve_{cfg}.log")
        rec = {"config": cfg, "rank": config_rank(cfg), "server_cmd": " ".join(cmd[1:])}
        t0 = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                _wait_ready(f"http://127.0.0.1:{port}", proc, a.server_timeout)
                rec["startup_s"] = round(time.time() - t0, 1)
                rec["runs"] = []
                with tempfile.TemporaryDirectory() as raw:  # vllm bench serve's own files; the record keeps its metrics
                    for c in a.concurrency:
                        n = max(8, 4 * c)
                        rec["runs"].append(bench_serve(f"http://127.0.0.1:{port}", path, c, n, a.input_len,
                                                       a.output_len, raw, f"bench_serve_{cfg}_c{c}.json"))
                        print(cfg, json.dumps(rec["runs"][-1]), flush=True)
            except Exception as e:  # keep going with the next config; the log says why
                rec["error"] = repr(e)
                print(f"{cfg}: FAILED {e!r}; see {log_path}", flush=True)
            finally:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        with open(os.path.join(a.out, f"serve_{cfg}.json"), "w") as f:
            json.dump(rec, f, indent=1)


WORKLOAD = ("Llama-3-8B shapes (32 blocks, random weights), 512 prompts x 512 random tokens in, 256 out, vLLM defaults "
            "(torch.compile + CUDA graphs); batch 1: ms per output token; serve: `vllm bench serve`, random 512-token "
            "prompts, 256 out, 4 x concurrency prompts (at least 8)")


def cmd_collect(a) -> None:
    """One results file from a run's records (e2e_<config>.json, serve_<config>.json, e2e_make.json in --out):
    {device, vllm, workload, commands, make, records, serve}, records in the order the configs ran."""
    import glob

    import torch
    import vllm

    def load(pattern):
        return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(a.out, pattern)), key=os.path.getmtime)]

    make = load("e2e_make.json")
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "vllm": vllm.__version__,
           "workload": WORKLOAD, "commands": a.commands or [], "make": make[0] if make else None,
           "records": [r for r in load("e2e_*.json") if "config" in r], "serve": load("serve_*.json")}  # not make
    with open(a.result, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{a.result}: {len(res['records'])} records, {len(res['serve'])} servers")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=("make", "bench", "one", "serve", "collect"))
    ap.add_argument("--workdir", default="/tmp/e2e")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ranks", type=int, nargs="*", default=[0, 32, 64])
    ap.add_argument("--head-ranks", type=int, nargs="*", default=[],
                    help="also make tq_r<R>_h4: rank R with lm_head quantized too")
    ap.add_argument("--configs", nargs="+", default=["bf16", "fp8", "gptq", "tq_r0", "tq_r32", "tq_r64"])
    ap.add_argument("--config")
    ap.add_argument("--profile", nargs="*")
    ap.add_argument("--suffix", default="", help="bench: appended to each record's config name (e.g. _tin: the same "
                    "checkpoints under other TWINQUANT_* switches, which the record lists)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda", help="where make builds and quantizes")
    ap.add_argument("--dtype", default="bfloat16", help="activation dtype of the engines (float16 on the CPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--server-timeout", type=float, default=420)
    ap.add_argument("--result", default="e2e.json", help="collect: the results file written")
    ap.add_argument("--commands", nargs="*", help="collect: the commands of the run, as recorded")
    a = ap.parse_args()
    {"make": cmd_make, "bench": cmd_bench, "one": cmd_one, "serve": cmd_serve, "collect": cmd_collect}[a.stage](a)


if __name__ == "__main__":
    main()
