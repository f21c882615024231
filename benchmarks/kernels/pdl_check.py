"""Does the residual kernel really wait for the down projection? (GPU, sm_90+)

    python3 benchmarks/kernels/pdl_check.py [--out DIR] [--expect-race]

With programmatic dependent launch (`twinquant_gemm.pdl_usable`) the residual kernel starts
while the down projection t = x @ D^T still runs, and only its epilogue waits for t
(`griddepcontrol.wait`). A wait in the wrong place would pass ordinary checks, because the
down projection is short and is usually done in time. Here it is made slow on purpose: one
program per rank tile walks all of K (`lowrank_down(..., num_splits=1)`, K = 14336). Each
dispatch path (vector kernel, mma decode kernel, tile kernel with and without split-K, the
Hopper wgmma kernel) then runs against a float32 reference, output NaN-poisoned; a t read too
early is the uninitialised workspace or zeros, several percent off or NaN.
Where rank-0 decode layers are themselves launched with PDL (`_GEMV_CHAIN`), a last case
checks that such a layer waits for the kernel that writes its x (`chained_check`).
Exit status 1 on a mismatch; --expect-race inverts it (the negative control, run on a copy of
the kernels with the wait removed, must fail).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench_kernels import fresh_case, mode8_available  # noqa: E402

from csrc_triton import twinquant_gemm as tg  # noqa: E402

K, N, RANK = 14336, 4096, 128
CASES = [  # (M, forced config or None for the dispatch's, what runs)
    (1, None, "vector decode kernel"),
    (8, None, "mma decode kernel"),
    (64, None, "mma decode kernel, 64 tokens per program"),
    (100, (64, 64, 128, 8, 3, 1, 7), "tile kernel MODE 7"),
    (100, (64, 64, 128, 8, 3, 4, 7), "tile kernel MODE 7, split-K 4"),
    (200, (256, 128, 64, 8, 3, 1, 9), "wgmma kernel MODE 9"),
]


@triton.jit
def _slow_producer(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """x for the chained check: one program copies it BLOCK values at a time (slow on purpose)
    after letting the next launch start at once, as a PDL-aware producer may."""
    tl.extra.cuda.gdc_launch_dependents()
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n) * 1.0, mask=offs < n)


def chained_check(gen):
    """A rank-0 layer at one token launched with PDL right after the kernel that writes its x
    (`_GEMV_CHAIN`): it may read codes early but must wait before it reads x. x's buffer holds
    other values (another random x) until the slow producer overwrites it."""
    errs = []
    for _ in range(3):
        x, qw, sc, _, _, _, _, ref = fresh_case(1, K, N, 0, torch.bfloat16, gen)
        buf = torch.randn_like(x)
        out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        _slow_producer[(1,)](x, buf, x.numel(), BLOCK=16)
        tg.tq_gemm(buf, qw, sc, 128, out=out)
        torch.cuda.synchronize()
        e = ((out.float() - ref).norm() / ref.norm()).item()
        errs.append(float("inf") if e != e else e)
    print(f"M=   1 {'vector decode kernel, rank 0, chained (PDL)':45s} worst rel. error {max(errs):.2e}", flush=True)
    return {"M": 1, "config": None, "path": "vector decode kernel, rank 0, chained after a slow producer",
            "rel_err": max(errs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--expect-race", action="store_true")
    args = ap.parse_args()
    if not tg.pdl_usable(0):
        raise SystemExit("PDL is not in use on this device (sm_90+ and TWINQUANT_PDL unset needed)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    slow_down, trigger = tg.lowrank_down, tg.pdl_trigger
    tg.lowrank_down = lambda x, down, num_splits=None, **kw: slow_down(x, down, 1, **kw)
    tg.pdl_trigger = lambda m, n, k, r: 1  # PDL on every path, also where the dispatch leaves it off
    recs = []
    for m, cfg, what in CASES:
        if cfg is not None and cfg[6] == 9 and not mode8_available():
            continue
        errs = []
        for _ in range(3):
            x, qw, sc, down, up, b, scales, ref = fresh_case(m, K, N, RANK, torch.bfloat16, gen)
            out = torch.full((m, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            tg.tq_gemm(x, qw, sc, 128, down, up, b, out=out, config=cfg)
            torch.cuda.synchronize()
            e = ((out.float() - ref).norm() / ref.norm()).item()
            errs.append(float("inf") if e != e else e)
        recs.append({"M": m, "config": cfg, "path": what, "rel_err": max(errs)})
        print(f"M={m:4d} {what:45s} worst rel. error {max(errs):.2e}", flush=True)
    tg.lowrank_down, tg.pdl_trigger = slow_down, trigger
    if tg._GEMV_CHAIN:
        recs.append(chained_check(gen))
    ok = all(r["rel_err"] <= 1e-2 for r in recs)
    os.makedirs(args.out, exist_ok=True)
    name = "pdl_check_race.json" if args.expect_race else "pdl_check.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "K": K, "N": N, "rank": RANK, "records": recs,
                   "all_within_1e-2": ok}, f, indent=1)
    if ok == args.expect_race:
        raise SystemExit("a race went unseen" if args.expect_race else "MISMATCH: t read before it was complete")


if __name__ == "__main__":
    main()
