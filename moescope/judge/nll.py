"""The comparisons every judgement is built from, each defined once: next-token negative
log-likelihood and perplexity, KL(baseline || candidate) of the next-token distributions, and top-1
agreement. KL is taken in that direction everywhere: the baseline's distribution is the reference
that the candidate is scored against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moescope.backends.hf.loading import input_device


def logits_nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window [n] from its logits [n, seq_len, vocab]
    (float64, on the CPU): any runtime's logits are scored the same way."""
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), windows[:, 1:].to(logits.device), reduction="none")
    return loss.double().sum(-1).cpu()


def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window [n] (float64, on the CPU)."""
    device = input_device(model)
    sums = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            sums.append(logits_nll(model(input_ids=batch).logits, batch))
    return torch.cat(sums)


def nll_perplexity(sums: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) from the windows' summed NLL (`window_nll`, `logits_nll`)."""
    return math.exp(float(sums.sum()) / (windows.shape[0] * (windows.shape[1] - 1)))


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `windows` [n, seq_len]."""
    return nll_perplexity(window_nll(model, windows, batch_size), windows)


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def token_kl(base_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """KL(baseline || candidate) in nats at each position [...], from log-probabilities [..., vocab]."""
    return (base_logp.exp() * (base_logp - cand_logp)).sum(-1)


def top1_matches(base_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """bool [...]: the candidate's most likely next token is the baseline's."""
    return base_logp.argmax(-1) == cand_logp.argmax(-1)
