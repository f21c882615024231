"""The committed accuracy results stay consistent: the issue's JSON records come from the JSONL that
twinquant-eval writes, and README's table is the one make_tables.py prints from it."""

import contextlib
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_tables  # noqa: E402

JSONL = os.path.join(ROOT, "benchmarks", "results", "accuracy_smollm2.jsonl")
JSON = os.path.join(ROOT, "benchmarks", "results", "accuracy_smollm2.json")
KEYS = {"method", "weight_bits", "activation_bits", "rank", "effective_bits", "ppl", "ppl_bf16"}


def test_json_records_match_jsonl():
    rows = [json.loads(l) for l in open(JSONL) if l.strip()]
    recs = json.load(open(JSON))
    assert len(recs) == len(rows)
    base = next(r["ppl"] for r in rows if r["recipe"] == "dense")
    by_label = {r["label"]: r for r in rows}
    for rec in recs:
        assert KEYS <= rec.keys(), rec
        row = by_label[rec["label"]]
        assert rec["ppl"] == row["ppl"] and rec["ppl_bf16"] == base
        assert rec["method"] == make_tables.METHODS[row["recipe"]], f"no method name for recipe {row['recipe']}"


def test_readme_table_is_make_tables_output():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        make_tables.accuracy(JSONL)
    table = out.getvalue().strip()
    assert table in open(os.path.join(ROOT, "README.md")).read()
