"""The comparisons every judgement is built from, each defined once: next-token negative
log-likelihood and perplexity, KL(baseline || candidate) of the next-token distributions, and top-1
agreement. KL is taken in that direction everywhere: the baseline's distribution is the reference
that the candidate is scored against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window [n] (float64, on the CPU)."""
    device = next(model.parameters()).device
    sums = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            sums.append(loss.double().sum(-1).cpu())
    return torch.cat(sums)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `windows` [n, seq_len]."""
    return perplexity_from_nll(window_nll(model, windows, batch_size), windows.shape)


def perplexity_from_nll(sums: torch.Tensor, shape) -> float:
    """exp(mean next-token NLL) of windows of `shape` [n, seq_len] whose summed NLLs are `sums` [n]."""
    return math.exp(float(sums.sum()) / (shape[0] * (shape[1] - 1)))


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def token_kl(base_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """KL(baseline || candidate) in nats at each position [...], from log-probabilities [..., vocab]."""
    return (base_logp.exp() * (base_logp - cand_logp)).sum(-1)


def top1_matches(base_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """bool [...]: the candidate's most likely next token is the baseline's."""
    return base_logp.argmax(-1) == cand_logp.argmax(-1)
