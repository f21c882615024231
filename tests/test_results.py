"""The committed results stay consistent: the accuracy JSON records come from the JSONL that
twinquant-eval writes, README's and docs/accuracy.md's tables are the ones make_tables.py prints from the
committed results; the kernel records carry the keys of issue 3 with ratios that match their timings, and the
kernel README's
current table is make_tables.py's output."""

import contextlib
import io
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_tables  # noqa: E402

JSONL = os.path.join(ROOT, "benchmarks", "results", "accuracy_smollm2.jsonl")
JSON = os.path.join(ROOT, "benchmarks", "results", "accuracy_smollm2.json")
KEYS = {"method", "weight_bits", "activation_bits", "rank", "effective_bits", "ppl", "ppl_bf16"}


def test_json_records_match_jsonl():
    rows = [json.loads(line) for line in open(JSONL) if line.strip()]
    recs = json.load(open(JSON))
    assert len(recs) == len(rows)
    base = next(r["ppl"] for r in rows if r["recipe"] == "dense")
    by_label = {r["label"]: r for r in rows}
    for rec in recs:
        assert KEYS <= rec.keys(), rec
        row = by_label[rec["label"]]
        assert rec["ppl"] == row["ppl"] and rec["ppl_bf16"] == base
        assert rec["method"] == make_tables.METHODS[row["recipe"]], f"no method name for recipe {row['recipe']}"


