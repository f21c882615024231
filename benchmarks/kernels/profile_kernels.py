"""Runs the decode (M=1) and tile (M=16) kernels on gate_up (4096->28672), three launches each,
for profiling on the GPU host. How benchmarks/results/profiles/ was made:

    TRITON_CACHE_DIR=/tmp/tc python3 benchmarks/kernels/profile_kernels.py --sass 1   # list compiled kernels
    cuobjdump -res-usage /tmp/tc/*/_tq_*.cubin                                           # registers per kernel
    ncu --kernel-name regex:_tq_ --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 benchmarks/kernels/profile_kernels.py
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
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    k, n = 4096, 28672
    qw = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32, generator=gen)
    sc = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.01 + 0.002).half()
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3):
            tg.tq_gemm(x, qw, sc, 128)
    torch.cuda.synchronize()
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
