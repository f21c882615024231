"""Exact, foldable transforms that make a model's weights easier to quantize (docs/method.md
has the derivation and every choice). Each works on one decoder block at a time, through the
block's `families.Family` (which norms feed which linears, how the norms scale):

* `fold_block_norms`: every pre-norm's scale moved into the linears that read it, leaving the
  norm at unit scale (weight 1, or 0 for Gemma's 1 + w norms); `fold_head_norm` does the same
  for the final norm and lm_head. The block computes the same function.
* `rotate_block`: one orthogonal Q applied to the residual stream: every reader of the stream
  right-multiplied by Q, every writer left-multiplied by Q^T (and the embeddings and lm_head by
  Q, outside the blocks). Exact after norm folding, because RMSNorm(h Q) = RMSNorm(h) Q at unit
  scale; refused for families with post-norms (`Family.rotation_refusal`).
* `learn_rotation`: Q learned on the Stiefel manifold (Riemannian gradient, Cayley
  retraction) to minimise the 4-bit round-to-nearest error of all the weights it touches,
  with a straight-through estimator for the rounding.
* `subspace_rotation_init`: ResQ's start for the rotation (W4A4 with an 8-bit activation
  subspace): the principal directions of the normalised residual stream in the last columns;
  `learn_rotation(..., blocks=...)` then keeps them there.
* `learn_smoothing` / `smooth_block`: a positive diagonal (the general-linear transform that
  folds exactly into the preceding pre-norm, or into the rows that feed down_proj) per group of
  layers sharing one input, learned against the calibration-weighted output error.

`fold_norms` and `rotate_residual_stream` apply the block functions to a whole transformers
model (tests and diagnostics). Nothing here runs at inference time: every transform ends up
inside stored tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from offline_quantizer.families import Family, family_for


def _scale_of(norm_weight: torch.Tensor, family: Family) -> torch.Tensor:
    """The per-channel factor a norm applies, in float64."""
    return norm_weight.detach().double() + family.norm_offset


def _unit_norm(norm: torch.nn.Module, family: Family) -> None:
    norm.weight.data.fill_(1.0 - family.norm_offset)


@torch.no_grad()
def fold_block_norms(block: torch.nn.Module, family: Family) -> None:
    """Move every pre-norm's scale into the linears that read its output; the norms become unit."""
    for group in family.pre_norms:
        norm = block.get_submodule(group.norm)
        g = _scale_of(norm.weight, family)
        for name in group.readers:
            lin = block.get_submodule(name)
            lin.weight.data = (lin.weight.data.double() * g[None, :]).to(lin.weight.dtype)
        _unit_norm(norm, family)


