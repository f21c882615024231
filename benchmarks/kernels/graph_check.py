"""The plugin's custom op (torch.ops.twinquant.linear) under CUDA graphs and torch.compile, on the GPU.

    python3 benchmarks/kernels/graph_check.py [--out DIR] [--tag h200]

vLLM captures decode steps in CUDA graphs (and compiles the model with torch.compile); the
Gluon kernels keep state between calls (their split-K scratch and tickets must be all zero again
after every call). For batches of M = 1, 2, 4, 9, 16, 24, 64, 100, 200, 300 tokens (300: the
large-M path, transient weights with the low-rank part folded in + cuBLAS) on merged q/k/v
(slots) and gate/up shapes, rank 0 and 64, the op is captured in one CUDA graph, replayed five
times with fresh inputs copied into the captured buffer, and each replay's output is compared
with a float32 reference; at M = 4 and rank 64 also through torch.compile(fullgraph=True,
mode="reduce-overhead"). Fails (exit != 0) on a relative error > 1e-2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from common import make_layer, reference  # noqa: E402

import csrc_triton as ct  # noqa: E402
import vllm_twinquant.kernels  # noqa: E402, F401  (registers torch.ops.twinquant.linear)

CASES = [("qkv", 4096, 6144, (4096, 5120)), ("o", 4096, 4096, ()), ("gate_up", 4096, 28672, (14336,)),
         ("down", 14336, 4096, ())]


def rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h200")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    recs, worst = [], 0.0
    for (name, k, n, bounds), m, r in [
        (c, m, r) for c in CASES for m in (1, 2, 4, 9, 16, 24, 64, 100, 200, 300) for r in (0, 64)
    ]:
        qw, sc, down, up = make_layer(k, n, r, dtype, gen, 128, len(bounds) + 1)
        qwr = ct.repack(qw, 128)
        op = torch.ops.twinquant.linear

        def f(x, qwr=qwr, sc=sc, down=down, up=up, bounds=bounds, op=op):
            return op(x, qwr, sc, down, up, None, 128, list(bounds))

        xs = [torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) for _ in range(5)]
        refs = [reference(x, qw, sc, down, up, 128, bounds) for x in xs]
        x_static = xs[0].clone()
        f(x_static)  # warm-up (compiles, allocates the scratch) outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = f(x_static)
        errs = []
        for x, ref in zip(xs, refs):
            x_static.copy_(x)
            y_static.fill_(float("nan"))
            g.replay()
            errs.append(rel(y_static, ref))
        cerrs = []
        if m == 4 and r == 64:  # torch.compile once per shape (each compile takes a while)
            fc = torch.compile(f, fullgraph=True, mode="reduce-overhead")
            for x, ref in zip(xs, refs):
                cerrs.append(rel(fc(x).clone(), ref))
            del fc
        p = ct.plan(ct.LayerShape(n, k, 128, r, bounds, dtype), m, ct.Device.of(x_static.device))
        cfg = f"{p.kernel} {vars(p.config)}"
        rec = {"name": name, "M": m, "rank": r, "kernel": p.kernel, "config": vars(p.config), "graph_rel_err": errs,
               "compiled_rel_err": cerrs}
        recs.append(rec)
        worst = max(worst, *errs, *cerrs)
        print(f"{name:8s} M={m:3d} r={r:2d} {cfg}: graph replays {max(errs):.2e}"
              + (f", torch.compile {max(cerrs):.2e}" if cerrs else ""), flush=True)
        if not max(errs + cerrs) <= 1e-2:
            raise SystemExit(f"MISMATCH {rec}")
        del g
    print(f"worst {worst:.2e} over {len(recs)} cases x 5 replays")
    with open(os.path.join(args.out, f"graph_check_{args.tag}.json"), "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
                   "worst_rel_err": worst, "records": recs}, fh, indent=1)


if __name__ == "__main__":
    main()
