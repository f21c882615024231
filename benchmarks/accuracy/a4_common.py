"""Shared by a4_sensitivity.py and a4_subspace_sensitivity.py: plain-transformers perplexity."""
import math

import torch


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) of `model` over the rows of `wins` [W, L], `batch` rows at a time."""
    nll, n = 0.0, 0
    for i in range(0, wins.shape[0], batch):
        out = model(wins[i:i + batch]).logits[:, :-1]
        t = wins[i:i + batch, 1:]
        nll += torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1), reduction="sum").item()
        n += t.numel()
    return math.exp(nll / n)
