"""Exact, foldable transforms of a Llama-family model that make its weights easier to
quantize (docs/method.md has the derivation and every choice).

* `fold_norms`: RMSNorm weights moved into the linears that read them (q/k/v, gate/up,
  lm_head); the norms become all-ones. The model computes the same function.
* `rotate_residual_stream`: one orthogonal Q (576x576 for SmolLM2) applied to the residual
  stream: embeddings and every reader (q/k/v, gate/up, lm_head) right-multiplied by Q, every
  writer (o_proj, down_proj) left-multiplied by Q^T. Exact after `fold_norms`, because
  RMSNorm(h Q) = RMSNorm(h) Q for unit norm weights.
* `learn_rotation`: Q learned on the Stiefel manifold (Riemannian gradient, Cayley
  retraction) to minimise the 4-bit round-to-nearest error of all the weights it touches,
  with a straight-through estimator for the rounding.
* `residual_stream_covariance`, `subspace_rotation_init`: ResQ's start for the rotation (W4A4
  with an 8-bit activation subspace): the principal directions of the normalised residual
  stream in the last columns; `learn_rotation(..., blocks=...)` then keeps them there.
* `learn_smoothing`: a positive diagonal (the general-linear transform that can be folded
  exactly into the preceding norm or up_proj) per group of layers sharing one input, learned
  with the same estimator against the calibration-weighted output error.

Nothing here is executed at inference time: every transform ends up inside stored tensors.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def check_llama_like(model) -> None:
    inner = getattr(model, "model", None)
    ok = inner is not None and hasattr(inner, "layers") and hasattr(inner, "norm") and hasattr(inner, "embed_tokens")
    if ok:
        b = inner.layers[0]
        ok = all(hasattr(b, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))
        ok = ok and all(_has(b, p) for p in READERS + WRITERS)
    if not ok:
        raise SystemExit(
            f"{type(model).__name__}: --rotation/--smoothing need a Llama-family layout "
            "(model.layers[i].{input_layernorm,post_attention_layernorm,self_attn.{q,k,v,o}_proj,"
            "mlp.{gate,up,down}_proj}, model.norm, model.embed_tokens); use --recipe svd for this model"
        )
    if any(b.get_submodule(p).bias is not None for b in inner.layers for p in WRITERS):
        raise SystemExit(f"{type(model).__name__}: o_proj/down_proj with a bias are not supported by --rotation")


def _has(b, path):
    try:
        b.get_submodule(path)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def fold_norms(model, include_head: bool = True) -> None:
    """Move every RMSNorm weight into the linears that read its output. include_head: also the
    final norm into lm_head, which unties lm_head from the embeddings (needed by a rotation)."""
    inner = model.model
    for b in inner.layers:
        for norm, readers in ((b.input_layernorm, READERS[:3]), (b.post_attention_layernorm, READERS[3:])):
            g = norm.weight.data.double()
            for p in readers:
                lin = b.get_submodule(p)
                lin.weight.data = (lin.weight.data.double() * g[None, :]).to(lin.weight.dtype)
            norm.weight.data.fill_(1.0)
    if not include_head:
        return
    head = model.lm_head
    g = inner.norm.weight.data.double()
    w = head.weight.data.double().clone()  # a copy: a tied lm_head must not change the embeddings
    head.weight = torch.nn.Parameter((w * g[None, :]).to(head.weight.dtype), requires_grad=False)
    inner.norm.weight.data.fill_(1.0)
    model.config.tie_word_embeddings = False


def rotation_targets(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(reader weights [N, d], writer weights [d, K]) of the residual stream, fp32 copies."""
    readers, writers = [], []
    for b in model.model.layers:
        readers += [b.get_submodule(p).weight.data.float() for p in READERS]
        writers += [b.get_submodule(p).weight.data.float() for p in WRITERS]
    return readers, writers


@torch.no_grad()
def rotate_residual_stream(model, q: torch.Tensor) -> None:
    """Apply Q (orthogonal [d, d]) to the residual stream; call `fold_norms` first."""
    q = q.double()
    emb = model.model.embed_tokens
    emb.weight.data = (emb.weight.data.double() @ q).to(emb.weight.dtype)
    head = model.lm_head
    head.weight.data = (head.weight.data.double() @ q).to(head.weight.dtype)
    for b in model.model.layers:
        for p in READERS:
            lin = b.get_submodule(p)
            lin.weight.data = (lin.weight.data.double() @ q).to(lin.weight.dtype)
        for p in WRITERS:
            lin = b.get_submodule(p)
            lin.weight.data = (q.t() @ lin.weight.data.double()).to(lin.weight.dtype)


