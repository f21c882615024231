"""The large-M path on a layer wider than its transient cap: Llama-3-8B's lm_head (4096 -> 128256, 1 GB of
bf16 weights) at the token counts vLLM gives a head under batching (one row per sequence), made whole and
in row ranges (`csrc_triton.kernels.base.TRANSIENT_BYTES`), and the fused kernels that make no transient copy
(`--fused`: wgmma_rs and the tile kernel forced at the same M, the question being where the head's plan should
leave them). Per (M, rank, path) it records the relative error against float32, the peak memory the call adds
to its operands, and the time of one call (CUDA-graph replays, unless --no-time); BF16's matmul of the same shape
beside. On a GPU, no vLLM needed:

    python benchmarks/kernels/wide_layer.py --out DIR [--ms 257 512 2048] [--fused wgmma_rs tile] [--no-time]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_ms, make_layer, reference, save_records  # noqa: E402

import csrc_triton as ct  # noqa: E402
from csrc_triton.kernels import base  # noqa: E402
from csrc_triton.kernels.tile import TileConfig  # noqa: E402
from csrc_triton.kernels.wgmma_rs import RsConfig  # noqa: E402

K, N, GROUP = 4096, 128256, 128
UNCAPPED = 1 << 62
# the fused kernels timed beside the large-M path: each forced with the config its table gives the widest layer it has
FUSED = {"wgmma_rs": RsConfig(tokens=256, block_n=128, warps=8, stages=4, split_k=1),
         "tile": TileConfig(block_m=128, block_n=128, block_k=64, warps=8, stages=4, split_k=1, mode=7)}


def run_case(x, layer, cap: int, timed: bool, fused: str | None = None) -> tuple[dict, torch.Tensor]:
    qw, sc, down, up = layer
    base.TRANSIENT_BYTES = cap
    out = torch.empty(x.shape[0], N, device="cuda", dtype=x.dtype)
    if fused:
        call = lambda: ct.gemm(x, qw, sc, GROUP, down, up, config=FUSED[fused], out=out)  # noqa: E731
    else:
        call = lambda: ct.linear(x, qw, sc, GROUP, down, up, large_m_threshold=0, out=out)  # noqa: E731
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    rec = {"path": fused or "dequant_cublas", "cap_bytes": None if cap == UNCAPPED or fused else cap,
           "ranges": 1 if fused else len(_ranges(x, qw)),
           "transient_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    if timed:
        rec["ms"] = graph_time_ms([call])
    return rec, out


def _ranges(x, qw):
    a = base.Launch(x, qw, None, None, None, None, None, None, None, GROUP, base.NO_BOUNDARY, base.NO_BOUNDARY,
                    256, False, lambda: (None, 0))
    return a.row_ranges(x.element_size())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", type=int, nargs="+", default=[257, 512, 2048])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--fused", nargs="*", choices=sorted(FUSED), default=sorted(FUSED),
                    help="fused kernels timed at the same M (default: %(default)s)")
    ap.add_argument("--no-time", action="store_true", help="errors and memory only (beside other GPU work)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0, default_cap = time.time(), base.TRANSIENT_BYTES
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "k": K, "n": N, "group": GROUP,
            "default_cap_bytes": default_cap, "timed": not args.no_time,
            "command": "python benchmarks/kernels/wide_layer.py " + " ".join(sys.argv[1:])}
    recs = []
    for r in args.ranks:
        qw, sc, down, up = make_layer(K, N, r, torch.bfloat16, gen)
        layer = (ct.repack(qw, GROUP), sc, down, up)
        for m in args.ms:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = reference(x, qw, sc, down, up)
            bf16 = None
            if not args.no_time:
                w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen)
                bf16 = graph_time_ms([lambda x=x, w=w: x @ w.t()])
                del w
            for cap, fused in [(default_cap, None), (UNCAPPED, None), *((default_cap, f) for f in args.fused)]:
                rec, out = run_case(x, layer, cap, not args.no_time, fused)
                rec.update(m=m, rank=r, rel_err=((out.float() - ref).norm() / ref.norm()).item(), bf16_ms=bf16)
                recs.append(rec)
                print(rec, flush=True)
                del out
            del ref
            save_records(args.out, "wide_layer", meta, recs)
        del qw, sc, down, up, layer
    base.TRANSIENT_BYTES = default_cap
    print(save_records(args.out, "wide_layer", meta, recs, t0))


if __name__ == "__main__":
    main()
