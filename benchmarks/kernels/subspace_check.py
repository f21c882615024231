"""W4A4 layers with ResQ's 8-bit subspace on the CUDA kernels, one GPU, no vLLM: the plugin's layer kernel
(`TritonTwinQuantKernel`: the first K - S columns' 4-bit codes on the INT8 kernels, then one GEMM for the low-rank
term and the subspace) against a float64 reference of the format, and its time against the same layer read as
plain W4A4 and as W4A16, on Llama-3-8B's merged q/k/v and gate/up (random weights, rank 64, group 128, S = 128,
inputs with outliers in the subspace's columns).

    python benchmarks/kernels/subspace_check.py --out $OUT     # needs torch, Triton, compressed-tensors

Up to 16 tokens the plan gives W4A4 layers the W4A16 kernels on unquantized inputs (README's limits), so there the
output is checked against the reference with 16-bit main columns (the subspace still at 8 bits), above against the
4-bit one. Times: CUDA events around a CUDA graph of 20 calls, median of 7 replays. Writes subspace_check_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from vllm_twinquant import format as fmt  # noqa: E402
from vllm_twinquant import kernels as K  # noqa: E402

SHAPES = {"qkv_proj": (4096, (4096, 1024, 1024)), "gate_up_proj": (4096, (14336, 14336))}
MS = (1, 16, 17, 64, 256, 1024, 4096)
SMALL_M = 16  # the plan's W4A16 range for W4A8/W4A4 layers
RANK, GROUP, SUB, CLIP = 64, 128, 128, 0.8


def tensors(k: int, n: int, slots: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    return {"weight_packed": fmt.pack_codes(codes),
            "weight_scale": (torch.rand(n, k // GROUP, generator=gen) * 0.004 + 0.001).half(),
            "lowrank_down": (torch.randn(slots * RANK, k, generator=gen) * 0.02).bfloat16(),
            "lowrank_up": (torch.randn(n, RANK, generator=gen) * 0.02).bfloat16()}


def layer_of(t: dict[str, torch.Tensor], c: K.TwinQuantLayerConfig) -> tuple[torch.nn.Module, K.TwinQuantKernel]:
    layer = torch.nn.Module()
    for name, v in t.items():
        setattr(layer, name, torch.nn.Parameter(v.clone().cuda(), requires_grad=False))
    kernel = K.TritonTwinQuantKernel(c)
    kernel.process_weights_after_loading(layer)
    return layer, kernel


def dense_float64(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's deq(R), D and U in float64 on the GPU, once per shape for every M's reference."""
    w = fmt.dequantize_residual(t["weight_packed"].cuda(), t["weight_scale"].cuda(), GROUP, torch.float64)
    return w, t["lowrank_down"].cuda().double(), t["lowrank_up"].cuda().double()


def reference(dense, c: K.TwinQuantLayerConfig, x: torch.Tensor, quantized_main: bool) -> torch.Tensor:
    """float64: the residual on [codes of x's first K - S columns (or those columns as they are), q8(x_S)], the
    low-rank term per slot on x."""
    w, down, up = dense
    k_main = c.in_features - SUB
    xf = x.float()
    main = fmt.quantize_activations(xf[:, :k_main], 4, CLIP) if quantized_main else xf[:, :k_main]
    xr = torch.cat([main, fmt.quantize_activations(xf[:, k_main:], 8, 1.0)], 1).double()
    y = xr @ w.T
    lo = 0
    for s, size in enumerate(c.slot_sizes):
        y[:, lo:lo + size] += (x.double() @ down[s * RANK:(s + 1) * RANK].T) @ up[lo:lo + size].T
        lo += size
    return y


def time_us(fn) -> float:
    """GPU time of one call as vLLM serves it (20 calls captured in one CUDA graph, so the host's launch
    overhead, which dominates an eager call up to ~1,000 tokens, is not counted)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    runs = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        runs.append(a.elapsed_time(b) * 1000 / 20)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    rec = {"device": dev, "torch": torch.__version__, "rank": RANK, "group_size": GROUP, "subspace": SUB,
           "activation_clip": CLIP, "timing": "cuda_graph",
           "command": "python benchmarks/kernels/subspace_check.py --out $OUT",
           "rows": []}
    ok = True
    for i, (name, (k, slots)) in enumerate(SHAPES.items()):
        n = sum(slots)
        t = tensors(k, n, len(slots), seed=i)
        c = K.TwinQuantLayerConfig(in_features=k, slot_sizes=slots, rank=RANK, group_size=GROUP,
                                   act_dtype=torch.bfloat16, activation_bits=4, activation_clip=CLIP,
                                   activation_subspace=SUB, name=name)
        sub = layer_of(t, c)
        plain = layer_of(t, dataclasses.replace(c, activation_subspace=0))
        w16 = layer_of(t, dataclasses.replace(c, activation_bits=16, activation_clip=1.0, activation_subspace=0))
        dense = dense_float64(t)
        gen = torch.Generator(device="cuda").manual_seed(100 + i)
        for m in MS:
            x = torch.randn(m, k, device="cuda", generator=gen) * torch.rand(m, 1, device="cuda", generator=gen) * 2
            x[:, k - SUB:] *= 30
            x = x.bfloat16()
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            y.copy_(sub[1].apply(sub[0], x, None))
            errs = {}
            for key, q in (("vs_4bit_reference", True), ("vs_16bit_main_reference", False)):
                ref = reference(dense, c, x, q)
                errs[key] = ((y.double() - ref).norm() / ref.norm()).item()
            want = "vs_16bit_main_reference" if m <= SMALL_M else "vs_4bit_reference"
            good = not torch.isnan(y).any().item() and errs[want] <= 1e-2 and errs[want] < min(errs.values()) * 1.01
            ok &= good
            row = {"layer": name, "k": k, "n": n, "m": m, **{k2: round(v, 6) for k2, v in errs.items()},
                   "expected": want, "ok": good}
            for label, (lay, ker) in (("subspace", sub), ("plain_w4a4", plain), ("w4a16", w16)):
                row[f"{label}_us"] = round(time_us(lambda lay=lay, ker=ker, x=x: ker.apply(lay, x, None)), 2)
            row["subspace_over_plain"] = round(row["subspace_us"] / row["plain_w4a4_us"], 3)
            print(json.dumps(row), flush=True)
            rec["rows"].append(row)
    rec["passed"] = ok
    os.makedirs(args.out, exist_ok=True)
    tag = dev.replace(" ", "_")
    with open(os.path.join(args.out, f"subspace_check_{tag}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    if not ok:
        raise SystemExit("MISMATCH: see the rows above")
    print("subspace check passed")


if __name__ == "__main__":
    main()
