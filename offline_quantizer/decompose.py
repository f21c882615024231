"""The decomposition math: W ~= U @ D + deq(R), one linear layer at a time.

Everything here is pure torch on one weight matrix and its calibration statistics; the
model walk lives in `quantize.py`, the storage layout in `vllm_twinquant/format.py`.

* low-rank part: truncated SVD of W, optionally activation-weighted (LQER / SVDQuant
  style, diag scaling by the RMS of each input channel) or weighted by the full
  calibration Hessian (the split that minimises ||(W - L) X^T||_F for the stored rank);
  both factors are rounded to the stored low-rank dtype (bf16/fp16, or int8 with a scale per
  row: `format.round_lowrank`) before the residual is formed, so the residual absorbs their
  rounding error.
* residual: 4-bit symmetric group quantization of R = W - U @ D, either round-to-nearest
  or GPTQ (Frantar et al. 2022) with the calibration Hessian H = 2/n sum x x^T.

rank 0 gives plain RTN / GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_twinquant.format import residual_quant_args, round_lowrank

QMIN, QMAX = -8, 7


@dataclass
class Decomposed:
    codes: torch.Tensor  # int8 [N, K] in [-8, 7]
    scales: torch.Tensor  # scale_dtype [N, K/G]
    down: torch.Tensor | None  # [r, K] as stored: in lowrank_dtype, or float32 on the int8 grid
    up: torch.Tensor | None  # [N, r] likewise
    lowrank_dtype: torch.dtype | None = None  # the stored dtype of both factors (None: rank 0)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The effective weight U @ D + deq(R) that the served layer applies."""
        w = group_dequantize(self.codes.to(dtype), self.scales.to(dtype))
        if self.down is not None:
            w = w + self.up.to(dtype) @ self.down.to(dtype)
        return w


class ServedLinear(torch.nn.Module):
    """A decomposed layer as the plugin's torch path serves it, in float32:
    y = Q_a(x') deq(R)^T + (x' D^T) U^T + b, with x' = x H for layers whose input is rotated
    online (W4A4) and Q_a the per-token activation quantizer (format.quantize_activations) when
    activation_bits < 16 (W4A8, W4A4), over `shards` equal parts of the input columns (tensor-parallel
    ranks of a row-parallel layer; 1 otherwise). The quantizer runs its streams and its end-to-end check
    through it."""

    def __init__(self, d: Decomposed, bias: torch.Tensor | None, hadamard: bool = False, activation_bits: int = 16,
                 activation_clip: float = 1.0, subspace: int = 0, subspace_bits: int = 8, activation_type: str = "int",
                 shards: int = 1):
        super().__init__()
        self.register_buffer("weight_r", group_dequantize(d.codes.float(), d.scales.float()), persistent=False)
        self.register_buffer("up", d.up.float() if d.up is not None else None, persistent=False)
        self.register_buffer("down", d.down.float() if d.down is not None else None, persistent=False)
        self.register_buffer("bias", bias.float() if bias is not None else None, persistent=False)
        self.hadamard, self.bits, self.clip, self.kind = hadamard, activation_bits, activation_clip, activation_type
        self.subspace, self.subspace_bits, self.shards = subspace, subspace_bits, shards
        self.in_features, self.out_features = self.weight_r.shape[1], self.weight_r.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from vllm_twinquant.format import apply_online_hadamard, quantize_activations

        x = x.float()
        if self.hadamard:
            x = apply_online_hadamard(x)
        xr = x
        if self.bits < 16:
            xr = quantize_activations(x, self.bits, self.clip, self.subspace, self.subspace_bits, self.kind,
                                      self.shards)
        y = xr @ self.weight_r.t()
        if self.up is not None:
            y = y + (x @ self.down.t()) @ self.up.t()
        return y if self.bias is None else y + self.bias


def group_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """deq(R)[n, k] = codes[n, k] * scales[n, k // G] (both already in the result dtype)."""
    n, k = codes.shape
    return (codes.view(n, scales.shape[1], -1) * scales[:, :, None]).view(n, k)


