"""Does the residual kernel really wait for the down projection? (GPU, sm_90+)

    python3 benchmarks/kernels/pdl_check.py [--out DIR] [--expect-race]

With programmatic dependent launch (`csrc_triton.dispatch.pdl_usable`) the residual kernel starts
while the down projection t = x @ D^T still runs, and only its epilogue waits for t
(`griddepcontrol.wait`). A wait in the wrong place would pass ordinary checks, because the
down projection is short and is usually done in time. Here it is made slow on purpose: one
program per rank tile walks all of K (`lowrank_down(..., num_splits=1)`, K = 14336). Each
kernel (gemv, mma_decode, tile with and without split-K, wgmma_rs) then runs with PDL against a
float32 reference, output NaN-poisoned; a t read too early is the uninitialised workspace or
zeros, several percent off or NaN.
Exit status 1 on a mismatch; --expect-race inverts it (the negative control, run on a copy of
the kernels with the wait removed, must fail).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from common import fresh_case  # noqa: E402

import csrc_triton as ct  # noqa: E402
from csrc_triton import dispatch, layer  # noqa: E402
from csrc_triton.kernels.gemv import GemvConfig  # noqa: E402
from csrc_triton.kernels.mma_decode import MmaConfig  # noqa: E402
from csrc_triton.kernels.tile import TileConfig  # noqa: E402
from csrc_triton.kernels.wgmma_rs import RsConfig  # noqa: E402

K, N, RANK = 14336, 4096, 128
CASES = [  # (M, forced config, what runs)
    (1, GemvConfig(1, 4, 256, 2, 2, 1), "gemv"),
    (8, MmaConfig(1, 8, 8), "mma_decode"),
    (64, MmaConfig(2, 4, 16, 64), "mma_decode, 64 tokens per program"),
    (100, TileConfig(64, 64, 128, 8, 3, 1, 7), "tile MODE 7"),
    (100, TileConfig(64, 64, 128, 8, 3, 4, 7), "tile MODE 7, split-K 4"),
    (200, RsConfig(256, 128, 8, 4, 4), "wgmma_rs"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--expect-race", action="store_true")
    args = ap.parse_args()
    device = ct.Device.of(torch.device("cuda"))
    if not dispatch.pdl_usable(device):
        raise SystemExit("PDL is not in use on this device (sm_90+ and pdl not in TWINQUANT_DISABLED_KERNELS)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    slow_down, trigger = layer.lowrank_down, dispatch.pdl_trigger
    layer.lowrank_down = lambda x, down, num_splits=None, **kw: slow_down(x, down, 1, **kw)
    dispatch.pdl_trigger = lambda *args: 1  # PDL on every path, also where the table leaves it off
    recs = []
    for m, cfg, what in CASES:
        if not dispatch.kernels()[layer.config_kernel(cfg)].can_implement(ct.LayerShape(N, K, 128, RANK), device)[0]:
            continue
        errs = []
        for _ in range(3):
            x, qw, sc, down, up, b, scales, ref = fresh_case(m, K, N, RANK, torch.bfloat16, gen)
            out = torch.full((m, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            ct.gemm(x, qw, sc, 128, down, up, b, out=out, config=cfg)
            torch.cuda.synchronize()
            e = ((out.float() - ref).norm() / ref.norm()).item()
            errs.append(float("inf") if e != e else e)
        recs.append({"M": m, "config": vars(cfg), "path": what, "rel_err": max(errs)})
        print(f"M={m:4d} {what:45s} worst rel. error {max(errs):.2e}", flush=True)
    layer.lowrank_down, dispatch.pdl_trigger = slow_down, trigger
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
