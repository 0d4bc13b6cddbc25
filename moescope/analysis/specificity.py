"""Which experts belong to a domain or a language, and which experts are chosen together."""

from __future__ import annotations

import numpy as np


def group_mixes(group_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[G, ..., E] selections by group -> (each expert's mix over the groups, its layer's mix), both
    [G, ..., E]. The layer's mix is the token mix of the calibration set (every token makes top-k
    selections in every layer). An expert never selected has an all-zero mix."""
    counts = np.asarray(group_counts, dtype=np.float64)
    expert_total = counts.sum(0)
    expert = np.divide(counts, expert_total, out=np.zeros_like(counts), where=expert_total > 0)
    layer = counts.sum(-1, keepdims=True)
    return expert, np.broadcast_to(layer / np.maximum(layer.sum(0), 1), counts.shape)


def js_specificity(group_counts: np.ndarray) -> np.ndarray:
    """[..., E] Jensen-Shannon divergence (bits, 0..1) of each expert's group mix from its layer's.

    `group_counts` is [G, ..., E] (selections by domain or by language; see `group_mixes`), so an expert
    indifferent to the groups scores 0 whatever the groups' sizes. NaN for experts never selected.
    """
    p, q = group_mixes(group_counts)
    expert_total = np.asarray(group_counts).sum(0)
    m = (p + q) / 2

    def kl(a):
        return (a * np.log2(np.divide(a, m, out=np.ones_like(a), where=a > 0))).sum(0)

    return np.where(expert_total > 0, np.clip((kl(p) + kl(q)) / 2, 0, 1), np.nan)


def npmi(coactivation: np.ndarray, selections: np.ndarray, tokens: float) -> np.ndarray:
    """[..., E, E] normalised PMI of two experts being chosen for the same token: -1 never together,
    0 independent, 1 always together. The diagonal is NaN."""
    p_ij = np.asarray(coactivation, dtype=np.float32) / np.float32(tokens)  # float32: E x E per layer is large
    log_i = np.log(np.maximum(np.asarray(selections, dtype=np.float64) / tokens, 1e-300)).astype(np.float32)
    log_ij = np.log(p_ij, where=p_ij > 0, out=np.full_like(p_ij, -np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (log_ij - log_i[..., :, None] - log_i[..., None, :]) / -log_ij
    value[p_ij >= 1] = 1.0
    value[p_ij == 0] = -1.0
    value[..., np.arange(value.shape[-1]), np.arange(value.shape[-1])] = np.nan
    return value


def clusters(linked: np.ndarray) -> list[list[int]]:
    """Connected components (size >= 2) of a symmetric bool adjacency matrix [E, E]."""
    seen = np.zeros(len(linked), dtype=bool)
    found = []
    for start in np.flatnonzero(linked.any(1)):
        if seen[start]:
            continue
        component, frontier = {int(start)}, [int(start)]
        while frontier:
            new = set(np.flatnonzero(linked[frontier].any(0)).tolist()) - component
            component |= new
            frontier = list(new)
        seen[list(component)] = True
        found.append(sorted(component))
    return found