def _ste_rtn_residual(w: torch.Tensor, group: int) -> torch.Tensor:
    """RTN4(w) - w (4-bit symmetric groups along the input, scales max|w|/7.5), with round()
    passed straight through so that gradients reach w and whatever w came from."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    s = (g.abs().amax(dim=2, keepdim=True) / 7.5).clamp_min(1e-8)
    x = g / s
    q = torch.clamp(x + (torch.round(x) - x).detach(), -8, 7)
    return ((q - x) * s).reshape(n, k)


def _ste_rtn_error(w: torch.Tensor, group: int) -> torch.Tensor:
    """||RTN4(w) - w||^2, straight-through."""
    return _ste_rtn_residual(w, group).pow(2).sum()


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


@torch.enable_grad()
def learn_rotation(
    readers: list[torch.Tensor],
    writers: list[torch.Tensor],
    group_size: int,
    init: "str | torch.Tensor" = "random",
    steps: int = 100,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device | None = None,
    blocks: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Q on the Stiefel manifold O(d) minimising the relative 4-bit RTN error of every reader
    (W Q, groups along its input) and writer (Q^T W, rows mixed, groups along its own input).

    Riemannian SGD with the Cayley retraction (Wen & Yin 2013, as in SpinQuant): the Euclidean
    gradient G is projected to the skew generator A = G Q^T - Q G^T, and
    Q <- (I + lr/2 A)^-1 (I - lr/2 A) Q, which stays exactly orthogonal. The step is normalised
    by ||A|| so that lr is an angle; it decays by cosine to 0. Returns Q (on the CPU) and the loss
    per step (step 0 = the initial point); the best Q seen is returned.

    device: where the products run (default: that of the weights). The loss and its gradient are
    accumulated one matrix at a time, each weight moved to `device` for its term, so the memory
    beyond the weights is that of one matrix's term (an 8B model's 224 matrices need not fit at once).

    init: "random", "identity" or a starting Q [d, d]. blocks (sizes summing to d): keep the
    span of each block of Q's columns fixed, i.e. move only within O(b1) x O(b2) x ... (the
    ResQ subspaces of `subspace_rotation_init`): the step is taken in Q's own coordinates,
    Q <- Q (I + lr/2 A')^-1 (I - lr/2 A') with A' = Q^T A Q masked to its diagonal blocks."""
    d = readers[0].shape[1]
    dev = torch.device(device) if device is not None else readers[0].device
    if isinstance(init, torch.Tensor):
        q = init.float().to(dev)
    else:
        q = (random_orthogonal(d, seed).float() if init == "random" else torch.eye(d)).to(dev)
    mask = None
    if blocks is not None:
        if sum(blocks) != d or min(blocks) < 1:
            raise ValueError(f"rotation blocks {blocks} do not partition {d} dimensions")
        mask = torch.block_diag(*[torch.ones(b, b) for b in blocks]).to(dev)
    terms = [(w, False) for w in readers] + [(w, True) for w in writers]
    norms = [float(w.pow(2).sum()) * len(terms) for w, _ in terms]
    eye = torch.eye(d, device=dev)
    history: list[float] = []
    best = (math.inf, q.clone())
    for step in tqdm(range(steps + 1), desc="learning rotation (Stiefel)", unit="step", leave=False):
        qv = q.clone().requires_grad_(True)
        loss, grad = 0.0, torch.zeros_like(q)
        for (w, writer), n in zip(terms, norms):
            w = w.to(dev)
            term = _ste_rtn_error(qv.t() @ w if writer else w @ qv, group_size) / n
            if step < steps:
                grad += torch.autograd.grad(term, qv)[0]
            loss += float(term.detach())
        history.append(loss)
        if history[-1] < best[0]:
            best = (history[-1], q.clone())
        if step == steps:
            break
        eta = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if mask is None:
            a = grad @ q.t() - q @ grad.t()
            a = a / a.norm().clamp_min(1e-12)
            q = torch.linalg.solve(eye + 0.5 * eta * a, (eye - 0.5 * eta * a) @ q)
        else:
            a = (q.t() @ grad - grad.t() @ q) * mask
            a = a / a.norm().clamp_min(1e-12)
            q = q @ torch.linalg.solve(eye + 0.5 * eta * a, eye - 0.5 * eta * a)
    return best[1].cpu(), history