def group_scales(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scales per (row, group), compressed-tensors' convention (max|w| / 7.5),
    rounded to the stored dtype so that codes are chosen against the scales served."""
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    scale, _ = calculate_qparams(g.amin(dim=2), g.amax(dim=2), residual_quant_args(group_size))
    # a tiny floor keeps fp16 scales finite and non-zero for all-zero groups
    return scale.clamp_min(1e-8).to(scale_dtype)


def quantize_rtn(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit symmetric group quantization: (codes int8, scales)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    scales = group_scales(w, group_size, scale_dtype)
    zp = torch.zeros_like(scales, dtype=torch.int8)
    codes = quantize(w.float(), scales.float(), zp, residual_quant_args(group_size), dtype=torch.int8)
    return codes, scales


def quantize_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with per-group scales chosen as the sweep reaches each group (no act-order).

    Columns are quantized left to right; each rounding error is spread over the columns
    not yet quantized through the inverse Hessian's Cholesky factor."""
    w = w.detach().float().clone()
    n, k = w.shape
    if block_size % group_size:
        block_size = group_size * max(1, block_size // group_size)
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = _upper_cholesky_of_inverse(h)

    codes = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # groups never straddle blocks (block_size % G == 0)
                s = group_scales(w1[:, i : i + group_size], group_size, scale_dtype)
                scales[:, col // group_size] = s[:, 0]
                sf = s[:, 0].float()
            x = w1[:, i]
            q = torch.clamp(torch.round(x / sf), QMIN, QMAX)
            codes[:, col] = q.to(torch.int8)
            e = (x - q * sf) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is numerically PD."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        extra = max(extra * 10, 1e-2 * float(torch.mean(torch.diag(h))))
    raise RuntimeError("calibration Hessian is not positive definite even after damping")


def top_singular_triplets(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `rank` largest singular triplets (U_r, S_r, V_r^T) of `a`, float32.

    Through the eigendecomposition of the smaller Gram matrix in float64 instead of a full SVD
    (1024 x 3584 on a 2-core CPU: 0.36 s vs 1.40 s). float64 keeps the top singular values within
    ~1e-6 of the largest one (squaring the spectrum only hurts the smallest ones, never kept)."""
    a64 = a.double()
    wide = a64.shape[0] <= a64.shape[1]
    g = a64 @ a64.t() if wide else a64.t() @ a64
    r = min(rank, g.shape[0])
    evals, evecs = torch.linalg.eigh(g)  # ascending
    sv = evals.flip(0)[:r].clamp_min(0).sqrt()
    vecs = evecs.flip(1)[:, :r]
    inv = torch.where(sv > 0, 1.0 / sv.clamp_min(1e-300), torch.zeros_like(sv))
    if wide:  # vecs are left singular vectors; V_r^T = S_r^-1 U_r^T A
        u, vh = vecs, (vecs.t() @ a64) * inv[:, None]
    else:  # vecs are right singular vectors; U_r = A V_r S_r^-1
        u, vh = (a64 @ vecs) * inv[None, :], vecs.t()
    return u.float(), sv.float(), vh.float()


def lowrank_split(
    w: torch.Tensor,
    rank: int,
    lowrank_dtype: torch.dtype,
    hessian: torch.Tensor | None = None,
    weighting: str = "diag",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD split W ~= U @ D with U = U_r S_r^1/2, D = S_r^1/2 V_r^T T^-1.

    weighting: "none" (T = I), "diag" (T = diag(rms of each input channel), LQER /
    SVDQuant-like), "hessian" (T = Cholesky factor of H: optimal for output error)."""
    w = w.detach().float()
    k = w.shape[1]
    if weighting == "none" or hessian is None:
        t = t_inv = None
    elif weighting == "diag":
        s = torch.sqrt(torch.diag(hessian).float().clamp_min(1e-8))
        s = s / s.mean()
        t, t_inv = torch.diag(s), torch.diag(1.0 / s)
    elif weighting == "hessian":
        h = hessian.float() + 1e-2 * torch.mean(torch.diag(hessian.float())) * torch.eye(k, device=w.device)
        t = torch.linalg.cholesky(h)  # H = T T^T, ||(W-L)X^T||^2 ~ ||(W-L) T||^2
        t_inv = torch.linalg.inv(t)
    else:
        raise ValueError(f"--lowrank-weighting {weighting!r}: expected none, diag or hessian")
    a = w if t is None else w @ t
    u, sv, vh = top_singular_triplets(a, rank)
    root = torch.sqrt(sv)
    up = u * root[None, :]
    down = root[:, None] * vh
    if t_inv is not None:
        down = down @ t_inv
    return round_lowrank(up, down, lowrank_dtype)


def decompose(
    w: torch.Tensor,
    rank: int,
    group_size: int,
    scale_dtype: torch.dtype,
    lowrank_dtype: torch.dtype,
    hessian: torch.Tensor | None = None,
    residual: str = "gptq",
    weighting: str = "diag",
) -> Decomposed:
    """Split one weight into a low-rank part and a 4-bit residual (the SVD baseline)."""
    w = w.detach().float()
    up = down = None
    r = w
    if rank > 0:
        up, down = lowrank_split(w, rank, lowrank_dtype, hessian, weighting)
        r = w - up.float() @ down.float()
    if residual == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs a calibration Hessian")
        codes, scales = quantize_gptq(r, hessian, group_size, scale_dtype)
    elif residual == "rtn":
        codes, scales = quantize_rtn(r, group_size, scale_dtype)
    else:
        raise ValueError(f"--residual {residual!r}: expected gptq or rtn")
    return Decomposed(codes=codes, scales=scales, down=down, up=up, lowrank_dtype=lowrank_dtype if rank else None)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T) for E = w_hat - w: the calibration output error of the served weight."""
    e = (w_hat.float() - w.float())
    return float(torch.sum((e @ hessian.float()) * e))


def decompose_refined(
    w: torch.Tensor,
    rank: int,
    group_size: int,
    scale_dtype: torch.dtype,
    lowrank_dtype: torch.dtype,
    hessian: torch.Tensor,
    iters: int = 3,
) -> tuple[Decomposed, list[float]]:
    """The post-quantization split (TwinQuant): alternate
      R-step: R_hat = GPTQ(W - L)                             (residual given the low-rank part)
      L-step: L = argmin_{rank r} ||(W - R_hat - L) X^T||_F   (low-rank part given the residual)
    starting from the Hessian-weighted SVD split. The L-step is exact: with H = T T^T it is the
    truncated SVD of (W - R_hat) T mapped back by T^-1, i.e. the optimum over the Stiefel
    manifold of input subspaces V (D = S^1/2 V^T T^-1) and the free factor U, so no gradient
    steps are needed there. Each iterate is scored by the output error of the weight actually
    served (factors rounded to their dtype, residual quantized) and the best is kept, so the
    result is never worse than the SVD split (iteration 0). Returns it and the error per iterate."""
    w = w.detach().float()
    if rank == 0:
        codes, scales = quantize_gptq(w, hessian, group_size, scale_dtype)
        d = Decomposed(codes, scales, None, None)
        return d, [output_error(w, d.dequantized(), hessian)]
    up, down = lowrank_split(w, rank, lowrank_dtype, hessian, "hessian")
    best, errs = None, []
    for it in range(iters + 1):
        codes, scales = quantize_gptq(w - up.float() @ down.float(), hessian, group_size, scale_dtype)
        d = Decomposed(codes, scales, down, up, lowrank_dtype)
        w_hat = d.dequantized()
        err = output_error(w, w_hat, hessian)
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, d)
        if it == iters:
            break
        r_hat = w_hat - up.float() @ down.float()
        up, down = lowrank_split(w - r_hat, rank, lowrank_dtype, hessian, "hessian")
    return best[1], errs


def attention_mixed_gram(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scaling: float | None = None,
                         window: int | None = None, softcap: float | None = None) -> tuple[torch.Tensor, int]:
    """Σ_h Σ_i z_i z_iᵀ with z_i = Σ_j a^h_ij x_j: the calibration statistic of v_proj in the
    metric of the attention output (`--attention-aware`, docs/method.md section 5).

    A value projection's error ΔW reaches head h's output as Σ_j a_ij ΔW x_j = ΔW z_i, so the
    output error is tr(ΔW (Σ_i z_i z_iᵀ) ΔWᵀ): the inputs mixed by the attention probabilities,
    not the raw inputs, are what GPTQ and the split must be exact on. Tokens that many queries
    attend to (the first token of a window, an "attention sink") weigh in accordingly.
    x: [B, T, K] the input of v_proj; q: [B, H, T, d] and k: [B, Hkv, T, d] after the rotary
    embedding. Causal attention without padding (calibration windows), scores scaled by `scaling`
    (default d^-0.5), soft-capped as c tanh(s / c) with `softcap`, and limited to the last
    `window` keys with a sliding window. Returns the Gram matrix summed over heads and the
    number of (query, head) pairs it sums."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    k = k.repeat_interleave(h // kv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (d**-0.5 if scaling is None else scaling)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if window:
        causal &= ~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(-window)
    a = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # [B, H, T, T]
    z = a @ x.float()[:, None]  # [B, H, T, K]
    z = z.reshape(-1, x.shape[-1])
    return z.t() @ z, z.shape[0]
