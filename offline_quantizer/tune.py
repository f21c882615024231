"""Block reconstruction with quantization in the loop (`--tune-epochs`, docs/method.md section 4).

After every linear layer of a decoder block has been decomposed (codes, group scales, low-rank
factors), the block's continuous parameters are tuned so that the block, as it will be served,
reproduces the dense model's block output:

    min  || block_q(X_q) - block(X) ||^2 / || block(X) ||^2          (loss "tensor", the default)

From SmolLM2's block 12 on, the first token carries a massive activation (norm ~21,600 against a
median of ~140: 99.5% of the squared sum), so this loss mostly tunes that token. Loss "token",
mean_t || block_q(X_q)_t - block(X)_t ||^2 / || block(X)_t ||^2, weighs every token alike (the
next block sees each token through an RMSNorm); it measured slightly worse on SmolLM2 (held-out
perplexity 17.26 vs 17.12, docs/method.md), so it is an option, not the default.

X_q: what enters the block in the partly quantized model (earlier blocks quantized), X: what
enters it in the dense model, so the tuning also absorbs the error that earlier blocks pass on.
Tuned: group scales (scale = scale0 * exp(a)), both low-rank factors, the norm weights
(gamma = gamma0 * exp(b)). The 4-bit codes stay GPTQ's, so the served weight is a smooth
function of everything tuned. (Tuning the codes too, through a latent residual rounded with a
straight-through estimator, lowered the held-out error less on SmolLM2's first blocks and
flipped almost no codes; it is not kept.) With 4-bit activations the residual product sees
per-token fake-quantized inputs in the loop (straight-through rounding).
Adam with a cosine-decayed rate; the last calibration batch is held out, and the parameters with
the lowest held-out loss (measured with everything rounded to its stored dtype, the start
included) are kept, so tuning never makes that loss worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from offline_quantizer.decompose import Decomposed, group_dequantize
from vllm_twinquant.format import quantize_activations, round_lowrank


@dataclass
class TuneResult:
    heldout_start: float  # held-out relative MSE before tuning
    heldout_end: float  # ... with the kept parameters, rounded to the stored dtypes
    steps: int


TUNE_LOSSES = ("token", "tensor")


def _relative_mse(out: torch.Tensor, target: torch.Tensor, loss: str = "tensor") -> torch.Tensor:
    if loss == "tensor":
        return torch.mean((out - target) ** 2) / torch.mean(target**2).clamp_min(1e-30)
    err = torch.sum((out - target) ** 2, dim=-1)
    return torch.mean(err / torch.sum(target**2, dim=-1).clamp_min(1e-30))


def tune_block(
    block: torch.nn.Module,
    decomposed: dict[str, Decomposed],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    kwargs_list: list[dict],
    epochs: int,
    lr: float = 1e-3,
    norms: dict[str, float] | None = None,
    norm_dtype: torch.dtype | None = None,
    activation_bits: dict[str, int] | None = None,
    activation_clip: float = 1.0,
    loss: str = "tensor",
    activation_subspace: dict[str, int] | None = None,
    activation_subspace_bits: int = 8,
    activation_type: str = "int",
) -> TuneResult:
    """Tune `decomposed` (name -> Decomposed of block.get_submodule(name)) in place, and the
    block's norms (`norms`: name -> the family's norm offset, the norm scaling by offset + weight;
    the scale is tuned as scale0 * exp(b)), on (inputs -> targets). At the end the block's linear weights are the
    served weights. norm_dtype: the dtype the norm weights are stored in. activation_bits:
    name -> bits of the residual product's input (16, 8 or 4), quantized as `activation_type`
    codes ("float": FP8 e4m3) with `activation_clip` (format: activation_clip_ratio);
    activation_subspace: name -> how many last input columns are quantized apart at
    activation_subspace_bits (format: activation_subspace_*). loss: "token" (relative error per
    token, averaged) or "tensor" (over the whole output). Needs at least two batches (the last one is held out)."""
    if loss not in TUNE_LOSSES:
        raise ValueError(f"tune loss {loss!r}: expected one of {TUNE_LOSSES}")
    if len(inputs) < 2:
        raise ValueError("block tuning needs at least 2 calibration batches (one is held out); raise --nsamples")
    names = list(decomposed)
    dev = inputs[0].device
    norm_dtype = norm_dtype or torch.float32
    abits = activation_bits or {}
    subspace = activation_subspace or {}
    codes = {n: decomposed[n].codes.to(dev, torch.float32) for n in names}
    s0 = {n: decomposed[n].scales.to(dev, torch.float32) for n in names}
    tuned: dict[str, torch.Tensor] = {}  # key -> leaf tensor
    groups = []
    for n in names:
        d = decomposed[n]
        tuned[f"{n}/a"] = torch.zeros_like(s0[n], requires_grad=True)
        groups.append({"params": [tuned[f"{n}/a"]], "lr": lr})
        if d.up is not None:  # Adam moves each entry ~lr per step: scale the rate to each factor
            for key, t in (("up", d.up), ("down", d.down)):
                p = t.to(dev, torch.float32).clone().requires_grad_(True)
                tuned[f"{n}/{key}"] = p
                groups.append({"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt())})
    offsets = {
        n: off for n, off in (norms or {}).items() if getattr(block.get_submodule(n), "weight", None) is not None
    }
    norms = list(offsets)
    g0 = {n: block.get_submodule(n).weight.detach().to(dev, torch.float32).clone() + offsets[n] for n in norms}
    for n in norms:
        tuned[f"{n}/b"] = torch.zeros_like(g0[n], requires_grad=True)
        groups.append({"params": [tuned[f"{n}/b"]], "lr": lr})
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in opt.param_groups]

    def layer_params(n: str, stored: bool):
        """(scales, up, down) as served (stored=True: rounded to the stored dtypes)."""
        d = decomposed[n]
        s = s0[n] * torch.exp(tuned[f"{n}/a"])
        up, down = tuned.get(f"{n}/up"), tuned.get(f"{n}/down")
        if stored:
            s = s.to(d.scales.dtype).float()
            if up is not None:
                up, down = (f.float() for f in round_lowrank(up, down, d.lowrank_dtype))
        return s, up, down

    def linear_forward(n: str, lin: torch.nn.Linear, stored: bool):
        def fwd(x):
            s, up, down = layer_params(n, stored)
            w = group_dequantize(codes[n], s)
            xr = x
            if abits.get(n, 16) < 16:
                xq = quantize_activations(x, abits[n], activation_clip, subspace.get(n, 0), activation_subspace_bits,
                                          activation_type)
                xr = x + (xq - x).detach()
            y = xr @ w.t()
            if up is not None:
                y = y + (x @ down.t()) @ up.t()
            return y if lin.bias is None else y + lin.bias
        return fwd

    def run(x, kw, stored: bool):
        lins = {n: block.get_submodule(n) for n in names}
        for n, lin in lins.items():
            lin.forward = linear_forward(n, lin, stored)
        try:
            gam = {}
            for n in norms:
                w = g0[n] * torch.exp(tuned[f"{n}/b"]) - offsets[n]
                gam[f"{n}.weight"] = w.to(norm_dtype).float() if stored else w
            out = functional_call(block, gam, (x,), kw)
        finally:
            for lin in lins.values():
                del lin.forward
        return out[0] if isinstance(out, (tuple, list)) else out

    def heldout() -> float:
        with torch.no_grad():
            return float(_relative_mse(run(inputs[-1], kwargs_list[-1], True), targets[-1], loss))

    start = heldout()
    best = (start, {k: t.detach().clone() for k, t in tuned.items()})
    train = list(range(len(inputs) - 1))
    total = max(epochs * len(train), 1)
    step = 0
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(epochs):
            for j in torch.randperm(len(train), generator=gen).tolist():
                for g, b in zip(opt.param_groups, base_lr):
                    g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / total))
                err = _relative_mse(run(inputs[j], kwargs_list[j], False), targets[j], loss)
                opt.zero_grad(set_to_none=True)
                err.backward()
                opt.step()
                step += 1
            val = heldout()
            if val < best[0]:
                best = (val, {k: t.detach().clone() for k, t in tuned.items()})

    with torch.no_grad():
        for k, t in best[1].items():
            tuned[k].copy_(t)
        for n in names:
            d = decomposed[n]
            s, up, down = layer_params(n, True)
            d.scales = s.to(d.scales.dtype).to(d.scales.device)
            if up is not None:
                d.up, d.down = round_lowrank(up.to(d.up.device), down.to(d.down.device), d.lowrank_dtype)
            lin = block.get_submodule(n)
            lin.weight.data = d.dequantized(torch.float32).to(lin.weight.device, lin.weight.dtype)
        for n in norms:
            norm = block.get_submodule(n)
            w = g0[n] * torch.exp(tuned[f"{n}/b"]) - offsets[n]
            norm.weight.data = w.to(norm_dtype).to(norm.weight.dtype)
    return TuneResult(heldout_start=start, heldout_end=best[0], steps=step)