@torch.no_grad()
def fold_head_norm(
    norm_weight: torch.Tensor, head_weight: torch.Tensor, family: Family
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit final-norm weight, lm_head with the final norm's scale folded in): new tensors."""
    head = (head_weight.double() * _scale_of(norm_weight, family)[None, :]).to(head_weight.dtype)
    return torch.full_like(norm_weight, 1.0 - family.norm_offset), head


def rotation_refusal(family: Family) -> str | None:
    return family.rotation_refusal()


@torch.no_grad()
def rotate_block(block: torch.nn.Module, family: Family, q: torch.Tensor) -> None:
    """Readers W <- W Q, writers W <- Q^T W; call fold_block_norms first."""
    why = family.rotation_refusal()
    if why:
        raise ValueError(why)
    q = q.double().to(next(block.parameters()).device)
    for group in family.pre_norms:
        for name in group.readers:
            lin = block.get_submodule(name)
            lin.weight.data = (lin.weight.data.double() @ q).to(lin.weight.dtype)
    for name in family.writers:
        lin = block.get_submodule(name)
        lin.weight.data = (q.t() @ lin.weight.data.double()).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias.data = (lin.bias.data.double() @ q).to(lin.bias.dtype)


def _down_input_rows(block: torch.nn.Module, family: Family) -> tuple[torch.nn.Linear, slice]:
    name, which = family.down_input_rows
    lin = block.get_submodule(name)
    n = lin.weight.shape[0]
    return lin, slice(n // 2, n) if which == "second_half" else slice(0, n)


@torch.no_grad()
def smooth_block(
    block: torch.nn.Module,
    family: Family,
    hessians: dict,
    group_size: int,
    norm_dtype: torch.dtype,
    skip: frozenset = frozenset(),
    steps: int = 60,
    lr: float = 0.02,
) -> list[str]:
    """Learned diagonal GL transforms (`learn_smoothing`), folded exactly: into each pre-norm for
    its readers, into the rows feeding down_proj for down_proj. hessians: linear name -> input
    Hessian, transformed with them (X -> X diag(s)^-1). Layers in `skip` (inputs rotated online:
    a diagonal fold into the rows feeding them would act in the unrotated basis) are left alone.
    norm_dtype: the dtype the norm weights are stored in (the fold is exact for the stored value).
    Returns the names of the smoothed linears."""
    done = []
    groups = [(g.norm, g.readers) for g in family.pre_norms] + [(None, (family.writers[-1],))]
    for owner, names in groups:
        if any(n in skip or n not in hessians for n in names):
            continue
        h = hessians[names[0]]
        s = learn_smoothing([block.get_submodule(n).weight.data for n in names], h, group_size, steps, lr)
        if owner is None:  # down_proj: divide the rows that make its input
            lin, rows = _down_input_rows(block, family)
            lin.weight.data[rows] = lin.weight.data[rows] / s[:, None].to(lin.weight.dtype)
            if lin.bias is not None:
                lin.bias.data[rows] = lin.bias.data[rows] / s.to(lin.bias.dtype)
        else:
            norm = block.get_submodule(owner)
            g = _scale_of(norm.weight, family)
            stored = (g / s.double() - family.norm_offset).to(norm_dtype)  # what the checkpoint keeps
            s = (g / (stored.double() + family.norm_offset)).float()  # the exact factor it applies
            norm.weight.data = stored.to(norm.weight.dtype)
        for n in names:
            lin = block.get_submodule(n)
            lin.weight.data = lin.weight.data * s[None, :].to(lin.weight.dtype)
            hessians[n] = hessians[n] / s[:, None] / s[None, :]
        done += list(names)
    return done


def _model_family(model, family: Family | None) -> Family:
    return family or family_for(model.config)


@torch.no_grad()
def fold_norms(model, include_head: bool = True, family: Family | None = None) -> None:
    """fold_block_norms on every block of a transformers model; include_head: also the final norm
    into lm_head, which unties lm_head from the embeddings (needed by a rotation)."""
    fam = _model_family(model, family)
    for b in model.model.layers:
        fold_block_norms(b, fam)
    if not include_head:
        return
    norm, head = fold_head_norm(model.model.norm.weight.data, model.lm_head.weight.data, fam)
    model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)  # a new tensor: untied
    model.model.norm.weight.data.copy_(norm)
    model.config.tie_word_embeddings = False


@torch.no_grad()
def rotate_residual_stream(model, q: torch.Tensor, family: Family | None = None) -> None:
    """Apply Q (orthogonal [d, d]) to a whole transformers model; call `fold_norms` first."""
    fam = _model_family(model, family)
    qd = q.double()
    for lin in (model.model.embed_tokens, model.lm_head):
        lin.weight.data = (lin.weight.data.double() @ qd).to(lin.weight.dtype)
    for b in model.model.layers:
        rotate_block(b, fam, q)


def _weight(w: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    return w() if callable(w) else w


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
    readers: list,
    writers: list,
    group_size: int,
    init: str | torch.Tensor = "random",
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
    readers and writers may be tensors or callables returning them (weights read lazily from disk).

    init: "random", "identity" or a starting Q [d, d]. blocks (sizes summing to d): keep the
    span of each block of Q's columns fixed, i.e. move only within O(b1) x O(b2) x ... (the
    ResQ subspaces of `subspace_rotation_init`): the step is taken in Q's own coordinates,
    Q <- Q (I + lr/2 A')^-1 (I - lr/2 A') with A' = Q^T A Q masked to its diagonal blocks."""
    first = _weight(readers[0])
    d = first.shape[1]
    dev = torch.device(device) if device is not None else first.device
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
    norms = [float(_weight(w).float().pow(2).sum()) * len(terms) for w, _ in terms]
    eye = torch.eye(d, device=dev)
    history: list[float] = []
    best = (math.inf, q.clone())
    for step in tqdm(range(steps + 1), desc="learning rotation (Stiefel)", unit="step", leave=False):
        qv = q.clone().requires_grad_(True)
        loss, grad = 0.0, torch.zeros_like(q)
        for (w, writer), n in zip(terms, norms):
            w = _weight(w).to(dev, torch.float32)
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

    best = (math.inf, torch.zeros_like(a))
    for step in range(steps + 1):  # every point is evaluated once: the start and after each step
        loss = objective(a)
        if float(loss) < best[0]:
            best = (float(loss), a.detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    av = best[1]
    return torch.exp(av - av.mean()).detach()