@torch.no_grad()
def residual_stream_covariance(model, batches, device: str = "cpu") -> torch.Tensor:
    """sum over tokens and blocks of x^T x, x the inputs of q_proj and gate_proj (the normalised
    residual stream every reader sees; call `fold_norms` first so that the norms are all ones
    and every token has the same weight), float64 [d, d]. The parameters run on `device` in
    float32 and go back to the CPU in their own dtypes (lossless from bf16/fp16); buffers
    (rotary frequencies) travel in theirs."""
    d = model.config.hidden_size
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)

    def hook(_m, args):
        x = args[0].reshape(-1, d).double()
        cov.addmm_(x.t(), x)

    hooks = [b.get_submodule(p).register_forward_pre_hook(hook)
             for b in model.model.layers for p in (READERS[0], READERS[3])]
    dtypes = {n: p.dtype for n, p in model.named_parameters()}  # parameters only: buffers keep theirs
    for p in model.parameters():
        p.data = p.data.to(device, torch.float32)
    for b in model.buffers():
        b.data = b.data.to(device)
    try:
        for b in tqdm(batches, desc="residual-stream covariance", unit="batch", leave=False):
            model.model(input_ids=b.to(device), use_cache=False)  # the decoder only: no lm_head
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.data = p.data.to("cpu", dtypes[n])
        for b in model.buffers():
            b.data = b.data.to("cpu")
    return cov.cpu()


def subspace_rotation_init(cov: torch.Tensor, channels: int, seed: int) -> tuple[torch.Tensor, float]:
    """ResQ's residual-stream rotation: Q = U blockdiag(R_l, R_h), U the eigenvectors of `cov`
    in ascending order (so the top `channels` principal directions come last) and R_l, R_h
    random orthogonal matrices that flatten each subspace (seeded). x Q then holds the
    high-variance part of x in its last `channels` coordinates. Returns Q and the share of the
    energy (trace of `cov`) that those directions hold."""
    d = cov.shape[0]
    if not 0 < channels < d:
        raise ValueError(f"activation subspace of {channels} channels in a {d}-wide residual stream")
    ev, u = torch.linalg.eigh(cov.double())
    mix = torch.block_diag(random_orthogonal(d - channels, seed), random_orthogonal(channels, seed + 1))
    return u @ mix, float(ev[-channels:].sum() / ev.sum())


@torch.enable_grad()
def learn_smoothing(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    group_size: int,
    steps: int = 60,
    lr: float = 0.02,
) -> torch.Tensor:
    """Positive per-input-channel factors s (a diagonal element of GL(K)) for layers that share
    one input X: they store W diag(s) and see X diag(s)^-1. Minimises
    sum_W tr(E H E^T) / tr(W H W^T), E = (RTN(W diag(s)) - W diag(s)) diag(s)^-1, with s = exp(a)
    (always positive, so always invertible) by Adam from a = 0 (s = 1), straight-through
    rounding; s is renormalised to geometric mean 1. Returns s = 1 if nothing improves."""
    h = hessian.float()
    ws = [w.float() for w in weights]
    den = [abs(float(torch.sum((w @ h) * w))) + 1e-30 for w in ws]
    a = torch.zeros(h.shape[0], device=h.device, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)

    def objective(av):
        s = torch.exp(av - av.mean())
        tot = 0.0
        for w, dn in zip(ws, den):
            e = _ste_rtn_residual(w * s[None, :], group_size) / s[None, :]
            tot = tot + torch.sum((e @ h) * e) / dn
        return tot / len(ws)

    with torch.no_grad():
        best = (float(objective(a)), torch.zeros_like(a))
    for _ in range(steps):
        opt.zero_grad()
        loss = objective(a)
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = float(objective(a))
            if val < best[0]:
                best = (val, a.detach().clone())
    av = best[1]
    return torch.exp(av - av.mean()).detach()
