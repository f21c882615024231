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


def test_the_w4a8_kernel_tables_in_the_kernel_readme_are_make_tables_output():
    readme = open(os.path.join(ROOT, "benchmarks", "kernels", "README.md")).read()
    results = os.path.join(ROOT, "benchmarks", "results")
    assert _printed(make_tables.w4a8_kernels, os.path.join(results, "w4a8_h100.json")) in readme
    for act in ("fp8", "int8"):
        assert _printed(make_tables.w4a8_sweep, os.path.join(results, "sweeps", f"w4a8_{act}_h100.json")) in readme


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
