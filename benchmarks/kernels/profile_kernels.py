"""Runs the kernels of one layer (default gate_up, 4096->28672, g128) at the given token counts,
three calls each, for profiling on the GPU host. How benchmarks/results/profiles/ was made:

    TRITON_CACHE_DIR=/tmp/tc python3 benchmarks/kernels/profile_kernels.py --sass 1   # list compiled kernels
    cuobjdump -res-usage /tmp/tc/*/_tq_*.cubin                                           # registers per kernel
    ncu --kernel-name regex:_tq_ --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 benchmarks/kernels/profile_kernels.py
    # v3 (tile kernel MODE 4 at M=16, MODE 0 at M=64/256, rank 64, beside cuBLAS):
    ncu --profile-from-start off --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats \
        python3 benchmarks/kernels/profile_kernels.py --ms 1 16 64 256 --rank 64 --calls 1 --bf16
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from csrc_triton import twinquant_gemm as tg  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", default=None, help="any value: list the compiled _tq_ kernels in TRITON_CACHE_DIR")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--calls", type=int, default=3, help="calls per M (after one warm-up call)")
    ap.add_argument("--bf16", action="store_true", help="also run the BF16 torch.mm of each M (cuBLAS) for comparison")
    ap.add_argument("--config", type=int, nargs="+", action="append", default=None, metavar="C",
                    help="launch configuration as tq_gemm takes it (3 numbers: the tensor-core decode kernel, "
                         "5 or 6: the vector decode kernel, 7: the tile kernel); repeatable: each is run in turn at "
                         "every M instead of the dispatch's choice")
    args = ap.parse_args()
    cfgs = [tuple(c) for c in args.config] if args.config else [None]
    gen = torch.Generator(device="cuda").manual_seed(0)
    k, n, r = args.k, args.n, args.rank
    qw = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32, generator=gen)
    sc = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.01 + 0.002).half()
    down = (torch.randn(r, k, device="cuda", generator=gen) * 0.02).bfloat16() if r else None
    up = (torch.randn(n, r, device="cuda", generator=gen) * 0.02).bfloat16() if r else None
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) if args.bf16 else None
    xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) for m in args.ms}
    for m in args.ms:  # warm-up: compile everything before the profiled launches
        for cfg in cfgs:
            tg.tq_gemm(xs[m], qw, sc, 128, down, up, config=cfg)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # with `ncu --profile-from-start off`: only what follows is profiled
    for m in args.ms:
        for _ in range(args.calls):
            for cfg in cfgs:
                tg.tq_gemm(xs[m], qw, sc, 128, down, up, config=cfg)
            if w is not None:
                torch.mm(xs[m], w.t())
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    if args.sass:  # compiled artefacts are in TRITON_CACHE_DIR; summarise register use there
        import glob
        import json

        for meta in glob.glob(os.path.join(os.environ.get("TRITON_CACHE_DIR", ""), "*", "*.json")):
            with open(meta) as f:
                d = json.load(f)
            if d.get("name", "").startswith("_tq_"):
                print(d["name"], {k: d.get(k) for k in ("num_warps", "num_stages", "shared")}, os.path.dirname(meta))


if __name__ == "__main__":
    main()
