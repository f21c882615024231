"""t = x D^T made inside the decode kernels' own launch (`csrc_triton/kernels/gemv.py` up to 4 tokens,
`mma_decode.py` up to 16; a `gemv_t_splits` / `mma_decode_t_splits` row with `in_kernel`) against the separate
down projection (what the committed table plans, with PDL where it does), one GPU, no vLLM.

    python benchmarks/kernels/t_in_launch_check.py --out $OUT [--table-dir DIR] [--ms 1 4 16] [--variants 8x64]

For Llama-3-8B's four layers (merged q/k/v and gate/up), rank 64, at every token count of --ms that the plan
gives one of those two kernels: each way of making t (the committed plan, and in the launch with (K-slices, rows
of D per piece) from VARIANTS) is first checked against the float32 reference with a NaN-poisoned output, again
after 100 CUDA-graph replays (which must leave the scratch zero: the next replay depends on it), then timed:
CUDA-graph replays over enough copies of the layer to overflow L2 (benchmarks/kernels/common.py), rank 0 beside
it (what the low-rank term costs). Writes t_in_launch_check_<device>.json; with --table-dir, a copy of the
device's launch table whose `gemv_t_splits` (`mma_decode_t_splits`) row is the fastest in-launch variant, where
it is faster than the committed plan on the sum over the four layers at one token (over every token count the
plan gives mma_decode) (TWINQUANT_CONFIG_DIR=DIR serves with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import GROUP, flush_copies, fresh_case, graph_time_ms, layer_bytes, save_records  # noqa: E402

import csrc_triton as ct  # noqa: E402
from csrc_triton.dispatch import LowrankPlan, kernels, table_file  # noqa: E402
from csrc_triton.kernels.base import t_scratch  # noqa: E402
from csrc_triton.layer import run  # noqa: E402

LAYERS = {"qkv": (4096, 6144, (4096, 5120)), "o": (4096, 4096, ()), "gate_up": (4096, 28672, (14336,)),
          "down": (14336, 4096, ())}
RANK = 64
VARIANTS = [(8, 64), (16, 64), (32, 64), (16, 32), (32, 32)]  # (K-slices, rows of D per piece)
KERNELS = {"gemv": ("gemv_t_splits", [1]), "mma_decode": ("mma_decode_t_splits", None)}  # table row, ms summed


def plans(shape, m, device, variants):
    """name -> KernelPlan: the committed plan, then each in-launch variant."""
    base = ct.plan(shape, m, device)
    out = {"pdl" if base.pdl_trigger else "separate": base}
    for splits, block_r in variants:
        out[f"in_launch_{splits}x{block_r}"] = dataclasses.replace(
            base, lowrank=LowrankPlan(splits, False, block_r, True), pdl_trigger=0)
    return out


def sums(recs: list[dict]) -> dict[str, dict[str, float]]:
    """kernel -> {"plan": the committed plan's µs (PDL or separate, as it chose per case), in-launch variant: µs},
    each summed over the cases that decide the kernel's table row (KERNELS)."""
    out = {}
    for kernel, (_, ms) in KERNELS.items():
        rows = [r for r in recs if r["kernel"] == kernel and (ms is None or r["m"] in ms)]
        if rows:
            label = {r["t"]: r["t"] if r["t"].startswith("in_launch") else "plan" for r in rows}
            out[kernel] = {}
            for r in rows:
                out[kernel][label[r["t"]]] = round(out[kernel].get(label[r["t"]], 0.0) + r["us"], 2)
    return out


def check(p, case, bounds) -> tuple[float, bool]:
    """The relative error against the float32 reference (the larger of one call's and of the last of 100 graph
    replays'), and whether the scratch of t made in the launch is all zero after them."""
    x, qw, sc, down, up, b, scales, ref = case
    out = torch.full(ref.shape, float("nan"), dtype=x.dtype, device=x.device)
    call = functools.partial(run, p, x, qw, sc, GROUP, down, up, b, bounds, scales.get("down_scale"),
                             scales.get("up_scale"), out=out)
    call()
    errs = [((out.float() - ref).norm() / ref.norm()).item()]
    out.fill_(float("nan"))
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        call()
    for _ in range(100):
        g.replay()
    torch.cuda.synchronize()
    errs.append(((out.float() - ref).norm() / ref.norm()).item())
    t, sync = t_scratch(x.device)
    return max(errs), not (t.any() or sync.any())


def timed_us(p, m, k, n, bounds, rank, gen) -> float:
    """µs per call of plan p, CUDA-graph replays over enough copies of the layer to overflow L2."""
    fns = []
    for _ in range(flush_copies(layer_bytes(k, n, rank))):
        x, qw, sc, down, up, _, _, _ = fresh_case(m, k, n, rank, torch.bfloat16, gen, bounds=bounds)
        out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        fns.append(functools.partial(run, p, x, qw, sc, GROUP, down, up, None, bounds, None, None, out=out))
    return graph_time_ms(fns) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--table-dir", help="write the device's table with the fastest in-launch row here")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="token counts (where the plan is gemv or mma_decode)")
    ap.add_argument("--variants", nargs="+", default=[f"{s}x{b}" for s, b in VARIANTS],
                    help="in-launch variants, K-slices x rows of D per piece")
    a = ap.parse_args()
    variants = [tuple(map(int, v.split("x"))) for v in a.variants]
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    device = ct.Device.of(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    recs = []
    for name, (k, n, bounds) in LAYERS.items():
        for m in a.ms:
            shape = ct.LayerShape(n, k, GROUP, RANK, bounds)
            ps = plans(shape, m, device, variants)
            kernel = next(iter(ps.values())).kernel
            if kernel not in KERNELS or m > kernels()[kernel].t_tokens:
                continue
            r0 = timed_us(ct.plan(ct.LayerShape(n, k, GROUP, 0, bounds), m, device), m, k, n, bounds, 0, gen)
            for label, p in ps.items():
                err, zero = check(p, fresh_case(m, k, n, RANK, torch.bfloat16, gen, bounds=bounds, bias=True), bounds)
                rec = {"layer": name, "k": k, "n": n, "m": m, "rank": RANK, "kernel": kernel, "t": label,
                       "rel_err": err, "scratch_zero_after": zero,
                       "us": round(timed_us(p, m, k, n, bounds, RANK, gen), 2), "rank0_us": round(r0, 2)}
                rec["ok"] = err <= 1e-2 and zero
                recs.append(rec)
                print(json.dumps(rec), flush=True)
                save_records(a.out, f"t_in_launch_check_{device.name.split()[1].lower()}", {}, recs)
    meta = {"device": device.name, "torch": torch.__version__, "triton": device.triton,
            "command": "python benchmarks/kernels/t_in_launch_check.py " + " ".join(sys.argv[1:]), "variants": variants}
    totals = sums(recs)
    meta["sum_us"] = totals
    print(json.dumps(totals))
    path = save_records(a.out, f"t_in_launch_check_{device.name.split()[1].lower()}", meta, recs, t0)
    if not all(r["ok"] for r in recs):
        raise SystemExit(f"{path}: some variant failed its check")
    if a.table_dir:
        with open(table_file(device.name)) as f:
            table = json.load(f)
        for kernel, by_variant in totals.items():
            row = KERNELS[kernel][0]
            best = min((v for v in by_variant if v != "plan"), key=by_variant.get)
            if by_variant[best] < by_variant["plan"]:
                splits, block_r = map(int, best.removeprefix("in_launch_").split("x"))
                table[row] = [{"max_k": None, "splits": splits, "block_r": block_r, "in_kernel": True}]
            print(f"{row}: {table.get(row)} ({best} {by_variant[best]:.1f} us vs the plan {by_variant['plan']:.1f} us)")
        os.makedirs(a.table_dir, exist_ok=True)
        with open(os.path.join(a.table_dir, os.path.basename(table_file(device.name))), "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
