"""Which experts to merge, chosen from their similarity and their usage.

Two groupings, each turning the E experts of a layer into E - round(R x E) groups:

- hc-smoe (Chen et al., ICML 2025): agglomerative clustering with average linkage on the distance
  1 - similarity; it never looks at routing, only at what the experts compute.
- m-smoe (Li et al., ICLR 2024): the most used experts lead (one group each), every other expert
  joins the leader it is most similar to.

Before averaging, `linear_assignment` lets each member's hidden neurons be matched to the first
member's (M-SMoE's permutation alignment; see moescope.compress.merge).

A group's members are listed most used first, and its weights are their usage shares (uniform when
no member was used), so the merged expert is the usage-weighted average of its members. Groups are
ordered by their first member: merged expert i is group i.
"""

from __future__ import annotations

import numpy as np

from moescope.analysis.criteria import profile_scores
from moescope.errors import MoescopeError
from moescope.plans import MergePlan

MERGE_METHODS = ("hc-smoe", "m-smoe")
USAGE = ("frequency", "gate-mass")


def average_linkage(similarity: np.ndarray, count: int) -> list[list[int]]:
    """Cluster the E experts of `similarity` [E, E] into `count` groups: repeatedly join the two
    groups with the smallest mean pairwise distance (1 - similarity); ties go to the lowest indices."""
    experts = similarity.shape[0]
    distance = 1.0 - similarity.astype(np.float64)
    np.fill_diagonal(distance, np.inf)
    sizes = np.ones(experts)
    members = [[e] for e in range(experts)]
    alive = np.ones(experts, dtype=bool)
    for _ in range(experts - count):
        a, b = sorted(np.unravel_index(int(np.argmin(distance)), distance.shape))
        # Lance-Williams for average linkage: the joined group's distance is the size-weighted mean.
        joined = (sizes[a] * distance[a] + sizes[b] * distance[b]) / (sizes[a] + sizes[b])
        distance[a], distance[:, a] = joined, joined
        distance[a, a] = np.inf
        distance[b], distance[:, b] = np.inf, np.inf
        sizes[a] += sizes[b]
        members[a] += members[b]
        alive[b] = False
    return [members[e] for e in range(experts) if alive[e]]


def leader_groups(similarity: np.ndarray, usage: np.ndarray, count: int) -> list[list[int]]:
    """M-SMoE's grouping: the `count` most used experts lead; every other joins its most similar leader."""
    order = np.argsort(-usage, kind="stable")
    leaders = [int(e) for e in order[:count]]
    groups = {leader: [leader] for leader in leaders}
    for expert in (int(e) for e in order[count:]):
        groups[leaders[int(np.argmax(similarity[expert, leaders]))]].append(expert)
    return list(groups.values())


def ordered_groups(groups: list[list[int]], usage: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    """Groups with their members most used first, ordered by that first member, and each member's usage share."""
    groups = sorted(([int(e) for e in sorted(g, key=lambda e: (-usage[e], e))] for g in groups), key=lambda g: g[0])
    weights = []
    for group in groups:
        used = np.array([max(float(usage[e]), 0.0) for e in group])
        shares = used / used.sum() if used.sum() > 0 else np.full(len(group), 1 / len(group))
        weights.append([float(w) for w in shares])
    return groups, weights


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """The permutation `perm` minimising sum_i cost[i, perm[i]] for a square cost matrix (the Hungarian
    method with potentials, O(n^3), the inner loop vectorised)."""
    n = cost.shape[0]
    cost = cost.astype(np.float64)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: the row (1-based) matched to column j; 0 = none
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        row_of[0], column = row, 0
        slack, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while row_of[column] != 0:
            used[column] = True
            current = row_of[column]
            reduced = cost[current - 1] - u[current] - v[1:]
            free = ~used[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better], way[1:][better] = reduced[better], column
            candidates = np.where(free, slack[1:], np.inf)
            nearest = int(np.argmin(candidates)) + 1
            delta = candidates[nearest - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            slack[1:][free] -= delta
            column = nearest
        while column:
            previous = way[column]
            row_of[column] = row_of[previous]
            column = previous
    perm = np.zeros(n, dtype=np.int64)
    perm[row_of[1:] - 1] = np.arange(n)
    return perm


def merged_count(experts: int, ratio: float, top_k: int, layer: int) -> int:
    """Experts left after merging round(ratio x experts) away; refuses fewer than top-k."""
    if not 0 <= ratio < 1:
        raise MoescopeError(f"--ratio {ratio} is out of range: use a value in [0, 1)")
    count = experts - int(round(ratio * experts))
    if count < top_k:
        raise MoescopeError(f"--ratio {ratio} merges layer {layer} down to {count} experts, fewer than top-k = "
                            f"{top_k}: lower the ratio")
    return count


def check_merge_ratio(profile, ratio: float) -> None:
    """Refuse a ratio that merges any layer of the profiled model below top-k, before any work is done."""
    top_k = min(layer["top_k"] for layer in profile.layers)
    for layer in profile.layers:
        merged_count(layer["num_experts"], ratio, top_k, layer["layer"])


def make_merge_plan(profile, similarity: dict[int, np.ndarray], method: str, ratio: float, *,
                    usage: str = "frequency", source: dict | None = None) -> MergePlan:
    """A merge plan from a profile (usage) and each MoE layer's expert similarity [E, E]."""
    if method not in MERGE_METHODS:
        raise MoescopeError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if usage not in USAGE:
        raise MoescopeError(f"unknown usage counter {usage!r}; choose one of {', '.join(USAGE)}")
    top_k = min(layer["top_k"] for layer in profile.layers)
    scores = profile_scores(profile, usage)
    groups, weights = {}, {}
    for row, layer in enumerate(profile.layers):
        index, experts = layer["layer"], layer["num_experts"]
        if index not in similarity or similarity[index].shape != (experts, experts):
            raise MoescopeError(f"no {experts} x {experts} expert similarity for MoE layer {index}: measure it on "
                                "the profile's model")
        count = merged_count(experts, ratio, top_k, index)
        used = scores[row, :experts]
        found = (average_linkage(similarity[index], count) if method == "hc-smoe"
                 else leader_groups(similarity[index], used, count))
        groups[index], weights[index] = ordered_groups(found, used)
    return MergePlan(model=profile.model, num_experts={x["layer"]: x["num_experts"] for x in profile.layers},
                     top_k=top_k, groups=groups, weights=weights, method=method,
                     source={"ratio": ratio, "usage": usage, "calibration_hash": profile.calibration_hash,
                             **(source or {})})
