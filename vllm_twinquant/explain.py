"""Which CUDA kernel runs a TwinQuant layer for every token count, and with which launch config.

    python -m vllm_twinquant.explain --k 4096 --n 28672 --rank 64 --device h100
    python -m vllm_twinquant.explain --k 4096 --n 6144 --slots 4096,5120 --rank 64 --configs
    python -m vllm_twinquant.explain --k 14336 --n 4096 --rank 64 --activations fp8
    python -m vllm_twinquant.explain --k 4096 --n 28672 --slots 14336 --rank 64 --activations int4 --subspace 128

Prints the ranges of M that share a kernel (with --configs: a launch configuration), as
`csrc_triton.dispatch` decides them for that device's table (a device without one gets the nearest,
as at serving time), honouring TWINQUANT_DISABLED_KERNELS. Needs Triton, not a GPU.
"""

from __future__ import annotations

import argparse

DEVICES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vllm_twinquant.explain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, required=True, help="input features (this tensor-parallel rank's)")
    ap.add_argument("--n", type=int, required=True, help="output features (all slots of a merged layer)")
    ap.add_argument("--rank", type=int, default=0, help="low-rank width (default: %(default)s)")
    ap.add_argument("--group-size", type=int, default=128, help="residual group size (default: %(default)s)")
    ap.add_argument("--slots", default="", help="first output row of slots 1 and 2 of a merged layer, e.g. 4096,5120")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activations (default: %(default)s)")
    ap.add_argument("--activations", choices=["16", "fp8", "int8", "int4"], default="16",
                    help="the residual product's input as the checkpoint declares it: 16, fp8, int8 or int4 (W4A4)")
    ap.add_argument("--subspace", type=int, default=0,
                    help="W4A4 with ResQ's subspace of this many last input columns: the kernel runs the first K - S")
    ap.add_argument("--device", default="h100",
                    help="h100, h200 or a CUDA device name as torch reports it (default: %(default)s)")
    ap.add_argument("--capability", default="9.0", help="compute capability of that device (default: %(default)s)")
    ap.add_argument("--triton", default="3.6.0", help="Triton version assumed there (default: %(default)s)")
    ap.add_argument("--configs", action="store_true", help="also print each range's launch configuration")
    args = ap.parse_args(argv)
    if args.subspace and args.activations != "int4":
        ap.error("--subspace takes --activations int4")

    import torch

    from csrc_triton import Device, LayerShape, ranges, tables_for
    from csrc_triton.kernels.base import row_ranges

    major, minor = (int(v) for v in args.capability.split("."))
    device = Device.named(DEVICES.get(args.device, args.device), (major, minor), args.triton)
    slots = tuple(int(v) for v in args.slots.split(",") if v)
    k, rank = args.k - args.subspace, 0 if args.subspace else args.rank  # as the plugin's _residual_config
    shape = LayerShape(args.n, k, args.group_size, rank, slots, getattr(torch, DTYPES[args.dtype]),
                       act_quant="none" if args.activations == "16" else args.activations)
    tables = tables_for(device.name, device.capability)
    print(f"{shape.k} -> {shape.n}, rank {shape.rank}, group {shape.group_size}, slots {list(slots) or 'none'}, "
          f"{args.dtype}, activations {args.activations} on {device.name} (sm_{major}{minor}, Triton {args.triton}); "
          f"table {tables.path}")
    if args.subspace:
        print(f"  ResQ subspace: the kernel below runs the first {k} input columns at rank 0; one GEMM then adds "
              f"[x D^T, q8(x_S)] of width {(len(slots) + 1) * args.rank + args.subspace}")
    for lo, hi, label in ranges(shape, device, tables, with_config=args.configs):
        span = f"M = {lo}" if lo == hi else f"M = {lo}-{hi}"
        transient = {"dequant_cublas": shape.dtype.itemsize, "fp8_cublas": 1}.get(label.split()[0])
        if transient:  # the large-M paths' transient weights, made whole or in row ranges
            parts = len(row_ranges(shape.k, (0, *slots, shape.n), transient))
            label += f" (transient weights {shape.n * shape.k * transient / 2**20:,.0f} MiB" + (
                f", made in {parts} row ranges)" if parts > 1 else ")")
        print(f"  {span:16s} {label}")


if __name__ == "__main__":
    main()