def _printed(fn, *args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue().strip()


def test_the_full_accuracy_table_in_docs_is_make_tables_output():
    assert _printed(make_tables.accuracy, JSONL) in open(os.path.join(ROOT, "docs", "accuracy.md")).read()


def test_the_w4a8_accuracy_table_in_docs_is_make_tables_output():
    path = os.path.join(ROOT, "benchmarks", "results", "accuracy_w4a8_smollm2.jsonl")
    table = _printed(make_tables.w4a8_accuracy, path)
    assert table.count("\n") >= 4 and table in open(os.path.join(ROOT, "docs", "accuracy.md")).read()


def test_the_gpu_kernel_accuracy_table_in_docs_is_make_tables_output():
    path = os.path.join(ROOT, "benchmarks", "results", "accuracy_acts_h100.jsonl")
    table = _printed(make_tables.acts_gpu, path)
    assert table.count("\n") >= 3 and table in open(os.path.join(ROOT, "docs", "accuracy.md")).read()


def test_the_w4a8_kernel_tables_in_the_kernel_readme_are_make_tables_output():
    readme = open(os.path.join(ROOT, "benchmarks", "kernels", "README.md")).read()
    results = os.path.join(ROOT, "benchmarks", "results")
    assert _printed(make_tables.w4a8_kernels, os.path.join(results, "w4a8_h100.json")) in readme
    for act in ("fp8", "int8"):
        assert _printed(make_tables.w4a8_sweep, os.path.join(results, "sweeps", f"w4a8_{act}_h100.json")) in readme


def test_the_w4a8_kernel_table_gains_a_cutlass_column_only_where_the_run_timed_it(tmp_path):
    d = json.load(open(os.path.join(ROOT, "benchmarks", "results", "w4a8_h100.json")))
    d["records"] = [{k: v for k, v in r.items() if not k.startswith("ms_cutlass")} for r in d["records"][:3]]
    d["records"][1].update(ms_cutlass_w4a8=2e-2, ms_cutlass_w4a8_mm=1.5e-2)
    path = tmp_path / "w4a8.json"
    path.write_text(json.dumps(d))
    lines = [line for line in _printed(make_tables.w4a8_kernels, str(path)).splitlines() if line.startswith("|")]
    assert "CUTLASS W4A8 (GEMM alone)" in lines[0] and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 20.0 (15.0) |" in lines[3] and "| – |" in lines[2]


def test_benchmark_int4_packing_puts_column_8w_plus_j_in_bits_4j_of_word_w():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "kernels"))
    from bench_w4a8 import pack_int4_along_k

    q = torch.randint(-8, 8, (5, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_int4_along_k(q)
    assert packed.shape == (5, 8) and packed.dtype == torch.int32
    nibbles = torch.stack([(packed >> (4 * j)) & 0xF for j in range(8)], -1).reshape(5, 64)
    assert torch.equal(torch.where(nibbles >= 8, nibbles - 16, nibbles), q)


def test_readme_tables_are_make_tables_output_of_the_committed_results():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert _printed(make_tables.readme_accuracy, JSONL) in readme
    assert _printed(make_tables.readme_speed, os.path.join(ROOT, "benchmarks", "results", "e2e_h100.json")) in readme


KERNEL_TABLES = [os.path.join(ROOT, "benchmarks", "results", f"kernels_{t}.json") for t in ("h100", "h200")]
KERNEL_KEYS = {"M", "K", "N", "rank", "group_size", "ms", "gbps", "tflops", "pct_of_floor", "speedup_vs_bf16",
               "speedup_vs_unfused"}


@pytest.mark.parametrize("path", KERNEL_TABLES)
def test_kernel_records_carry_the_issue_keys_and_their_ratios(path):
    d = json.load(open(path))
    assert d["meta"]["max_rel_err"] <= 1e-2
    cases = {(r["name"], r["M"], r["rank"]) for r in d["records"]}
    assert len(cases) == len(d["records"]) == 4 * 8 * 4  # shapes x M x ranks, each once
    for r in d["records"]:
        assert KERNEL_KEYS <= r.keys(), r
        assert abs(r["speedup_vs_bf16"] - r["ms_bf16"] / r["ms"]) < 1e-9
        assert abs(r["speedup_vs_unfused"] - r["ms_unfused"] / r["ms"]) < 1e-9
        assert abs(r["gbps"] - r["bytes"] / r["ms"] / 1e6) < 1e-6


@pytest.mark.parametrize("path", KERNEL_TABLES)
def test_kernel_readme_table_is_make_tables_output(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        make_tables.kernels(path)
    assert out.getvalue().strip() in open(os.path.join(ROOT, "benchmarks", "kernels", "README.md")).read()


def test_the_in_launch_t_check_passed_every_case_and_its_readme_table_is_make_tables_output():
    path = os.path.join(ROOT, "benchmarks", "results", "t_in_launch_check_h100.json")
    d = json.load(open(path))
    assert all(r["ok"] and r["rel_err"] <= 1e-2 and r["scratch_zero_after"] for r in d["records"])
    for kernel, by_variant in d["meta"]["sum_us"].items():  # the sums the table choice was made from
        for variant, total in by_variant.items():
            rows = [r for r in d["records"] if r["kernel"] == kernel and (r["m"] == 1 or kernel != "gemv")
                    and (r["t"] == variant or (variant == "plan" and not r["t"].startswith("in_launch")))]
            assert rows and abs(sum(r["us"] for r in rows) - total) < 0.05, (kernel, variant)
    readme = open(os.path.join(ROOT, "benchmarks", "kernels", "README.md")).read()
    assert _printed(make_tables.t_in_launch, path) in readme


def test_the_w4a8_end_to_end_table_is_one_runs_records_with_the_issue_keys():
    path = os.path.join(ROOT, "benchmarks", "results", "e2e_w4a8_h100.json")
    d = json.load(open(path))
    keys = {"config", "rank", "activations", "out_tok_s", "total_tok_s", "bs1_ms_per_token", "startup_s"}
    assert all(keys <= set(r) for r in d["records"])
    configs = [r["config"] for r in d["records"]]
    assert len(configs) == len(set(configs)) and {"bf16", "fp8"} <= set(configs)  # baselines of the same run
    suffix = {"a8": "int8", "f8": "fp8"}
    for r in d["records"]:  # a TwinQuant config's activations are those its name declares
        if r["config"].startswith("tq_"):
            assert r["activations"] == suffix.get(r["config"].removesuffix("_kv8").split("_")[-1], "bf16"), r
    readme = open(os.path.join(ROOT, "benchmarks", "e2e", "README.md")).read()
    table = _printed(make_tables.e2e_w4a8, path)
    assert "\n".join("  " + line if line else "" for line in table.splitlines()) in readme


def test_the_decode_breakdown_splits_steps_into_buckets_layer_kinds_and_idle_time():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    from decode_breakdown import breakdown

    def step(t, w4a8=False):
        ks, names = [], ["vectorized_embedding_kernel"]
        for _ in range(2):  # two blocks
            names += ["_lowrank_down_kernel", "_tq_gemv_vec_kernel", "flash_fwd_splitkv_kernel",
                      "_tq_gemv_vec_kernel", "rms_norm_kernel", "_lowrank_down_kernel"]
            names += ["_quantize_rows_kernel", "_tq_w4a8_rs_kernel"] if w4a8 else ["_tq_decode_mma_kernel"]
            names += ["act_and_mul_kernel", "_tq_gemv_vec_kernel"]
        names += ["nvjet_sm90_tst_128x64", "argmax_kernel"]
        for n in names:
            ks.append((n, t, 2.0))
            t += 3.0  # 1 µs idle after every kernel
        return ks, t

    kernels, t = [], 0.0
    for w4a8 in (False, True, False):
        ks, t = step(t, w4a8)
        kernels += ks
    r = breakdown(kernels, "embedding")
    assert r["steps"] == 2  # the third step has no end
    assert r["step_us"] == pytest.approx(r["busy_us"] + r["idle_us"])
    assert r["busy_us"] == pytest.approx(2 / 3 * r["step_us"])
    assert r["exclusive"] == r["buckets"]  # nothing overlaps: every kernel ran alone
    assert r["buckets"]["lowrank_down"] == pytest.approx(8.0)
    assert r["buckets"]["dense_gemm (lm_head, or every linear of a dense model)"] == pytest.approx(2.0)
    assert {k: round(v, 1) for k, v in r["twinquant_by_kind"].items()} == {
        "qkv_proj": 4.0, "o_proj": 4.0, "gate_up_proj": 6.0, "down_proj": 4.0}  # W4A8 step: quantize_rows to gate/up
    assert r["buckets"]["attention"] == 4.0 and r["buckets"]["norm"] == 4.0 and r["buckets"]["sampling"] == 2.0
    with pytest.raises(ValueError, match="no whole step"):
        breakdown(kernels[:5], "embedding")


def test_the_decode_breakdown_gives_a_quantized_lm_head_its_own_kind_after_the_last_block():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    from decode_breakdown import breakdown

    kernels, t = [], 0.0
    for _ in range(3):  # a step of 2 blocks (4 TwinQuant layers each, 1 us) and a TwinQuant lm_head (5 us)
        kernels.append(("embedding_kernel", t, 1.0))
        t += 1.0
        for d in [1.0] * 8 + [5.0]:
            kernels.append(("_tq_gemv_vec_kernel", t, d))
            t += d
    r = breakdown(kernels, "embedding", layers=2)
    assert r["twinquant_by_kind"] == {"qkv_proj": 2.0, "o_proj": 2.0, "gate_up_proj": 2.0, "down_proj": 2.0,
                                      "lm_head": 5.0}
    assert breakdown(kernels, "embedding")["twinquant_by_kind"]["qkv_proj"] == 7.0  # without layers: cyclic


def test_the_decode_breakdown_counts_kernels_launched_early_once_and_reports_the_time_each_bucket_ran_alone():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    from decode_breakdown import breakdown

    kernels, t = [], 0.0
    for _ in range(3):  # a step: embedding 2 us, down projection 8 us, the residual kernel launched early
        kernels += [("embedding_kernel", t, 2.0), ("_lowrank_down_kernel", t + 2, 8.0),
                    ("_tq_gemv_vec_kernel", t + 4, 10.0)]
        t += 20.0  # 6 us idle at the end of each step
    r = breakdown(kernels, "embedding")
    assert r["busy_us"] == pytest.approx(14.0) and r["idle_us"] == pytest.approx(6.0)
    assert r["buckets"]["lowrank_down"] == 8.0 and r["buckets"]["twinquant_linear"] == 10.0  # they overlap 6 us
    assert r["exclusive"]["lowrank_down"] == pytest.approx(2.0)  # alone from 2 to 4 us
    assert r["exclusive"]["twinquant_linear"] == pytest.approx(4.0)  # alone from 10 to 14 us
    assert sum(r["exclusive"].values()) < r["busy_us"] < sum(r["buckets"].values())
    assert r["lowrank_down_by_kind"] == {"qkv_proj": 8.0} and r["after_down_by_kind"] == {"qkv_proj": 4.0}


def test_end_to_end_configs_declare_w4a8_by_config_alone_and_take_an_fp8_kv_cache(tiny_tq, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    import shutil

    from e2e_h100 import config_activations, engine_args

    shutil.copytree(tiny_tq, tmp_path / "tq_r8")
    acts = {c: config_activations(c) for c in ("bf16", "fp8", "gptq", "tq_r8", "tq_r8_a8", "tq_r8_f8", "fp8_kv8",
                                              "tq_r8_f8_kv8")}
    assert acts == {"bf16": "bf16", "fp8": "fp8", "gptq": "bf16", "tq_r8": "bf16", "tq_r8_a8": "int8",
                    "tq_r8_f8": "fp8", "fp8_kv8": "fp8", "tq_r8_f8_kv8": "fp8"}
    for cfg, kind in (("tq_r8_a8", "int"), ("tq_r8_f8_kv8", "float")):
        path, kw = engine_args(str(tmp_path), cfg)
        q = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
        assert (q["activation_bits"], q["activation_type"]) == (8, kind)
        assert kw.get("kv_cache_dtype") == ("fp8" if cfg.endswith("_kv8") else None)
        assert kw["quantization"] == "twinquant"
        assert os.path.samefile(os.path.join(path, "model.safetensors"), tmp_path / "tq_r8" / "model.safetensors")
    assert engine_args(str(tmp_path), "fp8_kv8")[1] == {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    assert json.load(open(tmp_path / "tq_r8" / "config.json"))["quantization_config"]["activation_bits"] == 16


def test_the_end_to_end_record_names_the_linear_kernels_the_engine_logged():
    """vLLM's own kernel choice and the plugin's per-shape lines, each once, in the order logged."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    import torch
    from e2e_h100 import logged_kernels

    import csrc_triton as ct

    h100 = ct.Device.named("NVIDIA H100 80GB HBM3")
    plugin = [ct.summary(name, ct.LayerShape(n, 4096, 128, 64, (), torch.bfloat16), h100)
              for name, n in (("qkv_proj", 6144), ("o_proj", 4096))]
    log = "\n".join([
        "INFO 12-06 19:40:02 [__init__.py:923] Using MacheteLinearKernel for GPTQMarlinLinearMethod",
        *(f"(EngineCore pid=7) INFO 12-06 19:40:03 [kernels.py:346] {line}" for line in plugin + plugin[:1]),
        "INFO 12-06 19:40:04 [__init__.py:759] Selected CutlassFP8ScaledMMLinearKernel for Fp8LinearMethod",
        "INFO 12-06 19:40:05 [gpu_model_runner.py:2] Using FLASH_ATTN backend.",
    ])
    got = logged_kernels(log)
    assert got == ["MacheteLinearKernel", *(p.removeprefix("twinquant: ") for p in plugin),
                   "CutlassFP8ScaledMMLinearKernel"]
    assert all(" 4096->" in g and "r64" in g for g in got[1:3])


def test_one_runs_results_file_holds_its_records_and_servers_and_the_serve_table_compares_tpot_to_bf16(tmp_path):
    """`e2e_h100.py collect` gathers a run's records (e2e_<config>.json, in the order they ran) and `serve`
    records into one file; `make_tables.py e2e-serve` prints each server's runs with TPOT against BF16's at the
    same concurrency (none where BF16 has no run at it)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "e2e"))
    import argparse
    import time

    from e2e_h100 import cmd_collect

    def run(c, tpot):
        return {"concurrency": c, "median_tpot_ms": tpot, "median_ttft_ms": 20.0, "output_throughput": 1000.0 / tpot}

    files = {"e2e_make.json": {"layers": 32},
             "e2e_bf16.json": {"config": "bf16", "bs1_ms_per_token": 6.5, "out_tok_s": 9600.0},
             "e2e_tq_r64.json": {"config": "tq_r64", "bs1_ms_per_token": 3.5, "out_tok_s": 8100.0},
             "serve_bf16.json": {"config": "bf16", "runs": [run(1, 6.8), run(16, 8.0)]},
             "serve_tq_r64_h4.json": {"config": "tq_r64_h4", "runs": [run(1, 3.4), run(16, 5.0), run(64, 9.0)]}}
    for i, (name, rec) in enumerate(files.items()):
        (tmp_path / name).write_text(json.dumps(rec))
        os.utime(tmp_path / name, (time.time() + i, time.time() + i))
    result = tmp_path / "e2e.json"
    cmd_collect(argparse.Namespace(out=str(tmp_path), result=str(result), commands=["bench bf16 tq_r64"]))
    d = json.load(open(result))
    assert [r["config"] for r in d["records"]] == ["bf16", "tq_r64"] and d["make"] == {"layers": 32}
    assert [s["config"] for s in d["serve"]] == ["bf16", "tq_r64_h4"] and d["commands"] == ["bench bf16 tq_r64"]
    rows = [line.split(" | ") for line in _printed(make_tables.e2e_serve, str(result)).splitlines()[2:]]
    tq = {int(r[1]): r for r in rows if r[0].endswith(make_tables.SPEED_NAMES["tq_r64_h4"])}
    assert float(tq[1][3]) == pytest.approx(6.8 / 3.4, abs=0.01) and float(tq[16][3]) == pytest.approx(1.6, abs=0.01)
    assert tq[64][3] == "–" and len(rows) == 5


def test_the_serve_table_compares_tpot_to_fp8_where_the_run_has_no_bf16_server_and_shows_p99_tpot(tmp_path):
    def run(c, tpot, p99):
        return {"concurrency": c, "median_tpot_ms": tpot, "p99_tpot_ms": p99, "median_ttft_ms": 20.0,
                "output_throughput": 1000.0 / tpot}

    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"serve": [{"config": "fp8", "runs": [run(1, 4.0, 4.2)]},
                                          {"config": "bf16", "error": "not ready", "runs": []},
                                          {"config": "tq_r64_h4_a8", "runs": [run(1, 3.2, 9.5)]}]}))
    lines = _printed(make_tables.e2e_serve, str(path)).splitlines()
    assert f"× {make_tables.SPEED_NAMES['fp8']}" in lines[0]
    tq = next(line.split(" | ") for line in lines[2:] if make_tables.SPEED_NAMES["tq_r64_h4_a8"] in line)
    assert float(tq[3]) == pytest.approx(4.0 / 3.2, abs=0.01) and float(tq[4]) == 9.5


def test_the_serve_table_in_the_end_to_end_readme_is_make_tables_output_of_its_run():
    path = os.path.join(ROOT, "benchmarks", "results", "serve_w4a8_h100.json")
    d = json.load(open(path))
    assert d["serve"] and all(s.get("runs") for s in d["serve"]) and not d["records"]
    table = _printed(make_tables.e2e_serve, path)
    readme = open(os.path.join(ROOT, "benchmarks", "e2e", "README.md")).read()
    assert "\n".join("  " + line for line in table.splitlines()) in readme
