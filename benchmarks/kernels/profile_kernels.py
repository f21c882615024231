"""Runs one layer's kernels at the given token counts, a few calls each, for profiling on the GPU host
(ncu, nsys, or cuobjdump on Triton's cache). The plan picks the kernels; TWINQUANT_DISABLED_KERNELS
steers it (e.g. `wgmma_rs` to profile what runs instead).

    ncu --kernel-name regex:_tq_ --launch-skip 1 --launch-count 2 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python3 benchmarks/kernels/profile_kernels.py --n 28672 --k 4096 --ms 1 16 --rank 64
    (--act-quant int8 [--rs TOKENS WARPS STAGES | --ws FIELD=VALUE..]: a W4A8 layer, a Gluon INT8 kernel forced
     with that config, e.g. --ws tokens=128 stages=6 persistent=1 convert=bias; --fp8: also FP8 W8A8's
     torch._scaled_mm of each M, rowwise scales; --no-layer: not the TwinQuant layer itself)
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import make_layer  # noqa: E402

import csrc_triton as ct  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--calls", type=int, default=3, help="calls per M (after one warm-up call)")
    ap.add_argument("--bf16", action="store_true", help="also run the BF16 torch.mm of each M (cuBLAS)")
    ap.add_argument("--fp8", action="store_true", help="also run FP8 W8A8's torch._scaled_mm of each M (cuBLAS)")
    ap.add_argument("--act-quant", default="none", choices=("none", "fp8", "int8"))
    ap.add_argument("--rs", type=int, nargs=3, metavar=("TOKENS", "WARPS", "STAGES"),
                    help="force the w4a8_rs kernel with this config (INT8 layers)")
    ap.add_argument("--ws", nargs="+", metavar="FIELD=VALUE",
                    help="force the w4a8_ws kernel with this config (W4a8WsConfig's fields; INT8 layers)")
    ap.add_argument("--no-layer", action="store_true", help="run only the peers' GEMMs (--bf16, --fp8)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    qw, sc, down, up = make_layer(args.k, args.n, args.rank, torch.bfloat16, gen)
    qw = ct.repack(qw, 128)
    w = torch.randn(args.n, args.k, device="cuda", dtype=torch.bfloat16, generator=gen) if args.bf16 else None
    w8 = torch.randn(args.n, args.k, device="cuda", generator=gen).to(torch.float8_e4m3fn) if args.fp8 else None
    device = ct.Device.of(torch.device("cuda"))
    config = None
    if args.rs:
        from csrc_triton.kernels.w4a8_rs import W4a8RsConfig

        config = W4a8RsConfig(*args.rs)
    if args.ws:
        config = ws_config(args.ws)
    for m in args.ms:
        x = torch.randn(m, args.k, device="cuda", dtype=torch.bfloat16, generator=gen)
        p = ct.plan(ct.LayerShape(args.n, args.k, 128, args.rank, act_quant=args.act_quant), m, device)
        print(f"M={m}: {p.kernel if config is None else ct.layer.config_kernel(config)} "
              f"{vars(p.config if config is None else config)}", flush=True)
        x8 = x.to(torch.float8_e4m3fn) if args.fp8 else None
        ones_m = torch.ones(m, 1, device="cuda")
        ones_n = torch.ones(1, args.n, device="cuda")
        for _ in range(args.calls + 1):
            if not args.no_layer:
                ct.linear(x, qw, sc, 128, down, up, config=config, act_quant=args.act_quant)
            if w is not None:
                torch.mm(x, w.t())
            if w8 is not None:
                torch._scaled_mm(x8, w8.t(), ones_m, ones_n, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()


def ws_config(fields: list[str]):
    """W4a8WsConfig from FIELD=VALUE words, each value parsed as its field's type."""
    import dataclasses

    from csrc_triton.kernels.w4a8_ws import W4a8WsConfig

    types = {f.name: f.type for f in dataclasses.fields(W4a8WsConfig)}
    kw = {}
    for word in fields:
        name, _, value = word.partition("=")
        if name not in types:
            raise SystemExit(f"--ws {word}: W4a8WsConfig has the fields {sorted(types)}")
        kw[name] = value if types[name] == "str" else (value not in ("0", "false", "False")
                                                       if types[name] == "bool" else int(value))
    return W4a8WsConfig(**kw)


if __name__ == "__main__":
    main()
